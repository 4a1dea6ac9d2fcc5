"""The flow map's extra inputs as a diffusers UNet config: the target-time hook and the guidance input (pure Python)."""

from __future__ import annotations


def add_target_time_hook_config(unet_config: dict) -> dict:
    """A copy of a diffusers UNet2DConditionModel config dict with the flow map's target-time hook:
    `class_embed_type="timestep"`, so `class_labels` (the target time t) goes through the same sinusoidal
    projection as the timestep into a `TimestepEmbedding` added to the time embedding.

    Raises ValueError naming the key if the teacher already uses a class embedding
    (`class_embed_type`, `num_class_embeds`) or concatenates class embeddings (`class_embeddings_concat`).
    """
    config = dict(unet_config)
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise ValueError(f"the teacher UNet already uses a class embedding ({key}={config[key]!r}); the flow "
                             "map's target time needs class_embed_type='timestep' for itself")
    if config.get("class_embeddings_concat", False):
        raise ValueError("UNet config key 'class_embeddings_concat'=True is not supported by the target-time hook")
    config["class_embed_type"] = "timestep"
    # diffusers' `from_config` re-applies class defaults to the keys listed in `_use_default_values`
    # (set on a live model's config): the hook's key must not be listed there.
    if "_use_default_values" in config:
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k != "class_embed_type"]
    return config


def add_guidance_input_config(unet_config: dict, embedding_dim: int) -> dict:
    """A copy of a diffusers UNet2DConditionModel config dict with the guidance scale as an input:
    `time_cond_proj_dim = embedding_dim`, so `timestep_cond` (B, embedding_dim) (the guidance-scale embedding of
    w - 1, LCM's convention) goes through `time_embedding.cond_proj` (bias-free, (embedding_dim ->
    the time projection's width)) into the timestep embedding's input.

    Raises ValueError naming the key if the teacher already has a `time_cond_proj_dim` (its own guidance input,
    e.g. an LCM teacher) or `embedding_dim` is below 4 (LCM's embedding divides by dim // 2 - 1).
    """
    embedding_dim = int(embedding_dim)
    if embedding_dim < 4:
        raise ValueError(f"guidance_embedding_dim must be >= 4 (the embedding divides by dim // 2 - 1), got "
                         f"{embedding_dim}")
    if unet_config.get("time_cond_proj_dim") is not None:
        raise ValueError(f"the teacher UNet already has time_cond_proj_dim={unet_config['time_cond_proj_dim']!r} (a "
                         "guidance input of its own); the flow map's guidance input needs that key for itself")
    config = dict(unet_config)
    config["time_cond_proj_dim"] = embedding_dim
    if "_use_default_values" in config:
        config["_use_default_values"] = [k for k in config["_use_default_values"] if k != "time_cond_proj_dim"]
    return config


def hooked_unet_config(base_unet_config: dict, guidance_embedding_dim: int | None) -> dict:
    """The flow-map UNet config on a base UNet's config: the target-time hook, and the guidance input of
    `guidance_embedding_dim` where the flow map has one (flowmap.json's hooks.timestep_cond), else none."""
    config = add_target_time_hook_config(dict(base_unet_config))
    if guidance_embedding_dim is not None:
        config = add_guidance_input_config(config, guidance_embedding_dim)
    return config
