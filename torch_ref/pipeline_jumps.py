"""One jump of `FlowMapPipeline`'s sampler: classifier-free guidance on the jump (with diffusers' guidance
rescale) and TCD-style stochastic re-noising (`eta`). Images (B, C, h, w) float32 tensors; times are teacher
timesteps (floats).

- `guided_jump`: X = X_u + w (X_c - X_u), X_c and X_u the map's jumps with the conditional and the
  unconditional conditioning (one batched call, conditional rows first). With `guidance_rescale` = r > 0,
  diffusers' `rescale_noise_cfg` is applied to that combined jump *destination* X (the latent at the target
  time, not a noise prediction): X <- r X std(X_c) / std(X) + (1 - r) X, stds per example over (C, h, w).
- `renoised_jump`: the re-noising step of `torch_ref.samplers.flow_map_sample` with gamma = eta: jump to the
  time u where sigma_u / alpha_u = sqrt(1 - eta^2) sigma_t / alpha_t, then
  x_t = (alpha_t / alpha_u) x_u + eta sigma_t z (z standard normal). eta = 0 is the deterministic jump; eta = 1
  jumps to the clean end and re-noises fully (multistep consistency sampling). TCD's `eta` (its gamma) plays
  the same role; TCD picks the intermediate time as (1 - gamma) times the next timestep, here it is chosen by
  noise level, as in our samplers.
"""

from __future__ import annotations

import torch

from torch_ref import schedules

__all__ = ["concat_cond", "guided_jump", "plain_jump", "renoised_jump"]


def concat_cond(a, b):
    """Conditioning dicts stacked on the batch axis (a's rows first); non-tensor entries (cross_attention_kwargs)
    are a's."""
    if isinstance(a, dict):
        return {k: concat_cond(v, b[k]) for k, v in a.items()}
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return a


def plain_jump(flow_map, x, t_source, t_target, cond):
    """X(x, s, t) with the map's own conditioning: (B, C, h, w) float32."""
    return flow_map(None, x, t_source, t_target, cond)


def guided_jump(flow_map, x, t_source, t_target, cond, uncond, scale: float, guidance_rescale: float = 0.0):
    """X_u + scale (X_c - X_u) from one call on the doubled batch, then diffusers' `rescale_noise_cfg` on it
    against X_c when guidance_rescale > 0 (see the module docstring). x (B, C, h, w); cond, uncond: UNet
    keyword dicts of batch B."""
    batch = x.shape[0]
    out = flow_map(None, torch.cat([x, x]), t_source, t_target, concat_cond(cond, uncond))
    x_cond, x_uncond = out[:batch], out[batch:]
    guided = x_uncond + float(scale) * (x_cond - x_uncond)
    if guidance_rescale > 0:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            rescale_noise_cfg,
        )

        guided = rescale_noise_cfg(guided, x_cond, guidance_rescale=float(guidance_rescale))
    return guided


def renoised_jump(jump, schedule, x, t_source: float, t_target: float, eta: float, noise: torch.Tensor):
    """`jump(x, s, u)` to the less noisy time u, then re-noised to t_target with `noise` (x's shape): the
    formula of `torch_ref.samplers.flow_map_sample` with gamma = eta (see the module docstring)."""
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"re-noising noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    a_n, s_n = schedules.alpha_sigma(schedule, t_target)
    u = schedules.time_from_rho(schedule, (1.0 - eta ** 2) ** 0.5 * s_n / a_n)
    a_u, _ = schedules.alpha_sigma(schedule, u)
    x_u = jump(x, t_source, u)
    return (a_n / a_u) * x_u + eta * s_n * noise.to(x.dtype)
