"""The teacher's noise schedule and its time convention, shared by `flowmap_jax` and `torch_ref`.

Numpy only (no jax, no torch). One class per schedule kind, each a subclass of `ScheduleConfig` (`base`):

- `DDPMSchedule` (`ddpm`, kind "ddpm"): diffusers DDPM betas;
- `VPCosineSchedule` (`vp_cosine`, kind "vp_cosine"): continuous VP cosine;
- `RectifiedFlowSchedule` (`rectified_flow`, kind "rectified_flow"): rectified flow.

Each owns its fields, its time range, its alpha_t / sigma_t formulas (written once against an `ArrayOps`,
`array_ops`, so numpy here and the float32 `flowmap_jax.core.schedules` / `torch_ref.schedules` run the same
code), its form and default flow-map parameterisation, its log-SNR grid rule and its diffusers scheduler
mapping. Also here: reading a diffusers scheduler config (`ScheduleConfig.from_diffusers`,
`load_scheduler`), `check_time_values` (the range check on concrete times) and `alpha_sigma` (float64 numpy,
for time grids and other host-side work).

Adding a kind: a module here with its class (`@register_schedule`, a new `kind`), one import line below
(importing it registers it), and its tests; the backends need no change unless its formulas need an operation `ArrayOps` lacks.

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
theta = arctan(sigma_t / alpha_t) (unit-free and well conditioned; see `flowmap_jax.core.objectives`).
"""

from __future__ import annotations

from flowmap_jax.spec.schedule.array_ops import NUMPY_OPS, ArrayOps, NumpyOps
from flowmap_jax.spec.schedule.base import (
    SHARED_FIELD_DEFAULTS,
    ScheduleConfig,
    alpha_sigma,
    check_time_values,
    load_scheduler,
    prediction_type_from_diffusers,
    read_scheduler_config,
    register_schedule,
    schedule_class,
    schedule_fields,
    schedule_kinds,
)
from flowmap_jax.spec.schedule.ddpm import BETA_SCHEDULES, DDPMSchedule
from flowmap_jax.spec.schedule.rectified_flow import RectifiedFlowSchedule
from flowmap_jax.spec.schedule.vp_cosine import VPCosineSchedule

SCHEDULE_KINDS = schedule_kinds()

__all__ = ["ScheduleConfig", "DDPMSchedule", "VPCosineSchedule", "RectifiedFlowSchedule", "SCHEDULE_KINDS",
           "BETA_SCHEDULES", "SHARED_FIELD_DEFAULTS", "ArrayOps", "NumpyOps", "NUMPY_OPS", "register_schedule",
           "schedule_class", "schedule_kinds", "schedule_fields", "read_scheduler_config",
           "prediction_type_from_diffusers", "load_scheduler", "check_time_values", "alpha_sigma"]
