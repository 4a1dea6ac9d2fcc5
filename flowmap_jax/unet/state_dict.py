"""In-memory conversion: diffusers state dict <-> Flax UNet parameter tree (numpy both sides, no torch)."""

from __future__ import annotations

import numpy as np

from flowmap_jax.unet import UNetConfig, abstract_unet_params
from flowmap_jax.unet.key_map import (
    expected_key_map,
    flax_path_to_torch_key,
    flax_to_torch_layout,
    torch_to_flax_layout,
)


class ConversionError(ValueError):
    """A state dict and a config disagree; the message lists every offending key."""


def _as_config(config) -> UNetConfig:
    return config if isinstance(config, UNetConfig) else UNetConfig.from_dict(dict(config))


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def check_keys(state_shapes: dict[str, tuple], config, source: str = "state dict") -> dict:
    """Compares {key: shape} with what `config` needs; raises one ConversionError listing every problem.

    Returns the expected map {diffusers key: (flax path, diffusers shape)}.
    """
    expected = expected_key_map(abstract_unet_params(_as_config(config)))
    missing = sorted(set(expected) - set(state_shapes))
    unexpected = sorted(set(state_shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_shapes) if tuple(state_shapes[k]) != expected[k][1])
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the UNet config:"]
        lines += [f"  missing key {k} (expected shape {expected[k][1]})" for k in missing]
        lines += [f"  unexpected key {k} (shape {tuple(state_shapes[k])})" for k in unexpected]
        lines += [f"  wrong shape for {k}: got {tuple(state_shapes[k])}, expected {expected[k][1]}" for k in wrong]
        raise ConversionError("\n".join(lines))
    return expected


def state_dict_to_flax(state_dict: dict, config, dtype=None, source: str = "state dict") -> dict:
    """diffusers state dict {key: array or torch tensor} -> nested Flax param dict of numpy arrays.

    `dtype` (e.g. np.float32) casts every tensor; None keeps the stored dtype (bit-exact round trips).
    Errors list every missing, unexpected or wrong-shape key with both shapes.
    """
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    expected = check_keys({k: v.shape for k, v in arrays.items()}, config, source)
    params: dict = {}
    for key, (path, _) in expected.items():
        array = torch_to_flax_layout(arrays[key], path[-1])
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        node = params
        for segment in path[:-1]:
            node = node.setdefault(segment, {})
        node[path[-1]] = array
    return params


def flax_to_state_dict(params, config=None) -> dict[str, np.ndarray]:
    """Nested Flax params -> {diffusers key: C-contiguous numpy array}. With `config`, keys are checked."""
    out = {}

    def walk(tree, prefix):
        for name, value in tree.items():
            if hasattr(value, "items"):
                walk(value, prefix + (name,))
            else:
                path = prefix + (name,)
                out[flax_path_to_torch_key(path)] = flax_to_torch_layout(np.asarray(value), path[-1])

    walk(params, ())
    if config is not None:
        check_keys({k: v.shape for k, v in out.items()}, config, "Flax params")
    return out
