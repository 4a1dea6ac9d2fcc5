"""Converged reference solutions of the probability-flow ODE for closed-form data, computed independently
of the code under test (numpy float64, scipy's DOP853 at rtol 1e-10), for the solver tests and
benchmarks/teacher_target_error.py.

Data: every element drawn independently from the 1-D Gaussian mixture MIXTURE (three modes of variance
0.01: narrow, so the ODE bends sharply near the clean end, unlike a single Gaussian's). The library's
closed-form teacher of the same data is `teacher.gaussian_mixture_teacher_fn` (JAX and torch).

The ODE is solved in the angle theta = arctan(sigma / alpha) for y = x / sqrt(alpha^2 + sigma^2): with
c = cos theta, s = sin theta, y = c x0 + s eps, and
    dy/dtheta = E[c eps - s x0 | y] = sum_k r_k (c eps_k - s x0_k),
finite at both ends (theta = 0, the clean end, and theta = pi/2, alpha = 0) and the same for every
schedule; a schedule only enters through theta(t) and the scale sqrt(alpha^2 + sigma^2), which
`angle_scale` computes from diffusers' own alphas_cumprod (DDPM) or the closed forms (VP cosine with
s = 0, rectified flow).
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp

MIXTURE = {"weights": np.array([0.3, 0.45, 0.25]), "means": np.array([-1.0, 0.15, 1.2]),
           "vars": np.array([0.01, 0.01, 0.01])}
"""Elementwise data distribution of the mixture tests: modes at -1, 0.15, 1.2, variance 0.01 each."""


def mixture_params(dtype=np.float32):
    """MIXTURE as {"weights", "means", "vars"} arrays of `dtype` (the JAX teacher's params)."""
    return {k: v.astype(dtype) for k, v in MIXTURE.items()}


def sample_mixture(rng: np.random.Generator, shape) -> np.ndarray:
    """Data x0 of `shape` (float64), each element from MIXTURE."""
    k = rng.choice(len(MIXTURE["weights"]), size=shape, p=MIXTURE["weights"])
    return MIXTURE["means"][k] + np.sqrt(MIXTURE["vars"][k]) * rng.normal(size=shape)


def _ddpm_log_alpha_table(schedule) -> np.ndarray:
    """log alpha at t = -1, 0, ..., N - 1 from diffusers' DDPMScheduler (independent of flow_config)."""
    from diffusers import DDPMScheduler

    kwargs = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
              "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule}
    if schedule.trained_betas is not None:
        kwargs["trained_betas"] = list(schedule.trained_betas)
    cumprod = DDPMScheduler(**kwargs).alphas_cumprod.double().numpy()
    return np.concatenate([[0.0], 0.5 * np.log(cumprod)])


def alpha_sigma(schedule, t):
    """float64 (alpha_t, sigma_t) for a `ScheduleConfig` (DDPM: log alpha linear between integer steps of
    diffusers' table, alpha = 1 at t = -1; VP cosine with cosine_s = 0; rectified flow)."""
    t = np.asarray(t, np.float64)
    if schedule.kind == "ddpm":
        table = _ddpm_log_alpha_table(schedule)
        log_alpha = np.interp(t + 1.0, np.arange(table.shape[0], dtype=np.float64), table)
        alpha = np.exp(log_alpha)
        return alpha, np.sqrt(-np.expm1(2.0 * log_alpha))
    tau = t / schedule.time_scale
    if schedule.kind == "vp_cosine":
        if schedule.cosine_s != 0.0:
            raise NotImplementedError("reference only for cosine_s = 0")
        return np.cos(np.pi * tau / 2), np.sin(np.pi * tau / 2)
    return 1.0 - tau, tau


def angle_scale(schedule, t):
    """(theta_t, sqrt(alpha_t^2 + sigma_t^2)), float64."""
    alpha, sigma = alpha_sigma(schedule, t)
    return np.arctan2(sigma, alpha), np.hypot(alpha, sigma)


def _posterior(y, theta):
    """E[x0 | y], E[eps | y] at angle theta (y and theta broadcast), float64."""
    c, s = np.cos(theta)[..., None], np.sin(theta)[..., None]
    w, m, v = MIXTURE["weights"], MIXTURE["means"], MIXTURE["vars"]
    yk = y[..., None]
    total = c * c * v + s * s
    resid = (yk - c * m) / total
    logits = np.log(w) - 0.5 * np.log(total) - 0.5 * resid * (yk - c * m)
    logits = logits - logits.max(axis=-1, keepdims=True)
    resp = np.exp(logits)
    resp = resp / resp.sum(axis=-1, keepdims=True)
    return np.sum(resp * (m + c * v * resid), axis=-1), np.sum(resp * s * resid, axis=-1)


def mixture_flow(schedule, x_s, t_source, t_target, rtol: float = 1e-10) -> np.ndarray:
    """The PF-ODE solution from t_source to t_target (scalars or (B,), either direction) for MIXTURE data,
    x_s (B, ...): float64 of x_s's shape, converged to ~rtol (DOP853, all examples in one solve along
    u in [0, 1] with theta_i(u) = theta_s,i + u (theta_t,i - theta_s,i))."""
    x_s = np.asarray(x_s, np.float64)
    batch = x_s.shape[0]
    theta_s, r_s = (np.broadcast_to(v, (batch,)) for v in angle_scale(schedule, t_source))
    theta_t, r_t = (np.broadcast_to(v, (batch,)) for v in angle_scale(schedule, t_target))
    y0 = (x_s.reshape(batch, -1) / r_s[:, None])
    span = (theta_t - theta_s)[:, None]

    def rhs(u, flat):
        y = flat.reshape(y0.shape)
        theta = np.broadcast_to((theta_s + u * (theta_t - theta_s))[:, None], y.shape)
        x0, eps = _posterior(y, theta)
        return (span * (np.cos(theta) * eps - np.sin(theta) * x0)).ravel()

    sol = solve_ivp(rhs, (0.0, 1.0), y0.ravel(), method="DOP853", rtol=rtol, atol=rtol * 1e-2)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    y_t = sol.y[:, -1].reshape(y0.shape)
    return (y_t * r_t[:, None]).reshape(x_s.shape)


def rel_rms(a, ref) -> float:
    """RMS(a - ref) / RMS(ref) over all elements (the relative RMS error of the reports)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
