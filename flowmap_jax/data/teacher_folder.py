"""Finding a teacher: its folder (embedded, local or hub), UNet, scheduler config and label table.

The one place that knows where a teacher's files are, for the trainer (`assembly`), the shard writer
(`write_shards`), the export (`conversion.export`, `run_provenance`) and the benchmarks.

A teacher is a diffusers folder (or a hub id) `path` with
  <path>/<subfolder>/config.json + safetensors         the UNet (`subfolder` "unet" by default)
  <path>/<scheduler_subfolder>/scheduler_config.json   its scheduler (schedule and prediction type)
  <path>/label_embeddings.safetensors                  optional: "weight" (K + 1, D), row K the null label,
                                                       the digits teacher's "text encoder" (`spec.label_table`)
`EMBEDDED_DIGITS_TEACHER` names the digits teacher shipped in `flowmap_jax/assets/digits_teacher/`, which is
just such a folder. A hub id (`owner/name`) is read through the hub cache, one file at a time; nothing
else downloads. Pure Python: loading the UNet's weights into Flax is `assembly.load_teacher_unet`.
"""

from __future__ import annotations

import os
from pathlib import Path

from flowmap_jax.spec.label_table import LABEL_EMBEDDINGS_NAME
from flowmap_jax.spec.schedule import (
    ScheduleConfig,
    load_scheduler,
    read_scheduler_config,
)

__all__ = [
    "EMBEDDED_DIGITS_TEACHER",
    "EMBEDDED_TEACHER_DIR",
    "TeacherNotFound",
    "embedded_teacher_folder",
    "label_table_file",
    "load_schedule",
    "read_teacher_scheduler_config",
    "read_teacher_unet_config",
    "resolve_teacher_path",
    "teacher_file",
]

EMBEDDED_DIGITS_TEACHER = "embedded:digits_teacher"
"""Marker for the digits teacher that ships in `flowmap_jax/assets/digits_teacher/` (a diffusers
folder); the trainer resolves it to that folder and then loads it exactly like a user's folder."""

EMBEDDED_TEACHER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                    "digits_teacher")
"""The shipped digits teacher's folder."""


class TeacherNotFound(FileNotFoundError):
    """The teacher folder, its UNet or its scheduler cannot be found or read."""


def embedded_teacher_folder() -> str:
    return EMBEDDED_TEACHER_DIR


def resolve_teacher_path(path: str) -> str:
    """`EMBEDDED_DIGITS_TEACHER` -> the package's folder; anything else (a folder or a hub id) unchanged."""
    return embedded_teacher_folder() if path == EMBEDDED_DIGITS_TEACHER else path


def _is_hub_id(path: str) -> bool:
    return not os.path.isdir(path) and path.count("/") == 1 and not path.startswith((".", "/"))


def teacher_file(path: str, subfolder: str, filename: str, flag: str) -> Path:
    """A file of the teacher: from a local folder, or one file of a hub repo (no weights downloaded).
    TeacherNotFound naming `flag` when it is not there."""
    local = Path(path) / subfolder / filename if subfolder else Path(path) / filename
    if Path(path).is_dir():
        if not local.is_file():
            raise TeacherNotFound(f"{flag}: no {filename} in {local.parent}")
        return local
    if not _is_hub_id(path):
        raise TeacherNotFound(f"{flag}: no teacher folder at {path}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, filename, subfolder=subfolder or None))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo
        raise TeacherNotFound(f"{flag}: cannot fetch {filename} of hub id {path!r}: {err}") from None


def read_teacher_scheduler_config(path: str, scheduler_subfolder: str) -> dict:
    """The teacher's full diffusers scheduler config (scheduler_config.json) as a dict."""
    return read_scheduler_config(teacher_file(path, scheduler_subfolder, "scheduler_config.json",
                                              "--teacher.scheduler_subfolder"))


def load_schedule(path: str, scheduler_subfolder: str) -> tuple[ScheduleConfig, str]:
    """(ScheduleConfig, prediction_type) from the teacher's scheduler_config.json."""
    return load_scheduler(read_teacher_scheduler_config(path, scheduler_subfolder))


def read_teacher_unet_config(path: str, subfolder: str) -> dict:
    """The teacher UNet's diffusers config.json (no weights read)."""
    import json

    return json.loads(teacher_file(path, subfolder, "config.json", "--teacher.subfolder").read_text())


def label_table_file(path: str) -> str | None:
    """The teacher folder's label_embeddings.safetensors, or None (none there, or a hub id)."""
    file = os.path.join(path, LABEL_EMBEDDINGS_NAME) if os.path.isdir(path) else ""
    return file if file and os.path.isfile(file) else None
