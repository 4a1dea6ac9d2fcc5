"""Pure-Python configuration of the flow-map core, shared by `flowmap_jax` and `torch_ref`.

No jax and no torch here (numpy only), so both backends import the same objects:

- `ScheduleConfig`: the teacher's noise schedule (diffusers DDPM betas, continuous VP cosine, rectified
  flow) and its time convention, read from a diffusers scheduler config.
- `PREDICTION_TYPES` and `check_prediction_type`.
- `TimePairConfig`: how training (s, t) pairs are drawn (`time_pairs.py` in each backend).
- `ObjectiveOptions`: the switches of the objectives (`objectives.py` in each backend).
- `time_grid`: sampling time grids; `add_target_time_hook_config`: the flow map's second-time hook.

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

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
"""What a network predicts at (x_t, t): the noise eps, v = alpha eps - sigma x0, the data x0, or the flow
velocity u = eps - x0 (SD3/FLUX; equal to dx/dt in [0, 1] time for rectified flow)."""

SCHEDULE_KINDS = ("ddpm", "vp_cosine", "rectified_flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

def check_prediction_type(prediction_type: str) -> str:
    """Returns `prediction_type` if it is one of PREDICTION_TYPES, else raises ValueError naming it."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
    return prediction_type


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


GRID_SPACINGS = ("uniform", "logsnr")


def time_grid(schedule: ScheduleConfig, num_steps: int, t_start: float | None = None,
              t_end: float | None = None, spacing: str = "uniform") -> np.ndarray:
    """(num_steps + 1,) float64 times from `t_start` (default the noise end) to `t_end` (default the clean
    end). Any grid works with the samplers; both directions (decreasing: towards data; increasing: towards
    noise) are allowed.

    spacing "uniform" (default): uniform in t. For DDPM with N divisible by num_steps this is diffusers'
    "trailing" spacing plus the clean end: N = 1000, 4 steps -> [999, 749, 499, 249, -1].
    spacing "logsnr": the interior times uniform in log(sigma_t / alpha_t) (DPM-Solver's log-SNR spacing),
    the clean end taken at the teacher's last trained time (DDPM t = 0, sigma / alpha ~ 0.01; other
    schedules 1e-3 of the range) for the spacing only; the ends are exact. DDPM with linear betas, 2 steps:
    [999, ~302, -1]. Needs a finite sigma / alpha at both ends of the spacing (not rectified flow, nor VP
    cosine up to alpha = 0: give those `t_max` or "uniform").
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
    from flowmap_jax import schedules  # lazy: schedules imports this module

    lo = max(min(t_start, t_end), schedule.t_eval_min)
    if schedule.kind != "ddpm":  # sigma = 0 at the clean end: start the spacing a little after it
        lo = max(lo, schedule.t_clean + 1e-3 * schedule.time_unit)
    hi = max(t_start, t_end)
    dense = np.linspace(lo, hi, 8193)
    alpha, sigma = (np.asarray(v, np.float64) for v in schedules.alpha_sigma(schedule, dense))
    with np.errstate(divide="ignore"):
        log_rho = np.log(sigma) - np.log(alpha)
    if schedule.kind == "rectified_flow" or not np.all(np.isfinite(log_rho)) or np.any(np.diff(log_rho) <= 0):
        raise ValueError(f"grid spacing 'logsnr' needs a finite, increasing sigma/alpha between t = {lo:g} and "
                         f"{hi:g} for this {schedule.kind} schedule; use spacing 'uniform'")
    a, b = (log_rho[0], log_rho[-1]) if t_start <= t_end else (log_rho[-1], log_rho[0])
    targets = np.linspace(a, b, int(num_steps) + 1)[1:-1]
    inner = np.interp(targets, log_rho, dense)
    return np.concatenate([[t_start], inner, [t_end]])


@dataclasses.dataclass(frozen=True)
class TimePairConfig:
    """How (t_source, t_target) training pairs are drawn (see `time_pairs.py`).

    In normalised time tau in [0, 1] (0 the clean end, 1 the noise end): the jump length d = |tau_s - tau_t|
    has density proportional to d^(length_power - 1) (d = U^(1 / length_power)); the source
    tau_s ~ U(d, 1) and tau_t = tau_s - d. With probability `p_clean` the target is the clean end (the jump
    every sampler ends with); with probability `p_noise` the source is the noise end (the jump every sampler
    starts with, where an epsilon-parameterised map is least well conditioned: x0_hat = (x - sigma eps_hat) /
    alpha amplifies the network's error by sigma / alpha, ~160 at DDPM t = 999 with linear betas), the length
    kept. With `bidirectional`, half the pairs are swapped (jumps towards noise, for inversion).
    length_power = 1 makes all lengths equally likely; the default 2 weights up long jumps
    (density 2d, against 2(1 - d) for two independent uniform times), because short jumps are right by
    construction of the parameterisation (the teacher's own DDIM step) while few-step sampling lives on
    long ones.
    """

    length_power: float = 2.0
    p_clean: float = 0.25
    p_noise: float = 0.0
    bidirectional: bool = False

    def __post_init__(self):
        if not self.length_power > 0:
            raise ValueError(f"length_power must be > 0, got {self.length_power}")
        if not 0 <= self.p_clean <= 1:
            raise ValueError(f"p_clean must lie in [0, 1], got {self.p_clean}")
        if not 0 <= self.p_noise <= 1:
            raise ValueError(f"p_noise must lie in [0, 1], got {self.p_noise}")


OBJECTIVE_NAMES = ("pairs", "lagrangian", "eulerian", "progressive")
TEACHER_SOLVERS = ("ddim", "heun", "dpmpp_2m")
TEACHER_SPACINGS = ("uniform", "karras", "logsnr")
"""Grids of the teacher's reference solutions (`samplers.solve_grid`)."""


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
    """Switches of the objectives, one namespace for all of them (unused ones are ignored by an objective).

    time_pairs: `TimePairConfig` (or a dict of its fields).
    teacher_steps, teacher_solver, teacher_spacing: `pairs` target: the teacher's PF-ODE solved from s to t
        with this many steps of this solver (one of TEACHER_SOLVERS) on this grid (one of TEACHER_SPACINGS;
        `samplers.teacher_solve` / `solve_grid`). Measured on elementwise Gaussian-mixture data with modes of
        variance 0.01 against a converged solution, over training pairs that include both ends
        (`python benchmarks/teacher_target_error.py`): the default DPM-Solver++(2M), 32 steps, log-SNR grid
        leaves 0.2-0.64% relative RMS error depending on the schedule (DDPM linear / scaled_linear /
        squaredcos, VP cosine, rectified flow); 24 steps 0.3-0.9%, 16 steps 0.6-1.4%, 8 steps 3-6%,
        4 steps 10-22%.
    residual_form: JVP objectives. "stopgrad" (sCM / Align Your Flow): loss = |X - sg(X - r)|^2, whose
        gradient is 2 r . dX/dparams with r the (normalised) residual, needing no backward pass through the
        JVP; "direct" (LSD of Boffi et al.): loss = |r|^2, differentiated through the JVP. "auto" (default):
        stopgrad for eulerian, direct for lagrangian (the stop-gradient Lagrangian diverged on the Gaussian
        closed form; the direct one trains).
    tangent_normalization, tangent_norm_c: r <- r / (|r| + c), |r| the per-example L2 norm (sCM, c = 0.1).
    tangent_warmup_steps, tangent_warmup_max: the network's JVP term is multiplied by
        tangent_warmup_max * min(step / tangent_warmup_steps, 1) (sCM's linear ramp, 10k steps there; 0 = off,
        factor 1). `step` comes from batch["step"] (() or (B,)), which the trainer must then provide.
    adaptive_weight, adaptive_weight_p, adaptive_weight_c: per-example loss l <- l / sg((l + c)^p)
        (MeanFlow; l is the per-example mean squared error).
    jvp: "exact" (jax.jvp / torch.func.jvp) or "finite_difference" (central difference with step fd_eps
        in theta, the angle the objectives differentiate by; for kernels or shardings without forward-mode AD).
    jump_scale_normalization: JVP objectives: X and the residual of a jump (s, t) are multiplied by
        1 / max(1, |c_x(s, t)|), c_x the factor by which X(x_s, s, t) = c_x x_s + c_pred F amplifies x_s
        (alpha_t / alpha_s for an epsilon teacher: about 15 for SD's jump from t = 999 to clean data). Without
        it, the long jumps of epsilon teachers from the noise end dominate the gradients of the JVP objectives
        and training stalls (measured on the Gaussian closed form); v, flow and sample teachers have
        |c_x| <= ~1.4, so it barely changes them.
    progressive_anchor_weight: weight of the `progressive` objective's anchor term, which matches the map's
        velocity at t = s to the teacher's (without it the semigroup condition alone has trivial solutions).
    guidance_scale_range: (lo, hi) to draw a per-example guidance scale w ~ U(lo, hi) for the teacher (guidance
        distillation); None uses the teacher's own scale. guidance_embedding_dim: if set, the student gets
        cond["timestep_cond"] = guidance_scale_embedding(w - 1, dim) (LCM's convention, through the UNet's
        time_cond_proj_dim).
    """

    time_pairs: TimePairConfig = TimePairConfig()
    teacher_steps: int = 32
    teacher_solver: str = "dpmpp_2m"
    teacher_spacing: str = "logsnr"
    residual_form: str = "auto"
    tangent_normalization: bool = False
    tangent_norm_c: float = 0.1
    tangent_warmup_steps: int = 0
    tangent_warmup_max: float = 1.0
    adaptive_weight: bool = False
    adaptive_weight_p: float = 1.0
    adaptive_weight_c: float = 0.01
    jvp: str = "exact"
    fd_eps: float = 5e-3
    jump_scale_normalization: bool = True
    progressive_anchor_weight: float = 1.0
    guidance_scale_range: tuple[float, float] | None = None
    guidance_embedding_dim: int | None = None

    def __post_init__(self):
        if isinstance(self.time_pairs, dict):
            object.__setattr__(self, "time_pairs", TimePairConfig(**self.time_pairs))
        if self.guidance_scale_range is not None:
            object.__setattr__(self, "guidance_scale_range", tuple(float(v) for v in self.guidance_scale_range))
            if len(self.guidance_scale_range) != 2:
                raise ValueError(f"guidance_scale_range must be (lo, hi), got {self.guidance_scale_range}")
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise ValueError(f"unknown teacher_solver {self.teacher_solver!r}: expected one of {TEACHER_SOLVERS}")
        if self.teacher_spacing not in TEACHER_SPACINGS:
            raise ValueError(f"unknown teacher_spacing {self.teacher_spacing!r}: expected one of {TEACHER_SPACINGS}")
        if self.residual_form not in ("auto", "stopgrad", "direct"):
            raise ValueError(f"unknown residual_form {self.residual_form!r}: expected 'auto', 'stopgrad' or 'direct'")
        if self.jvp not in ("exact", "finite_difference"):
            raise ValueError(f"unknown jvp {self.jvp!r}: expected 'exact' or 'finite_difference'")
        if int(self.teacher_steps) < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {self.teacher_steps}")
        if not self.fd_eps > 0:
            raise ValueError(f"fd_eps must be > 0, got {self.fd_eps}")

    def residual_form_for(self, objective: str) -> str:
        """The residual form a JVP objective uses ("auto" resolved)."""
        if self.residual_form != "auto":
            return self.residual_form
        return "direct" if objective == "lagrangian" else "stopgrad"

    @classmethod
    def create(cls, options: "ObjectiveOptions | dict | None" = None) -> "ObjectiveOptions":
        """From None (defaults), a dict (unknown keys raise ValueError naming them) or an instance."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise ValueError(f"unknown objective option(s) {unknown}: known options are {sorted(known)}")
            return cls(**options)
        raise TypeError(f"objective options must be a dict or ObjectiveOptions, got {type(options).__name__}")


def add_target_time_hook_config(unet_config: dict) -> dict:
    """A copy of a diffusers UNet2DConditionModel config dict with the flow map's target-time hook:
    `class_embed_type="timestep"`, so `class_labels` (the target time t) goes through the same sinusoidal
    projection as the timestep into a `TimestepEmbedding` added to the time embedding.

    Raises ValueError naming the key if the teacher already uses a class embedding
    (`class_embed_type`, `num_class_embeds`) or concatenates class embeddings (`class_embeddings_concat`).
    """
    config = dict(unet_config)
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise ValueError(f"the teacher UNet already uses a class embedding ({key}={config[key]!r}); the flow "
                             "map's target time needs class_embed_type='timestep' for itself")
    if config.get("class_embeddings_concat", False):
        raise ValueError("UNet config key 'class_embeddings_concat'=True is not supported by the target-time hook")
    config["class_embed_type"] = "timestep"
    # diffusers' `from_config` re-applies class defaults to the keys listed in `_use_default_values`
    # (set on a live model's config): the hook's key must not be listed there.
    if "_use_default_values" in config:
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k != "class_embed_type"]
    return config
