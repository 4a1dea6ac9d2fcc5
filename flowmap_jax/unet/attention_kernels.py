"""Scaled dot-product attention kernels for the Flax UNet: softmax(q k^T * scale) v over heads.

    out = dot_product_attention(q, k, v, scale, implementation=None)

q (B, T, H, D), k and v (B, S, H, D) -> (B, T, H, D) in q's dtype. The attention logits, their softmax
and its normaliser are float32 whatever the input dtype (as in `jax.nn.dot_product_attention`'s XLA path).

Implementations:
- "chunked": the queries are split into blocks of `query_chunk` rows, processed one after another by
  `jax.lax.map`, each block's (B, H, chunk, S) logits rematerialised in the backward pass
  (`jax.checkpoint`) instead of stored. Each query row still sees every key, so this is the same
  softmax, not an approximation. Peak memory for the logits drops from B H T S to B H chunk S floats,
  and on XLA CPU the block stays in cache: at (B, T, S, H, D) = (2, 1024, 1024, 8, 16) the forward is
  about 3x and forward + JVP + gradient about 2-3x faster than the unchunked program (measured on 2
  cores; `benchmarks/backend_speed.py` has the whole-network effect). Plain jnp: `jax.jvp`, `jax.grad`
  and their compositions (the flow-map objectives) work through it.
- "xla": the whole (B, H, T, S) logits at once, plain jnp. Written out here (`_attend`, also each block's
  body) rather than calling `jax.nn.dot_product_attention`'s XLA path, which computes the same thing: on
  XLA CPU at (2, 1024, 1024, 8, 16) that path measured 1.5x slower, forward and forward + JVP + gradient
  alike (this one divides by the softmax normaliser after the product with v, not before, one pass over
  the logits fewer); at the small digits/256-token shapes the two are within noise.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA's fused kernel (GPU only;
  no forward-mode AD, so not for the JVP objectives).
- None (the default): "chunked" when the whole logits would exceed `CHUNK_WHEN_BLOCKS` blocks, else "xla".

Block size (`query_chunk=None`): the most query rows whose (B, H, chunk, S) float32 logits stay within
`block_elements()`: 2^20 (4 MiB, about a core's L2 cache) on CPU, where cache reuse is the win (64 rows
at (B, H, S) = (2, 8, 1024)), and 2^26 (256 MiB) on GPU/TPU, where only memory matters (256 rows for SD
1.5 at a 64x64 latent, batch 8: 16 blocks instead of 4.3 GB of logits per attention layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["CHUNK_WHEN_BLOCKS", "IMPLEMENTATIONS", "block_elements", "dot_product_attention", "query_chunk_size"]

IMPLEMENTATIONS = (None, "chunked", "xla", "cudnn")
CHUNK_WHEN_BLOCKS = 4  # the default implementation chunks when the logits fill more blocks than this


def block_elements(backend: str | None = None) -> int:
    """Logit elements per query block: 2^20 on CPU, 2^26 elsewhere (`jax.default_backend()` if not given)."""
    return 1 << 20 if (backend or jax.default_backend()) == "cpu" else 1 << 26


def query_chunk_size(batch: int, heads: int, t_len: int, s_len: int, backend: str | None = None) -> int:
    """Query rows per block: as many as fit (B, H, rows, S) logits in `block_elements`, at least 1, at most T."""
    return int(min(t_len, max(1, block_elements(backend) // (batch * heads * s_len))))


def _attend(q, k, v, scale):
    """Unchunked attention, logits and normaliser in float32: (B, T, H, D) x (B, S, H, D)^2 -> (B, T, H, D)."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    normaliser = jnp.einsum("bhts->bth", weights)[..., None]
    return (out / normaliser).astype(q.dtype)


def _attend_chunked(q, k, v, scale, query_chunk: int):
    """`_attend` over blocks of `query_chunk` queries (a ragged last block runs on its own)."""
    batch, t_len, heads, dim = q.shape
    blocks, rest = divmod(t_len, query_chunk)
    attend = jax.checkpoint(lambda q_block: _attend(q_block, k, v, scale))
    if blocks == 0:
        return attend(q)
    q_main = q[:, : blocks * query_chunk].reshape(batch, blocks, query_chunk, heads, dim)
    out = jax.lax.map(attend, jnp.moveaxis(q_main, 1, 0))  # (blocks, B, chunk, H, D_v)
    out = jnp.moveaxis(out, 0, 1).reshape(batch, blocks * query_chunk, heads, v.shape[-1])
    if rest:
        out = jnp.concatenate([out, attend(q[:, blocks * query_chunk :])], axis=1)
    return out


def dot_product_attention(q, k, v, scale: float, implementation: str | None = None,
                          query_chunk: int | None = None):
    """softmax(q k^T * scale) v: q (B, T, H, D), k/v (B, S, H, D) -> (B, T, H, D); see the module docstring."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q (B, T, H, D) and k, v (B, S, H, D); got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive number of query rows, got {query_chunk}")
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    batch, t_len, heads, _ = q.shape
    s_len = k.shape[1]
    if implementation is None:
        logits = batch * heads * t_len * s_len
        implementation = "chunked" if logits > CHUNK_WHEN_BLOCKS * block_elements() else "xla"
    if implementation == "chunked":
        return _attend_chunked(q, k, v, scale, query_chunk or query_chunk_size(batch, heads, t_len, s_len))
    return _attend(q, k, v, scale)
