"""Training (t_source, t_target) pairs in JAX (mirrored by `torch_ref.time_pairs`).

The distribution (`spec.time_pairs.TimePairConfig`, documented there) lives in normalised time tau in [0, 1]
(0 the clean end, 1 the noise end, t = t_clean + tau (t_noise - t_clean)):

    d ~ density proportional to d^(length_power - 1)  (d = U^(1 / length_power); default 1: every length alike)
    tau_s ~ U(d, 1), tau_t = tau_s - d
    with probability p_noise: tau_s = 1, tau_t = 1 - d (the first jump of every sampler)
    with probability p_clean: tau_t = 0 (the last jump of every sampler)
    with bidirectional: swap (s, t) with probability 1/2 (jumps towards noise)

then each time is clipped into the range its objective can evaluate (e.g. the teacher is evaluated at the
source in `eulerian`, at the target in `lagrangian`). All outputs are (B,) float32 in teacher units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowmap_jax.spec.schedule import ScheduleConfig
from flowmap_jax.spec.time_pairs import TimePairConfig

__all__ = ["sample_time_pairs", "sample_mid_times"]


def sample_time_pairs(rng, batch_size: int, schedule: ScheduleConfig, config: TimePairConfig | None = None,
                      source_range=None, target_range=None):
    """(t_source, t_target), each (batch_size,) float32, drawn as the module docstring says.
    source_range / target_range: optional (lo, hi) the times are clipped into. rng: a jax PRNG key."""
    config = TimePairConfig() if config is None else config
    k_len, k_src, k_clean, k_swap = jax.random.split(rng, 4)
    d = jax.random.uniform(k_len, (batch_size,)) ** (1.0 / config.length_power)
    tau_s = d + (1.0 - d) * jax.random.uniform(k_src, (batch_size,))
    tau_t = tau_s - d
    if config.p_noise > 0:  # its own key, so the draws with p_noise = 0 are unchanged
        at_noise = jax.random.uniform(jax.random.fold_in(rng, 1), (batch_size,)) < config.p_noise
        tau_s, tau_t = jnp.where(at_noise, 1.0, tau_s), jnp.where(at_noise, 1.0 - d, tau_t)
    tau_t = jnp.where(jax.random.uniform(k_clean, (batch_size,)) < config.p_clean, 0.0, tau_t)
    if config.bidirectional:
        swap = jax.random.uniform(k_swap, (batch_size,)) < 0.5
        tau_s, tau_t = jnp.where(swap, tau_t, tau_s), jnp.where(swap, tau_s, tau_t)
    lo, hi = schedule.t_clean, schedule.t_noise
    s = lo + tau_s * (hi - lo)
    t = lo + tau_t * (hi - lo)
    if source_range is not None:
        s = jnp.clip(s, *source_range)
    if target_range is not None:
        t = jnp.clip(t, *target_range)
    return s.astype(jnp.float32), t.astype(jnp.float32)


def sample_mid_times(rng, t_source, t_target):
    """u = s + U(0, 1) (t - s) between each pair (the `progressive` objective's split point), (B,)."""
    return t_source + jax.random.uniform(rng, jnp.shape(t_source)) * (t_target - t_source)
