"""Sampling time grids (teacher units, from the noise end to the clean end by default). Numpy only."""

from __future__ import annotations

import numpy as np

from flowmap_jax.spec.schedule import ScheduleConfig, alpha_sigma, check_time_values

GRID_SPACINGS = ("uniform", "logsnr")
DIRECTIONS = ("generate", "invert")
ALPHA_ZERO = 1e-9
"""alpha below this is the schedule's alpha = 0 (VP cosine at T without t_max) for the log-SNR spacing, which
needs a finite sigma / alpha: rounding left 6e-17 there, and the grid put most steps within 1e-4 of T."""


def check_direction(grid, direction: str | None = "generate", name: str = "timesteps",
                    invert_hint: str = "", direction_name: str = "direction") -> None:
    """The one rule of a sampling grid's direction (the CLIs, `FlowMapPipeline`, `flowmap_jax.sample.sample`):
    ValueError naming `name` and the grid unless it goes the way `direction` says: strictly decreasing for
    generate (None, the default: noise to data), strictly increasing for invert (data to noise).
    `invert_hint` ends the generate message (the CLIs: how to ask for an inversion there); `direction_name`
    names the direction argument in the invert message (the CLIs: --direction)."""
    grid = np.asarray(grid, np.float64)
    text = ",".join(f"{t:g}" for t in grid)
    steps = np.diff(grid)
    if direction == "invert":
        if not np.all(steps > 0):
            raise ValueError(f"{name} {text} is not strictly increasing: {direction_name} invert goes from data to "
                             f"noise (e.g. -1,499,999)")
    elif direction in (None, "generate"):
        if not np.all(steps < 0):
            raise ValueError(f"{name} {text} is not strictly decreasing: sampling goes from noise to data (e.g. "
                             f"999,499,-1){invert_hint}")
    else:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")


def time_grid(schedule: ScheduleConfig, num_steps: int, t_start: float | None = None,
              t_end: float | None = None, spacing: str = "uniform") -> np.ndarray:
    """(num_steps + 1,) float64 times from `t_start` (default the noise end) to `t_end` (default the clean
    end). Any grid works with the samplers; both directions (decreasing: towards data; increasing: towards
    noise) are allowed.

    spacing "uniform" (default): uniform in t. For DDPM with N divisible by num_steps this is diffusers'
    "trailing" spacing plus the clean end: N = 1000, 4 steps -> [999, 749, 499, 249, -1].
    spacing "logsnr": the interior times uniform in log(sigma_t / alpha_t) (DPM-Solver's log-SNR spacing),
    the clean end taken at the teacher's last trained time (`schedule.logsnr_t_min`: DDPM t = 0,
    sigma / alpha ~ 0.01; other schedules 1e-3 of the range) for the spacing only; the ends are exact. DDPM
    with linear betas, 2 steps: [999, ~302, -1]. Needs a finite sigma / alpha at both ends of the spacing and a schedule that allows it
    (`schedule.logsnr_grid`: not rectified flow, nor VP cosine up to alpha = 0: give those `t_max` or
    "uniform").
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if spacing not in GRID_SPACINGS:
        raise ValueError(f"unknown grid spacing {spacing!r}: expected one of {GRID_SPACINGS}")
    t_start = schedule.t_noise if t_start is None else float(t_start)
    t_end = schedule.t_clean if t_end is None else float(t_end)
    check_time_values(schedule, [t_start, t_end], "time_grid end")
    uniform = np.linspace(t_start, t_end, int(num_steps) + 1)
    if spacing == "uniform" or int(num_steps) == 1:
        return uniform
    lo = max(min(t_start, t_end), schedule.logsnr_t_min)
    hi = max(t_start, t_end)
    dense = np.linspace(lo, hi, 8193)
    alpha, sigma = (np.asarray(v, np.float64) for v in alpha_sigma(schedule, dense))
    alpha = np.where(alpha < ALPHA_ZERO, 0.0, alpha)  # cos(pi / 2) is 6e-17 in float64: alpha = 0 there
    with np.errstate(divide="ignore"):
        log_rho = np.log(sigma) - np.log(alpha)
    if not schedule.logsnr_grid or not np.all(np.isfinite(log_rho)) or np.any(np.diff(log_rho) <= 0):
        raise ValueError(f"grid spacing 'logsnr' needs a finite, increasing sigma/alpha between t = {lo:g} and "
                         f"{hi:g} for this {schedule.kind} schedule; use spacing 'uniform'")
    a, b = (log_rho[0], log_rho[-1]) if t_start <= t_end else (log_rho[-1], log_rho[0])
    targets = np.linspace(a, b, int(num_steps) + 1)[1:-1]
    inner = np.interp(targets, log_rho, dense)
    return np.concatenate([[t_start], inner, [t_end]])
