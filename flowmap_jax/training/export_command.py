"""The entry point of `python -m conversion export`: a run folder or checkpoint -> an exported flow map.

    python -m conversion export runs/digits runs/digits/export              # newest checkpoint, EMA weights
    python -m conversion export runs/digits/checkpoints/400 out --weights params
    python -m conversion export OLD_EXPORT NEW_EXPORT                        # re-export a flow-map folder
    python -m conversion export runs/lora OUT [--lora | --merge]             # a LoRA run

`export_checkpoint` reads the checkpoint's parameters (`checkpointing.read_checkpoint_params`, checked like the
trainer's resume) and the run's config.json, and writes through `export_writer` (a full fine-tune's UNet) or
`lora_export_writer` (a LoRA run: its LoRA folder, or the adapters merged into the base).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowmap_jax.core.export_loading import load_flow_map_export
from flowmap_jax.data.teacher_folder import read_teacher_unet_config, resolve_teacher_path
from flowmap_jax.spec.export_format import is_export, is_lora_export
from flowmap_jax.training.checkpointing import read_checkpoint_params
from flowmap_jax.training.export_writer import export_flow_map, student_unet_config
from flowmap_jax.training.run_provenance import (
    flow_map_config_from_train_config,
    read_train_config,
    run_provenance,
)

__all__ = ["EXPORT_FORMS", "export_checkpoint"]

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
