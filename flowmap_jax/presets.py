"""Training configuration: typed dataclasses, the presets as data, and the command line (on `tyro`).

    python -m flowmap_jax.train                                 # the `digits` preset (default)
    python -m flowmap_jax.train --preset sd15 --teacher.path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data.source shards --data.path /data/laion_shards --mesh.fsdp 8
    python -m flowmap_jax.train --optim.lr 3e-4 --run.steps 2000   # any field, `--section.field value`
    python -m flowmap_jax.train --lr 3e-4 --steps 2000             # short form where the name is unique
    python -m flowmap_jax.train -n 2000 -b 64 -t /my/teacher       # short aliases of the common flags
    python -m flowmap_jax.train --config runs/digits/config.json   # rerun a run as it was (flags still override)
    python -m flowmap_jax.train --preset sd15 --help               # every field, its choices and sd15's values
    python -m flowmap_jax.train --preset sdxl --teacher.path SDXL_FOLDER --data.path /data/sdxl_shards

Pure Python (no jax, no torch): the PyTorch reference may share it. A preset is a complete
`TrainConfig` value; nothing elsewhere branches on a preset's name (the trainer reads fields only).
Choice fields are `Literal` types: `--help` lists their choices and a bad value fails at parse time.

Command-line rules (`parse_args`): `--section.field value` or `--section.field=value` (`-` and `_` alike);
a field name that occurs in only one section may be given alone (`--lr`); the aliases in the field
annotations (`-n`, `-b`, `-t`, `-o`, `-r`, `--lr`, ...). Booleans: `--run.export` / `--run.no_export`, or
a value true/false/1/0/yes/no/on/off. Tuples: space- or comma-separated (`--objective.names eulerian,pairs`).
`--preset NAME` or `--config FILE` picks the base values, whatever its position. An unknown flag, a
missing value, a value of the wrong type or outside a field's choices is a `ConfigError` naming the flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro
from tyro.conf import Suppress, arg
from tyro.constructors import PrimitiveConstructorSpec

from flowmap_jax.spec.cli_exit import BadInput
from flowmap_jax.spec.objective_options import ObjectiveOptions, objective_names
from flowmap_jax.teacher_folder import EMBEDDED_DIGITS_TEACHER

_JSON_OPTIONS = PrimitiveConstructorSpec(
    nargs=1, metavar="JSON", instance_from_str=lambda args: ObjectiveOptions.from_json(args[0]),
    is_instance=lambda value: isinstance(value, ObjectiveOptions), str_from_instance=lambda value: [value.to_json()])
"""`--objective.options '{...}'`: one JSON flag for the typed options (tyro would otherwise expand the dataclass)."""


class ConfigError(BadInput, ValueError):
    """A bad command-line flag or configuration value; the message names the flag."""


ObjectiveName = Literal[objective_names()]
"""The objectives of `spec.objective_options.OBJECTIVE_OPTIONS` (each backend's OBJECTIVES checks it holds the same)."""


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
    remat: bool = False  # rematerialise each UNet block (saves memory, costs compute)
    parameterization: Literal["auto", "angle", "linear", "teacher_step"] = "auto"  # the flow map's output form: auto (angle for VP, linear for rectified flow), angle, linear, teacher_step


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
    """What is minimised: a weighted sum of flow-map objectives from `flowmap_jax.objectives`."""

    names: tuple[ObjectiveName, ...] = ("pairs",)  # objectives by name (spec.objective_options.OBJECTIVE_OPTIONS)
    weights: tuple[float, ...] = (1.0,)  # one weight per name
    options: Annotated[ObjectiveOptions, _JSON_OPTIONS] = ObjectiveOptions(teacher_steps=4)  # the objectives' options (spec.objective_options: each objective's class and defaults); on the command line a JSON object of the options to change (the rest keep the preset's values), each set on every named objective that has it

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

    lr: Annotated[float, arg(aliases=("--lr",))] = 1e-4
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant or cosine (to 0 at run.steps)
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

    Sized for a 2-core CPU (300 steps of 32 examples). Objective `pairs`: the regression target is the
    teacher's PF-ODE from s to t in 4 DPM-Solver++(2M) log-SNR steps. On the job's own training pairs that
    target is 5.4% off a converged 64-step solution, against 13.5% for the trained map itself
    (`python benchmarks/pairs_target_error.py --run runs/digits`); 8 steps (1.7%) cost ~1.8x the teacher
    passes per step and did not change the quality table at this budget (2 / 4 jumps MSE 0.0167 / 0.0204
    with 8 steps against 0.0164 / 0.0180 with 4, seed 0), so the longer runs are where 8 pays.
    The other objectives at this budget (300 steps, their default options; numbers in the sd15 docstring)
    improved every row too, but less (1-jump FD: eulerian 160, progressive 236, lagrangian 354, against 71).
    """
    return TrainConfig(preset="digits")


def sd15() -> TrainConfig:
    """Stable Diffusion 1.5: 64x64x4 latents (512px images), 768-d CLIP text embeddings from
    precomputed shards (`python -m flowmap_jax.write_shards`), bf16 compute, remat, 8-way data parallel.

    Guidance: baked in at --teacher.guidance_scale 7.5. To distil it as an input instead (w drawn per example,
    the student's UNet gains time_cond_proj_dim; sample later at any w in the range, 7.5 the default):
    `--objective.options '{"guidance_scale_range": [2, 12], "guidance_embedding_dim": 256}'` (256 as the
    LCM SD 1.5 UNets; the JSON updates the preset's options).

    Objective: `pairs` with 8-step targets (DPM-Solver++(2M), log-SNR grid; 2.9% relative error on SD's
    schedule against the exact ODE of a narrow-mode mixture, `benchmarks/results/teacher_target_error.md`),
    chosen from what trained in the bounded parameterisation on the digits teacher at the default budget
    (300 steps, each objective with its default options, seed 0; docs/DESIGN.md has seed 1): every objective
    improved every row of the quality table, `pairs` the most. MSE to the teacher at 1 / 2 / 4 jumps:
    pairs 0.024 / 0.016 / 0.018, eulerian 0.074 / 0.046 / 0.032, progressive 0.085 / 0.040 / 0.024,
    lagrangian 0.19 / 0.099 / 0.040, untrained 1.65 / 0.63 / 0.16; FD against the teacher's 68.9: pairs 71 /
    60 / 61, eulerian 160 / 121 / 87, progressive 236 / 109 / 83, lagrangian 354 / 228 / 103, untrained
    1439 / 1354 / 392. Not yet measured on SD itself. Cost: 9 guided teacher evaluations (18 UNet passes,
    forward only) per example against the student's ~3, about 3x an eulerian step's compute and less memory
    (no tangent). The cheaper alternatives: `--objective.names eulerian` (Align Your Flow's JVP objective; one
    guided teacher evaluation and one JVP per example) and `progressive` (one guided teacher evaluation)."""
    return TrainConfig(
        preset="sd15",
        run=RunConfig(dir="runs/sd15", steps=20_000, log_every=50, sample_every=1000, checkpoint_every=1000,
                      keep_checkpoints=3, quality_samples=0),
        teacher=TeacherConfig(path="stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="unet",
                              scheduler_subfolder="scheduler", guidance_scale=7.5),
        model=ModelConfig(dtype="bfloat16", remat=True),
        data=DataConfig(source="shards", path="", batch_size=256, image_size=512,
                        sample_shape=(64, 64, 4)),
        objective=ObjectiveConfig(names=("pairs",), weights=(1.0,), options=ObjectiveOptions(teacher_steps=8)),
        optim=OptimConfig(lr=1e-5, warmup_steps=500, schedule="cosine", weight_decay=0.01, grad_clip=1.0,
                          ema_decay=0.9999),
        mesh=MeshConfig(data=-1, fsdp=1),
        sample=SampleConfig(jumps=(1, 2, 4), teacher_steps=50, grid_columns=4),
    )


def sdxl() -> TrainConfig:
    """Stable Diffusion XL base: 128x128x4 latents (1024px images), two text encoders' 2048-d hidden states
    plus the pooled text embedding and the six size/crop time ids (`added_cond_kwargs`), all from precomputed
    shards (`python -m flowmap_jax.write_shards --pipeline SDXL_FOLDER`), bf16 compute, remat, FSDP over 8
    devices (the 2.6 B-parameter UNet's AdamW state does not fit one device replicated). Guidance as an input
    instead of baked in at 5.0: as for sd15, e.g. `--objective.options '{"guidance_scale_range": [2, 8],
    "guidance_embedding_dim": 256}'`. Objective: `pairs` with 8-step targets, as sd15 (why there)."""
    return TrainConfig(
        preset="sdxl",
        run=RunConfig(dir="runs/sdxl", steps=20_000, log_every=50, sample_every=1000, checkpoint_every=1000,
                      keep_checkpoints=3, quality_samples=0),
        teacher=TeacherConfig(path="stabilityai/stable-diffusion-xl-base-1.0", subfolder="unet",
                              scheduler_subfolder="scheduler", guidance_scale=5.0),
        model=ModelConfig(dtype="bfloat16", remat=True),
        data=DataConfig(source="shards", path="", batch_size=128, image_size=1024,
                        sample_shape=(128, 128, 4)),
        objective=ObjectiveConfig(names=("pairs",), weights=(1.0,), options=ObjectiveOptions(teacher_steps=8)),
        optim=OptimConfig(lr=1e-5, warmup_steps=500, schedule="cosine", weight_decay=0.01, grad_clip=1.0,
                          ema_decay=0.9999),
        mesh=MeshConfig(data=-1, fsdp=8),
        sample=SampleConfig(jumps=(1, 2, 4), teacher_steps=50, grid_columns=4),
    )


PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {"digits": digits, "sd15": sd15, "sdxl": sdxl}
DEFAULT_PRESET = "digits"


# --------------------------------------------------------------------------------------------------
# Command line: a thin pass that keeps every flag spelling of the README working (short names, bool
# values, comma lists) and rewrites the flags to tyro's `--section.field` form; tyro parses the values,
# checks the choices and writes `--help` from these dataclasses, with the chosen preset's values.

PROG = "python -m flowmap_jax.train"
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}


@dataclass(frozen=True)
class _Flag:
    """One configurable field: its `section.field` name, its type hint (Annotated stripped) and the kind
    of value it takes: "bool" (none, or a bool word), "tuple" (one or more), "value" (exactly one)."""

    dotted: str
    hint: typing.Any

    @property
    def kind(self) -> str:
        if self.hint is bool:
            return "bool"
        return "tuple" if typing.get_origin(self.hint) is tuple else "value"

    @property
    def scalar(self) -> typing.Any:
        return typing.get_args(self.hint)[0] if self.kind == "tuple" else self.hint


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "preset"}


def _fields() -> dict[str, tuple[str, str, typing.Any, typing.Any]]:
    """'section.field' -> (section, field, type hint, digits default) for every configurable field."""
    out = {}
    base = digits()
    for section, section_cls in _section_types().items():
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            out[f"{section}.{f.name}"] = (section, f.name, hints[f.name], getattr(getattr(base, section), f.name))
    return out


def _aliases() -> dict[str, str]:
    """'-n' -> 'run.steps', ...: the aliases declared with `tyro.conf.arg(aliases=...)` on the fields."""
    out = {}
    for section, section_cls in _section_types().items():
        for name, hint in typing.get_type_hints(section_cls, include_extras=True).items():
            for meta in getattr(hint, "__metadata__", ()):
                for alias in getattr(meta, "aliases", None) or ():
                    out[alias] = f"{section}.{name}"
    return out


def _flag_table() -> dict[str, _Flag]:
    """Every accepted spelling (without leading dashes for long flags, '-n' for short aliases; `_` for
    `-`) -> its field: 'section.field', the field name where it occurs in one section only, the aliases,
    and 'no_'-prefixed forms of the booleans."""
    fields = _fields()
    table = {dotted: _Flag(dotted, hint) for dotted, (_, _, hint, _) in fields.items()}
    counts: dict[str, list[str]] = {}
    for dotted, (_, name, _, _) in fields.items():
        counts.setdefault(name, []).append(dotted)
    table.update({name: table[dotted[0]] for name, dotted in counts.items() if len(dotted) == 1})
    for alias, dotted in _aliases().items():
        table[alias.lstrip("-") if alias.startswith("--") else alias] = table[dotted]
    return table


def _is_flag(token: str) -> bool:
    """`--anything` or a short flag `-x`; `-1`, `-0.5` are values."""
    return token.startswith("--") or (len(token) >= 2 and token[0] == "-" and token[1].isalpha())


def _normalise(flag: _Flag, text: str) -> str:
    """A value as tyro takes it: integers written as floats ('1e3') become '1000'."""
    if flag.scalar is int:
        try:
            as_float = float(text)
        except ValueError:
            return text
        if as_float.is_integer() and not text.lstrip("+-").isdigit():
            return str(int(as_float))
    return text


def _split_argv(argv: typing.Sequence[str]):
    """(preset name or None, config file or None, wants help, tyro's argv,
    {'section.field': (the flag as typed, its value as typed)}).
    Raises `ConfigError` for a positional argument, an unknown flag or a missing value."""
    table = _flag_table()
    preset = config_file = None
    wants_help = False
    out: list[str] = []
    typed: dict[str, tuple[str, str]] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-h", "--help"):
            wants_help = True
            continue
        if not _is_flag(token):
            raise ConfigError(f"unexpected argument {token!r}: flags look like --section.field VALUE (see --help)")
        name, inline = (token.split("=", 1) + [None])[:2] if token.startswith("--") else (token, None)
        values = [] if inline is None else [inline]
        while inline is None and i < len(argv) and not _is_flag(argv[i]):
            values.append(argv[i])
            i += 1
        key = name[2:].replace("-", "_") if name.startswith("--") else name
        if key in ("preset", "-p", "config", "-c"):
            if len(values) != 1:
                what = "one of " + ", ".join(PRESETS) if key in ("preset", "-p") else "a config.json file"
                raise ConfigError(f"flag {name} needs one value: {what}")
            if key in ("preset", "-p"):
                if values[0] not in PRESETS:
                    raise ConfigError(f"flag {name}: unknown preset {values[0]!r}; known: {', '.join(PRESETS)}")
                preset = values[0]
            else:
                config_file = values[0]
            continue
        negated = False
        flag = table.get(key)
        if flag is None and "no_" in key:  # --run.no_export, --no_export
            head, _, tail = key.rpartition("no_")
            candidate = table.get(head + tail)
            if candidate is not None and candidate.kind == "bool" and head in ("", head.rstrip(".") + "."):
                flag, negated = candidate, True
        if flag is None:
            known = [k for k in table if not k.startswith("-")] + ["preset", "config"]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise ConfigError(f"unknown flag {name}{hint}")
        typed[flag.dotted] = (name, " ".join(values))
        section, field_name = flag.dotted.split(".")
        if flag.kind == "bool":
            if len(values) > 1 or (values and values[0].lower() not in _BOOL_WORDS):
                raise ConfigError(f"flag {name} expects a boolean (true/false), got {' '.join(values)!r}")
            on = _BOOL_WORDS[values[0].lower()] if values else True
            out.append(f"--{section}.{'' if on != negated else 'no_'}{field_name}")
            continue
        if flag.kind == "tuple":
            values = [part for v in values for part in v.replace(" ", "").split(",") if part != ""]
            if not values:
                raise ConfigError(f"flag {name} needs one or more values (comma- or space-separated)")
        elif len(values) != 1:
            if not values:
                raise ConfigError(f"flag {name} needs a value ({_type_name(flag.hint)})")
            raise ConfigError(f"flag {name} takes one value, got {len(values)}: {' '.join(values)}")
        if flag.kind == "tuple":
            out.append(f"--{flag.dotted}")
            out.extend(_normalise(flag, v) for v in values)
        else:  # the = form, so a value such as -x is not read as a flag
            out.append(f"--{flag.dotted}={_normalise(flag, values[0])}")
    return preset, config_file, wants_help, out, typed


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"{_type_name(typing.get_args(hint)[0])},..."
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


def _description(source: str) -> str:
    paragraphs = [
        ("Distil a diffusion teacher into a few-step flow map. With no arguments: the embedded digits teacher, "
         "on whatever devices JAX sees (a CPU is enough, a few minutes)."),
        f"The defaults shown below are {source}.",
        (f"-p, --preset {{{','.join(PRESETS)}}}: start from this preset (default {DEFAULT_PRESET}). "
         "-c, --config FILE: start from a run's config.json instead, to rerun that run as it was. "
         "Either may stand anywhere; the other flags override it."),
        ("Every field is a flag: --section.field VALUE (or =VALUE; - and _ alike). A field name found in one "
         "section only may be given alone: --lr, --steps, --resume. Lists: --objective.names pairs eulerian "
         "(or pairs,eulerian). Booleans: --run.export / --run.no_export (or --run.export false)."),
        "Exit codes: 0 done, 1 the run failed, 2 bad flags or bad input.",
    ]
    return "\n\n".join(paragraphs)


def _as_config_error(typed: dict[str, tuple[str, str]]):
    """A tyro parse-error hook that raises `ConfigError` (one line, naming the flag as the user typed it)
    instead of tyro's boxed message. The hook API (`tyro._errors`) is tyro's private one: if it changes,
    the hook is not installed or returns None, and tyro prints its own message (still exit 2)."""
    errors = getattr(tyro, "_errors", None)
    if errors is None or not hasattr(errors, "on_parse_error"):
        return contextlib.nullcontext()

    def flag_of(event) -> tuple[str, str, typing.Any]:
        """(the flag as typed, its value as typed, the field's type hint)."""
        names = [n for n in event.argument.lowered.name_or_flags if n.startswith("--") and "." in n]
        dotted = names[0][2:].replace("-", "_")
        flag, text = typed.get(dotted, (names[0], ""))
        return flag, text, _fields()[dotted][2]

    def hook(event) -> None:
        try:
            if isinstance(event, errors.InvalidChoice):
                flag, _, _ = flag_of(event)
                message = f"flag {flag}: {event.value!r} is not one of {', '.join(map(str, event.choices))}"
            elif isinstance(event, errors.InstantiationFailure) and event.argument is not None:
                flag, text, hint = flag_of(event)
                many = typing.get_origin(hint) is tuple
                scalar = typing.get_args(hint)[0] if many else hint
                kind = {int: "integer", float: "number"}.get(scalar)
                if kind is None:
                    message = f"flag {flag}: {event.message}"
                else:
                    kind = f"{kind}s" if many else ("an " if kind == "integer" else "a ") + kind
                    message = f"flag {flag} expects {kind}, got {text!r}"
            elif isinstance(event, errors.BadValue):
                flag, text, _ = flag_of(event)
                message = f"flag {flag}: bad or missing value {text!r}"
            elif isinstance(event, errors.UnrecognizedArgs):
                message = f"unexpected argument(s) {' '.join(event.tokens)} (see --help)"
            else:
                return
        except (AttributeError, IndexError, KeyError, TypeError):  # an event this code does not know
            return
        raise ConfigError(message)

    return errors.on_parse_error(hook)


def _tyro_cli(base: TrainConfig, args: list[str], source: str, typed: dict[str, tuple[str, str]]) -> TrainConfig:
    with _as_config_error(typed):
        return tyro.cli(TrainConfig, default=base, args=args, prog=PROG, description=_description(source),
                        use_underscores=True)


def help_text(preset: str = DEFAULT_PRESET) -> str:
    """The `--help` text of `--preset preset` (every field with its type or choices and that preset's value)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        _tyro_cli(PRESETS[preset](), ["--help"], f"the {preset} preset's", {})
    return out.getvalue()


def parse_args(argv: typing.Sequence[str] | None = None) -> TrainConfig:
    """Build a `TrainConfig` from command-line arguments (see the module docstring): the base values of
    `--preset` (default digits) or `--config FILE`, then the other flags, then `validate`.

    Raises `ConfigError` for an unknown flag, a missing value, a value of the wrong type or outside a
    field's choices, and a failed `validate`; `--help` prints the help of the chosen preset or config
    and raises `SystemExit(0)`.
    """
    import sys

    preset, config_file, wants_help, args, typed = _split_argv(sys.argv[1:] if argv is None else argv)
    if preset is not None and config_file is not None:
        raise ConfigError("give --preset or --config, not both (a run's config.json names its preset)")
    if config_file is not None:
        base = load_config_file(config_file)
        source = f"those of {config_file} (preset {base.preset})"
    else:
        preset = preset or DEFAULT_PRESET
        base, source = PRESETS[preset](), f"the {preset} preset's"
    config = _tyro_cli(base, ["--help"] if wants_help else args, source, typed)
    if "objective.options" in typed and not wants_help:  # the JSON updates the base's options, not the defaults
        flag, text = typed["objective.options"]
        try:
            config.objective.options = ObjectiveOptions.from_json(text, base=base.objective.options,
                                                                  objectives=config.objective.names)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{flag}: {error}") from None
    validate(config)
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
        raise ConfigError(f"{flag} must be {_type_name(hint)}, got {value!r}")


def check_types(config: TrainConfig) -> None:
    """Every field has its declared type and lies among its choices; raises `ConfigError` naming the flag."""
    for dotted, (section, name, hint, _) in _fields().items():
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
    if not 0.0 <= c.optim.ema_decay < 1.0:
        raise ConfigError(f"--optim.ema_decay must be in [0, 1), got {c.optim.ema_decay}")
    if c.mesh.fsdp < 1 or (c.mesh.data < 1 and c.mesh.data != -1):
        raise ConfigError(f"--mesh.data must be -1 or >= 1 and --mesh.fsdp >= 1, got {c.mesh.data}, {c.mesh.fsdp}")
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
