"""The UNet's attention kernels against PyTorch's scaled_dot_product_attention running live, their
derivatives against jax.nn.dot_product_attention, and the default's choice of kernel and block size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap_jax.unet import attention_kernels as ak

torch = pytest.importorskip("torch")


def _qkv(rng, batch, t_len, s_len, heads, dim):
    q = rng.standard_normal((batch, t_len, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, s_len, heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, s_len, heads, dim)).astype(np.float32)
    return q, k, v


def _torch_sdpa(q, k, v, scale):
    to_t = lambda a: torch.from_numpy(a).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(to_t(q), to_t(k), to_t(v), scale=scale)
    return out.transpose(1, 2).numpy()


@pytest.mark.parametrize("implementation,query_chunk", [
    ("xla", None), ("chunked", 16), ("chunked", 7), ("chunked", 100), ("chunked", None), (None, None),
], ids=["xla", "chunked_even", "chunked_ragged", "chunked_one_block", "chunked_auto", "default"])
def test_matches_torch_sdpa(implementation, query_chunk):
    q, k, v = _qkv(np.random.default_rng(0), batch=2, t_len=48, s_len=40, heads=3, dim=8)
    scale = 8**-0.5
    out = ak.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale, implementation,
                                   query_chunk)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _torch_sdpa(q, k, v, scale), rtol=1e-5, atol=2e-6)


def test_bf16_inputs_keep_their_dtype_and_stay_close():
    q, k, v = _qkv(np.random.default_rng(1), batch=2, t_len=33, s_len=20, heads=2, dim=16)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    out = ak.dot_product_attention(bf(q), bf(k), bf(v), 0.25, "chunked", 8)
    assert out.dtype == jnp.bfloat16
    ref = _torch_sdpa(q, k, v, 0.25)
    assert float(np.max(np.abs(np.asarray(out, np.float32) - ref))) < 3e-2


def test_chunked_jvp_and_gradient_match_jax_attention():
    """Forward-mode through the blocks, then a gradient of both the output and the tangent (the JVP
    objectives' composition), against jax.nn.dot_product_attention's derivatives."""
    rng = np.random.default_rng(2)
    q, k, v = map(jnp.asarray, _qkv(rng, batch=2, t_len=30, s_len=30, heads=2, dim=8))
    tq, tk, tv = map(jnp.asarray, _qkv(rng, batch=2, t_len=30, s_len=30, heads=2, dim=8))
    probe = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def objective(fn):
        def loss(q, k, v):
            out, tangent = jax.jvp(fn, (q, k, v), (tq, tk, tv))
            return jnp.sum(out * probe) + jnp.sum(tangent**2)
        return loss

    ours = lambda q, k, v: ak.dot_product_attention(q, k, v, 0.3, "chunked", 8)
    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.3)
    _, t_ours = jax.jvp(ours, (q, k, v), (tq, tk, tv))
    _, t_ref = jax.jvp(reference, (q, k, v), (tq, tk, tv))
    np.testing.assert_allclose(t_ours, t_ref, rtol=1e-4, atol=1e-5)
    g_ours = jax.jit(jax.grad(objective(ours), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(objective(reference), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _uses_blocks(q, k, v):
    jaxpr = jax.make_jaxpr(lambda q, k, v: ak.dot_product_attention(q, k, v, 0.5))(q, k, v)
    return any(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)


def test_default_chunks_only_large_logits(monkeypatch):
    monkeypatch.setattr(ak, "block_elements", lambda backend=None: 64)
    small = jnp.zeros((1, 8, 2, 4))  # 1*2*8*8 = 128 logits <= 4 blocks of 64
    large = jnp.zeros((1, 32, 2, 4))  # 2048 logits
    assert not _uses_blocks(small, small, small)
    assert _uses_blocks(large, large, large)


def test_block_size():
    assert ak.query_chunk_size(2, 8, 1024, 1024, backend="cpu") == 64
    assert ak.query_chunk_size(8, 8, 4096, 4096, backend="gpu") == 256
    assert ak.query_chunk_size(1, 1, 10, 10, backend="cpu") == 10  # never more rows than queries
    assert ak.query_chunk_size(64, 64, 4096, 4096, backend="cpu") == 1


def test_bad_inputs_name_the_problem():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="'flash'"):
        ak.dot_product_attention(q, q, q, 1.0, "flash")
    with pytest.raises(ValueError, match=r"k \(1, 4, 3, 8\)"):
        ak.dot_product_attention(q, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)), 1.0)
    with pytest.raises(ValueError, match="query_chunk"):
        ak.dot_product_attention(q, q, q, 1.0, "chunked", 0)
