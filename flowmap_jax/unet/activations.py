"""Activation functions by diffusers name (exact GELU, not the tanh approximation)."""

import jax
import jax.numpy as jnp


def _mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": _mish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def get_activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None
