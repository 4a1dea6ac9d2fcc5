"""What a training run's config says about its flow map: the export's FlowMapConfig and its provenance.

`config` everywhere is a `config.TrainConfig`, its dict, or the path of a run's config.json
(`read_train_config`). `flow_map_config_from_train_config` finds the teacher's scheduler config and label
table through `flowmap_jax.data.teacher_folder`; `run_provenance` is the free-form record written into
flowmap.json (teacher, objectives, steps, seed, the whole training config). No jax, no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flowmap_jax.spec.export_format import FlowMapConfig
from flowmap_jax.spec.schedule import load_scheduler
from flowmap_jax.data.teacher_folder import (
    label_table_file,
    read_teacher_scheduler_config,
    resolve_teacher_path,
)

__all__ = ["flow_map_config_from_train_config", "read_train_config", "run_provenance"]


def read_train_config(config):
    """A `config.TrainConfig` from itself, its dict, or a config.json path; ValueError naming the file."""
    from flowmap_jax.training.config import TrainConfig

    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the run config {path}: {err}") from None
        if isinstance(data, dict) and "parameterization" not in (data.get("model") or {}):
            # Runs from before the field existed trained the teacher's DDIM-step parameterisation.
            data = dict(data, model=dict(data.get("model") or {}, parameterization="teacher_step"))
        try:
            return TrainConfig.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None
    return TrainConfig.from_dict(dict(config))


def flow_map_config_from_train_config(config, teacher: str | None = None, guidance_embedding_dim=None
                                      ) -> FlowMapConfig:
    """The FlowMapConfig of a run: `config` a `config.TrainConfig`, its dict, or its config.json path.

    Reads the teacher's scheduler_config.json (full, recorded) and finds label_embeddings.safetensors in
    the teacher folder (`teacher` overrides `config.teacher.path`). Guidance: autoguidance when
    `teacher.weak_path` is set, classifier-free when `teacher.guidance_scale` != 1, at that scale, baked in
    unless the objective options set `guidance_embedding_dim` (or `guidance_embedding_dim` is given): then an input,
    `teacher.guidance_scale` its default, the options' `guidance_scale_range` its range (classifier-free even at
    a default of 1).
    """
    config = read_train_config(config)
    path = resolve_teacher_path(teacher or config.teacher.path)
    scheduler_config = read_teacher_scheduler_config(path, config.teacher.scheduler_subfolder)
    try:
        schedule, prediction_type = load_scheduler(scheduler_config)
    except ValueError as err:
        raise ValueError(f"the teacher's scheduler_config.json ({path}): {err}") from None
    options = config.objective.options
    embedding_dim = guidance_embedding_dim or options.guidance_embedding_dim
    scale = float(config.teacher.guidance_scale)
    w_range = options.guidance_scale_range if embedding_dim else None
    guided = scale != 1.0 or w_range is not None  # a w range turns the teacher's guidance on at any default scale
    guidance = "autoguidance" if config.teacher.weak_path else ("cfg" if guided else "none")
    return FlowMapConfig(
        schedule=schedule, prediction_type=prediction_type, scheduler_config=scheduler_config,
        parameterization=config.model.parameterization, guidance=guidance, guidance_scale=scale, guidance_embedding_dim=embedding_dim,
        guidance_scale_range=w_range,
        label_embeddings=label_table_file(path),
        sample_shape=tuple(config.data.sample_shape))


def run_provenance(config, step: int | None = None, **extra) -> dict:
    """Provenance of a run for flowmap.json: teacher, objectives (names, weights, options), steps, seed,
    EMA decay, preset and the whole training config; `extra` (e.g. checkpoint=..., weights="ema") added."""
    config = read_train_config(config)
    options = json.loads(config.objective.options.to_json())
    return dict({
        "teacher": {"path": config.teacher.path, "subfolder": config.teacher.subfolder,
                    "scheduler_subfolder": config.teacher.scheduler_subfolder,
                    "guidance_scale": config.teacher.guidance_scale, "weak_path": config.teacher.weak_path or None},
        "objectives": [{"name": n, "weight": float(w)}
                       for n, w in zip(config.objective.names, config.objective.weights)],
        "objective_options": options,
        "step": step,
        "total_steps": config.run.steps,
        "seed": config.run.seed,
        "ema_decay": config.optim.ema_decay,
        "preset": config.preset,
        "train_config": config.to_dict(),
    }, **extra)
