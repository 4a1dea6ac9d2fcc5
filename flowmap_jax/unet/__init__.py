"""Flax port of diffusers' UNet2DConditionModel (NHWC). See `unet_2d_condition.py`."""

from flowmap_jax.unet.config import UNetConfig
from flowmap_jax.unet.unet_2d_condition import (
    FlaxUNet2DConditionModel,
    abstract_unet_params,
    dummy_inputs,
    init_unet_params,
)

__all__ = ["UNetConfig", "FlaxUNet2DConditionModel", "init_unet_params", "abstract_unet_params", "dummy_inputs"]
