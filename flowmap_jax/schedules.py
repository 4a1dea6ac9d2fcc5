"""Noise schedules in JAX: alpha_t, sigma_t and their time derivatives at float t.

The schedule itself (kind, betas, time range) is the pure-Python `ScheduleConfig` of
`flowmap_jax.spec.schedule`, shared with `torch_ref.schedules`; its module docstring fixes the time
convention. Summary: times are floats in the teacher's own units; DDPM: t in [-1, N - 1], alpha_t^2 =
alphas_cumprod[t] at integers, log(alpha) linear in between, t = -1 clean; VP cosine and rectified flow:
t in [0, T], t = 0 clean.

Every function takes `t` as a scalar or an array of any shape (float32) and returns arrays of t's shape.
Range checks (`check_times`) run only on concrete values: under `jax.jit` times are traced and unchecked.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax.spec.schedule import ScheduleConfig, check_time_values  # noqa: F401 (re-export)
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


def _ddpm_log_alpha(schedule: ScheduleConfig, t):
    """log(alpha_t) and its slope d log(alpha)/dt, piecewise linear between integer steps."""
    table = jnp.asarray(schedule.log_alpha_table, jnp.float32)  # entry k is t = k - 1
    n = schedule.num_train_timesteps
    u = t + 1.0
    index = jnp.clip(jnp.floor(u), 0, n - 1)
    frac = u - index
    index = index.astype(jnp.int32)
    lo, hi = table[index], table[index + 1]
    slope = hi - lo
    return lo + frac * slope, slope


def _cosine_theta(schedule: ScheduleConfig, t):
    s = schedule.cosine_s
    return (t / schedule.time_scale + s) / (1.0 + s) * (math.pi / 2)


def alpha_sigma(schedule: ScheduleConfig, t):
    """(alpha_t, sigma_t), float32 arrays of t's shape: x_t = alpha_t * x0 + sigma_t * eps."""
    t = jnp.asarray(t, jnp.float32)
    if schedule.kind == "ddpm":
        log_alpha, _ = _ddpm_log_alpha(schedule, t)
        return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
    if schedule.kind == "vp_cosine":
        theta = _cosine_theta(schedule, t)
        if schedule.cosine_s == 0.0:  # cos(pi/2) is -4e-8 in float32: clamp the noise end to alpha = 0
            return jnp.maximum(jnp.cos(theta), 0.0), jnp.sin(theta)
        alpha = jnp.maximum(jnp.cos(theta), 0.0) / math.cos(_cosine_theta(schedule, 0.0))
        return alpha, jnp.sqrt(jnp.maximum(1.0 - alpha * alpha, 0.0))
    tau = t / schedule.time_scale
    return 1.0 - tau, tau


def alpha_sigma_derivatives(schedule: ScheduleConfig, t):
    """(d alpha/dt, d sigma/dt) in teacher time units, float32 arrays of t's shape.

    DDPM: log(alpha) is piecewise linear, so d alpha/dt = alpha * slope with the slope of the segment
    [floor(t), floor(t) + 1] (right derivative at integers); d sigma/dt = -alpha * (d alpha/dt) / sigma is
    infinite at the clean end t = -1 (and at t = 0 for VP cosine with s > 0). Matches autodiff of
    `alpha_sigma` away from those points.
    """
    t = jnp.asarray(t, jnp.float32)
    if schedule.kind == "ddpm":
        log_alpha, slope = _ddpm_log_alpha(schedule, t)
        alpha, sigma = jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
        d_alpha = alpha * slope
        return d_alpha, -alpha * d_alpha / sigma
    if schedule.kind == "vp_cosine":
        theta = _cosine_theta(schedule, t)
        d_theta = math.pi / 2 / ((1.0 + schedule.cosine_s) * schedule.time_scale)
        if schedule.cosine_s == 0.0:
            return -jnp.sin(theta) * d_theta, jnp.cos(theta) * d_theta
        c0 = math.cos(_cosine_theta(schedule, 0.0))
        alpha = jnp.cos(theta) / c0
        sigma = jnp.sqrt(jnp.maximum(1.0 - alpha * alpha, 0.0))
        d_alpha = -jnp.sin(theta) / c0 * d_theta
        return d_alpha, -alpha * d_alpha / sigma
    rate = jnp.full_like(t, 1.0 / schedule.time_scale)
    return -rate, rate


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
    rho = jnp.asarray(rho, jnp.float32)
    if schedule.kind == "ddpm":
        log_alpha = -0.5 * jnp.log1p(rho * rho)
        table = schedule.log_alpha_table  # decreasing in t
        times = np.arange(table.shape[0], dtype=np.float64) - 1.0
        return jnp.interp(-log_alpha, jnp.asarray(-table, jnp.float32), jnp.asarray(times, jnp.float32))
    if schedule.kind == "vp_cosine":
        s, big_t = schedule.cosine_s, schedule.time_scale
        if s == 0.0:
            theta = jnp.arctan(rho)
        else:
            alpha = 1.0 / jnp.sqrt(1.0 + rho * rho)
            theta = jnp.arccos(jnp.clip(alpha * math.cos(_cosine_theta(schedule, 0.0)), -1.0, 1.0))
        t = (theta * 2 / math.pi * (1.0 + s) - s) * big_t
        return jnp.clip(t, schedule.t_clean, schedule.t_noise)
    tau = jnp.where(jnp.isinf(rho), 1.0, rho / (1.0 + rho))
    return jnp.clip(tau * schedule.time_scale, schedule.t_clean, schedule.t_noise)


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
