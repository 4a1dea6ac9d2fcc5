"""Transformer2DModel (continuous input), BasicTransformerBlock, Attention and GEGLU of diffusers, in Flax.

Attention runs through `flowmap_jax.unet.attention_kernels.dot_product_attention`: by default plain jnp
with the queries in blocks for long sequences (exact, less memory, faster on CPU), so forward-mode AD
(`jax.jvp`) works through it; "xla" (unblocked) and "cudnn" (fused, no JVP) can be selected.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowmap_jax.unet.attention_kernels import dot_product_attention
from flowmap_jax.unet.resnet import group_norm


class Attention(nn.Module):
    """Multi-head attention: (B, T, query_dim), context (B, S, D_ctx) -> (B, T, query_dim).

    to_q/to_k/to_v have no bias (diffusers' `attention_bias=False` in UNets); `to_out_0` has one.
    `upcast_attention` computes the softmax(QK^T) V product in float32 when running in bf16/fp16.
    """

    heads: int
    dim_head: int
    upcast_attention: bool = False
    attention_implementation: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        batch, t_len, s_len = x.shape[0], x.shape[1], context.shape[1]
        q = q.reshape(batch, t_len, self.heads, self.dim_head)
        k = k.reshape(batch, s_len, self.heads, self.dim_head)
        v = v.reshape(batch, s_len, self.heads, self.dim_head)
        out_dtype = q.dtype
        if self.upcast_attention and q.dtype != jnp.float32:
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        out = dot_product_attention(q, k, v, scale=self.dim_head**-0.5, implementation=self.attention_implementation)
        out = out.astype(out_dtype).reshape(batch, t_len, inner)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """`proj` to 2 * inner, then hidden * gelu(gate) with exact GELU: (..., D) -> (..., inner)."""

    inner_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden, gate = jnp.split(nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: `net_0` (GEGLU, 4x), `net_2` (Dense back to D)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(4 * dim, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention (attn1), cross-attention (attn2), GEGLU feed-forward (ff).

    (B, T, D), context (B, S, D_ctx) -> (B, T, D). With `only_cross_attention`, attn1 also attends
    to the context (diffusers' semantics).
    """

    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_implementation: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        def attn(name):
            return Attention(self.heads, self.dim_head, self.upcast_attention, self.attention_implementation,
                             dtype=self.dtype, name=name)

        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)

        x = attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None) + x
        x = attn("attn2")(norm("norm2")(x), context) + x
        x = FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x)) + x
        return x


class Transformer2DModel(nn.Module):
    """Spatial transformer: (B, H, W, C), context (B, S, D_ctx) -> (B, H, W, C).

    GroupNorm(eps=1e-6) -> proj_in (1x1 conv, or Dense with `use_linear_projection`) -> blocks ->
    proj_out -> + residual.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_implementation: str | None = None
    remat_blocks: bool = False  # rematerialise each BasicTransformerBlock in the backward pass (diffusers' granularity)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        batch, height, width, channels = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = group_norm(self.norm_num_groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = nn.Conv(inner, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="proj_in")(h)
            h = h.reshape(batch, height * width, inner)
        block_class = nn.remat(BasicTransformerBlock) if self.remat_blocks else BasicTransformerBlock
        for i in range(self.num_layers):
            h = block_class(
                self.heads, self.dim_head, self.only_cross_attention, self.upcast_attention,
                self.attention_implementation, dtype=self.dtype, name=f"transformer_blocks_{i}",
            )(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = h.reshape(batch, height, width, inner)
            h = nn.Conv(channels, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="proj_out")(h)
        return h + residual
