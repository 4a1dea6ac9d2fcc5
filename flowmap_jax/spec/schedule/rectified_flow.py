"""`RectifiedFlowSchedule` (kind "rectified_flow"): the straight path of flow matching.

T = time_scale, t in [0, T], x_t = (1 - t/T) x0 + (t/T) eps (SD3/FLUX; SD3's transformer sees
t = 1000 * sigma, i.e. T = 1000). t = 0 is clean. diffusers' FlowMatch* schedulers.
"""

from __future__ import annotations

import dataclasses

from flowmap_jax.spec.schedule.array_ops import NUMPY_OPS
from flowmap_jax.spec.schedule.base import ScheduleConfig, register_schedule

__all__ = ["RectifiedFlowSchedule"]


@register_schedule
@dataclasses.dataclass(frozen=True)
class RectifiedFlowSchedule(ScheduleConfig):
    """Rectified flow x_t = (1 - t/T) x0 + (t/T) eps on t in [0, T], T = `time_scale`."""

    time_scale: float = 1.0

    kind = "rectified_flow"
    variance_preserving = False
    parameterizations = ("linear", "teacher_step")
    default_parameterization = "linear"
    logsnr_grid = False  # alpha = 0 at T: sigma / alpha is infinite at the noise end
    diffusers_prediction_type = "flow"

    def __post_init__(self):
        object.__setattr__(self, "time_scale", float(self.time_scale))
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")

    # ---- diffusers ---------------------------------------------------------------------------------------
    @classmethod
    def claims_diffusers_config(cls, config: dict) -> bool:
        """A FlowMatch* scheduler config: by `_class_name` (saved json) or, for a live `scheduler.config`
        (which has no `_class_name`), by its `shift` key without DDPM betas."""
        if str(config.get("_class_name", "")).startswith("FlowMatch"):
            return True
        return "shift" in config and "beta_schedule" not in config and "trained_betas" not in config

    @classmethod
    def _from_diffusers_config(cls, config: dict) -> RectifiedFlowSchedule:
        """time_scale = num_train_timesteps; `shift` and the other step settings are the sampler's."""
        return cls(time_scale=float(int(config.get("num_train_timesteps", 1000))))

    def to_diffusers(self) -> dict:
        """A FlowMatchEulerDiscreteScheduler config (num_train_timesteps = T, a whole number)."""
        if self.time_scale != int(self.time_scale):
            raise ValueError(f"diffusers' FlowMatch schedulers need a whole num_train_timesteps; time_scale is "
                             f"{self.time_scale}")
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": int(self.time_scale)}

    # ---- time range ------------------------------------------------------------------------------------
    @property
    def t_clean(self) -> float:
        return 0.0

    @property
    def t_noise(self) -> float:
        return float(self.time_scale)

    @property
    def time_unit(self) -> float:
        return float(self.time_scale)

    @property
    def logsnr_t_min(self) -> float:
        """sigma = 0 at the clean end: a log-SNR spacing would start 1e-3 of the range after it."""
        return self.t_clean + 1e-3 * self.time_unit

    # ---- formulas --------------------------------------------------------------------------------------
    def alpha_sigma(self, t, ops=NUMPY_OPS):
        t = ops.asarray(t)
        tau = t / self.time_scale
        return 1.0 - tau, tau

    def alpha_sigma_derivatives(self, t, ops=NUMPY_OPS):
        t = ops.asarray(t)
        rate = ops.full_like(t, 1.0 / self.time_scale)
        return -rate, rate

    def time_from_rho(self, rho, ops=NUMPY_OPS):
        rho = ops.asarray(rho)
        tau = ops.where(ops.isinf(rho), 1.0, rho / (1.0 + rho))
        return ops.clip(tau * self.time_scale, self.t_clean, self.t_noise)
