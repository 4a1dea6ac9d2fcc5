"""Export a trained flow map for PyTorch/diffusers: the folder writer behind `python -m conversion export`
and the trainer's final export (the twin of `flowmap_jax.core.export_loading`, which reads the folder back).

The folder format is `flowmap_jax.spec.export_format` (a stock diffusers UNet2DConditionModel with
class_embed_type="timestep", safetensors, plus flowmap.json). API:

- `export_flow_map(params, unet_config, flow_map_config, out_dir, provenance)`: Flax params (nested dict of
  arrays, as trained) -> folder. Written into a temporary sibling folder and renamed into place: a failed
  export never leaves a half folder where a good one was (an existing export at `out_dir` is replaced only
  once the new one is complete).
- `student_unet_config(teacher_unet_config, params)`: the flow-map UNet's diffusers config.

Elsewhere: the command's entry point (a run folder or checkpoint -> an export, full or LoRA) is
`flowmap_jax.training.export_command.export_checkpoint`; a LoRA run's folder is written by
`flowmap_jax.training.lora_export_writer`; reading an export back into JAX is `flowmap_jax.core.export_loading`;
what a run's config says about its flow map (FlowMapConfig, provenance) is `flowmap_jax.training.run_provenance`.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flowmap_jax import __version__
from flowmap_jax.core.atomic_folder import replace_folder_atomically
from flowmap_jax.spec.export_format import (
    FLOWMAP_JSON,
    LABEL_EMBEDDINGS_NAME,
    FlowMapConfig,
    check_unet_hooks,
    flow_map_metadata,
    is_export,
)
from flowmap_jax.spec.label_table import read_label_embeddings
from flowmap_jax.spec.target_time_hook import add_target_time_hook_config
from flowmap_jax.unet import UNetConfig
from flowmap_jax.unet.diffusers_io import atomic_write_bytes, save_state_dict
from flowmap_jax.unet.state_dict import flax_to_state_dict

__all__ = ["export_flow_map", "export_metadata", "student_unet_config"]


# --------------------------------------------------------------------------------------------------
# Export.

def _write_folder_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """`atomic_folder.replace_folder_atomically` (write a temporary sibling, then rename it into
    place; a failure leaves `out_dir` as it was), refusing to replace a non-empty folder that is not a
    flow-map export."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir):
        raise ValueError(f"refusing to replace {out_dir}: it is not empty and not a flow-map export "
                              f"(no {FLOWMAP_JSON}); choose another output folder")
    return replace_folder_atomically(out_dir, write)


def _as_unet_config(unet_config) -> UNetConfig:
    if isinstance(unet_config, UNetConfig):
        return unet_config
    try:
        return UNetConfig.from_dict(dict(unet_config))
    except ValueError as err:
        raise ValueError(f"unet_config: {err}") from None


def export_metadata(flow_map_config: FlowMapConfig, unet_config: dict, provenance: dict | None,
                    exported_at: str | None = None) -> tuple[dict, bytes | None]:
    """(flowmap.json's document, the label table file's bytes or None) of an export, full or LoRA: the label
    table's description when `flow_map_config.label_embeddings` is set, and `provenance` with "date" (of this
    export: UTC, ISO 8601, or `exported_at`) and "flowmap_jax_version" set."""
    label_bytes, label_info = None, None
    if flow_map_config.label_embeddings is not None:
        label_path = Path(flow_map_config.label_embeddings)
        table = read_label_embeddings(label_path)
        label_bytes = label_path.read_bytes()
        label_info = {"num_labels": int(table.shape[0] - 1), "null_label": int(table.shape[0] - 1),
                      "label_embedding_dim": int(table.shape[1]),
                      "labels_to_encoder_hidden_states": "weight[labels][:, None, :] -> (B, 1, D); row K (the "
                                                         "null label) is the unconditional embedding"}
    provenance = dict(provenance or {})
    provenance["date"] = exported_at or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    provenance["flowmap_jax_version"] = __version__
    return flow_map_metadata(flow_map_config, unet_config, provenance, label_info, version=__version__), label_bytes


def export_flow_map(params, unet_config, flow_map_config: FlowMapConfig, out_dir, provenance: dict | None = None,
                    *, exported_at: str | None = None) -> Path:
    """Writes a flow map as a diffusers folder that `UNet2DConditionModel.from_pretrained` loads, plus
    flowmap.json (and label_embeddings.safetensors when `flow_map_config.label_embeddings` is set).

    params: the flow-map UNet's Flax parameters (nested dict of numpy or jax arrays, e.g. a TrainState's
        `ema_params` on host), stored in their own dtype (float32 from training).
    unet_config: the flow-map UNet's diffusers config (dict or UNetConfig) with class_embed_type="timestep"
        (`spec.target_time_hook.add_target_time_hook_config` of the teacher's) and time_cond_proj_dim where the guidance
        scale is an input.
    flow_map_config: schedule, prediction type, guidance, conditioning (`spec.export_format.FlowMapConfig`).
    provenance: free-form JSON-able dict (teacher, objectives, steps, ...; `run_provenance` builds the
        trainer's); "date" (of this export: UTC, ISO 8601, or `exported_at`) and "flowmap_jax_version" are
        set.
    Returns the folder (absolute). Atomic: see `_write_folder_atomically`.
    """
    if not isinstance(flow_map_config, FlowMapConfig):
        raise TypeError(f"flow_map_config must be a spec.export_format.FlowMapConfig, got {type(flow_map_config).__name__}")
    config = _as_unet_config(unet_config)
    config_dict = config.to_dict()
    check_unet_hooks(config_dict, flow_map_config, "unet_config")
    state = flax_to_state_dict(params, config)  # checks every key and shape against the config
    meta, label_bytes = export_metadata(flow_map_config, config_dict, provenance, exported_at)
    meta_bytes = (json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n").encode()

    def write(folder: Path):
        save_state_dict(state, config_dict, folder)
        if label_bytes is not None:
            atomic_write_bytes(folder / LABEL_EMBEDDINGS_NAME, label_bytes)
        atomic_write_bytes(folder / FLOWMAP_JSON, meta_bytes)

    return _write_folder_atomically(Path(out_dir), write)


def student_unet_config(teacher_unet_config: dict, params=None) -> dict:
    """The flow-map UNet's diffusers config: the teacher's plus the target-time hook; time_cond_proj_dim
    taken from `params` (time_embedding/cond_proj) when the trained network has a guidance input the
    teacher's config lacks."""
    config = add_target_time_hook_config(dict(teacher_unet_config))
    if params is not None and config.get("time_cond_proj_dim") is None:
        cond_proj = params.get("time_embedding", {}).get("cond_proj")
        if cond_proj is not None:
            config["time_cond_proj_dim"] = int(np.shape(cond_proj["kernel"])[0])
    return config
