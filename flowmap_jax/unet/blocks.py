"""Down, mid and up blocks of diffusers' UNet2DConditionModel, in Flax, NHWC.

Sub-module names follow diffusers' state-dict keys with list indices joined by `_`
(`resnets_0` <-> `resnets.0`); see `flowmap_jax/unet/key_map.py`.
"""

import flax.linen as nn
import jax.numpy as jnp

from flowmap_jax.unet.attention import Transformer2DModel
from flowmap_jax.unet.resnet import Downsample2D, ResnetBlock2D, Upsample2D


class BlockSettings(nn.Module):
    """Fields shared by every block (resolved per block by the UNet)."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float = 1e-5
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    # Cross-attention blocks only:
    heads: int = 8
    transformer_layers: tuple = (1,)
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_implementation: str | None = None
    remat_layers: bool = False  # rematerialise each resnet and each BasicTransformerBlock in the backward pass
    dtype: jnp.dtype = jnp.float32

    def resnet(self, index, output_scale_factor=1.0):
        return (nn.remat(ResnetBlock2D) if self.remat_layers else ResnetBlock2D)(
            self.out_channels, self.groups, self.eps, self.act_fn, output_scale_factor,
            self.time_embedding_norm, dtype=self.dtype, name=f"resnets_{index}",
        )

    def attention(self, index, channels):
        return Transformer2DModel(
            self.heads, channels // self.heads, self.transformer_layers[index], self.groups,
            self.use_linear_projection, self.only_cross_attention, self.upcast_attention,
            self.attention_implementation, remat_blocks=self.remat_layers, dtype=self.dtype, name=f"attentions_{index}",
        )


class DownBlock2D(BlockSettings):
    """(B, H, W, C), temb -> (h, skips); `add_downsample` appends a stride-2 conv."""

    add_downsample: bool = True
    downsample_padding: int = 1
    has_cross_attention = False

    @nn.compact
    def __call__(self, h, temb, context=None):
        skips = ()
        for i in range(self.num_layers):
            h = self.resnet(i)(h, temb)
            if self.has_cross_attention:
                h = self.attention(i, self.out_channels)(h, context)
            skips += (h,)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype, name="downsamplers_0")(h)
            skips += (h,)
        return h, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet."""

    has_cross_attention = True


class UpBlock2D(BlockSettings):
    """(B, H, W, C), skips (popped from the end), temb -> h; `upsample_size` = the next skip's size."""

    add_upsample: bool = True
    upsample_size: tuple | None = None
    has_cross_attention = False

    @nn.compact
    def __call__(self, h, skips, temb, context=None):
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - i]], axis=-1)
            h = self.resnet(i)(h, temb)
            if self.has_cross_attention:
                h = self.attention(i, self.out_channels)(h, context)
        if self.add_upsample:
            h = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(h, self.upsample_size)
        return h


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""

    has_cross_attention = True


class UNetMidBlock2DCrossAttn(BlockSettings):
    """resnet_0, then (attention_i, resnet_{i+1}) for each layer; resnets scaled by output_scale_factor."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, h, temb, context):
        h = self.resnet(0, self.output_scale_factor)(h, temb)
        for i in range(self.num_layers):
            h = self.attention(i, self.out_channels)(h, context)
            h = self.resnet(i + 1, self.output_scale_factor)(h, temb)
        return h


BLOCK_CLASSES = {
    "DownBlock2D": DownBlock2D,
    "CrossAttnDownBlock2D": CrossAttnDownBlock2D,
    "UpBlock2D": UpBlock2D,
    "CrossAttnUpBlock2D": CrossAttnUpBlock2D,
    "UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn,
}
