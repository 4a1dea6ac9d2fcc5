"""Training configuration: typed dataclasses, the presets as data, and the command-line overrides.

    python -m flowmap_jax.train                                 # the `digits` preset (default)
    python -m flowmap_jax.train --preset sd15 --teacher.path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data.source shards --data.path /data/laion_shards --mesh.fsdp 8
    python -m flowmap_jax.train --optim.lr 3e-4 --run.steps 2000   # any field, `--section.field value`
    python -m flowmap_jax.train --lr 3e-4 --steps 2000             # short form where the name is unique
    python -m flowmap_jax.train --help                              # every field, its type and default

Pure Python (no jax, no torch): the PyTorch reference may share it. A preset is a complete
`TrainConfig` value; nothing elsewhere branches on a preset's name (the trainer reads fields only).

Command-line rules: `--section.field value` or `--section.field=value`; a field name that occurs in
only one section may be given alone (`--lr`). Booleans take true/false/1/0/yes/no (a bare `--run.fsdp`
style flag with no value means true). Tuples are comma-separated (`--objective.names eulerian,pairs`).
`None`-able fields take `none`. An unknown flag, a missing value or a value of the wrong type is a
`ConfigError` naming the flag (and the closest known flag).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field

EMBEDDED_DIGITS_TEACHER = "embedded:digits_teacher"
"""Marker for the digits teacher that ships in `flowmap_jax/assets/digits_teacher/` (a diffusers
folder); the trainer resolves it to that folder and then loads it exactly like a user's folder."""


class ConfigError(ValueError):
    """A bad command-line flag or configuration value; the message names the flag."""


@dataclass
class RunConfig:
    """Where the run lives and how long it lasts."""

    dir: str = "runs/digits"  # run folder: checkpoints/, samples/, tensorboard/, export/, quality.md
    steps: int = 300  # total optimiser steps
    seed: int = 0  # seeds the initialisation, the per-step rng and the data order
    resume: str = "auto"  # auto: continue from <dir>/checkpoints if any; never: refuse a non-empty one; or a checkpoint path
    log_every: int = 10  # steps between scalar logs (TensorBoard, metrics.jsonl); NaN is checked every step
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    checkpoint_every: int = 100  # steps between checkpoints (also saved at the end and on SIGTERM)
    keep_checkpoints: int = 3  # keep the last N checkpoints
    async_checkpoints: bool = True  # write checkpoints in the background
    progress_bar: bool = True  # tqdm bar with loss, steps/s and ETA (process 0 only)
    export: bool = True  # write the trained flow map (EMA weights) as a diffusers folder at the end
    quality_samples: int = 100  # samples per row of the final quality table (0: skip the table)
    compilation_cache: str = "auto"  # persistent XLA cache folder; auto: $JAX_COMPILATION_CACHE_DIR or ~/.cache/flowmap_jax/xla; "": off


@dataclass
class TeacherConfig:
    """The pretrained diffusion model that is distilled."""

    path: str = EMBEDDED_DIGITS_TEACHER  # diffusers folder (or hub id) holding the UNet and its scheduler
    subfolder: str = "unet"  # the UNet's subfolder ("" if `path` is the UNet folder itself)
    scheduler_subfolder: str = "scheduler"  # scheduler_config.json's subfolder ("" for none: use defaults)
    guidance_scale: float = 1.5  # classifier-free guidance of the teacher (1.0: none); 1.5: the digits teacher's recommendation
    weak_path: str = ""  # autoguidance: a weaker teacher folder (empty: use classifier-free guidance)


@dataclass
class ModelConfig:
    """How the flow-map network (initialised from the teacher) is computed."""

    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
    remat: bool = False  # rematerialise each UNet block (saves memory, costs compute)


@dataclass
class DataConfig:
    """Where training examples come from. Shapes are (B, H, W, C), channels last."""

    source: str = "digits"  # digits (built in), folder (image folder), or shards (flowmap_jax.write_shards)
    path: str = ""  # folder of images or of shards
    batch_size: int = 32  # global batch, split across processes and devices
    image_size: int = 16  # folder: images are resized to this (pixel space) before any VAE
    vae: str = ""  # folder source with a latent teacher: diffusers AutoencoderKL folder or hub id
    vae_subfolder: str = "vae"
    sample_shape: tuple[int, ...] = (16, 16, 1)  # (H, W, C) the teacher sees; checked against the data


@dataclass
class ObjectiveConfig:
    """What is minimised: a weighted sum of flow-map objectives from `flowmap_jax.objectives`."""

    names: tuple[str, ...] = ("pairs",)  # objectives by name: pairs, lagrangian, eulerian, progressive
    weights: tuple[float, ...] = (1.0,)  # one weight per name
    options: str = '{"teacher_steps": 4}'  # JSON object of options for every objective (flow_config.ObjectiveOptions)


@dataclass
class OptimConfig:
    """optax AdamW with linear warm-up, then constant or cosine; global-norm clipping; EMA."""

    lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "constant"  # after warm-up: constant or cosine (to 0 at run.steps)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    ema_decay: float = 0.999  # EMA of the parameters (used for samples and export); 0: EMA = params


@dataclass
class MeshConfig:
    """Device mesh: a data-parallel axis and an FSDP axis (parameters and optimiser state sharded)."""

    data: int = -1  # data-parallel size; -1: all devices not used by fsdp
    fsdp: int = 1  # FSDP size (1: parameters replicated)
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

    jumps: tuple[int, ...] = (1, 2, 4)  # flow-map rows of the grid (number of jumps)
    teacher_steps: int = 50  # the teacher's row: DDIM steps
    grid_columns: int = 10  # samples per row of the PNG grid
    spacing: str = "uniform"  # the flow map's time grid: uniform (in teacher time) or logsnr (flow_config.time_grid)


@dataclass
class TrainConfig:
    """Everything a run needs. `preset` names the preset this was built from (informational)."""

    preset: str = "digits"
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
                section_cls = _section_types()[f.name]
                names = {sf.name for sf in dataclasses.fields(section_cls)}
                unknown = sorted(set(d[f.name]) - names)
                if unknown:
                    raise ConfigError(f"unknown field(s) in section '{f.name}': {unknown}")
                values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d[f.name].items()}
                kwargs[f.name] = section_cls(**values)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Presets (data only).

def digits() -> TrainConfig:
    """The embedded default: distil the shipped digits teacher (16x16x1 pixels, class labels through
    cross-attention, classifier-free guidance) on a CPU in minutes.

    Sized for a 2-core CPU (300 steps of 32 examples). Objective `pairs` (the teacher's PF-ODE from
    s to t, 4 DPM-Solver++(2M) steps, as the regression target) rather than the image default
    `eulerian`: measured on this teacher at this budget (batch 32, 150-600 steps, lr 1e-4..2e-4),
    `eulerian` (with or without tangent normalisation and the adaptive weight) made every row of the
    quality table worse than the untrained map, while `pairs` improved all of them (2 jumps: FD 141 ->
    99 at 300 steps, -> 61 at 600; teacher 50 steps: 119; 100 samples). The sd15 preset keeps
    `eulerian`, the published default for images.
    """
    return TrainConfig(preset="digits")


def sd15() -> TrainConfig:
    """Stable Diffusion 1.5: 64x64x4 latents (512px images), 768-d CLIP text embeddings from
    precomputed shards (`python -m flowmap_jax.write_shards`), bf16 compute, remat, 8-way data parallel."""
    return TrainConfig(
        preset="sd15",
        run=RunConfig(dir="runs/sd15", steps=20_000, log_every=50, sample_every=1000, checkpoint_every=1000,
                      keep_checkpoints=3, quality_samples=0),
        teacher=TeacherConfig(path="stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet",
                              scheduler_subfolder="scheduler", guidance_scale=7.5),
        model=ModelConfig(dtype="bfloat16", remat=True),
        data=DataConfig(source="shards", path="", batch_size=256, image_size=512,
                        sample_shape=(64, 64, 4)),
        objective=ObjectiveConfig(names=("eulerian",), weights=(1.0,), options="{}"),
        optim=OptimConfig(lr=1e-5, warmup_steps=500, schedule="cosine", weight_decay=0.01, grad_clip=1.0,
                          ema_decay=0.9999),
        mesh=MeshConfig(data=-1, fsdp=1),
        sample=SampleConfig(jumps=(1, 2, 4), teacher_steps=50, grid_columns=4),
    )


def sdxl() -> TrainConfig:
    """Stable Diffusion XL base: 128x128x4 latents (1024px images), two text encoders' 2048-d hidden states
    plus the pooled text embedding and the six size/crop time ids (`added_cond_kwargs`), all from precomputed
    shards (`python -m flowmap_jax.write_shards --pipeline SDXL_FOLDER`), bf16 compute, remat, FSDP over 8
    devices (the 2.6 B-parameter UNet's AdamW state does not fit one device replicated)."""
    config = sd15()
    config.preset = "sdxl"
    config.run.dir = "runs/sdxl"
    config.teacher.path = "stabilityai/stable-diffusion-xl-base-1.0"
    config.teacher.guidance_scale = 5.0
    config.data.image_size = 1024
    config.data.sample_shape = (128, 128, 4)
    config.data.batch_size = 128
    config.mesh = MeshConfig(data=-1, fsdp=8)
    return config


PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {"digits": digits, "sd15": sd15, "sdxl": sdxl}
DEFAULT_PRESET = "digits"
ALIASES = {"teacher": "teacher.path"}
"""Extra short flags: `--teacher PATH` is `--teacher.path PATH`."""


# --------------------------------------------------------------------------------------------------
# Command line.

def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "preset"}


def _fields() -> dict[str, tuple[str, str, typing.Any, typing.Any]]:
    """'section.field' -> (section, field, type hint, default) for every configurable field."""
    out = {}
    base = digits()
    for section, section_cls in _section_types().items():
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            out[f"{section}.{f.name}"] = (section, f.name, hints[f.name], getattr(getattr(base, section), f.name))
    return out


def _short_names(fields) -> dict[str, str]:
    """Field names that occur in exactly one section -> 'section.field'."""
    counts: dict[str, list[str]] = {}
    for dotted, (_, name, _, _) in fields.items():
        counts.setdefault(name, []).append(dotted)
    return {name: dotted[0] for name, dotted in counts.items() if len(dotted) == 1}


def _parse_value(flag: str, text: str, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):  # Optional[X]
        if text.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _parse_value(flag, text, inner)
    if origin is tuple:
        elem = args[0]
        parts = [p for p in text.replace(" ", "").split(",") if p != ""]
        return tuple(_parse_value(flag, p, elem) for p in parts)
    if hint is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"flag --{flag} expects a boolean (true/false), got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise ConfigError(f"flag --{flag} expects an integer, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"flag --{flag} expects a number, got {text!r}") from None
    return text


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"{_type_name(typing.get_args(hint)[0])},..."
    return getattr(hint, "__name__", str(hint))


def help_text() -> str:
    """The `--help` text: usage, presets, then every field with its type, default and comment."""
    comments = _field_comments()
    lines = [
        "usage: python -m flowmap_jax.train [--preset NAME] [--section.field VALUE ...]",
        "",
        "Distil a diffusion teacher into a few-step flow map. With no arguments: the embedded digits",
        "teacher, on whatever devices JAX sees (a CPU is enough, a few minutes).",
        "",
        f"presets: {', '.join(PRESETS)} (default {DEFAULT_PRESET}); values below are the digits preset's.",
        "A field whose name is unique may be given without its section (e.g. --lr, --steps, --resume);",
        "--teacher PATH is --teacher.path PATH.",
        "",
    ]
    section = None
    for dotted, (sec, name, hint, default) in _fields().items():
        if sec != section:
            section = sec
            doc = (_section_types()[sec].__doc__ or "").strip().splitlines()[0]
            lines += ["", f"{sec}: {doc}"]
        default_text = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        comment = comments.get(dotted, "")
        lines.append(f"  --{dotted:<30} {_type_name(hint):<10} default {default_text!s:<24} {comment}")
    return "\n".join(lines)


def _field_comments() -> dict[str, str]:
    """The trailing `# comment` of each field in this file's dataclasses (for --help)."""
    import inspect

    out = {}
    for section, cls in _section_types().items():
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            stripped = line.strip()
            if ":" in stripped and "#" in stripped and not stripped.startswith(("#", '"')):
                name = stripped.split(":", 1)[0].strip()
                out[f"{section}.{name}"] = stripped.split("#", 1)[1].strip()
    return out


def parse_args(argv: typing.Sequence[str] | None = None) -> TrainConfig:
    """Build a `TrainConfig` from command-line arguments (see the module docstring).

    Raises `ConfigError` for an unknown flag, a missing value or a value of the wrong type; `--help`
    raises `SystemExit(0)` after printing `help_text()`.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    fields = _fields()
    short = _short_names(fields)
    # Pass 1: the preset, so overrides apply on top of it whatever the order.
    preset = DEFAULT_PRESET
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: flags look like --section.field VALUE")
        name, value = (token[2:].split("=", 1) + [None])[:2]
        if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "preset":
            if value is None:
                raise ConfigError("flag --preset needs a value: one of " + ", ".join(PRESETS))
            if value not in PRESETS:
                raise ConfigError(f"flag --preset: unknown preset {value!r}; known: {', '.join(PRESETS)}")
            preset = value
            continue
        pairs.append((name, value))
    config = PRESETS[preset]()
    for name, value in pairs:
        dotted = name if name in fields else short.get(name, ALIASES.get(name))
        if dotted is None:
            known = list(fields) + list(short) + list(ALIASES) + ["preset"]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise ConfigError(f"unknown flag --{name}{hint}")
        section, field_name, hint, _ = fields[dotted]
        if value is None:
            if hint is bool:
                value = "true"
            else:
                raise ConfigError(f"flag --{name} needs a value ({_type_name(hint)})")
        setattr(getattr(config, section), field_name, _parse_value(name, value, hint))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Cross-field checks that need no jax; raises `ConfigError` naming the flag."""
    c = config
    if c.run.steps < 0:
        raise ConfigError(f"--run.steps must be >= 0, got {c.run.steps}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(c.run, name) < 1:
            raise ConfigError(f"--run.{name} must be >= 1, got {getattr(c.run, name)}")
    if c.run.sample_every < 0:
        raise ConfigError(f"--run.sample_every must be >= 0, got {c.run.sample_every}")
    if c.data.source not in ("digits", "folder", "shards"):
        raise ConfigError(f"--data.source must be digits, folder or shards, got {c.data.source!r}")
    if c.data.source in ("folder", "shards") and not c.data.path:
        raise ConfigError(f"--data.source {c.data.source} needs --data.path")
    if c.data.batch_size < 1:
        raise ConfigError(f"--data.batch_size must be >= 1, got {c.data.batch_size}")
    if len(c.data.sample_shape) != 3:
        raise ConfigError(f"--data.sample_shape must be H,W,C, got {c.data.sample_shape}")
    if not c.objective.names:
        raise ConfigError("--objective.names is empty")
    if len(c.objective.weights) != len(c.objective.names):
        raise ConfigError(f"--objective.weights has {len(c.objective.weights)} values for "
                          f"{len(c.objective.names)} objective names {c.objective.names}")
    try:
        options = json.loads(c.objective.options)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--objective.options is not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise ConfigError("--objective.options must be a JSON object")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--model.dtype must be float32 or bfloat16, got {c.model.dtype!r}")
    if c.optim.schedule not in ("constant", "cosine"):
        raise ConfigError(f"--optim.schedule must be constant or cosine, got {c.optim.schedule!r}")
    if not 0.0 <= c.optim.ema_decay < 1.0:
        raise ConfigError(f"--optim.ema_decay must be in [0, 1), got {c.optim.ema_decay}")
    if c.mesh.fsdp < 1 or (c.mesh.data < 1 and c.mesh.data != -1):
        raise ConfigError(f"--mesh.data must be -1 or >= 1 and --mesh.fsdp >= 1, got {c.mesh.data}, {c.mesh.fsdp}")
    if any(j < 1 for j in c.sample.jumps):
        raise ConfigError(f"--sample.jumps must be positive, got {c.sample.jumps}")
    from flowmap_jax.flow_config import GRID_SPACINGS

    if c.sample.spacing not in GRID_SPACINGS:
        raise ConfigError(f"--sample.spacing must be one of {', '.join(GRID_SPACINGS)}, got {c.sample.spacing!r}")
