"""Samplers in JAX (mirrored by `torch_ref.samplers`): the teacher's PF-ODE solvers and flow-map jumps.

Time grids are 1-D sequences of times in teacher units (`spec.time_grid.time_grid`, or any list; a traced
jax array works too, unchecked, so one compiled sampler serves every grid of a length),
decreasing towards data (sampling) or increasing towards noise (inversion); `x_init` is the state at
timesteps[0] (for sampling: noise, as diffusers' DDIM/DPM-Solver pipelines start with init_noise_sigma = 1).
To reproduce diffusers' schedulers take their `timesteps` and append the clean end (`schedule.t_clean`).

Teacher solvers (`ddim_sample`, `heun_sample`, `dpmpp_2m_sample`; `teacher_sample` picks by name):
- DDIM (eta = 0): x_t = alpha_t x0_hat + sigma_t eps_hat; Euler in (x / alpha, sigma / alpha) (for
  rectified flow also Euler in t). Matches diffusers' `DDIMScheduler` with `set_alpha_to_one=True`.
- Heun (2nd order): for VP schedules, the DDIM step plus a trapezoid correction that blends EDM's Heun in
  (x / alpha, sigma / alpha) (diffusers' HeunDiscrete; used near the clean end) with the same rule in
  (x / sigma, alpha / sigma) (near the noise end), so it is finite from alpha = 0 (`_heun_correction`);
  in (x, t) with the flow velocity for rectified flow (FlowMatchHeunDiscrete); the step into the clean end
  is Euler (EDM's rule).
- DPM-Solver++(2M) (data prediction, midpoint): first step first-order; a step is also first-order when
  any of its three times (previous, current, next) is an end of the schedule, where log(alpha / sigma) is
  infinite (sigma = 0 clean; alpha = 0 for VP cosine and rectified flow at T), or with `lower_order_final`
  and fewer than 15 steps on the last step (diffusers' rules for `DPMSolverMultistepScheduler` with its
  defaults).
Every solver runs from and to both ends of every schedule, either direction (tests/test_samplers.py checks
them against exact solutions there). An epsilon-prediction teacher cannot start at alpha = 0 (its
x0 = (x - sigma eps) / alpha is undefined): use v, flow or sample prediction for such schedules.
The fixed-grid loops run under `jax.lax.scan` (one compiled body whatever the step count).

`teacher_solve` solves from per-example t_source to t_target (B,) with `num_steps` steps on a per-example
grid (`solve_grid`, log-SNR spacing by default): the `pairs` target and other reference solutions. DDPM's
segment [-1, 0), below the first time its teacher can be evaluated, lies outside the grid: the solution
enters it with DDIM's last step (towards data) and leaves it with a trapezoid step that uses the clean
end's zero slope (towards noise, `_from_clean_end`; issue 28: a DDIM step there left a fixed error, so more
steps gave a worse answer). Its
error on Gaussian-mixture data (modes of variance 0.01) against the exact ODE solution, with
DPM-Solver++(2M) on the log-SNR grid over training pairs that include both ends, is 0.2-0.64% at 32 steps,
0.3-0.9% at 24, 0.6-1.4% at 16, 3-6% at 8 and 10-22% at 4, depending on the schedule (DDPM linear,
scaled_linear, squaredcos_cap_v2, VP cosine, rectified flow; `python benchmarks/teacher_target_error.py`
prints the table for every spacing). `flow_map_sample` makes N jumps on any grid, with optional stochastic
re-noising (gamma sampling of consistency models): jump to the time u where sigma_u / alpha_u = sqrt(1 - gamma^2) *
sigma_t / alpha_t, then re-noise to t with the forward transition (x_t = alpha_t / alpha_u x_u +
gamma sigma_t z); gamma = 0 is deterministic, gamma = 1 denoises fully at each jump.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax.core import predictions as pred_lib
from flowmap_jax.core import schedules
from flowmap_jax.core.schedules import expand_time
from flowmap_jax.spec.objective_options import TEACHER_SOLVERS, TEACHER_SPACINGS
from flowmap_jax.spec.schedule import check_time_values
from flowmap_jax.spec.solver_settings import (
    CLEAN_START_EVALUATIONS,
    HEUN_EDM_MAX_RHO,
    SPACING_RHO_MAX,
    SPACING_RHO_MIN,
)

__all__ = ["ddim_sample", "heun_sample", "dpmpp_2m_sample", "teacher_sample", "teacher_solve", "solve_grid",
           "flow_map_sample", "make_jump", "SOLVERS", "SOLVE_SPACINGS"]


def check_grid(schedule, timesteps):
    """A 1-D grid of >= 2 times -> (n + 1,) float64 numpy (concrete grids, range-checked) or float32 jax
    array (traced grids, e.g. a jit argument: unchecked). ValueError otherwise."""
    if isinstance(timesteps, jax.core.Tracer):
        if timesteps.ndim != 1 or timesteps.shape[0] < 2:
            raise ValueError(f"timesteps must be a 1-D sequence of at least 2 times, got shape {timesteps.shape}")
        return timesteps.astype(jnp.float32)
    grid = np.asarray(timesteps, dtype=np.float64)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 times, got shape {grid.shape}")
    check_time_values(schedule, grid, "timesteps")
    return grid


def _step_times(grid, batch):
    """(n + 1,) grid -> (n + 1, B) float32."""
    return jnp.broadcast_to(jnp.asarray(grid, jnp.float32)[:, None], (grid.shape[0], batch))


def _check_x(x):
    if jnp.ndim(x) < 1:
        raise ValueError(f"x_init must have a batch axis, got shape {jnp.shape(x)}")


def _heun_correction(x, a_c, s_c, a_n, s_n, x0_1, eps_1, x0_2, eps_2):
    """Heun's trapezoid correction to the DDIM (Euler) step from (a_c, s_c) to (a_n, s_n) of a VP schedule,
    given the teacher's (x0, eps) at the start (_1) and at the Euler point (_2). Shapes: x's; a/s (B,).

    Two second-order trapezoid rules exist: EDM's in y = x / alpha, rho = sigma / alpha (dy/drho = eps;
    diffusers' HeunDiscrete), correction c_eps (eps_2 - eps_1) with c_eps = 0.5 (s_n - a_n s_c / a_c),
    infinite from alpha_c = 0 and ill-conditioned where alpha_c is tiny; and the same rule in y' = x / sigma,
    rho' = alpha / sigma (dy'/drho' = x0), c_x0 (x0_2 - x0_1) with c_x0 = 0.5 (a_n - s_n a_c / s_c),
    infinite from sigma_c = 0. This is their blend with weights cos^2 and sin^2 of the angle theta_c (still
    second order, smooth, finite at both ends):
        0.5 (a_c s_n - a_n s_c) / (a_c^2 + s_c^2) * (a_c (eps_2 - eps_1) - s_c (x0_2 - x0_1)).
    EDM's form near the clean end, the x0 form near the noise end. On the mixture test EDM's form alone
    left 46% error at 32 uniform steps from DDPM squaredcos_cap_v2's t = 999 (alpha = 5e-5), the blend 1.5%;
    elsewhere they agree to within a few percent of the error."""
    coef = 0.5 * (a_c * s_n - a_n * s_c) / (a_c * a_c + s_c * s_c)
    blend = expand_time(coef, x) * (expand_time(a_c, x) * (eps_2 - eps_1) - expand_time(s_c, x) * (x0_2 - x0_1))
    # diffusers' HeunDiscrete (EDM's eps form) wherever it is well conditioned (sigma_c / alpha_c <= 20,
    # SD's whole range), so the solver is diffusers' Heun there; the blend only beyond, up to alpha = 0.
    use_edm = s_c <= HEUN_EDM_MAX_RHO * a_c
    a_safe = jnp.where(use_edm, a_c, jnp.ones_like(a_c))
    edm = expand_time(0.5 * (s_n - a_n * s_c / a_safe), x) * (eps_2 - eps_1)
    return jnp.where(expand_time(use_edm, x), edm, blend)


def _integrate(teacher, x, times, solver, cond, guidance_scale, lower_order_final, path=False):
    """Solve the teacher's PF-ODE along times (n + 1, B) with `solver`; returns x at times[-1], or with `path`
    (x at times[-1], the states at times[1:] stacked (n, B, ...))."""
    schedule = teacher.schedule
    n = times.shape[0] - 1
    index = jnp.arange(n)

    def x0_eps(x_cur, t_cur):
        return teacher.x0_eps(x_cur, t_cur, cond, guidance_scale)

    if solver == "ddim":
        def body(x_cur, inputs):
            t_cur, t_next, _ = inputs
            x_next = teacher.ddim_step(x_cur, t_cur, t_next, cond, guidance_scale)
            return x_next, x_next if path else None

        x, states = jax.lax.scan(body, x, (times[:-1], times[1:], index))
        return (x, states) if path else x

    if solver == "heun":
        rectified = not schedule.variance_preserving  # linear path: Heun on the flow velocity in t

        def body(x_cur, inputs):
            t_cur, t_next, _ = inputs
            a_c, s_c = schedules.alpha_sigma(schedule, t_cur)
            a_n, s_n = schedules.alpha_sigma(schedule, t_next)
            x0_1, eps_1 = x0_eps(x_cur, t_cur)
            x_euler = expand_time(a_n, x_cur) * x0_1 + expand_time(s_n, x_cur) * eps_1
            if rectified:
                v_1 = pred_lib.velocity(x0_1, eps_1, *schedules.alpha_sigma_derivatives(schedule, t_cur))
                v_2 = teacher.velocity(x_euler, t_next, cond, guidance_scale)
                x_heun = x_cur + expand_time(t_next - t_cur, x_cur) * 0.5 * (v_1 + v_2)
            else:
                x0_2, eps_2 = x0_eps(x_euler, t_next)
                x_heun = x_euler + _heun_correction(x_cur, a_c, s_c, a_n, s_n, x0_1, eps_1, x0_2, eps_2)
            correct = expand_time(s_n > 0, x_cur)
            x_next = jnp.where(correct, x_heun, x_euler)
            return x_next, x_next if path else None

        x, states = jax.lax.scan(body, x, (times[:-1], times[1:], index))
        return (x, states) if path else x

    if solver == "dpmpp_2m":
        def body(carry, inputs):
            x_cur, x0_prev, t_prev = carry
            t_cur, t_next, i = inputs
            a_c, s_c = schedules.alpha_sigma(schedule, t_cur)
            a_n, s_n = schedules.alpha_sigma(schedule, t_next)
            a_p, s_p = schedules.alpha_sigma(schedule, t_prev)
            x0, eps = x0_eps(x_cur, t_cur)
            # First order (DPM-Solver++1 = DDIM): a_n x0 + s_n eps = (s_n / s_c) x + a_n (1 - e^{-h}) x0.
            first = expand_time(a_n, x_cur) * x0 + expand_time(s_n, x_cur) * eps
            # Second order needs finite log-SNRs lambda = log(a / s) at t_prev, t_cur and t_next: not at either
            # end of the schedule (sigma = 0 clean, alpha = 0 for VP cosine / rectified flow at T).
            use_second = (i > 0) & (s_n > 0) & (s_c > 0) & (a_n > 0) & (a_c > 0) & (a_p > 0)
            if lower_order_final and n < 15:
                use_second = use_second & (i < n - 1)
            # Second order (midpoint): + 0.5 a_n (1 - e^{-h}) (h / h_0) (x0 - x0_prev), lambda = log(a / s).
            a_n_safe, a_c_safe, a_p_safe, s_n_safe, s_c_safe, s_p_safe = (
                jnp.where(use_second, v, 1.0) for v in (a_n, a_c, a_p, s_n, s_c, s_p))
            lam_n = jnp.log(a_n_safe) - jnp.log(s_n_safe)
            lam_c = jnp.log(a_c_safe) - jnp.log(s_c_safe)
            lam_p = jnp.log(a_p_safe) - jnp.log(s_p_safe)
            h = jnp.where(use_second, lam_n - lam_c, 1.0)
            h_0 = jnp.where(use_second, lam_c - lam_p, 1.0)
            h_0 = jnp.where(h_0 == 0, 1.0, h_0)  # a repeated time (zero-length step): no extrapolation
            exp_neg_h = (s_n_safe * a_c_safe) / (a_n_safe * s_c_safe)
            d_1 = expand_time(h / h_0, x_cur) * (x0 - x0_prev)
            second = first + expand_time(0.5 * a_n_safe * (1.0 - exp_neg_h), x_cur) * d_1
            x_next = jnp.where(expand_time(use_second, x_cur), second, first)
            return (x_next, x0, t_cur), x_next if path else None

        (x, _, _), states = jax.lax.scan(body, (x, jnp.zeros_like(x), times[0]), (times[:-1], times[1:], index))
        return (x, states) if path else x

    raise ValueError(f"unknown solver {solver!r}: expected one of {TEACHER_SOLVERS}")


def ddim_sample(teacher, x_init, timesteps, cond=None, guidance_scale=None):
    """DDIM (eta = 0) along `timesteps` (concrete, teacher units) from x_init (B, ...) at timesteps[0]."""
    _check_x(x_init)
    grid = check_grid(teacher.schedule, timesteps)
    return _integrate(teacher, x_init, _step_times(grid, x_init.shape[0]), "ddim", cond, guidance_scale, True)


def heun_sample(teacher, x_init, timesteps, cond=None, guidance_scale=None):
    """Heun's 2nd-order method (2 teacher evaluations per step, Euler into the clean end)."""
    _check_x(x_init)
    grid = check_grid(teacher.schedule, timesteps)
    return _integrate(teacher, x_init, _step_times(grid, x_init.shape[0]), "heun", cond, guidance_scale, True)


def dpmpp_2m_sample(teacher, x_init, timesteps, cond=None, guidance_scale=None, lower_order_final=True):
    """DPM-Solver++(2M), diffusers' `DPMSolverMultistepScheduler` defaults (see the module docstring)."""
    _check_x(x_init)
    grid = check_grid(teacher.schedule, timesteps)
    return _integrate(teacher, x_init, _step_times(grid, x_init.shape[0]), "dpmpp_2m", cond, guidance_scale,
                      lower_order_final)


SOLVERS = {"ddim": ddim_sample, "heun": heun_sample, "dpmpp_2m": dpmpp_2m_sample}


def teacher_sample(teacher, x_init, timesteps, solver="ddim", cond=None, guidance_scale=None):
    """The teacher solver named `solver` (one of SOLVERS) along `timesteps`."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: expected one of {tuple(SOLVERS)}")
    return SOLVERS[solver](teacher, x_init, timesteps, cond=cond, guidance_scale=guidance_scale)


SOLVE_SPACINGS = TEACHER_SPACINGS


def _spacing_variable(schedule, t, spacing):
    """The variable a grid is uniform in, at times t (float32): t itself, g(rho_t)^(1/7) (Karras) or
    log g(rho_t), g computed from the angle theta = arctan2(sigma, alpha), so finite at alpha = 0."""
    if spacing == "uniform":
        return t
    theta = schedules.angle(schedule, t)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    g = SPACING_RHO_MIN + sin / (cos + sin / SPACING_RHO_MAX)
    return g ** (1.0 / 7.0) if spacing == "karras" else jnp.log(g)


def _time_from_spacing_variable(schedule, w, spacing):
    """The inverse of `_spacing_variable` (interior grid points only)."""
    if spacing == "uniform":
        return w
    v = jnp.clip((w ** 7 if spacing == "karras" else jnp.exp(w)) - SPACING_RHO_MIN, 0.0, SPACING_RHO_MAX * (1 - 1e-6))
    return schedules.time_from_rho(schedule, v / (1.0 - v / SPACING_RHO_MAX))


def solve_grid(schedule, t_source, t_target, num_steps: int, spacing: str = "logsnr"):
    """(num_steps + 1, B) float32 per-example time grids from t_source to t_target ((B,) each), either
    direction, for the teacher's reference solutions (`teacher_solve`). The ends are exact, but an end
    below `t_eval_min` (DDPM's clean end, t in [-1, 0)) is taken at t_eval_min: the grid spans only times
    the teacher can be evaluated at, and `teacher_solve` crosses [-1, 0) with a step of its own at either
    end. The interior is uniform in the variable `spacing` names (one of SOLVE_SPACINGS):

    - "uniform": t;
    - "karras": g(rho_t)^(1/7) (EDM's rho = 7 spacing of the noise-to-signal ratio rho = sigma / alpha);
    - "logsnr" (default): log g(rho_t) (DPM-Solver's log-SNR spacing);
    with g(rho) = rho_min + rho / (1 + rho / rho_max) (`SPACING_RHO_MIN`, `SPACING_RHO_MAX`): rho itself
    between the two, finite at both ends of every schedule (rho = 0 at the clean end, rho = inf where
    alpha = 0: VP cosine at T, rectified flow at T), so every spacing works for every schedule and pair
    of ends. Measured accuracy of each: benchmarks/teacher_target_error.py.
    """
    if spacing not in SOLVE_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: expected one of {SOLVE_SPACINGS}")
    frac = jnp.arange(int(num_steps) + 1, dtype=jnp.float32)[:, None] / int(num_steps)
    first = jnp.maximum(jnp.asarray(t_source, jnp.float32), schedule.t_eval_min)
    last = jnp.maximum(jnp.asarray(t_target, jnp.float32), schedule.t_eval_min)
    w_s = _spacing_variable(schedule, first, spacing)
    w_t = _spacing_variable(schedule, last, spacing)
    times = _time_from_spacing_variable(schedule, w_s[None] + (w_t - w_s)[None] * frac, spacing)
    return times.at[0].set(first).at[-1].set(last)


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
    t_eval = jnp.full_like(t_source, schedule.t_eval_min)
    a_s, s_s = schedules.alpha_sigma(schedule, jnp.minimum(t_source, t_eval))
    a_e, s_e = schedules.alpha_sigma(schedule, t_eval)
    rho_s, rho_e = s_s / a_s, s_e / a_e
    x_pred = expand_time(a_e / a_s, x) * x  # y unchanged: the slope is 0 at the clean end
    coef = expand_time(0.5 * a_e * (rho_e * rho_e - rho_s * rho_s) / rho_e, x)  # 0 exactly where rho_s = rho_e
    x_e = x_pred
    for _ in range(CLEAN_START_EVALUATIONS):
        x_e = x_pred + coef * teacher.x0_eps(x_e, t_eval, cond, guidance_scale)[1]
    return x_e


def _may_start_at_clean_end(schedule, source_min) -> bool:
    """Whether a source may lie in [t_clean, t_eval_min) (DDPM's [-1, 0)), where `_from_clean_end` steps first:
    never for a schedule the teacher evaluates down to its clean end, nor when source_min >= t_eval_min."""
    return schedule.t_eval_min > schedule.t_clean and (source_min is None or float(source_min) < schedule.t_eval_min)


def teacher_solve(teacher, x_s, t_source, t_target, num_steps, solver="dpmpp_2m", cond=None,
                  guidance_scale=None, lower_order_final=False, spacing="logsnr", path=False, source_min=None):
    """The teacher's PF-ODE solution from t_source to t_target (scalars or (B,), either direction, either
    end of the schedule included) with `num_steps` steps of `solver` on the per-example grid
    `solve_grid(..., spacing)` (log-SNR by default) between max(t_source, t_eval_min) and
    max(t_target, t_eval_min). For DDPM (t_eval_min = 0 > t_clean = -1) the segment [-1, 0) is crossed
    outside the grid, at either end: a source in [-1, 0) (data to noise from the clean end) first steps up
    to t = 0 with `_from_clean_end` (an implicit trapezoid with the clean end's zero slope, 2 teacher
    evaluations; run only when some source of the batch lies there, so the `pairs` objective, whose sources
    are clipped to >= t_eval_min, never pays for it), and the solution ends with the teacher's DDIM step
    from max(t_target, t_eval_min) to t_target (an exact identity unless t_target lies in [-1, 0), where it
    is DDIM's own last step into the clean end; one more teacher evaluation). x_s exactly where
    t_source = t_target. lower_order_final: diffusers' rule (the last step first order below 15 steps); off
    by default here, where the second-order last step is measured more accurate (DPM-Solver++(2M), 4 log-SNR
    steps on SD's schedule: 9.9% against 13.8%; identical from 15 steps). x_s (B, ...). Traceable.
    path: also return the solution's interior points, (x_t, times (num_steps - 1, B), states (num_steps - 1,
    B, ...)): the state at each interior grid time (times[k] strictly between the ends; for s = t all equal
    s and x_s), the `pairs` objective's extra targets (`path_targets`).
    source_min: None, or a float the caller guarantees every source is at or above (the `pairs` objective
    passes the lower end of the range it clips its sources to). When it is >= t_eval_min, the
    `_from_clean_end` branch is left out of the program: a `lax.cond` that never runs still has its memory
    planned (XLA sizes the step's buffers for both branches), and that branch, two guided teacher passes whose
    weights and broadcasts XLA shares between the passes, set the whole step's peak (SDXL's pairs step at 2
    examples on one device: 33 of its 40 GiB of temporaries, `benchmarks/sd15_step_plan.py`). Sources below
    source_min are not checked under jit (the torch twin checks them)."""
    _check_x(x_s)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    batch = x_s.shape[0]
    schedule = teacher.schedule
    schedules.check_times(schedule, t_source, "t_source")
    schedules.check_times(schedule, t_target, "t_target")
    s = jnp.broadcast_to(jnp.asarray(t_source, jnp.float32), (batch,))
    t = jnp.broadcast_to(jnp.asarray(t_target, jnp.float32), (batch,))
    times = solve_grid(schedule, s, t, num_steps, spacing)
    x = x_s
    if _may_start_at_clean_end(schedule, source_min):  # DDPM: from [-1, 0) up to t_eval_min, where a source lies there
        x = jax.lax.cond(jnp.any(s < schedule.t_eval_min),
                         lambda v: _from_clean_end(teacher, v, s, cond, guidance_scale), lambda v: v, x)
    x = _integrate(teacher, x, times, solver, cond, guidance_scale, lower_order_final, path=path)
    x, states = x if path else (x, None)
    if schedule.t_eval_min > schedule.t_clean:  # DDPM: from t_eval_min into [-1, 0)
        x = teacher.ddim_step(x, times[-1], t, cond, guidance_scale)
    x = jnp.where(expand_time(s == t, x_s), x_s, x)  # s = t: the identity exactly, at either end
    if not path:
        return x
    return x, times[1:-1], jnp.where(expand_time(s == t, x_s), x_s, states[:-1])  # (n - 1, B, ...)


def flow_map_sample(flow_map, params, x_init, timesteps, cond=None, gamma=0.0, rng=None, noise=None,
                    jump=None):
    """N = len(timesteps) - 1 flow-map jumps X(x, t_i, t_{i+1}) from x_init (B, ...) at timesteps[0].

    gamma in [0, 1]: stochastic re-noising after every jump but the last (decreasing grids only), with
    standard normal noise from `rng` (a jax PRNG key; `fold_in(rng, i)` for jump i) or given as `noise`
    (N - 1 arrays of x's shape). Deterministic given rng/noise.

    jump: `make_jump(flow_map)` (one compiled jump with per-example (B,) times, shared by every grid and
    every N: the trainer's sample grids, the quality benchmark and the sample CLIs take this path), or None
    to call the map directly (inside an enclosing jit).
    """
    _check_x(x_init)
    grid = check_grid(flow_map.schedule, timesteps)
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    n = grid.shape[0] - 1
    concrete = isinstance(grid, np.ndarray)
    if gamma > 0:
        if concrete and not np.all(np.diff(grid) < 0):
            raise ValueError("gamma > 0 (re-noising) needs a decreasing grid (towards data)")
        if noise is None and rng is None:
            raise ValueError("gamma > 0 needs rng (a jax PRNG key) or noise")
        if noise is not None and len(noise) != n - 1:
            raise ValueError(f"noise must hold {n - 1} arrays (one per jump but the last), got {len(noise)}")
    if jump is None:
        step = flow_map
    else:
        def step(p, xx, t_source, t_target, c):
            b = xx.shape[0]
            return jump(p, xx, jnp.broadcast_to(jnp.asarray(t_source, jnp.float32), (b,)),
                        jnp.broadcast_to(jnp.asarray(t_target, jnp.float32), (b,)), c)
    x = x_init
    for i in range(n):
        t_cur, t_next = (float(grid[i]), float(grid[i + 1])) if concrete else (grid[i], grid[i + 1])
        if gamma > 0 and i < n - 1:
            a_n, s_n = schedules.alpha_sigma(flow_map.schedule, t_next)
            u = schedules.time_from_rho(flow_map.schedule, jnp.sqrt(1.0 - gamma ** 2) * s_n / a_n)
            a_u, _ = schedules.alpha_sigma(flow_map.schedule, u)
            x_u = step(params, x, t_cur, u, cond)
            z = noise[i] if noise is not None else jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            if jnp.shape(z) != x.shape:
                raise ValueError(f"noise[{i}] has shape {jnp.shape(z)}, expected {x.shape}")
            x = (a_n / a_u) * x_u + gamma * s_n * z
        else:
            x = step(params, x, t_cur, t_next, cond)
    return x


def make_jump(flow_map):
    """One jitted flow-map jump `(params, x (B, ...), t_source (B,), t_target (B,), cond) -> X` for
    `flow_map_sample(..., jump=)`: traced times, so every grid and every number of jumps reuses one
    compilation per input shape."""
    return jax.jit(lambda params, x, t_source, t_target, cond: flow_map(params, x, t_source, t_target, cond))
