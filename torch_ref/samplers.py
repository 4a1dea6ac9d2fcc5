"""Samplers in PyTorch, mirroring `flowmap_jax.core.samplers` (same names, signatures and numerics; see its
docstring for the solvers, their rules at the clean end, and gamma re-noising). Python loops here where
JAX uses `lax.scan`. Images are (B, C, H, W). Samplers run under torch.no_grad() unless the caller
enables gradients (`teacher_solve` inside objectives is wrapped by them)."""

from __future__ import annotations

import numpy as np
import torch

from flowmap_jax.spec.objective_options import TEACHER_SOLVERS, TEACHER_SPACINGS
from flowmap_jax.spec.schedule import check_time_values
from flowmap_jax.spec.solver_settings import (
    CLEAN_START_EVALUATIONS,
    HEUN_EDM_MAX_RHO,
    SPACING_RHO_MAX,
    SPACING_RHO_MIN,
)
from torch_ref import predictions as pred_lib
from torch_ref import schedules
from torch_ref.schedules import expand_time

__all__ = ["ddim_sample", "heun_sample", "dpmpp_2m_sample", "teacher_sample", "teacher_solve", "solve_grid",
           "flow_map_sample", "make_jump", "SOLVERS", "SOLVE_SPACINGS"]


def check_grid(schedule, timesteps) -> np.ndarray:
    """A concrete 1-D grid of >= 2 times inside the schedule -> (n + 1,) float64. ValueError otherwise."""
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.detach().cpu().numpy()
    grid = np.ascontiguousarray(timesteps, dtype=np.float64)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 times, got shape {grid.shape}")
    check_time_values(schedule, grid, "timesteps")
    return grid


def _step_times(grid, x):
    """(n + 1,) numpy grid -> (n + 1, B) float32 tensor."""
    return torch.as_tensor(grid, dtype=torch.float32, device=x.device)[:, None].expand(grid.shape[0], x.shape[0])


def _check_x(x):
    if x.ndim < 1:
        raise ValueError(f"x_init must have a batch axis, got shape {tuple(x.shape)}")


def _where(mask, a, b, x):
    return torch.where(expand_time(mask.to(torch.float32), x) > 0, a, b)




def _heun_correction(x, a_c, s_c, a_n, s_n, x0_1, eps_1, x0_2, eps_2):
    """Heun's trapezoid correction to the DDIM step of a VP schedule: the cos^2 / sin^2 (theta_c) blend of
    EDM's eps form and the x0 form, finite at both ends (see flowmap_jax.core.samplers._heun_correction)."""
    coef = 0.5 * (a_c * s_n - a_n * s_c) / (a_c * a_c + s_c * s_c)
    blend = expand_time(coef, x) * (expand_time(a_c, x) * (eps_2 - eps_1) - expand_time(s_c, x) * (x0_2 - x0_1))
    # diffusers' HeunDiscrete (EDM's eps form) wherever it is well conditioned (sigma_c / alpha_c <= 20,
    # SD's whole range), so the solver is diffusers' Heun there; the blend only beyond, up to alpha = 0.
    use_edm = s_c <= HEUN_EDM_MAX_RHO * a_c
    a_safe = torch.where(use_edm, a_c, torch.ones_like(a_c))
    edm = expand_time(0.5 * (s_n - a_n * s_c / a_safe), x) * (eps_2 - eps_1)
    return torch.where(use_edm.reshape(use_edm.shape + (1,) * (x.ndim - 1)), edm, blend)


def _integrate(teacher, x, times, solver, cond, guidance_scale, lower_order_final, path=False):
    """Solve the teacher's PF-ODE along times (n + 1, B) with `solver`; returns x at times[-1], or with `path`
    (x at times[-1], the states at times[1:] stacked (n, B, ...))."""
    schedule = teacher.schedule
    n = times.shape[0] - 1
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: expected one of {TEACHER_SOLVERS}")
    x0_prev = torch.zeros_like(x)
    states = []
    for i in range(n):
        if path and i > 0:
            states.append(x)
        t_cur, t_next = times[i], times[i + 1]
        if solver == "ddim":
            x = teacher.ddim_step(x, t_cur, t_next, cond, guidance_scale)
            continue
        a_c, s_c = schedules.alpha_sigma(schedule, t_cur)
        a_n, s_n = schedules.alpha_sigma(schedule, t_next)
        x0, eps = teacher.x0_eps(x, t_cur, cond, guidance_scale)
        first = expand_time(a_n, x) * x0 + expand_time(s_n, x) * eps
        if solver == "heun":
            if not schedule.variance_preserving:  # linear path: Heun on the flow velocity in t
                v_1 = pred_lib.velocity(x0, eps, *schedules.alpha_sigma_derivatives(schedule, t_cur))
                v_2 = teacher.velocity(first, t_next, cond, guidance_scale)
                x_heun = x + expand_time(t_next - t_cur, x) * 0.5 * (v_1 + v_2)
            else:
                x0_2, eps_2 = teacher.x0_eps(first, t_next, cond, guidance_scale)
                x_heun = first + _heun_correction(x, a_c, s_c, a_n, s_n, x0, eps, x0_2, eps_2)
            x = _where(s_n > 0, x_heun, first, x)
            continue
        # dpmpp_2m
        t_prev = times[i - 1] if i > 0 else times[0]
        a_p, s_p = schedules.alpha_sigma(schedule, t_prev)
        # Second order needs finite log-SNRs at t_prev, t_cur and t_next (see flowmap_jax.core.samplers).
        use_second = ((s_n > 0) & (s_c > 0) & (a_n > 0) & (a_c > 0) & (a_p > 0)
                      & torch.full_like(s_n, i > 0, dtype=torch.bool))
        if lower_order_final and n < 15 and i == n - 1:
            use_second = torch.zeros_like(use_second)
        one = torch.ones_like(s_n)
        a_n_safe, a_c_safe, a_p_safe, s_n_safe, s_c_safe, s_p_safe = (
            torch.where(use_second, v, one) for v in (a_n, a_c, a_p, s_n, s_c, s_p))
        lam_n = torch.log(a_n_safe) - torch.log(s_n_safe)
        lam_c = torch.log(a_c_safe) - torch.log(s_c_safe)
        lam_p = torch.log(a_p_safe) - torch.log(s_p_safe)
        h = torch.where(use_second, lam_n - lam_c, one)
        h_0 = torch.where(use_second, lam_c - lam_p, one)
        h_0 = torch.where(h_0 == 0, one, h_0)  # a repeated time (zero-length step): no extrapolation
        exp_neg_h = (s_n_safe * a_c_safe) / (a_n_safe * s_c_safe)
        d_1 = expand_time(h / h_0, x) * (x0 - x0_prev)
        second = first + expand_time(0.5 * a_n_safe * (1.0 - exp_neg_h), x) * d_1
        x0_prev = x0
        x = _where(use_second, second, first, x)
    return (x, torch.stack(states + [x])) if path else x


def ddim_sample(teacher, x_init, timesteps, cond=None, guidance_scale=None):
    """DDIM (eta = 0) along `timesteps` (teacher units) from x_init (B, ...) at timesteps[0]."""
    _check_x(x_init)
    grid = check_grid(teacher.schedule, timesteps)
    return _integrate(teacher, x_init, _step_times(grid, x_init), "ddim", cond, guidance_scale, True)


# Copied from flowmap_jax.core.samplers.heun_sample with x_init.shape[0])->x_init)
def heun_sample(teacher, x_init, timesteps, cond=None, guidance_scale=None):
    """Heun's 2nd-order method (2 teacher evaluations per step, Euler into the clean end)."""
    _check_x(x_init)
    grid = check_grid(teacher.schedule, timesteps)
    return _integrate(teacher, x_init, _step_times(grid, x_init), "heun", cond, guidance_scale, True)


def dpmpp_2m_sample(teacher, x_init, timesteps, cond=None, guidance_scale=None, lower_order_final=True):
    """DPM-Solver++(2M), diffusers' `DPMSolverMultistepScheduler` defaults."""
    _check_x(x_init)
    grid = check_grid(teacher.schedule, timesteps)
    return _integrate(teacher, x_init, _step_times(grid, x_init), "dpmpp_2m", cond, guidance_scale,
                      lower_order_final)


SOLVERS = {"ddim": ddim_sample, "heun": heun_sample, "dpmpp_2m": dpmpp_2m_sample}


# Copied from flowmap_jax.core.samplers.teacher_sample
def teacher_sample(teacher, x_init, timesteps, solver="ddim", cond=None, guidance_scale=None):
    """The teacher solver named `solver` (one of SOLVERS) along `timesteps`."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: expected one of {tuple(SOLVERS)}")
    return SOLVERS[solver](teacher, x_init, timesteps, cond=cond, guidance_scale=guidance_scale)


SOLVE_SPACINGS = TEACHER_SPACINGS


def _spacing_variable(schedule, t, spacing):
    if spacing == "uniform":
        return t
    theta = schedules.angle(schedule, t)
    cos, sin = torch.cos(theta), torch.sin(theta)
    g = SPACING_RHO_MIN + sin / (cos + sin / SPACING_RHO_MAX)
    return g ** (1.0 / 7.0) if spacing == "karras" else torch.log(g)


def _time_from_spacing_variable(schedule, w, spacing):
    if spacing == "uniform":
        return w
    v = torch.clamp((w ** 7 if spacing == "karras" else torch.exp(w)) - SPACING_RHO_MIN, 0.0,
                    SPACING_RHO_MAX * (1 - 1e-6))
    return schedules.time_from_rho(schedule, v / (1.0 - v / SPACING_RHO_MAX))


def solve_grid(schedule, t_source, t_target, num_steps: int, spacing: str = "logsnr"):
    """(num_steps + 1, B) per-example time grids (see `flowmap_jax.core.samplers.solve_grid`)."""
    if spacing not in SOLVE_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: expected one of {SOLVE_SPACINGS}")
    frac = torch.arange(int(num_steps) + 1, dtype=torch.float32, device=t_source.device)[:, None] / int(num_steps)
    first = torch.clamp(t_source.to(torch.float32), min=schedule.t_eval_min)
    last = torch.clamp(t_target.to(torch.float32), min=schedule.t_eval_min)
    w_s = _spacing_variable(schedule, first, spacing)
    w_t = _spacing_variable(schedule, last, spacing)
    times = _time_from_spacing_variable(schedule, w_s[None] + (w_t - w_s)[None] * frac, spacing)
    return torch.cat([first[None], times[1:-1], last[None]], 0)


# Copied from flowmap_jax.core.samplers._from_clean_end with jnp->torch
def _from_clean_end(teacher, x, t_source, cond, guidance_scale):
    """The PF-ODE step from t_source (B,) in [t_clean, t_eval_min] up to t_eval_min (DDPM: from [-1, 0) to
    t = 0, where the teacher cannot be evaluated): x (B, ...) at t_source -> x at t_eval_min, the start of
    `teacher_solve`'s grid. A source at t_eval_min is returned exactly. The teacher is evaluated at
    t_eval_min only, CLEAN_START_EVALUATIONS times (guided as `teacher.x0_eps` with cond, guidance_scale).

    The rule. In DDIM's variables y = x / alpha, rho = sigma / alpha the PF-ODE is dy/drho = eps_hat(x, t).
    At the clean end (rho = 0) eps_hat = -sigma * score -> 0, and near it eps_hat is linear in rho to leading
    order (Gaussian data N(m, v): eps_hat = rho (y - m) / (v + rho^2)), so the slope at the source is taken
    as (rho_s / rho_e) f_e, f_e the teacher's eps_hat at t_eval_min, and the trapezoid rule (exact for a
    slope linear in rho) gives
        y_e = y_s + (rho_e^2 - rho_s^2) / (2 rho_e) * eps_hat(x_e, t_eval_min),    x_e = alpha_e y_e,
    implicit in x_e: solved by fixed-point iteration from the zero-slope predictor x_e = (alpha_e / alpha_s) x_s
    (one iteration is Heun's predictor-corrector; the contraction factor is about rho_e^2 / (2 v), 0.04 for
    SD's schedule on data of variance 0.01). Its error is O(rho_e^4): 2% of the step's increment on the
    mixture test with SD's schedule (Heun's single evaluation: 6%).

    Not the DDIM step from the source: the teacher asked below t_eval_min answers with its t_eval_min
    prediction at x_s (clean data taken for a noisy state), whose eps_hat is about the slope at t_eval_min,
    not the clean end's 0; as the slope of the whole first step it moves y by about twice the true
    increment once the grid is fine, a fixed error that more steps do not remove (issue 28, SD's schedule,
    mixture data, t = -1 to 999, DPM-Solver++(2M): 8.0e-3 at 16 steps, 1.4e-2 at 64, 1.5e-2 at 128; it
    looked best at few steps, where it cancels part of the grid's own error). The exact inverse of DDIM's
    last step into the clean end (backward Euler, y_e = y_s + rho_e eps_hat(x_e)) doubles the increment
    too, and so does a Heun step that takes that t_eval_min prediction at x_s as its first slope. Measured in
    benchmarks/results/teacher_target_error.md."""
    schedule = teacher.schedule
    t_eval = torch.full_like(t_source, schedule.t_eval_min)
    a_s, s_s = schedules.alpha_sigma(schedule, torch.minimum(t_source, t_eval))
    a_e, s_e = schedules.alpha_sigma(schedule, t_eval)
    rho_s, rho_e = s_s / a_s, s_e / a_e
    x_pred = expand_time(a_e / a_s, x) * x  # y unchanged: the slope is 0 at the clean end
    coef = expand_time(0.5 * a_e * (rho_e * rho_e - rho_s * rho_s) / rho_e, x)  # 0 exactly where rho_s = rho_e
    x_e = x_pred
    for _ in range(CLEAN_START_EVALUATIONS):
        x_e = x_pred + coef * teacher.x0_eps(x_e, t_eval, cond, guidance_scale)[1]
    return x_e


# Copied from flowmap_jax.core.samplers._may_start_at_clean_end
def _may_start_at_clean_end(schedule, source_min) -> bool:
    """Whether a source may lie in [t_clean, t_eval_min) (DDPM's [-1, 0)), where `_from_clean_end` steps first:
    never for a schedule the teacher evaluates down to its clean end, nor when source_min >= t_eval_min."""
    return schedule.t_eval_min > schedule.t_clean and (source_min is None or float(source_min) < schedule.t_eval_min)


def teacher_solve(teacher, x_s, t_source, t_target, num_steps, solver="dpmpp_2m", cond=None,
                  guidance_scale=None, lower_order_final=False, spacing="logsnr", path=False, source_min=None):
    """The teacher's PF-ODE solution from t_source to t_target (numbers or (B,), either direction): for DDPM
    first `_from_clean_end` where a source lies in [-1, 0), then `num_steps` steps on `solve_grid(...,
    spacing)`, then the DDIM step from max(t_target, t_eval_min) to t_target (see
    `flowmap_jax.core.samplers.teacher_solve`). x_s (B, ...). path: also the interior points, (x_t, times
    (num_steps - 1, B), states (num_steps - 1, B, ...)). source_min: None, or a bound every source is at or
    above (checked here: ValueError otherwise); at or above t_eval_min it skips the clean-end start."""
    _check_x(x_s)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    batch = x_s.shape[0]
    schedule = teacher.schedule
    schedules.check_times(schedule, t_source, "t_source")
    schedules.check_times(schedule, t_target, "t_target")
    s = torch.as_tensor(t_source, dtype=torch.float32, device=x_s.device).expand(batch)
    t = torch.as_tensor(t_target, dtype=torch.float32, device=x_s.device).expand(batch)
    times = solve_grid(schedule, s, t, num_steps, spacing)
    x = x_s
    if source_min is not None and bool(torch.any(s < float(source_min))):
        raise ValueError(f"teacher_solve: a source lies below source_min={float(source_min)}: min t_source "
                         f"{float(s.min())}")
    if _may_start_at_clean_end(schedule, source_min) and bool(torch.any(s < schedule.t_eval_min)):
        x = _from_clean_end(teacher, x, s, cond, guidance_scale)  # DDPM: from [-1, 0) up to t_eval_min
    x = _integrate(teacher, x, times, solver, cond, guidance_scale, lower_order_final, path=path)
    x, states = x if path else (x, None)
    if schedule.t_eval_min > schedule.t_clean:  # DDPM: from t_eval_min into [-1, 0)
        x = teacher.ddim_step(x, times[-1], t, cond, guidance_scale)
    x = _where(s == t, x_s, x, x_s)  # s = t: the identity exactly, at either end
    if not path:
        return x
    return x, times[1:-1], _where(s == t, x_s, states[:-1], x_s)  # (n - 1, B, ...)


def flow_map_sample(flow_map, params, x_init, timesteps, cond=None, gamma=0.0, rng=None, noise=None,
                    jump=None):
    """N = len(timesteps) - 1 flow-map jumps X(x, t_i, t_{i+1}) from x_init (B, ...) at timesteps[0].

    gamma in [0, 1]: stochastic re-noising after every jump but the last (decreasing grids only), with
    standard normal noise drawn from `rng` (a torch.Generator, or an int seed) or given as `noise`
    (N - 1 tensors of x's shape). params: None (the network's own) or a dict for functional_call.
    jump: `make_jump(flow_map)` or None (the same in eager PyTorch: the map itself).
    """
    _check_x(x_init)
    grid = check_grid(flow_map.schedule, timesteps)
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    n = grid.shape[0] - 1
    if gamma > 0:
        if not np.all(np.diff(grid) < 0):
            raise ValueError("gamma > 0 (re-noising) needs a decreasing grid (towards data)")
        if noise is None and rng is None:
            raise ValueError("gamma > 0 needs rng (a torch.Generator or seed) or noise")
        if noise is not None and len(noise) != n - 1:
            raise ValueError(f"noise must hold {n - 1} tensors (one per jump but the last), got {len(noise)}")
        if isinstance(rng, int):
            rng = torch.Generator(device=x_init.device).manual_seed(rng)
    step = flow_map if jump is None else jump
    x = x_init
    for i in range(n):
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        if gamma > 0 and i < n - 1:
            a_n, s_n = schedules.alpha_sigma(flow_map.schedule, t_next)
            u = schedules.time_from_rho(flow_map.schedule, (1.0 - gamma ** 2) ** 0.5 * s_n / a_n)
            a_u, _ = schedules.alpha_sigma(flow_map.schedule, u)
            x_u = step(params, x, t_cur, u, cond)
            if noise is not None:
                z = torch.as_tensor(noise[i], dtype=x.dtype, device=x.device)
            else:
                z = torch.randn(x.shape, generator=rng, dtype=x.dtype, device=x.device)
            if z.shape != x.shape:
                raise ValueError(f"noise[{i}] has shape {tuple(z.shape)}, expected {tuple(x.shape)}")
            x = (a_n / a_u) * x_u + gamma * s_n * z
        else:
            x = step(params, x, t_cur, t_next, cond)
    return x


def make_jump(flow_map):
    """The twin of `flowmap_jax.core.samplers.make_jump`: eager PyTorch compiles nothing, so the map itself."""
    return flow_map
