"""`DDPMSchedule` (kind "ddpm"): diffusers' discrete DDPM betas on continuous time.

N = num_train_timesteps, t in [-1, N - 1]. At integer k >= 0, alpha_k^2 = alphas_cumprod[k] (diffusers'
table); at t = -1, alpha = 1 and sigma = 0 (clean data, where diffusers' DDIM lands when its previous
timestep goes negative with ``set_alpha_to_one=True``); log(alpha_t) is linear between consecutive integers
(DPM-Solver's interpolation) and sigma_t = sqrt(1 - alpha_t^2). The UNet was trained on t in [0, N - 1]
only: `t_eval_min` = 0, and a teacher asked for t in [-1, 0) uses its prediction at t = 0 (what DDIM's last
step does).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from flowmap_jax.spec.schedule.array_ops import NUMPY_OPS
from flowmap_jax.spec.schedule.base import ScheduleConfig, register_schedule

__all__ = ["DDPMSchedule", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar` with the "cosine" transform (squaredcos_cap_v2), float64."""
    def alpha_bar(x):
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


@register_schedule
@dataclasses.dataclass(frozen=True)
class DDPMSchedule(ScheduleConfig):
    """diffusers' DDPM betas (`beta_schedule` by name, or `trained_betas`), N = `num_train_timesteps`
    training steps; t in [-1, N - 1] teacher units, t = -1 clean (see the module docstring)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None

    kind = "ddpm"
    variance_preserving = True
    parameterizations = ("angle", "teacher_step", "anchored")
    default_parameterization = "angle"
    diffusers_fallback = True

    def __post_init__(self):
        object.__setattr__(self, "num_train_timesteps", int(self.num_train_timesteps))
        object.__setattr__(self, "beta_start", float(self.beta_start))
        object.__setattr__(self, "beta_end", float(self.beta_end))
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}: expected one of {BETA_SCHEDULES}"
                             " or trained_betas")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} entries but num_train_timesteps is "
                                 f"{self.num_train_timesteps}")
        betas = self.betas
        if not (np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError(f"betas must lie in (0, 1); got range [{betas.min()}, {betas.max()}]")

    # ---- diffusers ---------------------------------------------------------------------------------------
    @classmethod
    def _from_diffusers_config(cls, config: dict) -> DDPMSchedule:
        beta_schedule = config.get("beta_schedule", "linear")
        trained = config.get("trained_betas")
        if trained is None and beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"scheduler config key 'beta_schedule'={beta_schedule!r} is not supported: expected one of "
                             f"{BETA_SCHEDULES} (or 'trained_betas')")
        return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   beta_start=config.get("beta_start", 0.0001), beta_end=config.get("beta_end", 0.02),
                   beta_schedule=beta_schedule, trained_betas=trained)

    def to_diffusers(self) -> dict:
        """The keys every DDPM-family scheduler (DDPM, DDIM, DPMSolverMultistep, Euler, ...) reads."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": self.beta_schedule,
                "trained_betas": None if self.trained_betas is None else list(self.trained_betas)}

    # ---- time range ------------------------------------------------------------------------------------
    @property
    def t_clean(self) -> float:
        """-1: one step before diffusers' first timestep (alpha = 1, sigma = 0)."""
        return -1.0

    @property
    def t_noise(self) -> float:
        """N - 1, diffusers' last timestep."""
        return float(self.num_train_timesteps - 1)

    @property
    def t_eval_min(self) -> float:
        """0: the UNet was trained on t in [0, N - 1]."""
        return 0.0

    @property
    def time_unit(self) -> float:
        return float(self.num_train_timesteps)

    # ---- tables --------------------------------------------------------------------------------------
    @property
    def betas(self) -> np.ndarray:
        """(N,) float64 betas, diffusers' formulas."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float64)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
        return _betas_for_alpha_bar(n)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """(N,) float64 cumulative product of (1 - beta). Agrees with diffusers' float32 table to ~1e-6
        relative (float64 here; diffusers' `1 - alphas_cumprod` loses digits in float32 near t = 0)."""
        return np.cumprod(1.0 - self.betas)

    @property
    def log_alpha_table(self) -> np.ndarray:
        """(N + 1,) float64: log(alpha) at t = -1, 0, 1, ..., N - 1 (entry k is t = k - 1; entry 0 is 0)."""
        return np.concatenate([[0.0], 0.5 * np.log(self.alphas_cumprod)])

    # ---- formulas --------------------------------------------------------------------------------------
    def _log_alpha(self, t, ops):
        """log(alpha_t) and its slope d log(alpha)/dt, piecewise linear between integer steps."""
        table = ops.constant(self.log_alpha_table, t)  # entry k is t = k - 1
        n = self.num_train_timesteps
        u = t + 1.0
        index = ops.clip(ops.floor(u), 0, n - 1)
        frac = u - index
        index = ops.to_index(index)
        lo, hi = table[index], table[index + 1]
        slope = hi - lo
        return lo + frac * slope, slope

    def alpha_sigma(self, t, ops=NUMPY_OPS):
        t = ops.asarray(t)
        log_alpha, _ = self._log_alpha(t, ops)
        return ops.exp(log_alpha), ops.sqrt(-ops.expm1(2.0 * log_alpha))

    def alpha_sigma_derivatives(self, t, ops=NUMPY_OPS):
        """d alpha/dt = alpha * slope with the slope of the segment [floor(t), floor(t) + 1] (right
        derivative at integers); d sigma/dt = -alpha * (d alpha/dt) / sigma, infinite at t = -1."""
        t = ops.asarray(t)
        log_alpha, slope = self._log_alpha(t, ops)
        alpha, sigma = ops.exp(log_alpha), ops.sqrt(-ops.expm1(2.0 * log_alpha))
        d_alpha = alpha * slope
        return d_alpha, -alpha * d_alpha / sigma

    def time_from_rho(self, rho, ops=NUMPY_OPS):
        rho = ops.asarray(rho)
        log_alpha = -0.5 * ops.log1p(rho * rho)
        table = self.log_alpha_table  # decreasing in t
        times = np.arange(table.shape[0], dtype=np.float64) - 1.0
        return ops.interp(-log_alpha, ops.constant(-table, rho), ops.constant(times, rho))
