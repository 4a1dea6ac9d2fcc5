"""Noise schedules in PyTorch, mirroring `flowmap_jax.core.schedules` (same names, same signatures).

The schedule is the shared pure-Python `flowmap_jax.spec.schedule.ScheduleConfig`, one class per kind whose
formulas are written once against an `ArrayOps`; this module passes torch's, so no function here knows the
kinds (the spec's module docstring fixes the time convention: teacher units; DDPM t in [-1, N - 1] with
t = -1 clean and log(alpha) piecewise linear; VP cosine and rectified flow t in [0, T] with t = 0 clean). Tensors are float32 on t's device; every
function takes `t` as a number or a tensor of any shape and returns tensors of t's shape.
"""

from __future__ import annotations

import numpy as np
import torch

from flowmap_jax.spec.schedule import ScheduleConfig, check_time_values  # noqa: F401 (re-export)
from flowmap_jax.spec.schedule.array_ops import ArrayOps
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


class _TorchOps(ArrayOps):
    """torch, float32 on the times' device (`spec.schedule.array_ops`): what the schedule classes' formulas
    run on here."""

    def asarray(self, values):
        return _as_tensor(values)

    def constant(self, table, like):
        return torch.as_tensor(table, dtype=torch.float32, device=like.device)

    def to_index(self, x):
        return x.long()

    def full_like(self, x, value):
        return torch.full_like(x, value)

    def where(self, condition, x, y):
        x = torch.full_like(y, x) if not isinstance(x, torch.Tensor) else x
        y = torch.full_like(x, y) if not isinstance(y, torch.Tensor) else y
        return torch.where(condition, x, y)

    def clip(self, x, lo, hi):
        return torch.clamp(x, lo, hi)

    def maximum(self, x, value):
        return torch.clamp(x, min=value)

    def interp(self, x, xp, fp):
        return _interp(x, xp, fp)

    def isinf(self, x):
        return torch.isinf(x)

    def floor(self, x):
        return torch.floor(x)

    def exp(self, x):
        return torch.exp(x)

    def expm1(self, x):
        return torch.expm1(x)

    def log(self, x):
        return torch.log(x)

    def log1p(self, x):
        return torch.log1p(x)

    def sqrt(self, x):
        return torch.sqrt(x)

    def sin(self, x):
        return torch.sin(x)

    def cos(self, x):
        return torch.cos(x)

    def tan(self, x):
        return torch.tan(x)

    def arctan(self, x):
        return torch.atan(x)

    def arccos(self, x):
        return torch.acos(x)


_OPS = _TorchOps()


# Copied from flowmap_jax.core.schedules.alpha_sigma with arrays->tensors
def alpha_sigma(schedule: ScheduleConfig, t):
    """(alpha_t, sigma_t), float32 tensors of t's shape: x_t = alpha_t * x0 + sigma_t * eps."""
    return schedule.alpha_sigma(t, _OPS)


def alpha_sigma_derivatives(schedule: ScheduleConfig, t):
    """(d alpha/dt, d sigma/dt) in teacher time units (see `flowmap_jax.core.schedules`)."""
    return schedule.alpha_sigma_derivatives(t, _OPS)


def _interp(x, xp, fp):
    """numpy.interp for increasing xp (1-D tensors), clamping outside [xp[0], xp[-1]]."""
    x = torch.clamp(x, xp[0], xp[-1])
    index = torch.clamp(torch.searchsorted(xp, x.contiguous(), right=True) - 1, 0, xp.shape[0] - 2)
    x_lo, x_hi = xp[index], xp[index + 1]
    frac = (x - x_lo) / (x_hi - x_lo)
    return fp[index] + frac * (fp[index + 1] - fp[index])


def angle(schedule: ScheduleConfig, t):
    """theta_t = arctan(sigma_t / alpha_t) in [0, pi/2] (see `flowmap_jax.core.schedules.angle`)."""
    alpha, sigma = alpha_sigma(schedule, t)
    return torch.atan2(sigma, alpha)


# Copied from flowmap_jax.core.schedules.dtheta_dt
def dtheta_dt(schedule: ScheduleConfig, t):
    """d theta/dt = (alpha sigma' - sigma alpha') / (alpha^2 + sigma^2) > 0, teacher time units."""
    alpha, sigma = alpha_sigma(schedule, t)
    d_alpha, d_sigma = alpha_sigma_derivatives(schedule, t)
    return (alpha * d_sigma - sigma * d_alpha) / (alpha * alpha + sigma * sigma)


def time_from_rho(schedule: ScheduleConfig, rho):
    """The time t at which sigma_t / alpha_t = rho (rho >= 0), float32 of rho's shape; rho = 0 is the clean
    end, values beyond the noise end clip to it."""
    return schedule.time_from_rho(rho, _OPS)


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
