"""Time embeddings: diffusers' `get_timestep_embedding`, `Timesteps` and `TimestepEmbedding` in Flax.

Shapes: timesteps (B,) float32 in the teacher's own units (SD: 0..999) -> (B, dim) float32.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from flowmap_jax.unet.activations import get_activation


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, exactly as diffusers computes it.

    freq_k = exp(-log(max_period) * k / (dim/2 - freq_shift)); emb = [sin(t f), cos(t f)], swapped to
    [cos, sin] when `flip_sin_to_cos`, zero-padded when dim is odd.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding expects (B,) timesteps, got shape {timesteps.shape}")
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 [-> post_act]; optional bias-free `cond_proj` added to the input.

    `cond_proj` carries `timestep_cond` (B, cond_proj_dim) (LCM's guidance-scale embedding).
    """

    time_embed_dim: int
    act_fn: str = "silu"
    post_act_fn: str | None = None
    cond_proj_dim: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample, condition=None):
        if condition is not None:
            if self.cond_proj_dim is None:
                raise ValueError("timestep_cond was given but the UNet config has no time_cond_proj_dim")
            sample = sample + nn.Dense(sample.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(condition)
        elif self.cond_proj_dim is not None and self.is_initializing():
            # Create the parameter at init so the tree always matches diffusers' state dict.
            nn.Dense(sample.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(
                jnp.zeros(sample.shape[:-1] + (self.cond_proj_dim,), sample.dtype)
            )
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(sample)
        sample = get_activation(self.act_fn)(sample)
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(sample)
        if self.post_act_fn is not None:
            sample = get_activation(self.post_act_fn)(sample)
        return sample
