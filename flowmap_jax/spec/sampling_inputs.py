"""Backend-independent inputs of sampling from an export (the same numbers in JAX and PyTorch). Numpy only."""

from __future__ import annotations

import math

import numpy as np

from flowmap_jax.spec.export_format import ExportInfo, FlowMapConfig


def default_sample_shape(info: ExportInfo) -> tuple[int, int, int]:
    """(H, W, C): flowmap.json's sample_shape, else the UNet's sample_size and in_channels."""
    if info.config.sample_shape is not None:
        return info.config.sample_shape
    size = info.unet_config.get("sample_size") or 64
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w), int(info.unet_config.get("in_channels", 4))


def resolve_guidance(config: FlowMapConfig, guidance_scale: float | None) -> float | None:
    """The guidance scale to feed as `timestep_cond`, or None when the map has no guidance input.

    Embedded guidance: `guidance_scale` (default: the recorded scale); one outside the recorded training range
    (flowmap.json guidance.scale_range) is a ValueError, as the map never saw it. Baked-in guidance: None, and a
    `guidance_scale` other than the baked one is a ValueError (there is no input to change it)."""
    if config.guidance_embedded:
        w = config.guidance_scale if guidance_scale is None else float(guidance_scale)
        w_range = config.guidance_scale_range
        if w_range is not None and not (w_range[0] - 1e-6 <= w <= w_range[1] + 1e-6):
            raise ValueError(f"guidance scale {w} (--guidance / guidance_scale) lies outside [{w_range[0]}, "
                             f"{w_range[1]}], the range of w this flow map was trained on (flowmap.json "
                             "guidance.scale_range)")
        return w
    if guidance_scale is not None and not math.isclose(float(guidance_scale), config.guidance_scale,
                                                       rel_tol=1e-6, abs_tol=1e-6):
        raise ValueError(
            f"this flow map has no guidance input (config.json has no time_cond_proj_dim): it reproduces the teacher "
            f"guided at scale {config.guidance_scale} ({config.guidance}); --guidance {guidance_scale} cannot "
            "change it")
    return None


def initial_noise(seed: int, batch: int, shape_hwc, gamma_jumps: int = 0):
    """(noise (B, H, W, C) float32, renoise list of `gamma_jumps` arrays of the same shape) from numpy's
    PCG64 `default_rng(seed)`, so both backends start from the same numbers. Layout channels last (the Flax
    one); PyTorch flips with `flowmap_jax.spec.layout.nhwc_to_nchw`."""
    rng = np.random.default_rng(int(seed))
    shape = (int(batch), *(int(v) for v in shape_hwc))
    noise = rng.standard_normal(shape, dtype=np.float32)
    renoise = [rng.standard_normal(shape, dtype=np.float32) for _ in range(int(gamma_jumps))]
    return noise, renoise
