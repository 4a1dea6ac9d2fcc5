"""The teacher's noise schedule and its time convention, shared by `flowmap_jax` and `torch_ref`.

Numpy only (no jax, no torch):

- `ScheduleConfig`: the teacher's noise schedule (diffusers DDPM betas, continuous VP cosine, rectified
  flow), read from a diffusers scheduler config (`from_diffusers`, `load_scheduler`).
- `check_time_values`: the range check on concrete times.
- `alpha_sigma`: alpha_t and sigma_t in float64 numpy (for time grids and other host-side work; the
  backends' `schedules.alpha_sigma` are the float32 twins used inside models and samplers).

Time convention (both backends, everywhere)
-------------------------------------------
Times are floats in the teacher's own timestep units, so a pretrained UNet sees exactly the timesteps it
was trained on. The forward process is x_t = alpha_t * x0 + sigma_t * eps.

- DDPM (``kind="ddpm"``, N = num_train_timesteps): t in [-1, N - 1]. At integer k >= 0,
  alpha_k^2 = alphas_cumprod[k] (diffusers' table); at t = -1, alpha = 1 and sigma = 0 (clean data, where
  diffusers' DDIM lands when its previous timestep goes negative with ``set_alpha_to_one=True``);
  log(alpha_t) is linear between consecutive integers (DPM-Solver's interpolation) and
  sigma_t = sqrt(1 - alpha_t^2). The UNet was trained on t in [0, N - 1] only: `t_eval_min` = 0, and a
  teacher asked for t in [-1, 0) uses its prediction at t = 0 (what DDIM's last step does).
- VP cosine (``kind="vp_cosine"``, T = time_scale): t in [0, t_max] (t_max <= T), tau = t / T,
  alpha_t = cos(theta(tau)) / cos(theta(0)) with theta(tau) = (tau + s) / (1 + s) * pi / 2 and
  sigma_t = sqrt(1 - alpha_t^2); with the default s = 0 this is TrigFlow: alpha = cos(pi tau / 2),
  sigma = sin(pi tau / 2). t = 0 is clean.
- Rectified flow (``kind="rectified_flow"``, T = time_scale): t in [0, T], x_t = (1 - t/T) x0 + (t/T) eps
  (SD3/FLUX; SD3's transformer sees t = 1000 * sigma, i.e. T = 1000). t = 0 is clean.

`time_unit` is the length of [clean, noise] in the teacher's units (N for DDPM, T otherwise); the
(s, t) sampler works in tau = t / time_unit. The objectives differentiate with respect to the angle
theta = arctan(sigma_t / alpha_t) (unit-free and well conditioned; see `flowmap_jax.objectives`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from flowmap_jax.spec.prediction_types import PREDICTION_TYPES

SCHEDULE_KINDS = ("ddpm", "vp_cosine", "rectified_flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar` with the "cosine" transform (squaredcos_cap_v2), float64."""
    def alpha_bar(x):
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """A noise schedule and its time convention (see the module docstring). Frozen and hashable, so it
    can be a static (non-pytree) field under `jax.jit`.

    Build with `ScheduleConfig.ddpm(...)`, `.vp_cosine(...)`, `.rectified_flow(...)`, or
    `.from_diffusers(scheduler_config_dict)` / `.from_json_file(path)`.
    """

    kind: str = "ddpm"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    time_scale: float = 1.0
    cosine_s: float = 0.0
    t_max: float | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}: expected one of {SCHEDULE_KINDS}")
        if self.kind == "ddpm":
            if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
                raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}: expected one of {BETA_SCHEDULES}"
                                 " or trained_betas")
            if int(self.num_train_timesteps) < 2:
                raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
            if self.trained_betas is not None:
                object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
                if len(self.trained_betas) != self.num_train_timesteps:
                    raise ValueError(f"trained_betas has {len(self.trained_betas)} entries but num_train_timesteps is "
                                     f"{self.num_train_timesteps}")
            betas = self.betas
            if not (np.all(betas > 0) and np.all(betas < 1)):
                raise ValueError(f"betas must lie in (0, 1); got range [{betas.min()}, {betas.max()}]")
        else:
            if not self.time_scale > 0:
                raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
            if self.t_max is not None and not 0 < self.t_max <= self.time_scale:
                raise ValueError(f"t_max must lie in (0, time_scale={self.time_scale}], got {self.t_max}")
            if self.kind == "vp_cosine" and not 0 <= self.cosine_s < 1:
                raise ValueError(f"cosine_s must lie in [0, 1), got {self.cosine_s}")

    # ---- constructors ------------------------------------------------------------------------------
    @classmethod
    def ddpm(cls, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
             trained_betas=None) -> "ScheduleConfig":
        """A diffusers DDPM schedule (same defaults as diffusers' DDPM/DDIM schedulers)."""
        return cls(kind="ddpm", num_train_timesteps=int(num_train_timesteps), beta_start=float(beta_start),
                   beta_end=float(beta_end), beta_schedule=beta_schedule,
                   trained_betas=None if trained_betas is None else tuple(float(b) for b in trained_betas))

    @classmethod
    def vp_cosine(cls, time_scale=1.0, cosine_s=0.0, t_max=None) -> "ScheduleConfig":
        """Continuous VP cosine schedule on t in [0, t_max] (default t_max = time_scale)."""
        return cls(kind="vp_cosine", time_scale=float(time_scale), cosine_s=float(cosine_s),
                   t_max=None if t_max is None else float(t_max))

    @classmethod
    def rectified_flow(cls, time_scale=1.0) -> "ScheduleConfig":
        """Rectified flow x_t = (1 - t/T) x0 + (t/T) eps on t in [0, T]."""
        return cls(kind="rectified_flow", time_scale=float(time_scale))

    @classmethod
    def from_diffusers(cls, config: dict) -> "ScheduleConfig":
        """From a diffusers scheduler config dict (`scheduler_config.json`).

        DDPM-family schedulers (DDPM, DDIM, PNDM, DPMSolver*, Euler*, ...): reads `num_train_timesteps`,
        `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`. FlowMatch* schedulers (SD3/FLUX): rectified
        flow with time_scale = num_train_timesteps. Keys that only change how a sampler steps (`steps_offset`,
        `timestep_spacing`, `clip_sample`, `shift`, ...) are ignored. Refused with ValueError naming the key:
        an unknown `beta_schedule`, `rescale_betas_zero_snr=True` (alpha = 0 at the last step), an unknown
        `prediction_type` (see `prediction_type_from_diffusers`).
        """
        config = dict(config)
        prediction_type_from_diffusers(config)  # validate early, with the key named
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("scheduler config key 'rescale_betas_zero_snr'=True is not supported (zero terminal "
                             "SNR puts alpha = 0 at the last training step)")
        n = int(config.get("num_train_timesteps", 1000))
        if _is_flow_match(config):
            return cls.rectified_flow(time_scale=float(n))
        beta_schedule = config.get("beta_schedule", "linear")
        trained = config.get("trained_betas")
        if trained is None and beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"scheduler config key 'beta_schedule'={beta_schedule!r} is not supported: expected one of "
                             f"{BETA_SCHEDULES} (or 'trained_betas')")
        return cls.ddpm(beta_schedule=beta_schedule, beta_start=config.get("beta_start", 0.0001),
                        beta_end=config.get("beta_end", 0.02), num_train_timesteps=n, trained_betas=trained)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ScheduleConfig":
        """From a diffusers `scheduler_config.json` (a file, or a folder holding one)."""
        return cls.from_diffusers(read_scheduler_config(path))

    # ---- time range ------------------------------------------------------------------------------
    @property
    def t_clean(self) -> float:
        """The clean end (alpha = 1, sigma = 0): -1 for DDPM, 0 otherwise."""
        return -1.0 if self.kind == "ddpm" else 0.0

    @property
    def t_noise(self) -> float:
        """The noisiest time of the schedule: N - 1 for DDPM, t_max (default T) otherwise."""
        if self.kind == "ddpm":
            return float(self.num_train_timesteps - 1)
        return float(self.time_scale if self.t_max is None else self.t_max)

    @property
    def t_eval_min(self) -> float:
        """The smallest time the teacher network was trained on (0 for DDPM; the clean end otherwise)."""
        return 0.0 if self.kind == "ddpm" else self.t_clean

    @property
    def time_unit(self) -> float:
        """Teacher time units per unit of normalised time tau (N for DDPM, T otherwise)."""
        return float(self.num_train_timesteps) if self.kind == "ddpm" else float(self.time_scale)

    # ---- DDPM tables -------------------------------------------------------------------------------
    @property
    def betas(self) -> np.ndarray:
        """(N,) float64 betas, diffusers' formulas (DDPM only)."""
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_scheduler_config(path: str | os.PathLike) -> dict:
    """Reads a diffusers scheduler config: a `scheduler_config.json` file, or a folder holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    with open(path) as f:
        return json.load(f)


def _is_flow_match(config: dict) -> bool:
    """A FlowMatch* scheduler config: by `_class_name` (saved json) or, for a live `scheduler.config`
    (which has no `_class_name`), by its `shift` key without DDPM betas."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return True
    return "shift" in config and "beta_schedule" not in config and "trained_betas" not in config


def prediction_type_from_diffusers(config: dict) -> str:
    """The teacher's prediction type from a diffusers scheduler config: `prediction_type` (default
    "epsilon", as diffusers); FlowMatch* schedulers predict the flow velocity ("flow")."""
    if _is_flow_match(config):
        return "flow"
    value = config.get("prediction_type", "epsilon")
    if value not in PREDICTION_TYPES:
        raise ValueError(f"scheduler config key 'prediction_type'={value!r} is not supported: expected one of "
                         f"{PREDICTION_TYPES}")
    return value


def load_scheduler(path_or_config: Any) -> tuple[ScheduleConfig, str]:
    """(ScheduleConfig, prediction_type) from a scheduler config dict, json file or folder."""
    config = path_or_config if isinstance(path_or_config, dict) else read_scheduler_config(path_or_config)
    return ScheduleConfig.from_diffusers(config), prediction_type_from_diffusers(config)


def check_time_values(schedule: ScheduleConfig, values, name: str = "t") -> None:
    """Raises ValueError naming `name` and the offending value if any of `values` (numpy-convertible,
    concrete) lies outside [t_clean, t_noise] (with a tolerance of 1e-4 time units), or is not finite."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return
    lo, hi = schedule.t_clean, schedule.t_noise
    tol = 1e-4 * max(1.0, schedule.time_unit / 1000.0)
    bad = ~np.isfinite(v) | (v < lo - tol) | (v > hi + tol)
    if np.any(bad):
        value = float(v[bad].flat[0])
        raise ValueError(f"{name}={value!r} is outside the schedule's time range [{lo}, {hi}] "
                         f"({schedule.kind}; clean end {lo}, noise end {hi})")


def alpha_sigma(schedule: ScheduleConfig, t) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) as float64 numpy arrays of t's shape: x_t = alpha_t * x0 + sigma_t * eps.

    The same formulas as `flowmap_jax.schedules.alpha_sigma` and `torch_ref.schedules.alpha_sigma` (which
    compute in float32): DDPM log(alpha) linear between integer steps of `log_alpha_table`, VP cosine
    alpha = cos(theta) / cos(theta(0)), rectified flow (1 - t/T, t/T)."""
    t = np.asarray(t, np.float64)
    if schedule.kind == "ddpm":
        table = schedule.log_alpha_table  # entry k is t = k - 1
        u = t + 1.0
        index = np.clip(np.floor(u), 0, schedule.num_train_timesteps - 1)
        frac = u - index
        index = index.astype(np.int64)
        log_alpha = table[index] + frac * (table[index + 1] - table[index])
        return np.exp(log_alpha), np.sqrt(-np.expm1(2.0 * log_alpha))
    if schedule.kind == "vp_cosine":
        s = schedule.cosine_s
        theta = (t / schedule.time_scale + s) / (1.0 + s) * (math.pi / 2)
        if s == 0.0:
            return np.maximum(np.cos(theta), 0.0), np.sin(theta)
        alpha = np.maximum(np.cos(theta), 0.0) / math.cos(s / (1.0 + s) * (math.pi / 2))
        return alpha, np.sqrt(np.maximum(1.0 - alpha * alpha, 0.0))
    tau = t / schedule.time_scale
    return 1.0 - tau, tau
