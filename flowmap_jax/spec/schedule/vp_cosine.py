"""`VPCosineSchedule` (kind "vp_cosine"): the continuous variance-preserving cosine schedule.

T = time_scale, t in [0, t_max] (t_max <= T), tau = t / T: alpha_t = cos(theta(tau)) / cos(theta(0)) with
theta(tau) = (tau + s) / (1 + s) * pi / 2 and sigma_t = sqrt(1 - alpha_t^2); with the default s = 0 this is
TrigFlow: alpha = cos(pi tau / 2), sigma = sin(pi tau / 2). t = 0 is clean.
"""

from __future__ import annotations

import dataclasses
import math

from flowmap_jax.spec.schedule.array_ops import NUMPY_OPS
from flowmap_jax.spec.schedule.base import ScheduleConfig, register_schedule

__all__ = ["VPCosineSchedule"]


@register_schedule
@dataclasses.dataclass(frozen=True)
class VPCosineSchedule(ScheduleConfig):
    """Continuous VP cosine on t in [0, t_max] (default t_max = time_scale), offset `cosine_s` in [0, 1)."""

    time_scale: float = 1.0
    cosine_s: float = 0.0
    t_max: float | None = None

    kind = "vp_cosine"
    variance_preserving = True
    parameterizations = ("angle", "teacher_step", "anchored")
    default_parameterization = "angle"

    def __post_init__(self):
        object.__setattr__(self, "time_scale", float(self.time_scale))
        object.__setattr__(self, "cosine_s", float(self.cosine_s))
        if self.t_max is not None:
            object.__setattr__(self, "t_max", float(self.t_max))
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if self.t_max is not None and not 0 < self.t_max <= self.time_scale:
            raise ValueError(f"t_max must lie in (0, time_scale={self.time_scale}], got {self.t_max}")
        if not 0 <= self.cosine_s < 1:
            raise ValueError(f"cosine_s must lie in [0, 1), got {self.cosine_s}")

    # ---- time range ------------------------------------------------------------------------------------
    @property
    def t_clean(self) -> float:
        return 0.0

    @property
    def t_noise(self) -> float:
        """t_max, default T (alpha = 0 there)."""
        return float(self.time_scale if self.t_max is None else self.t_max)

    @property
    def time_unit(self) -> float:
        return float(self.time_scale)

    @property
    def logsnr_t_min(self) -> float:
        """sigma = 0 at the clean end: a log-SNR spacing starts 1e-3 of the range after it."""
        return self.t_clean + 1e-3 * self.time_unit

    # ---- formulas --------------------------------------------------------------------------------------
    def _theta(self, t):
        """theta(t / T) (numbers or arrays: plain arithmetic)."""
        s = self.cosine_s
        return (t / self.time_scale + s) / (1.0 + s) * (math.pi / 2)

    def alpha_sigma(self, t, ops=NUMPY_OPS):
        t = ops.asarray(t)
        theta = self._theta(t)
        if self.cosine_s == 0.0:  # cos(pi/2) is -4e-8 in float32: clamp the noise end to alpha = 0
            return ops.maximum(ops.cos(theta), 0.0), ops.sin(theta)
        alpha = ops.maximum(ops.cos(theta), 0.0) / math.cos(self._theta(0.0))
        return alpha, ops.sqrt(ops.maximum(1.0 - alpha * alpha, 0.0))

    def alpha_sigma_derivatives(self, t, ops=NUMPY_OPS):
        """d theta/dt = pi / (2 (1 + s) T); with s > 0, d sigma/dt = -alpha (d alpha/dt) / sigma is infinite at
        t = 0."""
        t = ops.asarray(t)
        theta = self._theta(t)
        d_theta = math.pi / 2 / ((1.0 + self.cosine_s) * self.time_scale)
        if self.cosine_s == 0.0:
            return -ops.sin(theta) * d_theta, ops.cos(theta) * d_theta
        c0 = math.cos(self._theta(0.0))
        alpha = ops.cos(theta) / c0
        sigma = ops.sqrt(ops.maximum(1.0 - alpha * alpha, 0.0))
        d_alpha = -ops.sin(theta) / c0 * d_theta
        return d_alpha, -alpha * d_alpha / sigma

    def time_from_rho(self, rho, ops=NUMPY_OPS):
        rho = ops.asarray(rho)
        s, big_t = self.cosine_s, self.time_scale
        if s == 0.0:
            theta = ops.arctan(rho)
        else:
            alpha = 1.0 / ops.sqrt(1.0 + rho * rho)
            theta = ops.arccos(ops.clip(alpha * math.cos(self._theta(0.0)), -1.0, 1.0))
        t = (theta * 2 / math.pi * (1.0 + s) - s) * big_t
        return ops.clip(t, self.t_clean, self.t_noise)
