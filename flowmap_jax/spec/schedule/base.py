"""`ScheduleConfig`, the base of the schedule classes (one per kind), and the registry of kinds.

A kind is a frozen dataclass subclass (its own fields), registered with `@register_schedule` under its
serialized name `kind`. It owns:

- its fields and their checks (`__post_init__`);
- its time range: `t_clean`, `t_noise`, `t_eval_min`, `time_unit` (teacher units);
- alpha_t, sigma_t, their time derivatives and the inverse of sigma / alpha, each written once against an
  `ArrayOps` (`array_ops`), so numpy, JAX and torch run the same formula;
- its form: `variance_preserving` (alpha^2 + sigma^2 = 1, the angle form) or not (rectified flow's linear
  form), the flow-map parameterisations it allows and its default (`parameterizations`,
  `default_parameterization`), and whether time grids may be spaced in log-SNR (`logsnr_grid`, from
  `logsnr_t_min`);
- its diffusers mapping: which scheduler configs it reads (`claims_diffusers_config`), how
  (`_from_diffusers_config`), the prediction type they imply, and the config it writes (`to_diffusers`).

`schedule_class(kind)` is the one place a serialized kind name becomes its class (`from_dict`, i.e.
flowmap.json). Nothing else branches on `kind`: it is the serialized name, read-only.

Serialized layout (`to_dict`, flowmap.json "schedule", unchanged since format version 1): "kind" then the
keys of `SHARED_FIELD_DEFAULTS` (the fields of the one flat ScheduleConfig of earlier versions), those a
kind does not own at their defaults; a kind with fields of its own beyond these adds them after.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from typing import Any, ClassVar

import numpy as np

from flowmap_jax.spec.prediction_types import PREDICTION_TYPES
from flowmap_jax.spec.schedule.array_ops import NUMPY_OPS, ArrayOps

__all__ = ["ScheduleConfig", "SHARED_FIELD_DEFAULTS", "register_schedule", "schedule_class", "schedule_kinds",
           "schedule_fields", "read_scheduler_config", "prediction_type_from_diffusers", "load_scheduler",
           "check_time_values", "alpha_sigma"]

SHARED_FIELD_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "time_scale": 1.0,
    "cosine_s": 0.0,
    "t_max": None,
}
"""Every serialized schedule holds these keys (after "kind"); a kind that does not own one writes its value
here, and reading accepts it only at this value."""

_REGISTRY: dict[str, type[ScheduleConfig]] = {}


def register_schedule(cls: type[ScheduleConfig]) -> type[ScheduleConfig]:
    """Class decorator: registers a schedule class under its `kind` (a new, non-empty name)."""
    kind = cls.__dict__.get("kind")
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} must set a class attribute kind (its serialized name)")
    if kind in _REGISTRY:
        raise ValueError(f"schedule kind {kind!r} is already registered ({_REGISTRY[kind].__name__})")
    if cls.default_parameterization not in cls.parameterizations:
        raise TypeError(f"{cls.__name__}.default_parameterization must be one of its parameterizations")
    _REGISTRY[kind] = cls
    return cls


def schedule_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_REGISTRY)


def schedule_class(kind: str) -> type[ScheduleConfig]:
    """The class registered under the serialized name `kind`; ValueError naming the known kinds otherwise."""
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown schedule kind {kind!r}: expected one of {schedule_kinds()}")
    return cls


def schedule_fields() -> tuple[str, ...]:
    """Every key a serialized schedule may hold: "kind", the shared keys, then each kind's own others."""
    keys = ["kind", *SHARED_FIELD_DEFAULTS]
    for cls in _REGISTRY.values():
        keys += [f.name for f in dataclasses.fields(cls) if f.name not in keys]
    return tuple(keys)


def _serialized_default(key: str):
    """The value a kind that does not own `key` writes for it."""
    if key in SHARED_FIELD_DEFAULTS:
        return SHARED_FIELD_DEFAULTS[key]
    for cls in _REGISTRY.values():
        for field in dataclasses.fields(cls):
            if field.name == key:
                return field.default
    raise KeyError(key)


class ScheduleConfig(abc.ABC):
    """A noise schedule and its time convention (`flowmap_jax.spec.schedule` fixes the convention): the base
    of the schedule classes. Each subclass is a frozen dataclass, hashable, so it can be a static
    (non-pytree) field under `jax.jit`; equal when of the same class with equal fields.

    Build with `ScheduleConfig.ddpm(...)`, `.vp_cosine(...)`, `.rectified_flow(...)` (or the classes
    themselves), `.from_diffusers(scheduler_config_dict)` / `.from_json_file(path)`, or `.from_dict(fields)`
    for the serialized form.
    """

    kind: ClassVar[str]
    """The serialized name (flowmap.json's schedule "kind"). Read-only; never branch on it."""
    variance_preserving: ClassVar[bool]
    """alpha_t^2 + sigma_t^2 = 1 (the angle form); False for rectified flow's linear form alpha + sigma = 1.
    The samplers' Heun step follows it (EDM's Heun for VP, Heun on the flow velocity otherwise)."""
    parameterizations: ClassVar[tuple[str, ...]]
    """The flow-map parameterisations (`spec.parameterization`) this schedule allows."""
    default_parameterization: ClassVar[str]
    """What parameterization "auto" resolves to."""
    logsnr_grid: ClassVar[bool] = True
    """Whether sampling grids may be spaced uniformly in log(sigma / alpha) (`spec.time_grid`)."""
    diffusers_prediction_type: ClassVar[str | None] = None
    """The prediction type every diffusers config of this kind implies (None: read `prediction_type`)."""
    diffusers_fallback: ClassVar[bool] = False
    """The kind a diffusers scheduler config is read as when no kind claims it (the DDPM family)."""

    # ---- named constructors (the kinds of format versions 1-2; a new kind is built from its class) ---------
    @classmethod
    def ddpm(cls, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
             trained_betas=None) -> ScheduleConfig:
        """A diffusers DDPM schedule (same defaults as diffusers' DDPM/DDIM schedulers): `DDPMSchedule`."""
        return schedule_class("ddpm")(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                      beta_end=beta_end, beta_schedule=beta_schedule, trained_betas=trained_betas)

    @classmethod
    def vp_cosine(cls, time_scale=1.0, cosine_s=0.0, t_max=None) -> ScheduleConfig:
        """Continuous VP cosine schedule on t in [0, t_max] (default t_max = time_scale): `VPCosineSchedule`."""
        return schedule_class("vp_cosine")(time_scale=time_scale, cosine_s=cosine_s, t_max=t_max)

    @classmethod
    def rectified_flow(cls, time_scale=1.0) -> ScheduleConfig:
        """Rectified flow x_t = (1 - t/T) x0 + (t/T) eps on t in [0, T]: `RectifiedFlowSchedule`."""
        return schedule_class("rectified_flow")(time_scale=time_scale)

    # ---- serialized form -------------------------------------------------------------------------------
    @staticmethod
    def from_dict(data: dict) -> ScheduleConfig:
        """From the serialized fields (`to_dict`; flowmap.json "schedule"): "kind" picks the class. Keys the
        kind does not own must hold their serialized default. ValueError naming the key otherwise."""
        values = dict(data)
        if "kind" not in values:
            raise ValueError(f"schedule fields have no 'kind': expected one of {schedule_kinds()}")
        cls = schedule_class(values.pop("kind"))
        own = {f.name for f in dataclasses.fields(cls)}
        known = schedule_fields()
        for key in list(values):
            if key in own:
                continue
            if key not in known:
                raise ValueError(f"unknown schedule field {key!r}: known {list(known)}")
            value = values.pop(key)
            if value != _serialized_default(key):
                raise ValueError(f"schedule field {key}={value!r} does not apply to a {cls.kind} schedule (its "
                                 f"fields: {sorted(own)})")
        return cls(**values)

    def to_dict(self) -> dict:
        """The serialized fields: "kind", the shared keys (those not owned at their defaults), own others."""
        return {"kind": self.kind, **SHARED_FIELD_DEFAULTS, **dataclasses.asdict(self)}

    # ---- diffusers scheduler configs ---------------------------------------------------------------------
    @classmethod
    def claims_diffusers_config(cls, config: dict) -> bool:
        """Whether a diffusers scheduler config describes this kind (by its keys or `_class_name`)."""
        return False

    @classmethod
    def _from_diffusers_config(cls, config: dict) -> ScheduleConfig:
        """This kind from a diffusers scheduler config it claims (ValueError naming a key it refuses)."""
        raise ValueError(f"a {cls.kind} schedule has no diffusers scheduler config")

    def to_diffusers(self) -> dict:
        """The diffusers scheduler config (keys for `SchedulerClass.from_config`) of this schedule, which
        `from_diffusers` reads back as an equal schedule. ValueError where diffusers has no such scheduler."""
        raise ValueError(f"diffusers has no scheduler with a {self.kind} schedule")

    @staticmethod
    def diffusers_class(config: dict) -> type[ScheduleConfig]:
        """The schedule class a diffusers scheduler config describes: the kind that claims it, else the
        fallback kind (DDPM: DDPM, DDIM, PNDM, DPMSolver*, Euler*, ... configs)."""
        claimed = [cls for cls in _REGISTRY.values() if cls.claims_diffusers_config(config)]
        if len(claimed) > 1:
            raise ValueError(f"scheduler config claimed by several schedule kinds: {[c.kind for c in claimed]}")
        if claimed:
            return claimed[0]
        return next(cls for cls in _REGISTRY.values() if cls.diffusers_fallback)

    @classmethod
    def from_diffusers(cls, config: dict) -> ScheduleConfig:
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
        return ScheduleConfig.diffusers_class(config)._from_diffusers_config(config)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ScheduleConfig:
        """From a diffusers `scheduler_config.json` (a file, or a folder holding one)."""
        return cls.from_diffusers(read_scheduler_config(path))

    # ---- time range (teacher units) -----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def t_clean(self) -> float:
        """The clean end (alpha = 1, sigma = 0)."""

    @property
    @abc.abstractmethod
    def t_noise(self) -> float:
        """The noisiest time of the schedule."""

    @property
    def t_eval_min(self) -> float:
        """The smallest time the teacher network was trained on (default: the clean end)."""
        return self.t_clean

    @property
    @abc.abstractmethod
    def time_unit(self) -> float:
        """Teacher time units per unit of normalised time tau (the length of [clean, noise] at t_max = T)."""

    @property
    def logsnr_t_min(self) -> float:
        """The clean end of a log-SNR spacing: the first time with a finite log(sigma / alpha) the teacher was
        trained on (default `t_eval_min`)."""
        return self.t_eval_min

    # ---- the formulas, once for every backend ---------------------------------------------------------------
    @abc.abstractmethod
    def alpha_sigma(self, t, ops: ArrayOps = NUMPY_OPS):
        """(alpha_t, sigma_t), arrays of t's shape in `ops`' working dtype: x_t = alpha_t x0 + sigma_t eps."""

    @abc.abstractmethod
    def alpha_sigma_derivatives(self, t, ops: ArrayOps = NUMPY_OPS):
        """(d alpha/dt, d sigma/dt) in teacher time units, arrays of t's shape."""

    @abc.abstractmethod
    def time_from_rho(self, rho, ops: ArrayOps = NUMPY_OPS):
        """The time t at which sigma_t / alpha_t = rho (rho >= 0), of rho's shape; rho = 0 gives the clean end,
        values beyond the noise end clip to it."""


def read_scheduler_config(path: str | os.PathLike) -> dict:
    """Reads a diffusers scheduler config: a `scheduler_config.json` file, or a folder holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    with open(path) as f:
        return json.load(f)


def prediction_type_from_diffusers(config: dict) -> str:
    """The teacher's prediction type from a diffusers scheduler config: `prediction_type` (default
    "epsilon", as diffusers); FlowMatch* schedulers predict the flow velocity ("flow")."""
    implied = ScheduleConfig.diffusers_class(config).diffusers_prediction_type
    if implied is not None:
        return implied
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

    The schedule's own formulas (`ScheduleConfig.alpha_sigma`) in float64 numpy; `flowmap_jax.core.schedules` and
    `torch_ref.schedules` run the same formulas in float32."""
    return schedule.alpha_sigma(t, NUMPY_OPS)
