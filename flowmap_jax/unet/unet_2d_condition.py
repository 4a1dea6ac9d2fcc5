"""FlaxUNet2DConditionModel: a faithful Flax port of diffusers' `UNet2DConditionModel`.

Layout is NHWC: sample (B, H, W, C_in) -> (B, H, W, C_out). Everything else follows diffusers:
timesteps in the model's own units (SD: 0..999), int or float, scalar or (B,); `class_labels` go through
the same sinusoidal projection as the timestep when `class_embed_type="timestep"` (the flow map's
target-time hook); `timestep_cond` (B, time_cond_proj_dim) is the guidance-scale embedding;
`added_cond_kwargs` = {"text_embeds": (B, D), "time_ids": (B, K)} for SDXL's `text_time`.

The network knows nothing of flow maps (see `flowmap_jax.core.flow_map`).

Switches: `dtype` is the compute dtype (bfloat16 for speed; parameters stay float32), `remat`
rematerialises each ResNet and transformer layer in the backward pass (diffusers' gradient-checkpointing
granularity; XLA plan of the SD 1.5 pairs step at 32 examples per device: 67.3 GiB, against 69.6 GiB with one
checkpoint per down/mid/up block, `benchmarks/sd15_step_plan.py`), `attention_implementation` picks the attention
kernel (`flowmap_jax.unet.attention_kernels`): None (query blocks for long sequences, else one block),
"chunked", "xla" (all support jax.jvp) or "cudnn" (fused, no jax.jvp).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowmap_jax.unet.activations import get_activation
from flowmap_jax.unet.blocks import BLOCK_CLASSES
from flowmap_jax.unet.config import UNetConfig
from flowmap_jax.unet.embeddings import TimestepEmbedding, timestep_embedding
from flowmap_jax.unet.resnet import conv2d, group_norm


def _batch_times(values, batch: int, name: str):
    """int/float scalar or (B,) array -> (B,) float32; anything else is an error naming `name`."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        values = jnp.broadcast_to(values, (batch,))
    elif values.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) (the batch), got shape {values.shape}")
    return values.astype(jnp.float32)


class FlaxUNet2DConditionModel(nn.Module):
    """The UNet. See the module docstring for shapes; `config` is a `UNetConfig`."""

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states=None, class_labels=None, timestep_cond=None,
                 added_cond_kwargs=None):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"sample must be (B, H, W, {cfg.in_channels}) (NHWC, in_channels={cfg.in_channels}), got shape {sample.shape}"
            )
        batch = sample.shape[0]
        out_dtype = sample.dtype if jnp.issubdtype(sample.dtype, jnp.floating) else jnp.float32
        act = get_activation(cfg.act_fn)

        # ---- time embedding ------------------------------------------------------------------
        t = _batch_times(timesteps, batch, "timesteps")
        t_emb = timestep_embedding(t, cfg.timestep_input_dim, cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
        if timestep_cond is not None:
            timestep_cond = jnp.asarray(timestep_cond, self.dtype)
            if timestep_cond.shape != (batch, cfg.time_cond_proj_dim or -1):
                raise ValueError(
                    f"timestep_cond must have shape ({batch}, time_cond_proj_dim={cfg.time_cond_proj_dim}), "
                    f"got {timestep_cond.shape}"
                )
        emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, cfg.timestep_post_act, cfg.time_cond_proj_dim,
                                dtype=self.dtype, name="time_embedding")(t_emb, timestep_cond)

        class_emb = self._class_embedding(class_labels, batch)
        if class_emb is not None:
            emb = jnp.concatenate([emb, class_emb], -1) if cfg.class_embeddings_concat else emb + class_emb

        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, batch)
        if cfg.time_embedding_act_fn is not None:
            emb = get_activation(cfg.time_embedding_act_fn)(emb)

        # ---- text conditioning ---------------------------------------------------------------
        context = encoder_hidden_states
        if context is None and cfg.uses_cross_attention:
            raise ValueError("encoder_hidden_states (B, S, D) is required: the UNet has cross-attention blocks")
        if context is not None:
            context = jnp.asarray(context, self.dtype)
            if context.ndim != 3 or context.shape[0] != batch:
                raise ValueError(f"encoder_hidden_states must be ({batch}, S, D), got shape {context.shape}")
            if cfg.effective_encoder_hid_dim_type == "text_proj":
                context = nn.Dense(cfg.cross_attention_dims[0], dtype=self.dtype, name="encoder_hid_proj")(context)

        # ---- down ----------------------------------------------------------------------------
        h = sample.astype(self.dtype)
        if cfg.center_input_sample:
            h = 2 * h - 1.0
        h = conv2d(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")(h)
        skips = (h,)
        n = cfg.num_blocks
        for i, block_type in enumerate(cfg.down_block_types):
            block = self._block(block_type, i, f"down_blocks_{i}", cfg.block_out_channels[i],
                                cfg.layers_per_block_list[i], cfg.transformer_layers_list[i],
                                add_downsample=i < n - 1, downsample_padding=cfg.downsample_padding)
            h, block_skips = block(h, emb, context)
            skips += block_skips

        # ---- mid -----------------------------------------------------------------------------
        if cfg.mid_block_type is not None:
            layers = cfg.transformer_layers_list[-1]
            block = self._block(cfg.mid_block_type, n - 1, "mid_block", cfg.block_out_channels[-1], 1,
                                layers if isinstance(layers, tuple) else (layers,),
                                output_scale_factor=cfg.mid_block_scale_factor)
            h = block(h, emb, context)

        # ---- up ------------------------------------------------------------------------------
        reversed_channels = tuple(reversed(cfg.block_out_channels))
        reversed_layers = tuple(reversed(cfg.layers_per_block_list))
        for i, block_type in enumerate(cfg.up_block_types):
            num_layers = reversed_layers[i] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            is_final = i == n - 1
            upsample_size = None if is_final else (skips[-1].shape[1], skips[-1].shape[2])
            block = self._block(block_type, n - 1 - i, f"up_blocks_{i}", reversed_channels[i], num_layers,
                                cfg.reverse_transformer_layers_list[i],
                                add_upsample=not is_final, upsample_size=upsample_size)
            h = block(h, block_skips, emb, context)

        # ---- out -----------------------------------------------------------------------------
        h = act(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(h))
        h = conv2d(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(h)
        return h.astype(out_dtype)

    # ------------------------------------------------------------------------------------------
    def _block(self, block_type, config_index, name, out_channels, num_layers, transformer_layers, **kwargs):
        """Builds one block; `config_index` picks the per-block head count / flags (down-block order)."""
        cfg = self.config
        if isinstance(transformer_layers, int):
            transformer_layers = (transformer_layers,) * num_layers
        cls = BLOCK_CLASSES[block_type]
        kwargs["remat_layers"] = bool(self.remat)
        return cls(
            out_channels=out_channels, num_layers=num_layers, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
            act_fn=cfg.act_fn, time_embedding_norm=cfg.resnet_time_scale_shift,
            heads=cfg.heads_per_block[config_index], transformer_layers=tuple(transformer_layers),
            use_linear_projection=cfg.use_linear_projection,
            only_cross_attention=bool(cfg.only_cross_attention_list[config_index]) and block_type != "UNetMidBlock2DCrossAttn",
            upcast_attention=cfg.upcast_attention, attention_implementation=self.attention_implementation,
            dtype=self.dtype, name=name, **kwargs,
        )

    def _class_embedding(self, class_labels, batch):
        """The class/target-time embedding (B, time_embed_dim), or None when the config has none."""
        cfg = self.config
        if cfg.class_embed_type is None and cfg.num_class_embeds is None:
            if class_labels is not None:
                raise ValueError("class_labels were given but the UNet config has no class embedding")
            return None
        if class_labels is None:
            raise ValueError(
                f"class_labels should be provided: the UNet config has class_embed_type={cfg.class_embed_type!r}"
                + (" (a flow map: class_labels is the target time t)" if cfg.class_embed_type == "timestep" else "")
            )
        if cfg.class_embed_type == "timestep":
            labels = _batch_times(class_labels, batch, "class_labels")
            proj = timestep_embedding(labels, cfg.timestep_input_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            return TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=self.dtype, name="class_embedding")(
                proj.astype(self.dtype))
        if cfg.class_embed_type == "projection":
            labels = jnp.asarray(class_labels, self.dtype)
            if labels.shape != (batch, cfg.projection_class_embeddings_input_dim):
                raise ValueError(
                    f"class_labels must be ({batch}, {cfg.projection_class_embeddings_input_dim}) for "
                    f"class_embed_type='projection', got {labels.shape}"
                )
            return TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=self.dtype, name="class_embedding")(labels)
        labels = jnp.asarray(class_labels)
        if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"class_labels must be ({batch},) integers for num_class_embeds, got {labels.shape} {labels.dtype}")
        return nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, dtype=self.dtype, name="class_embedding")(labels)

    def _text_time_embedding(self, added_cond_kwargs, batch):
        """SDXL: concat(text_embeds (B, D), sinusoid(time_ids (B, K)) flattened) -> add_embedding."""
        cfg = self.config
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError(
                "addition_embed_type='text_time' requires added_cond_kwargs with 'text_embeds' and 'time_ids'"
            )
        text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                         cfg.freq_shift).reshape(batch, -1)
        add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        if add_embeds.shape[-1] != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give {add_embeds.shape[-1]} features; "
                f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}"
            )
        return TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=self.dtype, name="add_embedding")(
            add_embeds.astype(self.dtype))


def dummy_inputs(config: UNetConfig, batch: int = 1, height: int | None = None, width: int | None = None,
                 seq_len: int = 1, dtype=jnp.float32) -> dict:
    """Keyword arguments of zeros that exercise every parameter of `config` (for init / eval_shape)."""
    height = height or 2 ** (config.num_blocks - 1)  # the smallest size every block can halve
    width = width or height
    kwargs = {
        "sample": jnp.zeros((batch, height, width, config.in_channels), dtype),
        "timesteps": jnp.zeros((batch,), jnp.float32),
    }
    if config.uses_cross_attention:
        ctx_dim = config.encoder_hid_dim if config.effective_encoder_hid_dim_type else config.cross_attention_dims[0]
        kwargs["encoder_hidden_states"] = jnp.zeros((batch, seq_len, ctx_dim), dtype)
    if config.class_embed_type == "timestep":
        kwargs["class_labels"] = jnp.zeros((batch,), jnp.float32)
    elif config.class_embed_type == "projection":
        kwargs["class_labels"] = jnp.zeros((batch, config.projection_class_embeddings_input_dim), dtype)
    elif config.num_class_embeds is not None:
        kwargs["class_labels"] = jnp.zeros((batch,), jnp.int32)
    if config.time_cond_proj_dim is not None:
        kwargs["timestep_cond"] = jnp.zeros((batch, config.time_cond_proj_dim), dtype)
    if config.addition_embed_type == "text_time":
        # Only the sum of the widths matters for the parameters: SDXL's split is 1280 + 6 ids.
        n_ids = 6 if config.projection_class_embeddings_input_dim > 6 * config.addition_time_embed_dim else 1
        text_dim = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": jnp.zeros((batch, text_dim), dtype),
            "time_ids": jnp.zeros((batch, n_ids), jnp.float32),
        }
    return kwargs


def init_unet_params(config: UNetConfig, rng, dtype=jnp.float32, **shape_kwargs):
    """Randomly initialised parameters (flax defaults; not diffusers' init) as a plain nested dict."""
    model = FlaxUNet2DConditionModel(config, dtype=dtype)
    inputs = dummy_inputs(config, **shape_kwargs)
    return jax.jit(lambda key: model.init(key, **inputs)["params"])(rng)


def abstract_unet_params(config: UNetConfig):
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating or computing anything."""
    model = FlaxUNet2DConditionModel(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config)))["params"]
