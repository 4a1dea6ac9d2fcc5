"""The Flax UNet port walked side by side with diffusers' UNet2DConditionModel, module by module: every
GroupNorm's group count and epsilon, every LayerNorm's epsilon, every attention's head count, scale and
upcast flag must be diffusers' own (read from the live torch modules).

The parity tests compare outputs to ~1e-5, which a slightly wrong epsilon passes (a transformer GroupNorm
eps of 1e-5 instead of 1e-6 moves the output by ~1e-5); this test reads the settings themselves. The Flax
side is traced abstractly (`jax.eval_shape` of `init`): no compilation, no weights.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention

from flowmap_jax.spec.layout import nchw_to_nhwc
from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig
from flowmap_jax.unet import attention as flax_attention
from flowmap_jax.unet.resnet import GroupNorm
from tests.test_unet_parity import CONFIGS, make_inputs

STRUCTURE_CONFIGS = {
    "sd1": CONFIGS["sd1"],  # conv projections, one head count
    "sd2": CONFIGS["sd2"],  # linear projections, per-block heads, upcast attention
    "sdxl": CONFIGS["sdxl"],  # linear projections, per-block heads, 1-3 transformer layers per block
    "misc_b": CONFIGS["misc_b"],  # only cross-attention, nested transformer depths, no mid block
    "norm_eps": dict(CONFIGS["diffusers_tiny_2"], norm_eps=1e-3, norm_num_groups=16),  # resnets' eps != others'
}


def _flax_name(torch_name: str) -> str:
    """diffusers module name -> Flax module path: list indices joined by '_' ('attentions.0' -> 'attentions_0')."""
    return re.sub(r"\.(\d+)", r"_\1", torch_name).replace(".", "/")


def torch_structure(unet) -> dict:
    """{Flax-style path: settings} of every norm and attention of a diffusers UNet."""
    found = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            found[_flax_name(name)] = ("group_norm", module.num_groups, module.eps)
        elif isinstance(module, torch.nn.LayerNorm):
            found[_flax_name(name)] = ("layer_norm", module.eps)
        elif isinstance(module, TorchAttention):
            found[_flax_name(name)] = ("attention", module.heads, module.scale, bool(module.upcast_attention))
    return found


def flax_structure(config: dict, monkeypatch) -> dict:
    """{path: settings} of every norm and attention the Flax port calls when initialised on `config`."""
    model = FlaxUNet2DConditionModel(UNetConfig.from_dict(config))
    found, stack, scales = {}, [], {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        path = "/".join(module.path)
        if isinstance(module, (GroupNorm, nn.GroupNorm)):
            found[path] = ("group_norm", module.num_groups, module.epsilon)
        elif isinstance(module, nn.LayerNorm):
            found[path] = ("layer_norm", module.epsilon)
        elif isinstance(module, flax_attention.Attention):
            found[path] = ("attention", module.heads, None, bool(module.upcast_attention))
        stack.append(path)
        try:
            return next_fun(*args, **kwargs)
        finally:
            stack.pop()

    real_attention = flax_attention.dot_product_attention

    def recording_attention(q, k, v, scale=None, **kwargs):
        scales[stack[-1]] = scale
        return real_attention(q, k, v, scale=scale, **kwargs)

    monkeypatch.setattr(flax_attention, "dot_product_attention", recording_attention)
    x, kwargs = make_inputs(config, np.random.default_rng(0), batch=1, height=8, width=8, seq_len=3)
    extra = {k: v for k, v in kwargs.items() if k != "context"}
    if "added_cond_kwargs" in extra:
        extra["added_cond_kwargs"] = {k: jnp.asarray(v) for k, v in extra["added_cond_kwargs"].items()}
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(nchw_to_nhwc(x)), jnp.asarray([10.0]),
                                          encoder_hidden_states=jnp.asarray(kwargs["context"]), **extra))
    for path, scale in scales.items():
        kind, heads, _, upcast = found[path]
        found[path] = (kind, heads, scale, upcast)
    return found


@pytest.mark.parametrize("name", sorted(STRUCTURE_CONFIGS))
def test_every_norm_and_attention_has_diffusers_settings(name, monkeypatch):
    config = STRUCTURE_CONFIGS[name]
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    reference = torch_structure(UNet2DConditionModel(**config))
    ours = flax_structure(dict(UNet2DConditionModel(**config).config), monkeypatch)
    assert sorted(ours) == sorted(reference), (sorted(set(ours) ^ set(reference)))
    kinds = {v[0] for v in reference.values()}
    assert kinds == {"group_norm", "layer_norm", "attention"}, kinds
    for path, expected in reference.items():
        got = ours[path]
        assert got[0] == expected[0], path
        if expected[0] == "attention":
            assert got[1] == expected[1] and got[3] == expected[3], (path, got, expected)
            assert got[2] is not None and math.isclose(got[2], expected[2], rel_tol=1e-12), (path, got, expected)
        else:  # group count and epsilon, exactly
            assert got == expected, (path, got, expected)
