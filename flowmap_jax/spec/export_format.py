"""The exported flow map on disk: a stock diffusers UNet folder plus `flowmap.json`. Pure Python (numpy
only, no jax, no torch), shared by the JAX exporter (`conversion.export`), the JAX loader
(`flowmap_jax.core.export_loading`) and the PyTorch loader (`torch_ref.export_loading`). The label table is read by
`flowmap_jax.spec.label_table`; the backend-independent sampling inputs are in `flowmap_jax.spec.sampling_inputs`.

Folder layout (written by `conversion.export.export_flow_map`, atomically as a whole)::

    <folder>/config.json                          diffusers UNet2DConditionModel config, class_embed_type="timestep"
                                                  (and time_cond_proj_dim where guidance was distilled as an input)
    <folder>/diffusion_pytorch_model.safetensors  the weights, diffusers keys and layouts (float32)
    <folder>/flowmap.json                         what the network means (below)
    <folder>/label_embeddings.safetensors         optional: "weight" (K + 1, D) float32, row K the null label

`UNet2DConditionModel.from_pretrained(folder)` loads it with no custom code. A stock pipeline cannot misuse
it: it calls the UNet without `class_labels` and diffusers raises "class_labels should be provided".

flowmap.json (format "flowmap-jax/flow-map", format_version 2; version 1 is read too)::

    format, format_version, flowmap_jax_version
    network:     {"class": "UNet2DConditionModel", "config": "config.json", "weights": "...safetensors"}
    parameterization: "angle" | "linear" | "teacher_step" | "anchored" (new in version 2; version 1 is
                 "teacher_step")
    flow_map:    "X(x_s, s, t) = ..." (the parameterisation, in words)
    prediction_type: "epsilon" | "v_prediction" | "sample" | "flow" (the teacher's)
    schedule:    ScheduleConfig fields (kind, num_train_timesteps, betas..., time_scale, ...); authoritative
    scheduler_config: the teacher's full diffusers scheduler config, or null (checked against `schedule`)
    time:        {"units", "t_clean", "t_noise", "time_unit", "convention"}
    hooks:       {"timestep": source time s, "class_labels": target time t,
                  "timestep_cond": null, or the guidance-scale embedding {"embedding", "dim", "argument"}}
    guidance:    {"teacher_guidance": "none" | "cfg" | "autoguidance", "scale": w the map reproduces
                  (baked in unless embedded), "embedded": bool, "scale_range": [lo, hi] or null}
    conditioning: {"encoder_hidden_states": ..., "label_embeddings": file name or null, "num_labels",
                   "null_label", "added_cond_kwargs": ...}
    sample_shape: [H, W, C] the flow map was trained on (channels last), or null
    provenance:  free-form: teacher, objectives, steps, date, checkpoint, ...

Time convention: floats in the teacher's own timestep units (`flowmap_jax.spec.schedule`): DDPM t in
[-1, N - 1] with t = -1 the clean end; VP cosine and rectified flow t in [0, T] with t = 0 clean. The UNet's
`timestep` argument is the source time s, `class_labels` the target time t, both (B,) float32. The map is
X(x_s, s, t) = c_x(s, t) x_s + c_F(s, t) F(x_s, s, t) with F the UNet's output and (c_x, c_F) those of
`parameterization` (`flowmap_jax.core.flow_map.FlowMap.coefficients`): "angle" cos/sin of theta_s - theta_t with F
read as v; "linear" 1 and (t - s) / time_unit with F a flow velocity; "teacher_step" (format 1) the teacher's
DDIM step with F in `prediction_type`; "anchored" (1 - b) angle's + b teacher_step's, b = clip((alpha_s - 0.3) /
0.3, 0, 1) (`spec.parameterization.ANCHOR_ALPHA`).

Errors (`ExportFormatError`, a ValueError) name the file and the key at fault.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from flowmap_jax.spec.parameterization import resolve_parameterization
from flowmap_jax.spec.prediction_types import check_prediction_type
from flowmap_jax.spec.schedule import ScheduleConfig, prediction_type_from_diffusers, schedule_fields

FORMAT_NAME = "flowmap-jax/flow-map"
FORMAT_VERSION = 2
FLOWMAP_JSON = "flowmap.json"
UNET_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LABEL_EMBEDDINGS_NAME = "label_embeddings.safetensors"
GUIDANCE_KINDS = ("none", "cfg", "autoguidance")
GUIDANCE_EMBEDDING = "lcm_guidance_scale_embedding"
LORA_NETWORK_KIND = "lora"  # flowmap.json's network.kind of a LoRA flow map (`spec.lora_format`)

MAP_DESCRIPTIONS = {
    "angle": "X(x_s, s, t) = cos(theta_s - theta_t) * x_s - sin(theta_s - theta_t) * F, theta_t = arctan(sigma_t / "
             "alpha_t), F the UNet's output at (x_s, timestep=s, class_labels=t) read as v = alpha eps - sigma x0 "
             "(VP schedules; TrigFlow). X(x, s, s) = x.",
    "linear": "X(x_s, s, t) = x_s + (t - s) / time_unit * F, F the UNet's output at (x_s, timestep=s, "
              "class_labels=t) read as the flow velocity u = eps - x0 (rectified flow). X(x, s, s) = x.",
    "teacher_step": "X(x_s, s, t) = alpha_t * x0_hat + sigma_t * eps_hat, (x0_hat, eps_hat) from the UNet's "
                    "prediction F in `prediction_type` at (x_s, timestep=s, class_labels=t): the teacher's first-order "
                    "(DDIM) step from s to t with F (rectified flow: x_s + (t - s) / time_unit * F). X(x, s, s) = x.",
    "anchored": "X(x_s, s, t) = (1 - b_s) X_angle + b_s X_teacher_step with the same UNet output F at (x_s, "
                "timestep=s, class_labels=t), b_s = clip((alpha_s - 0.3) / (0.6 - 0.3), 0, 1): the teacher's DDIM "
                "step with F in `prediction_type` where alpha_s >= 0.6, the angle form (F read as v) where alpha_s "
                "<= 0.3 (VP schedules). X(x, s, s) = x.",
}
"""flowmap.json's `flow_map` text for each parameterisation (`parameterization` is the key readers use)."""
TIME_CONVENTION = (
    "floats in the teacher's own timestep units. ddpm: t in [-1, N - 1], alpha_t^2 = alphas_cumprod[t] at integers, "
    "log(alpha) linear in between, t = -1 clean (alpha = 1). vp_cosine and rectified_flow: t in [0, T], t = 0 "
    "clean. Sampling goes from t_noise to t_clean (decreasing times).")


class ExportFormatError(ValueError):
    """A folder is not a (valid) flow-map export; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class FlowMapConfig:
    """Everything besides the network weights that defines an exported flow map.

    schedule, prediction_type: the teacher's.
    parameterization: the map's own (`spec.parameterization.PARAMETERIZATIONS`; "auto" resolves from the schedule).
        Format-1 exports are "teacher_step".
    scheduler_config: the teacher's full diffusers scheduler config (dict), or None for a schedule not read
        from diffusers; when given it must agree with `schedule` and `prediction_type`.
    guidance: how the teacher was guided when distilled: "none", "cfg" (classifier-free) or "autoguidance".
    guidance_scale: the teacher's guidance scale w. Without `guidance_embedding_dim` it is baked into the
        map (the map samples the guided teacher at w, with no guidance input); with it, it is the default w.
    guidance_embedding_dim: the UNet's `time_cond_proj_dim` when the scale is an input: `timestep_cond` =
        LCM's guidance-scale embedding of (w - 1), (B, dim) float32. None when baked in.
    guidance_scale_range: (lo, hi) the scales drawn in training when embedded, else None.
    label_embeddings: path of a safetensors file with "weight" (K + 1, D) float32 (row K the null label) that
        turns class labels into `encoder_hidden_states` (B, 1, D), or None. Exporting copies it into the
        folder; loading points it at the copy.
    sample_shape: (H, W, C) (channels last) of the training samples, or None (the UNet's sample_size then).
    """

    schedule: ScheduleConfig
    prediction_type: str
    scheduler_config: dict | None = None
    parameterization: str = "auto"
    guidance: str = "none"
    guidance_scale: float = 1.0
    guidance_embedding_dim: int | None = None
    guidance_scale_range: tuple[float, float] | None = None
    label_embeddings: str | None = None
    sample_shape: tuple[int, int, int] | None = None

    def __post_init__(self):
        if not isinstance(self.schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig, got {type(self.schedule).__name__}")
        check_prediction_type(self.prediction_type)
        object.__setattr__(self, "parameterization", resolve_parameterization(self.schedule, self.parameterization))
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance must be one of {GUIDANCE_KINDS}, got {self.guidance!r}")
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale}")
        if self.guidance_embedding_dim is not None:
            object.__setattr__(self, "guidance_embedding_dim", int(self.guidance_embedding_dim))
            if self.guidance_embedding_dim < 2:
                raise ValueError(f"guidance_embedding_dim must be >= 2, got {self.guidance_embedding_dim}")
        if self.guidance_scale_range is not None:
            lo, hi = (float(v) for v in self.guidance_scale_range)
            object.__setattr__(self, "guidance_scale_range", (lo, hi))
        if self.sample_shape is not None:
            shape = tuple(int(v) for v in self.sample_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"sample_shape must be (H, W, C), got {self.sample_shape}")
            object.__setattr__(self, "sample_shape", shape)
        if self.label_embeddings is not None:
            object.__setattr__(self, "label_embeddings", os.fspath(self.label_embeddings))
        if self.scheduler_config is not None:
            check_scheduler_agrees(self.scheduler_config, self.schedule, self.prediction_type, "scheduler_config")

    @property
    def guidance_embedded(self) -> bool:
        """True when the guidance scale is a network input (timestep_cond)."""
        return self.guidance_embedding_dim is not None

    def replace(self, **changes) -> "FlowMapConfig":
        return dataclasses.replace(self, **changes)


def check_scheduler_agrees(scheduler_config: dict, schedule: ScheduleConfig, prediction_type: str,
                           where: str) -> None:
    """ExportFormatError naming `where` if a diffusers scheduler config implies another schedule or
    prediction type than (schedule, prediction_type)."""
    if not isinstance(scheduler_config, dict):
        raise ExportFormatError(f"{where} must be a JSON object (a diffusers scheduler config), got "
                                f"{type(scheduler_config).__name__}")
    try:
        implied = ScheduleConfig.from_diffusers(scheduler_config)
        implied_prediction = prediction_type_from_diffusers(scheduler_config)
    except ValueError as err:
        raise ExportFormatError(f"{where}: {err}") from None
    if implied != schedule:
        ours = schedule.to_dict()
        diff = {k: (v, ours.get(k)) for k, v in implied.to_dict().items() if v != ours.get(k)}
        raise ExportFormatError(f"{where} describes another schedule than 'schedule' (scheduler config vs "
                                f"schedule: {diff})")
    if implied_prediction != prediction_type:
        raise ExportFormatError(f"{where} has prediction_type {implied_prediction!r} but 'prediction_type' is "
                                f"{prediction_type!r}")


# --------------------------------------------------------------------------------------------------
# flowmap.json <-> FlowMapConfig

def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def schedule_to_json(schedule: ScheduleConfig) -> dict:
    """The ScheduleConfig fields as JSON (trained_betas as a list)."""
    return _jsonable(schedule.to_dict())


def schedule_from_json(data: Any, where: str) -> ScheduleConfig:
    """ScheduleConfig from its JSON fields; ExportFormatError naming `where` and the key otherwise."""
    if not isinstance(data, dict):
        raise ExportFormatError(f"{where} must be a JSON object of ScheduleConfig fields, got {type(data).__name__}")
    known = set(schedule_fields())
    unknown = sorted(set(data) - known)
    if unknown:
        raise ExportFormatError(f"{where} has unknown key(s) {unknown}; known: {sorted(known)}")
    if "kind" not in data:
        raise ExportFormatError(f"{where}.kind is missing")
    try:
        return ScheduleConfig.from_dict(data)
    except (ValueError, TypeError) as err:  # from_dict's and the schedule classes' messages name the field
        raise ExportFormatError(f"{where}: {err}") from None


def flow_map_metadata(config: FlowMapConfig, unet_config: dict, provenance: dict | None,
                      label_info: dict | None = None, version: str | None = None) -> dict:
    """The flowmap.json document for `config` (label file name relative to the folder)."""
    schedule = config.schedule
    timestep_cond = None
    if config.guidance_embedded:
        timestep_cond = {
            "meaning": "guidance scale w of the distilled teacher, as an input",
            "embedding": GUIDANCE_EMBEDDING,
            "dim": config.guidance_embedding_dim,
            "argument": "w - 1",
            "description": "timestep_cond = get_guidance_scale_embedding(w - 1, dim): [sin, cos] of 1000 (w - 1) "
                           "times geometric frequencies (diffusers' LCM convention), (B, dim) float32",
        }
    conditioning = {
        "encoder_hidden_states": (None if unet_config.get("cross_attention_dim") is None else
                                  f"(B, L, {unet_config.get('cross_attention_dim')}) as for the teacher UNet"),
        "label_embeddings": LABEL_EMBEDDINGS_NAME if config.label_embeddings else None,
        "added_cond_kwargs": ({"text_embeds": "(B, D)", "time_ids": "(B, 6)"}
                              if unet_config.get("addition_embed_type") == "text_time" else None),
    }
    if label_info:
        conditioning.update(label_info)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "flowmap_jax_version": version,
        "network": {"class": "UNet2DConditionModel", "config": UNET_CONFIG_NAME, "weights": WEIGHTS_NAME,
                    "layout": "PyTorch (B, C, H, W); the Flax port takes (B, H, W, C)"},
        "flow_map": MAP_DESCRIPTIONS[config.parameterization],
        "parameterization": config.parameterization,
        "prediction_type": config.prediction_type,
        "schedule": schedule_to_json(schedule),
        "scheduler_config": None if config.scheduler_config is None else _jsonable(config.scheduler_config),
        "time": {"units": "teacher timesteps", "t_clean": schedule.t_clean, "t_noise": schedule.t_noise,
                 "time_unit": schedule.time_unit, "convention": TIME_CONVENTION},
        "hooks": {
            "timestep": "the source time s of the jump (teacher units, (B,) float)",
            "class_labels": {"meaning": "the target time t of the jump (teacher units, (B,) float)",
                             "class_embed_type": "timestep",
                             "description": "same sinusoidal projection as the timestep, into class_embedding "
                                            "(a TimestepEmbedding) added to the time embedding"},
            "timestep_cond": timestep_cond,
        },
        "guidance": {"teacher_guidance": config.guidance, "scale": config.guidance_scale,
                     "embedded": config.guidance_embedded,
                     "scale_range": None if config.guidance_scale_range is None else list(config.guidance_scale_range),
                     "description": ("the guidance scale is an input (hooks.timestep_cond); 'scale' is the default"
                                     if config.guidance_embedded else
                                     "baked in: the map reproduces the teacher guided at 'scale'; no guidance input")},
        "conditioning": conditioning,
        "sample_shape": None if config.sample_shape is None else list(config.sample_shape),
        "provenance": _jsonable(provenance or {}),
    }


def _get(data: dict, key: str, where: str, types=None):
    if key not in data:
        raise ExportFormatError(f"{where}: key '{key}' is missing")
    value = data[key]
    if types is not None and not isinstance(value, types):
        raise ExportFormatError(f"{where}: key '{key}' has the wrong type ({type(value).__name__})")
    return value


def config_from_metadata(meta: dict, folder: Path | None = None, where: str = FLOWMAP_JSON) -> FlowMapConfig:
    """FlowMapConfig from a flowmap.json document; ExportFormatError naming the key if invalid."""
    if not isinstance(meta, dict):
        raise ExportFormatError(f"{where} must hold a JSON object")
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise ExportFormatError(f"{where}: key 'format' is {fmt!r}, expected {FORMAT_NAME!r} (not a flow-map export)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise ExportFormatError(f"{where}: key 'format_version' is {version!r}; this flowmap-jax reads versions "
                                f"1..{FORMAT_VERSION}")
    prediction_type = _get(meta, "prediction_type", where, str)
    try:
        check_prediction_type(prediction_type)
    except ValueError as err:
        raise ExportFormatError(f"{where}: key 'prediction_type': {err}") from None
    schedule = schedule_from_json(_get(meta, "schedule", where), f"{where}: schedule")
    # Format 1 had one parameterisation, the teacher's DDIM step; format 2 names it.
    parameterization = "teacher_step" if version == 1 else _get(meta, "parameterization", where, str)
    try:
        resolve_parameterization(schedule, parameterization)
    except ValueError as err:
        raise ExportFormatError(f"{where}: key 'parameterization': {err}") from None
    scheduler_config = meta.get("scheduler_config")
    if scheduler_config is not None:
        check_scheduler_agrees(scheduler_config, schedule, prediction_type, f"{where}: scheduler_config")
    hooks = _get(meta, "hooks", where, dict)
    class_hook = _get(hooks, "class_labels", f"{where}: hooks", dict)
    if class_hook.get("class_embed_type") != "timestep":
        raise ExportFormatError(f"{where}: hooks.class_labels.class_embed_type is "
                                f"{class_hook.get('class_embed_type')!r}, expected 'timestep'")
    guidance = _get(meta, "guidance", where, dict)
    timestep_cond = hooks.get("timestep_cond")
    embedding_dim = None
    if timestep_cond is not None:
        if not isinstance(timestep_cond, dict) or timestep_cond.get("embedding") != GUIDANCE_EMBEDDING:
            raise ExportFormatError(f"{where}: hooks.timestep_cond must be null or a {GUIDANCE_EMBEDDING!r} "
                                    f"description, got {timestep_cond!r}")
        embedding_dim = _get(timestep_cond, "dim", f"{where}: hooks.timestep_cond", int)
    conditioning = meta.get("conditioning") or {}
    label_name = conditioning.get("label_embeddings")
    label_path = None
    if label_name:
        if os.path.basename(label_name) != label_name:
            raise ExportFormatError(f"{where}: conditioning.label_embeddings must be a file name in the folder, got "
                                    f"{label_name!r}")
        label_path = str(Path(folder) / label_name) if folder is not None else label_name
        if folder is not None and not os.path.isfile(label_path):
            raise ExportFormatError(f"{where}: conditioning.label_embeddings names {label_name}, which is not in "
                                    f"{folder}")
    shape = meta.get("sample_shape")
    try:
        return FlowMapConfig(
            schedule=schedule, prediction_type=prediction_type, scheduler_config=scheduler_config,
            parameterization=parameterization, guidance=guidance.get("teacher_guidance", "none"), guidance_scale=guidance.get("scale", 1.0),
            guidance_embedding_dim=embedding_dim, guidance_scale_range=guidance.get("scale_range"),
            label_embeddings=label_path, sample_shape=None if shape is None else tuple(shape))
    except (ValueError, TypeError) as err:
        raise ExportFormatError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What `read_export` finds in a folder (no weights read). unet_config: the diffusers config dict;
    metadata: flowmap.json as read."""

    folder: Path
    unet_config: dict
    config: FlowMapConfig
    metadata: dict

    @property
    def weights_path(self) -> Path:
        return self.folder / WEIGHTS_NAME


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path.name} in {path.parent} ({what})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{path} is not valid JSON: {err}") from None


def check_unet_hooks(unet_config: dict, config: FlowMapConfig, where: str) -> None:
    """The UNet config carries the target-time hook and the guidance input flowmap.json describes."""
    hook = unet_config.get("class_embed_type")
    if hook != "timestep":
        raise ExportFormatError(
            f"{where}: key 'class_embed_type' is {hook!r}, expected 'timestep' (the flow map's target-time hook); "
            "a plain teacher UNet is not a flow map")
    for key in ("num_class_embeds",):
        if unet_config.get(key) is not None:
            raise ExportFormatError(f"{where}: key {key!r}={unet_config[key]!r} conflicts with the target-time hook")
    proj = unet_config.get("time_cond_proj_dim")
    if config.guidance_embedding_dim is not None and proj != config.guidance_embedding_dim:
        raise ExportFormatError(f"{where}: key 'time_cond_proj_dim' is {proj!r} but flowmap.json's guidance "
                                f"embedding has dim {config.guidance_embedding_dim}")


def read_export(folder: str | os.PathLike) -> ExportInfo:
    """Reads and checks config.json and flowmap.json of an exported flow map (weights are not read).

    FileNotFoundError for a missing folder, config.json or weights file; ExportFormatError (naming the file
    and the key) for a folder that is not a flow-map export: no flowmap.json, a UNet without the target-time
    hook, an unknown format, a bad or inconsistent schedule, a missing label file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no flow-map export folder at {folder}")
    config_path = folder / UNET_CONFIG_NAME
    if not config_path.is_file():
        if is_lora_export(folder):
            raise ExportFormatError(f"{folder} is a LoRA flow map (adapters, no UNet of its own): load it onto its base "
                                    f"UNet, e.g. `--model BASE_FOLDER --lora {folder}`, or export the run with --merge")
    unet_config = _read_json(config_path, "the diffusers UNet config of a flow-map export")
    meta_path = folder / FLOWMAP_JSON
    if not meta_path.is_file():
        hook = unet_config.get("class_embed_type") if isinstance(unet_config, dict) else None
        detail = (" and its config.json has no target-time hook (class_embed_type is "
                  f"{hook!r}, not 'timestep'): a plain diffusers UNet" if hook != "timestep" else "")
        raise ExportFormatError(f"{meta_path} is missing: {folder} is not a flow-map export{detail}. Export one with "
                                "`python -m conversion export RUN_FOLDER OUT`")
    meta = _read_json(meta_path, "flow-map metadata")
    config = config_from_metadata(meta, folder, str(meta_path))
    check_unet_hooks(unet_config, config, str(config_path))
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder} (the flow map's weights)")
    return ExportInfo(folder=folder, unet_config=unet_config, config=config, metadata=meta)


def is_lora_export(folder: str | os.PathLike) -> bool:
    """True if `folder` holds a flowmap.json whose network is a LoRA (`spec.lora_format`; nothing else checked)."""
    path = Path(folder) / FLOWMAP_JSON
    if not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    network = meta.get("network") if isinstance(meta, dict) else None
    return isinstance(network, dict) and network.get("kind") == LORA_NETWORK_KIND


def is_export(folder: str | os.PathLike) -> bool:
    """True if `folder` holds a flowmap.json (without validating it)."""
    return (Path(folder) / FLOWMAP_JSON).is_file()
