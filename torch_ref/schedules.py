"""Noise schedules in PyTorch, mirroring `flowmap_jax.schedules` (same names, same signatures).

The schedule is the shared pure-Python `flowmap_jax.spec.schedule.ScheduleConfig` (its module docstring fixes
the time convention: teacher units; DDPM t in [-1, N - 1] with t = -1 clean and log(alpha) piecewise linear;
VP cosine and rectified flow t in [0, T] with t = 0 clean). Tensors are float32 on t's device; every
function takes `t` as a number or a tensor of any shape and returns tensors of t's shape.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flowmap_jax.spec.schedule import ScheduleConfig, check_time_values  # noqa: F401 (re-export)
from flowmap_jax.spec.time_grid import time_grid

__all__ = ["ScheduleConfig", "alpha_sigma", "alpha_sigma_derivatives", "angle", "dtheta_dt", "time_from_rho", "add_noise",
           "check_times", "expand_time", "batch_times", "time_grid"]


def _as_tensor(t, like=None):
    if isinstance(t, torch.Tensor):
        return t.to(torch.float32)
    device = like.device if isinstance(like, torch.Tensor) else None
    return torch.as_tensor(t, dtype=torch.float32, device=device)


def check_times(schedule: ScheduleConfig, t, name: str = "t") -> None:
    """Raises ValueError naming `name` and the value if times lie outside [t_clean, t_noise]. Values
    inside torch.func transforms (which cannot be read) are not checked."""
    try:
        values = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    except Exception:  # noqa: BLE001 - functorch-wrapped tensors cannot be read
        return
    check_time_values(schedule, values, name)


def _ddpm_log_alpha(schedule: ScheduleConfig, t):
    table = torch.as_tensor(schedule.log_alpha_table, dtype=torch.float32, device=t.device)
    n = schedule.num_train_timesteps
    u = t + 1.0
    index = torch.clamp(torch.floor(u), 0, n - 1)
    frac = u - index
    index = index.long()
    lo, hi = table[index], table[index + 1]
    slope = hi - lo
    return lo + frac * slope, slope


def _cosine_theta(schedule: ScheduleConfig, t):
    s = schedule.cosine_s
    return (t / schedule.time_scale + s) / (1.0 + s) * (math.pi / 2)


def alpha_sigma(schedule: ScheduleConfig, t):
    """(alpha_t, sigma_t), float32 tensors of t's shape: x_t = alpha_t * x0 + sigma_t * eps."""
    t = _as_tensor(t)
    if schedule.kind == "ddpm":
        log_alpha, _ = _ddpm_log_alpha(schedule, t)
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))
    if schedule.kind == "vp_cosine":
        theta = _cosine_theta(schedule, t)
        if schedule.cosine_s == 0.0:  # cos(pi/2) is -4e-8 in float32: clamp the noise end to alpha = 0
            return torch.clamp(torch.cos(theta), min=0.0), torch.sin(theta)
        alpha = torch.clamp(torch.cos(theta), min=0.0) / math.cos(_cosine_theta(schedule, 0.0))
        return alpha, torch.sqrt(torch.clamp(1.0 - alpha * alpha, min=0.0))
    tau = t / schedule.time_scale
    return 1.0 - tau, tau


def alpha_sigma_derivatives(schedule: ScheduleConfig, t):
    """(d alpha/dt, d sigma/dt) in teacher time units (see `flowmap_jax.schedules`)."""
    t = _as_tensor(t)
    if schedule.kind == "ddpm":
        log_alpha, slope = _ddpm_log_alpha(schedule, t)
        alpha, sigma = torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))
        d_alpha = alpha * slope
        return d_alpha, -alpha * d_alpha / sigma
    if schedule.kind == "vp_cosine":
        theta = _cosine_theta(schedule, t)
        d_theta = math.pi / 2 / ((1.0 + schedule.cosine_s) * schedule.time_scale)
        if schedule.cosine_s == 0.0:
            return -torch.sin(theta) * d_theta, torch.cos(theta) * d_theta
        c0 = math.cos(_cosine_theta(schedule, 0.0))
        alpha = torch.cos(theta) / c0
        sigma = torch.sqrt(torch.clamp(1.0 - alpha * alpha, min=0.0))
        d_alpha = -torch.sin(theta) / c0 * d_theta
        return d_alpha, -alpha * d_alpha / sigma
    rate = torch.full_like(t, 1.0 / schedule.time_scale)
    return -rate, rate


def _interp(x, xp, fp):
    """numpy.interp for increasing xp (1-D tensors), clamping outside [xp[0], xp[-1]]."""
    x = torch.clamp(x, xp[0], xp[-1])
    index = torch.clamp(torch.searchsorted(xp, x.contiguous(), right=True) - 1, 0, xp.shape[0] - 2)
    x_lo, x_hi = xp[index], xp[index + 1]
    frac = (x - x_lo) / (x_hi - x_lo)
    return fp[index] + frac * (fp[index + 1] - fp[index])


def angle(schedule: ScheduleConfig, t):
    """theta_t = arctan(sigma_t / alpha_t) in [0, pi/2] (see `flowmap_jax.schedules.angle`)."""
    alpha, sigma = alpha_sigma(schedule, t)
    return torch.atan2(sigma, alpha)


def dtheta_dt(schedule: ScheduleConfig, t):
    """d theta/dt = (alpha sigma' - sigma alpha') / (alpha^2 + sigma^2) > 0, teacher time units."""
    alpha, sigma = alpha_sigma(schedule, t)
    d_alpha, d_sigma = alpha_sigma_derivatives(schedule, t)
    return (alpha * d_sigma - sigma * d_alpha) / (alpha * alpha + sigma * sigma)


def time_from_rho(schedule: ScheduleConfig, rho):
    """The time t at which sigma_t / alpha_t = rho (rho >= 0), float32 of rho's shape; rho = 0 is the clean
    end, values beyond the noise end clip to it."""
    rho = _as_tensor(rho)
    if schedule.kind == "ddpm":
        log_alpha = -0.5 * torch.log1p(rho * rho)
        table = schedule.log_alpha_table
        times = np.arange(table.shape[0], dtype=np.float64) - 1.0
        xp = torch.as_tensor(-table, dtype=torch.float32, device=rho.device)
        fp = torch.as_tensor(times, dtype=torch.float32, device=rho.device)
        return _interp(-log_alpha, xp, fp)
    if schedule.kind == "vp_cosine":
        s, big_t = schedule.cosine_s, schedule.time_scale
        if s == 0.0:
            theta = torch.atan(rho)
        else:
            alpha = 1.0 / torch.sqrt(1.0 + rho * rho)
            theta = torch.acos(torch.clamp(alpha * math.cos(_cosine_theta(schedule, 0.0)), -1.0, 1.0))
        t = (theta * 2 / math.pi * (1.0 + s) - s) * big_t
        return torch.clamp(t, schedule.t_clean, schedule.t_noise)
    tau = torch.where(torch.isinf(rho), torch.ones_like(rho), rho / (1.0 + rho))
    return torch.clamp(tau * schedule.time_scale, schedule.t_clean, schedule.t_noise)


def expand_time(values, x):
    """A per-example (B,) tensor (or scalar) reshaped to broadcast against x (B, ...): (B, 1, ..., 1)."""
    values = _as_tensor(values, x)
    if values.ndim == 1 and x.ndim > 1:
        return values.reshape(values.shape + (1,) * (x.ndim - 1))
    return values


def batch_times(t, batch: int, name: str, like=None):
    """Number or (B,) times -> (B,) float32 tensor; any other shape raises ValueError naming `name`."""
    device = like.device if isinstance(like, torch.Tensor) else None
    t = t.to(torch.float32) if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) (the batch), got shape {tuple(t.shape)}")
    return t


def add_noise(schedule: ScheduleConfig, x0, noise, t):
    """x_t = alpha_t * x0 + sigma_t * noise. x0, noise: (B, ...); t: number or (B,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"add_noise: x0 shape {tuple(x0.shape)} and noise shape {tuple(noise.shape)} differ")
    alpha, sigma = alpha_sigma(schedule, _as_tensor(t, x0))
    return expand_time(alpha, x0) * x0 + expand_time(sigma, x0) * noise
