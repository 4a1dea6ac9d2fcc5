"""Noise schedules in JAX: alpha_t, sigma_t and their time derivatives at float t.

The schedule itself (one class per kind: fields, time range, formulas) is the pure-Python `ScheduleConfig`
of `flowmap_jax.spec.schedule`, shared with `torch_ref.schedules`; its module docstring fixes the time
convention. Each class writes its formulas once against an `ArrayOps`; this module passes jax.numpy's
(float32), so no function here knows the kinds. Summary: times are floats in the teacher's own units; DDPM:
t in [-1, N - 1], alpha_t^2 = alphas_cumprod[t] at integers, log(alpha) linear in between, t = -1 clean; VP
cosine and rectified flow: t in [0, T], t = 0 clean.

Every function takes `t` as a scalar or an array of any shape (float32) and returns arrays of t's shape.
Range checks (`check_times`) run only on concrete values: under `jax.jit` times are traced and unchecked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax.spec.schedule import ScheduleConfig, check_time_values  # noqa: F401 (re-export)
from flowmap_jax.spec.schedule.array_ops import ArrayOps
from flowmap_jax.spec.time_grid import time_grid

__all__ = ["ScheduleConfig", "alpha_sigma", "alpha_sigma_derivatives", "angle", "dtheta_dt", "time_from_rho", "add_noise",
           "check_times", "expand_time", "batch_times", "time_grid"]


def check_times(schedule: ScheduleConfig, t, name: str = "t") -> None:
    """Raises ValueError naming `name` and the value if concrete times lie outside [t_clean, t_noise].
    Traced values (inside jit/grad/vmap) are not checked."""
    if isinstance(t, jax.core.Tracer):
        return
    try:
        values = np.asarray(t)
    except Exception:  # noqa: BLE001 - abstract values cannot be checked
        return
    check_time_values(schedule, values, name)


class _JaxOps(ArrayOps):
    """jax.numpy, float32 (`spec.schedule.array_ops`): what the schedule classes' formulas run on here."""

    def asarray(self, values):
        return jnp.asarray(values, jnp.float32)

    def constant(self, table, like):
        return jnp.asarray(table, jnp.float32)

    def to_index(self, x):
        return x.astype(jnp.int32)

    def full_like(self, x, value):
        return jnp.full_like(x, value)

    def where(self, condition, x, y):
        return jnp.where(condition, x, y)

    def clip(self, x, lo, hi):
        return jnp.clip(x, lo, hi)

    def maximum(self, x, value):
        return jnp.maximum(x, value)

    def interp(self, x, xp, fp):
        return jnp.interp(x, xp, fp)

    def isinf(self, x):
        return jnp.isinf(x)

    def floor(self, x):
        return jnp.floor(x)

    def exp(self, x):
        return jnp.exp(x)

    def expm1(self, x):
        return jnp.expm1(x)

    def log(self, x):
        return jnp.log(x)

    def log1p(self, x):
        return jnp.log1p(x)

    def sqrt(self, x):
        return jnp.sqrt(x)

    def sin(self, x):
        return jnp.sin(x)

    def cos(self, x):
        return jnp.cos(x)

    def tan(self, x):
        return jnp.tan(x)

    def arctan(self, x):
        return jnp.arctan(x)

    def arccos(self, x):
        return jnp.arccos(x)


_OPS = _JaxOps()


def alpha_sigma(schedule: ScheduleConfig, t):
    """(alpha_t, sigma_t), float32 arrays of t's shape: x_t = alpha_t * x0 + sigma_t * eps."""
    return schedule.alpha_sigma(t, _OPS)


def alpha_sigma_derivatives(schedule: ScheduleConfig, t):
    """(d alpha/dt, d sigma/dt) in teacher time units, float32 arrays of t's shape.

    DDPM: log(alpha) is piecewise linear, so d alpha/dt = alpha * slope with the slope of the segment
    [floor(t), floor(t) + 1] (right derivative at integers); d sigma/dt = -alpha * (d alpha/dt) / sigma is
    infinite at the clean end t = -1 (and at t = 0 for VP cosine with s > 0). Matches autodiff of
    `alpha_sigma` away from those points.
    """
    return schedule.alpha_sigma_derivatives(t, _OPS)


def angle(schedule: ScheduleConfig, t):
    """theta_t = arctan(sigma_t / alpha_t) in [0, pi/2]: the TrigFlow angle (alpha = cos theta, sigma = sin
    theta for VP schedules). The objectives differentiate with respect to theta: unit-free, and the
    PF-ODE velocity dx/dtheta stays bounded at both ends (dx/dt does not: DDPM's sigma ~ sqrt(t + 1))."""
    alpha, sigma = alpha_sigma(schedule, t)
    return jnp.arctan2(sigma, alpha)


def dtheta_dt(schedule: ScheduleConfig, t):
    """d theta/dt = (alpha sigma' - sigma alpha') / (alpha^2 + sigma^2) > 0, teacher time units."""
    alpha, sigma = alpha_sigma(schedule, t)
    d_alpha, d_sigma = alpha_sigma_derivatives(schedule, t)
    return (alpha * d_sigma - sigma * d_alpha) / (alpha * alpha + sigma * sigma)


def time_from_rho(schedule: ScheduleConfig, rho):
    """The time t at which sigma_t / alpha_t = rho (rho >= 0; the inverse of the schedule's noise-to-signal
    ratio), float32 of rho's shape. rho = 0 gives the clean end; values beyond the noise end clip to it."""
    return schedule.time_from_rho(rho, _OPS)


def expand_time(values, x):
    """A per-example (B,) array (or scalar) reshaped to broadcast against x (B, ...): (B, 1, ..., 1)."""
    values = jnp.asarray(values)
    if values.ndim == 1 and x.ndim > 1:
        return values.reshape(values.shape + (1,) * (x.ndim - 1))
    return values


def batch_times(t, batch: int, name: str):
    """Scalar or (B,) times -> (B,) float32; any other shape raises ValueError naming `name`."""
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) (the batch of x), got shape {t.shape}")
    return t


def add_noise(schedule: ScheduleConfig, x0, noise, t):
    """x_t = alpha_t * x0 + sigma_t * noise. x0, noise: (B, ...); t: scalar or (B,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"add_noise: x0 shape {x0.shape} and noise shape {noise.shape} differ")
    alpha, sigma = alpha_sigma(schedule, t)
    return expand_time(alpha, x0) * x0 + expand_time(sigma, x0) * noise
