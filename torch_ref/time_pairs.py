"""Training (t_source, t_target) pairs in PyTorch, mirroring `flowmap_jax.core.time_pairs` (the distribution is
documented there and in `spec.time_pairs.TimePairConfig`). rng: a torch.Generator (or an int seed); the draws
differ from JAX's, the distribution is the same. Outputs are (B,) float32 in teacher units."""

from __future__ import annotations

import torch

from flowmap_jax.spec.schedule import ScheduleConfig
from flowmap_jax.spec.time_pairs import TimePairConfig

__all__ = ["sample_time_pairs", "sample_mid_times", "as_generator"]


def as_generator(rng, device=None):
    """A torch.Generator from a generator or an int seed."""
    if isinstance(rng, torch.Generator):
        return rng
    if isinstance(rng, int):
        return torch.Generator(device=device or "cpu").manual_seed(rng)
    raise TypeError(f"rng must be a torch.Generator or an int seed, got {type(rng).__name__}")


def sample_time_pairs(rng, batch_size: int, schedule: ScheduleConfig, config: TimePairConfig | None = None,
                      source_range=None, target_range=None):
    """(t_source, t_target), each (batch_size,) float32 (see `flowmap_jax.core.time_pairs.sample_time_pairs`)."""
    config = TimePairConfig() if config is None else config
    rng = as_generator(rng)
    d = torch.rand(batch_size, generator=rng) ** (1.0 / config.length_power)
    tau_s = d + (1.0 - d) * torch.rand(batch_size, generator=rng)
    tau_t = tau_s - d
    if config.p_noise > 0:
        at_noise = torch.rand(batch_size, generator=rng) < config.p_noise
        tau_s, tau_t = torch.where(at_noise, torch.ones_like(tau_s), tau_s), torch.where(at_noise, 1.0 - d, tau_t)
    tau_t = torch.where(torch.rand(batch_size, generator=rng) < config.p_clean, torch.zeros_like(tau_t), tau_t)
    if config.bidirectional:
        swap = torch.rand(batch_size, generator=rng) < 0.5
        tau_s, tau_t = torch.where(swap, tau_t, tau_s), torch.where(swap, tau_s, tau_t)
    lo, hi = schedule.t_clean, schedule.t_noise
    s = lo + tau_s * (hi - lo)
    t = lo + tau_t * (hi - lo)
    if source_range is not None:
        s = torch.clamp(s, *source_range)
    if target_range is not None:
        t = torch.clamp(t, *target_range)
    return s.to(torch.float32), t.to(torch.float32)


def sample_mid_times(rng, t_source, t_target):
    """u = s + U(0, 1) (t - s) between each pair, (B,)."""
    rng = as_generator(rng)
    return t_source + torch.rand(t_source.shape, generator=rng).to(t_source.device) * (t_target - t_source)
