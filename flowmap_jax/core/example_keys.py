"""Per-example random streams: a (B,) batch of PRNG keys, one per example, drawn from as if each example were
alone. JAX only (the PyTorch reference draws from a `torch.Generator`).

    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_ids)   # (B,), what the trainer passes
    k_times, k_noise = example_keys.split(keys, 2)                            # each (B,)
    noise = example_keys.draw(k_noise, B, lambda key, n: jax.random.normal(key, (n, H, W, C)))   # (B, H, W, C)

Every function also takes one key, and then behaves as `jax.random` does (`draw(key, B, sample)` is
`sample(key, B)`). Why: the training step must give the same result however the batch is split over devices
(each example's randomness follows its id, not its position), and the network must still run once on the
device's whole batch, so that every kernel is chosen for the real batch (a per-example `vmap` makes the
attention see a batch of 1 and take its unblocked path: ~16 GiB of logits per 4096-token layer at 32 examples).
"""

from __future__ import annotations

import jax

__all__ = ["is_key_batch", "split", "fold_in", "draw"]


def is_key_batch(rng) -> bool:
    """True for a (B,) batch of keys (typed keys of shape (B,), or raw uint32 keys (B, 2)); False for one key
    (typed (), raw (2,))."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.ndim == 1
    return rng.ndim == 2


def split(rng, num: int) -> list:
    """`jax.random.split(rng, num)` as a list of num keys; for a (B,) key batch, num (B,) key batches (example
    i's j-th key is `jax.random.split(rng[i], num)[j]`)."""
    if is_key_batch(rng):
        keys = jax.vmap(lambda key: jax.random.split(key, num))(rng)  # (B, num)
        return [keys[:, j] for j in range(num)]
    return list(jax.random.split(rng, num))


def fold_in(rng, data: int):
    """`jax.random.fold_in` of one key, or of each key of a (B,) batch."""
    if is_key_batch(rng):
        return jax.vmap(lambda key: jax.random.fold_in(key, data))(rng)
    return jax.random.fold_in(rng, data)


def draw(rng, batch_size: int, sample):
    """`sample(key, n) -> pytree of (n, ...) arrays` for a batch of `batch_size`: from one key with n =
    batch_size, or from a (B,) key batch, example i from `rng[i]` with n = 1, exactly what it would draw alone."""
    if is_key_batch(rng):
        if rng.shape[0] != batch_size:
            raise ValueError(f"{rng.shape[0]} per-example keys for a batch of {batch_size}")
        return jax.vmap(lambda key: jax.tree.map(lambda leaf: leaf[0], sample(key, 1)))(rng)
    return sample(rng, batch_size)
