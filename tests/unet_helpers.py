"""Shared helpers for the UNet parity tests: build a diffusers UNet, convert it, run both backends."""

import numpy as np
import torch

from conversion import state_dict_to_flax
from flowmap_jax.spec.layout import nchw_to_nhwc, nhwc_to_nchw


def make_torch_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DConditionModel with seeded random weights, every parameter perturbed.

    diffusers zero-initialises nothing here, but some inits are tiny or constant (norm scales=1,
    biases=0): perturbing all of them makes the parity test sensitive to every mapped tensor.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return unet


def convert(unet, config: dict):
    state = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    return state_dict_to_flax(state, config)


def run_both(unet, flax_model, params, sample_nchw, timesteps, context=None, class_labels=None,
             timestep_cond=None, added_cond_kwargs=None):
    """Runs diffusers (NCHW) and the Flax port (NHWC) on the same inputs; returns both as NCHW numpy."""
    import jax.numpy as jnp

    with torch.no_grad():
        torch_kwargs = {}
        if class_labels is not None:
            torch_kwargs["class_labels"] = torch.as_tensor(class_labels)
        if timestep_cond is not None:
            torch_kwargs["timestep_cond"] = torch.as_tensor(timestep_cond)
        if added_cond_kwargs is not None:
            torch_kwargs["added_cond_kwargs"] = {k: torch.as_tensor(v) for k, v in added_cond_kwargs.items()}
        t_torch = torch.as_tensor(timesteps) if isinstance(timesteps, np.ndarray) else timesteps
        ref = unet(torch.as_tensor(sample_nchw), t_torch,
                   encoder_hidden_states=None if context is None else torch.as_tensor(context),
                   **torch_kwargs).sample.numpy()
    out = jitted_apply(flax_model)(
        params, jnp.asarray(nchw_to_nhwc(sample_nchw)), timesteps,
        encoder_hidden_states=None if context is None else jnp.asarray(context),
        class_labels=None if class_labels is None else jnp.asarray(class_labels),
        timestep_cond=None if timestep_cond is None else jnp.asarray(timestep_cond),
        added_cond_kwargs=None if added_cond_kwargs is None else {k: jnp.asarray(v) for k, v in added_cond_kwargs.items()},
    )
    return ref, nhwc_to_nchw(np.asarray(out))


_JITTED = {}


def jitted_apply(flax_model):
    """One jitted `apply` per model (compiled once per input shape): eager Flax is far slower."""
    import jax

    key = id(flax_model)
    if key not in _JITTED:
        fn = jax.jit(lambda params, *args, **kwargs: flax_model.apply({"params": params}, *args, **kwargs))
        _JITTED[key] = (flax_model, fn)  # keeps the model alive, so its id stays unique
    return _JITTED[key][1]


def rel_error(ref, out):
    """max|out - ref| / max(1, max|ref|): the parity criterion of issue 2."""
    return float(np.max(np.abs(out - ref)) / max(1.0, float(np.max(np.abs(ref)))))
