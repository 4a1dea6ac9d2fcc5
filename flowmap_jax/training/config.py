"""The training configuration's schema: the typed sections, `TrainConfig`, its dict/JSON form, and the checks.

    TrainConfig()                        # the default run: the `digits` preset (flowmap_jax.training.presets)
    TrainConfig.from_dict(d) / .to_dict() / .to_json()
    load_config_file("runs/digits/config.json")   # a run's config.json back, checked
    validate(config)                     # types, choices and cross-field checks; ConfigError naming the flag

Pure Python (no jax, no torch): the PyTorch reference may share it. Choice fields are `Literal` types, so
`--help` lists their choices and a bad value fails at parse time. The field comments are the `--help` text
(tyro reads them from this file). The presets (`flowmap_jax.training.presets`) are deltas over these defaults; the
command line (`flowmap_jax.training.train_cli`) is built from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from tyro.conf import Suppress, arg
from tyro.constructors import PrimitiveConstructorSpec

from flowmap_jax.cli.cli_exit import BadInput
from flowmap_jax.spec.lora_format import DEFAULT_LORA_TARGETS, check_lora_settings
from flowmap_jax.spec.time_pairs import TimePairConfig
from flowmap_jax.spec.objective_options import ObjectiveOptions, objective_names
from flowmap_jax.spec.parameterization import PARAMETERIZATIONS
from flowmap_jax.data.teacher_folder import EMBEDDED_DIGITS_TEACHER

_JSON_OPTIONS = PrimitiveConstructorSpec(
    nargs=1, metavar="JSON", instance_from_str=lambda args: ObjectiveOptions.from_json(args[0]),
    is_instance=lambda value: isinstance(value, ObjectiveOptions), str_from_instance=lambda value: [value.to_json()])
"""`--objective.options '{...}'`: one JSON flag for the typed options (tyro would otherwise expand the dataclass)."""


class ConfigError(BadInput, ValueError):
    """A bad command-line flag or configuration value; the message names the flag."""


ObjectiveName = Literal[objective_names()]
"""The objectives of `spec.objective_options.OBJECTIVE_OPTIONS` (each backend's OBJECTIVES checks it holds the same)."""
ParameterizationName = Literal[("auto", *PARAMETERIZATIONS)]
"""--model.parameterization: "auto" or one of `spec.parameterization.PARAMETERIZATIONS`."""


@dataclass
class RunConfig:
    """Where the run lives and how long it lasts."""

    dir: Annotated[str, arg(aliases=("-o", "--dir"))] = "runs/digits"  # run folder: checkpoints/, samples/, tensorboard/, export/, quality.md
    steps: Annotated[int, arg(aliases=("-n", "--steps"))] = 300  # total optimiser steps
    seed: int = 0  # seeds the initialisation, the per-step rng and the data order
    resume: Annotated[str, arg(aliases=("-r", "--resume"))] = "auto"  # auto: continue from <dir>/checkpoints if any; never: refuse a non-empty one; or a checkpoint path
    log_every: int = 10  # steps between scalar logs (TensorBoard, metrics.jsonl); NaN is checked every step
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 100  # steps between checkpoints (also saved at the end and on SIGTERM)
    keep_checkpoints: int = 3  # keep the last N checkpoints
    async_checkpoints: bool = True  # write checkpoints in the background
    progress_bar: bool = True  # tqdm bar with loss, steps/s and ETA (process 0 only)
    export: bool = True  # write the trained flow map (EMA weights) as a diffusers folder at the end
    quality_samples: int = 100  # samples per row of the final quality table (0: skip the table)
    compilation_cache: str = "auto"  # persistent XLA cache folder; auto: $JAX_COMPILATION_CACHE_DIR or ~/.cache/flowmap_jax/xla; "": off
    allow_config_change: bool = False  # resume even if fields outside run_config_check.MAY_CHANGE differ (recorded in config_changes.jsonl)


@dataclass
class TeacherConfig:
    """The pretrained diffusion model that is distilled."""

    path: Annotated[str, arg(aliases=("-t", "--teacher"))] = EMBEDDED_DIGITS_TEACHER  # diffusers folder (or hub id) holding the UNet and its scheduler
    subfolder: str = "unet"  # the UNet's subfolder ("" if `path` is the UNet folder itself)
    scheduler_subfolder: str = "scheduler"  # scheduler_config.json's subfolder ("" for none: use defaults)
    guidance_scale: float = 1.5  # classifier-free guidance of the teacher (1.0: none); 1.5: the digits teacher's recommendation
    weak_path: str = ""  # autoguidance: a weaker teacher folder (empty: use classifier-free guidance)


@dataclass
class ModelConfig:
    """How the flow-map network (initialised from the teacher) is computed."""

    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
    remat: bool = False  # rematerialise each ResNet and transformer layer of the UNet (saves memory, costs one more forward)
    parameterization: ParameterizationName = "auto"  # the flow map's output form: auto (angle for VP, linear for rectified flow), angle, linear, teacher_step, anchored (VP: the teacher's DDIM step at low noise, angle at high noise)
    lora_rank: int = 0  # LoRA: adapters of this rank on the frozen teacher UNet (0: fine-tune every parameter); the flow map's own inputs train in full
    lora_alpha: float | None = None  # LoRA scale alpha / rank on the update (default: alpha = rank, no scaling, as diffusers' LCM-LoRA script)
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # LoRA target modules, diffusers names matched as peft does (a name or its '.'-suffix); default: the LCM-LoRA script's list


@dataclass
class DataConfig:
    """Where training examples come from. Shapes are (B, H, W, C), channels last."""

    source: Literal["digits", "folder", "shards"] = "digits"  # digits (built in), folder (image folder), or shards (flowmap_jax.write_shards)
    path: str = ""  # folder of images or of shards
    batch_size: Annotated[int, arg(aliases=("-b", "--batch_size"))] = 32  # global batch, split across processes and devices
    image_size: int = 16  # folder: images are resized to this (pixel space) before any VAE
    vae: str = ""  # folder source with a latent teacher: diffusers AutoencoderKL folder or hub id
    vae_subfolder: str = "vae"
    sample_shape: tuple[int, ...] = (16, 16, 1)  # (H, W, C) the teacher sees; checked against the data


@dataclass
class ObjectiveConfig:
    """What is minimised: a weighted sum of flow-map objectives from `flowmap_jax.core.objectives`."""

    names: tuple[ObjectiveName, ...] = ("pairs",)  # objectives by name (spec.objective_options.OBJECTIVE_OPTIONS)
    weights: tuple[float, ...] = (1.0,)  # one weight per name
    options: Annotated[ObjectiveOptions, _JSON_OPTIONS] = ObjectiveOptions(
        teacher_steps=4, output_scale_power=2.0, time_pairs=TimePairConfig(length_power=0.3))  # the objectives' options (spec.objective_options: each objective's class and defaults); on the command line a JSON object of the options to change (the rest keep the preset's values), each set on every named objective that has it

    def __post_init__(self):
        if not isinstance(self.options, ObjectiveOptions):  # a JSON string (the flag, an old config.json) or a dict
            try:
                self.options = (ObjectiveOptions.from_json(self.options) if isinstance(self.options, str)
                                else ObjectiveOptions.create(self.options))
            except (ValueError, TypeError) as error:
                raise ConfigError(f"--objective.options: {error}") from None


@dataclass
class OptimConfig:
    """optax AdamW with linear warm-up, then constant or cosine; global-norm clipping; EMA."""

    lr: Annotated[float, arg(aliases=("--lr",))] = 1e-3
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "cosine"  # after warm-up: constant or cosine (to 0 at run.steps)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    ema_decay: float = 0.999  # EMA of the parameters (used for samples and export); 0: EMA = params
    microbatch_size: int = 0  # the most examples a device runs at once: a larger per-device batch runs as sequential microbatches of this size, gradients averaged (0: all at once)


@dataclass
class MeshConfig:
    """Device mesh: a data-parallel axis and an FSDP axis (parameters and optimiser state sharded)."""

    data: int = -1  # data-parallel size; -1: all devices not used by fsdp
    fsdp: int = 1  # FSDP size (1: parameters replicated; -1: all the devices data leaves)
    fsdp_min_size: int = 2**18  # parameters with fewer elements stay replicated


@dataclass
class DistributedConfig:
    """Multi-process (multi-host) start-up; empty values fall back to the environment variables
    COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID (also JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID), else to JAX's own cluster auto-detection (SLURM, Cloud TPU, ...) when asked."""

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # 0: from the environment (1 if unset)
    process_id: int = -1  # -1: from the environment
    auto: bool = False  # call jax.distributed.initialize() with no arguments (cluster auto-detection)


@dataclass
class SampleConfig:
    """Sample grids and the final quality table."""

    jumps: tuple[int, ...] = (1, 2, 4, 8)  # flow-map rows of the grid and the quality table (number of jumps)
    teacher_steps: int = 50  # the teacher's row: DDIM steps
    grid_columns: int = 10  # samples per row of the PNG grid
    spacing: Literal["uniform", "logsnr"] = "uniform"  # the flow map's time grid: uniform (in teacher time) or logsnr (spec.time_grid.time_grid)


@dataclass
class TrainConfig:
    """Everything a run needs. `preset` names the preset this was built from (informational; set by
    `--preset`, not a flag of its own)."""

    preset: Suppress[str] = "digits"
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            if f.name == "preset":
                kwargs[f.name] = d[f.name]
            else:
                section_cls = section_types()[f.name]
                names = {sf.name for sf in dataclasses.fields(section_cls)}
                unknown = sorted(set(d[f.name]) - names)
                if unknown:
                    raise ConfigError(f"unknown field(s) in section '{f.name}': {unknown}")
                values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d[f.name].items()}
                kwargs[f.name] = section_cls(**values)
        return cls(**kwargs)


def section_types() -> dict[str, type]:
    """'run' -> RunConfig, ...: the sections of `TrainConfig` (the `preset` name is not a section)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "preset"}


def config_fields() -> dict[str, tuple[str, str, typing.Any]]:
    """'section.field' -> (section, field, type hint with Annotated stripped) for every configurable field."""
    out = {}
    for section, section_cls in section_types().items():
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            out[f"{section}.{f.name}"] = (section, f.name, hints[f.name])
    return out


def type_name(hint) -> str:
    """A type hint as the messages name it: int, float,..., pairs|eulerian."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"{type_name(typing.get_args(hint)[0])},..."
    if origin is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def load_config_file(path: str) -> TrainConfig:
    """A run's `config.json` (as `python -m flowmap_jax.train` writes it) back as a `TrainConfig`.
    Raises `ConfigError` naming the file for a missing file, bad JSON, an unknown field, a value of the
    wrong type or outside a field's choices."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--config {path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of sections, got {type(data).__name__}")
    try:
        config = TrainConfig.from_dict(data)
        check_types(config)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"--config {path}: {error}") from None
    return config



def _check_value(flag: str, value, hint) -> None:
    """`value` has the type `hint` says (int for float allowed) and lies among a Literal's choices."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{flag} must be a list, got {value!r}")
        for item in value:
            _check_value(flag, item, typing.get_args(hint)[0])
    elif origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(map(str, typing.get_args(hint)))}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag} must be a number, got {value!r}")
    elif hint in (int, bool, str) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{flag} must be {type_name(hint)}, got {value!r}")


def check_types(config: TrainConfig) -> None:
    """Every field has its declared type and lies among its choices; raises `ConfigError` naming the flag."""
    for dotted, (section, name, hint) in config_fields().items():
        _check_value(f"--{dotted}", getattr(getattr(config, section), name), hint)


def validate(config: TrainConfig) -> None:
    """Types and choices of every field (a config built in code or read from a file gets the same checks
    as the command line), then cross-field checks that need no jax; raises `ConfigError` naming the flag."""
    c = config
    check_types(c)
    if c.run.steps < 0:
        raise ConfigError(f"--run.steps must be >= 0, got {c.run.steps}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(c.run, name) < 1:
            raise ConfigError(f"--run.{name} must be >= 1, got {getattr(c.run, name)}")
    if c.run.sample_every < 0:
        raise ConfigError(f"--run.sample_every must be >= 0, got {c.run.sample_every}")
    if c.data.source in ("folder", "shards") and not c.data.path:
        raise ConfigError(f"--data.source {c.data.source} needs --data.path")
    if c.data.batch_size < 1:
        raise ConfigError(f"--data.batch_size must be >= 1, got {c.data.batch_size}")
    if c.optim.microbatch_size < 0:
        raise ConfigError(f"--optim.microbatch_size must be >= 0 (0: the whole per-device batch), got "
                          f"{c.optim.microbatch_size}")
    if len(c.data.sample_shape) != 3:
        raise ConfigError(f"--data.sample_shape must be H,W,C, got {c.data.sample_shape}")
    if not c.objective.names:
        raise ConfigError("--objective.names is empty")
    if len(c.objective.weights) != len(c.objective.names):
        raise ConfigError(f"--objective.weights has {len(c.objective.weights)} values for "
                          f"{len(c.objective.names)} objective names {c.objective.names}")
    if not isinstance(c.objective.options, ObjectiveOptions):
        raise ConfigError(f"--objective.options must be ObjectiveOptions, got {type(c.objective.options).__name__}")
    _check_guidance_input(c)
    if c.model.lora_rank < 0:
        raise ConfigError(f"--model.lora_rank must be >= 0 (0: no LoRA), got {c.model.lora_rank}")
    if c.model.lora_rank == 0 and c.model.lora_alpha is not None:
        raise ConfigError(f"--model.lora_alpha {c.model.lora_alpha} needs --model.lora_rank > 0 (LoRA is off at rank 0)")
    if c.model.lora_rank > 0:
        try:
            check_lora_settings(c.model.lora_rank, c.model.lora_alpha, c.model.lora_targets)
        except ValueError as error:
            raise ConfigError(f"--model.{error}") from None
    if not 0.0 <= c.optim.ema_decay < 1.0:
        raise ConfigError(f"--optim.ema_decay must be in [0, 1), got {c.optim.ema_decay}")
    if (c.mesh.fsdp < 1 and c.mesh.fsdp != -1) or (c.mesh.data < 1 and c.mesh.data != -1):
        raise ConfigError(f"--mesh.data and --mesh.fsdp must be -1 or >= 1, got {c.mesh.data}, {c.mesh.fsdp}")
    if any(j < 1 for j in c.sample.jumps):
        raise ConfigError(f"--sample.jumps must be positive, got {c.sample.jumps}")
    from flowmap_jax.spec.time_grid import GRID_SPACINGS

    if c.sample.spacing not in GRID_SPACINGS:
        raise ConfigError(f"--sample.spacing must be one of {', '.join(GRID_SPACINGS)}, got {c.sample.spacing!r}")


def _check_guidance_input(c: TrainConfig) -> None:
    """Guidance as an input: `guidance_scale_range` and `guidance_embedding_dim` of --objective.options come
    together (the student must be told the w its teacher was guided with), and --teacher.guidance_scale (the
    exported map's default w) lies in the range."""
    options = c.objective.options
    w_range, dim = options.guidance_scale_range, options.guidance_embedding_dim
    if dim is not None and w_range is None:
        raise ConfigError(f"--objective.options: guidance_embedding_dim {dim} needs guidance_scale_range [lo, hi] "
                          "(the range of w drawn per example in training)")
    if w_range is not None and dim is None:
        raise ConfigError(f"--objective.options: guidance_scale_range {list(w_range)} needs guidance_embedding_dim "
                          "(without the w input the student cannot tell the teacher's scales apart)")
    if w_range is not None and not w_range[0] <= c.teacher.guidance_scale <= w_range[1]:
        raise ConfigError(f"--teacher.guidance_scale {c.teacher.guidance_scale} (the exported map's default w) lies "
                          f"outside --objective.options guidance_scale_range {list(w_range)}")
