"""A trained flow map as a full diffusers pipeline folder (`python -m conversion export RUN OUT --pipeline`).

    OUT/model_index.json   _class_name ["pipeline", "FlowMapPipeline"], the components below, and the flow map's
                           flowmap.json under the config key "flow_map" (what `torch_ref.pipeline` reads)
    OUT/pipeline.py        how diffusers finds the class: imports torch_ref.pipeline.FlowMapPipeline (without
                           flowmap-jax, an ImportError that says `pip install "flowmap-jax[torch]"`)
    OUT/unet/              the flow map: a flow-map export (config.json, safetensors, flowmap.json), also
                           usable alone (`--model OUT/unet`)
    OUT/vae/, text_encoder/, tokenizer/ [text_encoder_2/, tokenizer_2/], scheduler/   copied from the teacher
                           pipeline (its safetensors weights and configs; no pickled .bin weights)

Load with `FlowMapPipeline.from_pretrained(OUT)` or `DiffusionPipeline.from_pretrained(OUT,
trust_remote_code=True)` (see `torch_ref.pipeline`). The folder is written under a temporary sibling name
and renamed into place; an existing OUT is replaced only if it is such a pipeline folder or empty.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conversion.output_folder import replace_folder_atomically
from flowmap_jax.spec.pipeline_folder import (
    PIPELINE_CLASS_NAME,
    PIPELINE_MODULE_FILE,
    PIPELINE_MODULE_SOURCE,
    is_flow_map_pipeline,
)

COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
SKIPPED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".pb", ".h5", ".onnx_data")
PIPELINE_CONFIG_KEYS = ("force_zeros_for_empty_prompt",)


def _teacher_pipeline_folder(path: str) -> Path:
    """A local pipeline folder, or a hub id's snapshot of the copied components (through the hub cache)."""
    if os.path.isdir(path):
        folder = Path(path)
    else:
        if path.count("/") != 1 or path.startswith((".", "/")):
            raise FileNotFoundError(f"--pipeline: no teacher pipeline folder at {path}")
        try:
            from huggingface_hub import snapshot_download

            patterns = ["model_index.json"] + [f"{c}/*.json" for c in COPIED_COMPONENTS] + [
                f"{c}/*.safetensors" for c in COPIED_COMPONENTS] + [f"{c}/*.txt" for c in COPIED_COMPONENTS]
            folder = Path(snapshot_download(path, allow_patterns=patterns))
        except Exception as err:  # noqa: BLE001 - offline, unknown repo
            raise FileNotFoundError(f"--pipeline: cannot fetch the teacher pipeline {path!r}: {err}") from None
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--pipeline needs the teacher as a diffusers pipeline folder (with model_index.json, vae/, "
                         f"text_encoder/, tokenizer/); {path} has no model_index.json")
    return folder


def teacher_pipeline_of(flow_map_folder, teacher: str | None = None) -> str:
    """The teacher pipeline of an export: `teacher` if given, else the provenance's teacher.path (the trainer
    reads its UNet from that folder's unet/ subfolder)."""
    if teacher:
        return teacher
    meta = json.loads((Path(flow_map_folder) / "flowmap.json").read_text())
    path = ((meta.get("provenance") or {}).get("teacher") or {}).get("path")
    if not path:
        raise ValueError(f"{flow_map_folder}/flowmap.json records no teacher path; pass --pipeline TEACHER_PIPELINE")
    return path


def write_pipeline(flow_map_folder, teacher_pipeline: str, out_dir) -> Path:
    """OUT from an existing flow-map export folder (copied as unet/) and the teacher pipeline's components."""
    from flowmap_jax.spec.export_format import read_export

    info = read_export(flow_map_folder)  # checks it is a flow-map export
    teacher = _teacher_pipeline_folder(teacher_pipeline)
    teacher_index = json.loads((teacher / "model_index.json").read_text())
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_flow_map_pipeline(out_dir):
        raise ValueError(f"refusing to replace {out_dir}: it is not empty and not a FlowMapPipeline folder")

    def write(tmp: Path) -> None:
        shutil.copytree(info.folder, tmp / "unet")
        index = {"_class_name": PIPELINE_CLASS_NAME,
                 "_diffusers_version": teacher_index.get("_diffusers_version"),
                 "unet": ["diffusers", "UNet2DConditionModel"]}
        for name in COPIED_COMPONENTS:
            entry = teacher_index.get(name)
            if not entry or entry[0] is None:
                continue
            if not (teacher / name).is_dir():
                raise FileNotFoundError(f"{teacher}/model_index.json names {name}, but {teacher / name} is missing")
            shutil.copytree(teacher / name, tmp / name,
                            ignore=lambda _dir, names: [n for n in names if n.endswith(SKIPPED_SUFFIXES)])
            index[name] = entry
        if "text_encoder" not in index and "text_encoder_2" not in index:
            raise ValueError(f"{teacher} has no text encoder: a FlowMapPipeline turns prompts into images")
        for key in PIPELINE_CONFIG_KEYS:
            if key in teacher_index:
                index[key] = teacher_index[key]
        index["flow_map"] = info.metadata
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / PIPELINE_MODULE_FILE).write_text(PIPELINE_MODULE_SOURCE)

    return replace_folder_atomically(out_dir, write)
