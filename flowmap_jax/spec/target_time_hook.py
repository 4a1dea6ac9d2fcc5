"""The flow map's second time as a diffusers UNet config: the target-time hook (pure Python)."""

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
