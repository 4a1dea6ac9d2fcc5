"""Image-to-image with a flow map: where the jumps start (`strength`) and the noised start state. Numpy only;
the one rule `torch_ref.pipeline_img2img.FlowMapImg2ImgPipeline` and both sampling CLIs (`--init-image`) use.

Times are teacher times (`spec.schedule`: t_clean the data end, t_noise the noise end).

- `start_time(schedule, strength)`: s = t_clean + strength (t_noise - t_clean), strength in (0, 1]. This is
  diffusers' meaning of `strength` (`StableDiffusionImg2ImgPipeline.get_timesteps`: with N "trailing" steps
  the first timestep is the one a fraction `strength` of the way from the clean end to the noise end): DDPM
  with 1000 steps, strength 0.6 -> s = 599, strength 1 -> s = 999 = t_noise.
- `img2img_grid(schedule, strength, num_steps, spacing)`: (num_steps + 1,) float64 times from s to t_clean,
  `spec.time_grid.time_grid` started at s (uniform in teacher time by default): strength 1 is the
  text-to-image grid.
- `noised_start(schedule, strength, latents, noise)`: x_s = alpha_s x0 + sigma_s eps in the dtype of
  `latents` (the teacher's forward process, diffusers' `scheduler.add_noise` at an integer DDPM timestep),
  except strength 1: x_s = eps, pure noise, the image unused (diffusers' inpainting pipelines do the same at
  strength 1; SD's img2img keeps sqrt(alphabar_999) ~ 0.07 of the image there), so strength 1 is
  text-to-image from the same noise.
"""

from __future__ import annotations

import numpy as np

from flowmap_jax.spec.schedule import ScheduleConfig, alpha_sigma
from flowmap_jax.spec.time_grid import time_grid

__all__ = ["check_strength", "img2img_grid", "noised_start", "start_coefficients", "start_time"]


def check_strength(strength, name: str = "strength") -> float:
    """float(strength), or a one-line ValueError naming `name` unless 0 < strength <= 1."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {strength!r}") from None
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must lie in (0, 1] (1: start from pure noise), got {strength}")
    return value


def start_time(schedule: ScheduleConfig, strength: float, name: str = "strength") -> float:
    """The teacher time s where the jumps start: t_clean + strength (t_noise - t_clean) (module docstring)."""
    strength = check_strength(strength, name)
    if strength == 1.0:
        return float(schedule.t_noise)
    return float(schedule.t_clean + strength * (schedule.t_noise - schedule.t_clean))


def img2img_grid(schedule: ScheduleConfig, strength: float, num_steps: int, spacing: str = "uniform",
                 name: str = "strength") -> np.ndarray:
    """(num_steps + 1,) float64 teacher times from `start_time` to the clean end (`spec.time_grid.time_grid`)."""
    return time_grid(schedule, int(num_steps), t_start=start_time(schedule, strength, name), spacing=spacing)


def start_coefficients(schedule: ScheduleConfig, strength: float, name: str = "strength") -> tuple[float, float]:
    """(a, b) with x_s = a x0 + b eps: (alpha_s, sigma_s) at `start_time`, (0, 1) at strength 1."""
    strength = check_strength(strength, name)
    if strength == 1.0:
        return 0.0, 1.0
    alpha, sigma = alpha_sigma(schedule, start_time(schedule, strength))
    return float(alpha), float(sigma)


def noised_start(schedule: ScheduleConfig, strength: float, latents, noise, name: str = "strength"):
    """x_s = a latents + b noise (`start_coefficients`), any array type with `*` and `+` (numpy, torch), in the
    latents' dtype; latents and noise of one shape (B, ...), latents as the network sees them (scaled)."""
    if tuple(latents.shape) != tuple(noise.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the image latents {tuple(latents.shape)}")
    a, b = start_coefficients(schedule, strength, name)
    return latents * a + noise * b
