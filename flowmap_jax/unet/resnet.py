"""ResnetBlock2D, Downsample2D and Upsample2D of diffusers, in Flax, NHWC.

Convolutions use explicit padding (never 'SAME'); group norms use diffusers' epsilon and the two-pass
variance; upsampling is nearest-neighbour with PyTorch's index rule.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax.unet.activations import get_activation


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(num_groups, C, eps) on the last axis of (B, ..., C) (NHWC); params `scale` (C,) and
    `bias` (C,) float32, as `flax.linen.GroupNorm`'s. Statistics in float32 with the two-pass variance
    (mean of (x - mean)^2); output in `dtype` (None: float32 for float32 inputs).

    Written as per-channel sums over the spatial axis followed by a sum over each group's channels, so
    every reduction runs along the contiguous channel axis: on XLA's CPU backend this is 1.5-3.5x faster
    than `flax.linen.GroupNorm` (which reduces a (B, H, W, G, C/G) view over three axes), same values.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        groups = self.num_groups
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
        per_group = channels // groups
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        batch = x.shape[0]
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(batch, -1, channels)
        count = xs.shape[1] * per_group

        def group_mean(per_channel_sum):  # (B, C) -> (B, C): each channel gets its group's mean
            means = per_channel_sum.reshape(batch, groups, per_group).sum(-1) / count
            return jnp.repeat(means, per_group, axis=1)

        centred = xs - group_mean(xs.sum(1))[:, None, :]
        inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred).sum(1)) + self.epsilon)
        y = centred * (inv_std[:, None, :] * scale) + bias
        return y.reshape(x.shape).astype(self.dtype or y.dtype)


def group_norm(num_groups, eps, dtype, name):
    """torch.nn.GroupNorm(num_groups, C, eps) on the last axis (NHWC); params `scale`, `bias`."""
    return GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)


def conv2d(features, kernel, dtype, name, stride=1, padding=None, use_bias=True):
    """torch.nn.Conv2d with symmetric explicit padding ((k - 1) // 2 unless given)."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=use_bias, dtype=dtype, name=name,
    )


def nearest_upsample(x, size):
    """Nearest-neighbour resize of (B, H, W, C) to spatial `size`, PyTorch's `F.interpolate(mode='nearest')`.

    Source index = min(floor(dst * (in / out)), in - 1) computed in float32 as PyTorch does; for an
    exact 2x this is `repeat`.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[1], x.shape[2]
    if (out_h, out_w) == (2 * in_h, 2 * in_w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def index(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(idx, n_in - 1)

    return x[:, index(in_h, out_h)][:, :, index(in_w, out_w)]


class ResnetBlock2D(nn.Module):
    """(B, H, W, C_in), temb (B, T) -> (B, H, W, out_channels).

    norm1 -> act -> conv1 -> (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2, plus a 1x1
    `conv_shortcut` when channels change; divided by `output_scale_factor`. `time_embedding_norm`
    "scale_shift" applies (1 + scale) * norm2(h) + shift instead.
    """

    out_channels: int
    groups: int
    eps: float = 1e-5
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    time_embedding_norm: str = "default"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        act = get_activation(self.act_fn)
        h = act(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv2d(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            proj_dim = self.out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = nn.Dense(proj_dim, dtype=self.dtype, name="time_emb_proj")(act(temb))[:, None, None, :]
        else:
            t = None
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(t, 2, axis=-1)
            h = group_norm(self.groups, self.eps, self.dtype, "norm2")(h) * (1 + scale) + shift
        else:
            if t is not None:
                h = h + t
            h = group_norm(self.groups, self.eps, self.dtype, "norm2")(h)
        h = conv2d(self.out_channels, 3, self.dtype, "conv2")(act(h))
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (`conv`): (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C).

    padding=1: symmetric; padding=0: diffusers pads (0, 1) on bottom/right first.
    """

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv2d(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest upsample to `size` (default 2x) then 3x3 conv (`conv`): (B, H, W, C) -> (B, H', W', C)."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size=None):
        size = size if size is not None else (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_upsample(x, size)
        return conv2d(self.out_channels, 3, self.dtype, "conv")(x)
