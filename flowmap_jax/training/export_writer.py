"""Export a trained flow map for PyTorch/diffusers: the folder writer behind `python -m conversion export`
and the trainer's final export (the twin of `flowmap_jax.core.export_loading`, which reads the folder back).

    python -m conversion export runs/digits runs/digits/export              # newest checkpoint, EMA weights
    python -m conversion export runs/digits/checkpoints/400 out --weights params
    python -m conversion export OLD_EXPORT NEW_EXPORT                        # re-export a flow-map folder

The folder format is `flowmap_jax.spec.export_format` (a stock diffusers UNet2DConditionModel with
class_embed_type="timestep", safetensors, plus flowmap.json). API:

- `export_flow_map(params, unet_config, flow_map_config, out_dir, provenance)`: Flax params (nested dict of
  arrays, as trained) -> folder. Written into a temporary sibling folder and renamed into place: a failed
  export never leaves a half folder where a good one was (an existing export at `out_dir` is replaced only
  once the new one is complete).
- `export_checkpoint(source, out_dir, weights="ema")`: a run folder, its checkpoints folder, one step's
  folder (`.../checkpoints/400`) or an existing export -> folder. The flow map's UNet config, schedule,
  guidance and label embeddings come from the run's `config.json` (its teacher folder); `teacher=...`
  overrides the teacher folder for a checkpoint without its run folder.

Elsewhere: reading an export back into JAX is `flowmap_jax.core.export_loading`; the partial restore of a
checkpoint's parameters is `flowmap_jax.training.checkpointing.read_checkpoint_params` (checked by
`flowmap_jax.training.run_record.verify`, like the trainer's resume); what a run's config says
about its flow map (FlowMapConfig, provenance) is `flowmap_jax.training.run_provenance`; finding the teacher's
files is `flowmap_jax.data.teacher_folder`.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flowmap_jax import __version__
from flowmap_jax.core.atomic_folder import replace_folder_atomically
from flowmap_jax.training.checkpointing import read_checkpoint_params
from flowmap_jax.core.export_loading import load_flow_map_export
from flowmap_jax.training.run_provenance import (
    flow_map_config_from_train_config,
    read_train_config,
    run_provenance,
)
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
from flowmap_jax.data.teacher_folder import read_teacher_unet_config, resolve_teacher_path
from flowmap_jax.unet import UNetConfig
from flowmap_jax.unet.diffusers_io import atomic_write_bytes, save_state_dict
from flowmap_jax.unet.state_dict import flax_to_state_dict

__all__ = ["export_checkpoint", "export_flow_map", "student_unet_config"]


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
    meta = flow_map_metadata(flow_map_config, config_dict, provenance, label_info, version=__version__)
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


# --------------------------------------------------------------------------------------------------
# The command's entry point.

EXPORT_FORMS = ("auto", "full", "lora", "merge", "unet")


def export_checkpoint(source, out_dir, weights: str = "ema", step: int | None = None, teacher: str | None = None,
                      run_config=None, say: Callable[[str], Any] = print, form: str = "auto",
                      lora_dtype: str = "float32") -> Path:
    """A run folder / checkpoint (or an existing flow-map export) -> an exported flow map at `out_dir`.

    weights: "ema" (default) or "params". step: a checkpoint step (default the newest good one).
    teacher: the teacher folder (default the run config's teacher.path). run_config: the run's
    config.json (default `<run>/config.json` next to the checkpoints folder).
    form: "auto" (a LoRA run: its LoRA folder; else the full UNet), "lora" (a LoRA run's adapters, its flow-map
    inputs and flowmap.json, `lora_export_writer`; an error for a full fine-tune), "merge" (a LoRA run's adapters
    merged into the base: a full export), "full" (a full fine-tune's UNet; an error for a LoRA run) or "unet" (a full
    UNet either way: a LoRA run merged, as `--pipeline` needs). lora_dtype: "float32" or "float16" for the adapters' file.
    A LoRA run's base (the teacher folder) must be the one it was trained on: its fingerprint is compared with the
    checkpoint's, and a difference is an error naming the folder.
    """
    if form not in EXPORT_FORMS:
        raise ValueError(f"export form must be one of {EXPORT_FORMS}, got {form!r}")
    source = Path(source)
    from flowmap_jax.spec.lora_format import is_lora_export

    if is_lora_export(source):
        raise ValueError(f"{source} is a LoRA flow-map export already: copy the folder, or load it onto its base "
                         "(`--model BASE --lora FOLDER` of the samplers); re-exporting it is not supported")
    if is_export(source):
        if form == "lora":
            raise ValueError(f"--lora: {source} is a full flow-map export (no adapters)")
        exported = load_flow_map_export(source)
        return export_flow_map(exported.params, exported.unet_config, exported.config, out_dir,
                               dict(exported.provenance, reexported_from=str(source.resolve())))
    loaded = read_checkpoint_params(source, weights, step, say=say)
    config_path = Path(run_config) if run_config else (loaded.run_dir / "config.json" if loaded.run_dir else None)
    if config_path is None:
        raise FileNotFoundError(f"no run config.json next to {loaded.directory.parent}: pass the run's config.json "
                                "(--run-config) so the teacher, schedule and objectives are known")
    config = read_train_config(config_path)
    path = resolve_teacher_path(teacher or config.teacher.path)
    flow_map_config = flow_map_config_from_train_config(config, teacher=path)
    provenance = run_provenance(config, loaded.step, weights=weights, checkpoint=str(loaded.directory),
                                checkpoint_time=loaded.meta.get("time"))
    if config.model.lora_rank > 0:
        form = "merge" if form == "unet" else form
        if form == "full":
            raise ValueError(f"{loaded.directory.parent} is a LoRA run (model.lora_rank {config.model.lora_rank}): "
                             "export its adapters (--lora) or merge them into the base (--merge)")
        return _export_lora_checkpoint(loaded, config, path, flow_map_config, provenance, out_dir, form, lora_dtype,
                                       weights, say)
    if form in ("lora", "merge"):
        raise ValueError(f"--{form}: the run in {loaded.directory.parent} fine-tuned every parameter "
                         "(model.lora_rank 0): it has no adapters; export it without --lora / --merge")
    teacher_unet = read_teacher_unet_config(path, config.teacher.subfolder)
    unet_config = student_unet_config(teacher_unet, loaded.params)
    folder = export_flow_map(loaded.params, unet_config, flow_map_config, out_dir, provenance)
    say(f"exported step {loaded.step} ({weights} weights) of {loaded.directory.parent} to {folder}")
    return folder


def _export_lora_checkpoint(loaded, config, teacher_path, flow_map_config, provenance, out_dir, form, lora_dtype,
                            weights, say) -> Path:
    """A LoRA run's checkpoint -> its LoRA folder ("auto", "lora") or the merged full export ("merge"), after
    checking that the teacher folder holds the base the run was trained on (the checkpoint's fingerprint)."""
    from flowmap_jax.core.lora import LoraSettings, base_fingerprint
    from flowmap_jax.training.lora_export_writer import export_lora_flow_map, export_merged_flow_map
    from flowmap_jax.unet.diffusers_io import load_diffusers_unet

    subfolder = config.teacher.subfolder or None
    where = os.path.join(teacher_path, subfolder) if subfolder else teacher_path
    base_config, base_params = load_diffusers_unet(teacher_path, subfolder=subfolder)
    fingerprint = base_fingerprint(base_params)
    saved = (loaded.meta.get("extra") or {}).get("lora_base") or {}
    if saved.get("sha256") and saved["sha256"] != fingerprint:
        raise ValueError(f"the base UNet weights in {where} are not the ones the LoRA run {loaded.directory.parent} "
                         f"was trained on ({saved.get('source')}); pass that folder with --teacher")
    settings = LoraSettings.create(config.model.lora_rank, config.model.lora_alpha, config.model.lora_targets)
    if form == "merge":
        folder = export_merged_flow_map(loaded.params, settings, base_params, base_config, flow_map_config, out_dir,
                                        provenance)
        what = "merged into the base"
    else:
        folder = export_lora_flow_map(loaded.params, settings, base_config, flow_map_config, out_dir, provenance,
                                      base_fingerprint=fingerprint, dtype=lora_dtype)
        what = f"LoRA rank {settings.rank}"
    say(f"exported step {loaded.step} ({weights} weights, {what}) of {loaded.directory.parent} to {folder}")
    return folder
