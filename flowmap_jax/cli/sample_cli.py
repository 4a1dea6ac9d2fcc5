"""The few-step sampling command line, shared by `python -m flowmap_jax.sample` and
`python -m torch_ref.sample` (the same flags, the same inputs, the same output files). Pure Python (numpy,
pillow; no jax, no torch): each backend passes its own `run(request) -> samples` to `main`.

    python -m flowmap_jax.sample --model runs/digits/export --steps 4 --batch 16 --seed 0 --out samples_jax
    python -m torch_ref.sample   --model runs/digits/export --steps 4 --batch 16 --seed 0 --out samples_torch
    python -m torch_ref.sample   --model EXPORT --timesteps 999,600,300,-1 --gamma 0.3 --dtype fp16 --device cuda
    python -m flowmap_jax.sample --model EXPORT --direction invert --timesteps=-1,499,999 --init samples/samples.npy
    python -m torch_ref.sample   --model PIPELINE --prompt "a watercolour" --init-image photo.png --strength 0.6

The grid goes from noise to data (strictly decreasing times); an increasing grid is an error unless
`--direction invert` asks for inversion (from `--init` data to noise).

Everything random is drawn here with numpy (`spec.sampling_inputs.initial_noise`: PCG64 from --seed), so the two
backends sample from the same noise and, in fp32, agree to float rounding.

With --lora FOLDER (`python -m conversion export RUN OUT --lora`), --model is the base the LoRA goes on: a
diffusers pipeline folder with unet/ (then --prompt works through its text encoder(s) and VAE, as below) or a
UNet folder (give --cond); each backend loads the LoRA onto it with its own loader.

With a FlowMapPipeline folder (`python -m conversion export RUN OUT --pipeline`) and --prompt: the prompts are
encoded by its text encoder(s) and the latents decoded by its VAE, for either backend, through the
`PipelineCodecs` the backend passes (PyTorch, `flowmap_jax.data.encoders`: this module imports no torch);
images/NNNN.png and prompts.txt join the outputs. With --init-image (image-to-image, `flowmap_jax.spec.img2img`)
the image is encoded by the folder's VAE (the posterior mean: the same latents for both backends), noised with
the --seed noise to the start time --strength picks, and --steps jumps go from there to the clean end.

Outputs in --out: samples.npy (B, H, W, C) float32 and noise.npy (B, H, W, C) float32, the state at the grid's
first time (drawn noise, --init, or the noised --init-image latents) (channels last in
both backends), labels.npy (B,) int64 when labels were used, grid.png (rows of --grid-columns; 1- or
3-channel samples in [-1, 1] are shown as images, other channel counts (latents) per-channel rescaled),
and sample_info.json (the flags, the time grid, backend, device, dtype, seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flowmap_jax.cli import cli_exit
from flowmap_jax.spec import time_grid as time_grid_rules
from flowmap_jax.spec.export_format import ExportInfo, is_export, read_export
from flowmap_jax.spec.img2img import check_strength, img2img_grid, noised_start
from flowmap_jax.spec.label_table import (
    labels_to_encoder_hidden_states,
    read_label_embeddings,
)
from flowmap_jax.spec.lora_format import read_lora_export
from flowmap_jax.spec.pipeline_folder import is_pipeline_folder
from flowmap_jax.spec.sampling_inputs import (
    default_sample_shape,
    initial_noise,
    resolve_guidance,
)
from flowmap_jax.spec.schedule import check_time_values
from flowmap_jax.spec.time_grid import GRID_SPACINGS, time_grid

DTYPES = ("fp32", "fp16", "bf16")
DIRECTIONS = time_grid_rules.DIRECTIONS
DEVICES = ("auto", "cpu", "cuda", "gpu")
COND_KEYS = ("encoder_hidden_states", "text_embeds", "time_ids")


def build_parser(prog: str, backend: str) -> argparse.ArgumentParser:
    """The flags of both sampling commands (`backend` only changes the help text)."""
    p = cli_exit.ArgumentParser(prog=prog, description=f"Few-step flow-map sampling ({backend}) from an exported "
                                f"flow map (python -m conversion export).", epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported flow-map folder (config.json, safetensors, flowmap.json), "
                   "or a FlowMapPipeline folder (python -m conversion export RUN OUT --pipeline) to sample from prompts")
    p.add_argument("--lora", default=None, help="a LoRA flow map (conversion export --lora) loaded onto the base UNet "
                   "at --model (a diffusers pipeline folder with unet/, or a UNet folder)")
    p.add_argument("--prompt", action="append", default=None, help="pipeline folders: a prompt (repeatable; the "
                   "prompts are repeated to fill --batch); the images go to --out as PNGs")
    p.add_argument("--prompt-file", default=None, help="pipeline folders: a text file with one prompt per line")
    p.add_argument("--steps", type=int, default=4, help="number of jumps, on a uniform grid in teacher time from "
                   "the noise end to the clean end (default 4)")
    p.add_argument("--spacing", choices=GRID_SPACINGS, default="uniform", help="the --steps grid: uniform in "
                   "teacher time (default) or logsnr (uniform in log(sigma / alpha); DDPM 2 jumps: 999, ~302, -1)")
    p.add_argument("--timesteps", default=None, help="explicit time grid instead of --steps, comma-separated "
                   "teacher times from noise to data, e.g. 999,749,499,249,-1 (a grid that starts with a minus sign "
                   "needs the = form: --timesteps=-1,999)")
    p.add_argument("--direction", choices=DIRECTIONS, default=None, help="generate (the default): a decreasing "
                   "grid, from noise to data; invert: an increasing grid, from data (--init) to noise. A --timesteps "
                   "grid that does not go the chosen way is an error")
    p.add_argument("--init", default=None, help="the state at the grid's first time, a .npy (B, H, W, C) float "
                   "array, instead of drawn noise (with --direction invert: the samples to invert, e.g. a "
                   "samples.npy); --batch is then its length")
    p.add_argument("--init-image", default=None, help="pipeline folders: image-to-image from this image file (PNG, "
                   "JPEG; RGB, height and width multiples of the VAE's factor, which set the sample size): encoded "
                   "by the folder's VAE (posterior mean), noised with the --seed noise to the time --strength picks, "
                   "then --steps jumps from there to the clean end; the image is repeated to --batch")
    p.add_argument("--strength", type=float, default=None, help="with --init-image: in (0, 1], how far towards "
                   "the noise end the jumps start (diffusers' img2img strength; 1: pure noise, the image unused; "
                   "default 0.6)")
    p.add_argument("--batch", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial (and re-noising) noise (default 0)")
    p.add_argument("--labels", default=None, help="class labels where the export has label embeddings: 'all' "
                   "(0, 1, ..., K-1 repeated; the default), one label, a comma-separated list (repeated to the "
                   "batch), or 'null' (unconditional)")
    p.add_argument("--cond", default=None, help="conditioning file (.safetensors or .npz; .npy = "
                   "encoder_hidden_states) with encoder_hidden_states (1 or B, L, D), and text_embeds / time_ids "
                   "for SDXL-style UNets")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale where it was distilled as an input "
                   "(time_cond_proj_dim); a map with guidance baked in accepts only its own scale")
    p.add_argument("--gamma", type=float, default=0.0, help="stochastic re-noising in [0, 1] after every jump but "
                   "the last (0: deterministic)")
    p.add_argument("--height", type=int, default=None, help="sample height (default: the training shape)")
    p.add_argument("--width", type=int, default=None, help="sample width (default: the training shape)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="network compute dtype (the sampler's state "
                   "and the jump coefficients stay float32)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto, cpu, or cuda/gpu (the same)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--grid-columns", type=int, default=8, help="images per row of grid.png (default 8)")
    return p


@dataclasses.dataclass
class SampleRequest:
    """Backend-independent inputs of one sampling call (numpy, channels last).

    noise: (B, H, W, C) float32 at timesteps[0]; renoise: N - 1 arrays like noise (gamma > 0) or None;
    timesteps: (N + 1,) float64 teacher times; cond: {"encoder_hidden_states": (B, L, D),
    "added_cond_kwargs": {"text_embeds", "time_ids"}} (float32) or None; guidance_scale: the scale to embed
    as timestep_cond, or None (no guidance input); labels: (B,) int64 or None. With --lora: lora is the LoRA
    folder, info its flowmap.json (folder: the LoRA folder, unet_config: the recorded flow-map UNet config),
    the base is args["model"], and pipeline is --model when it is a diffusers pipeline folder (model_index.json).
    """

    info: ExportInfo
    noise: np.ndarray
    pipeline: Path | None = dataclasses.field(default=None, kw_only=True)
    lora: Path | None = dataclasses.field(default=None, kw_only=True)
    prompts: list | None = dataclasses.field(default=None, kw_only=True)
    renoise: list | None
    timesteps: np.ndarray
    gamma: float
    cond: dict | None
    guidance_scale: float | None
    labels: np.ndarray | None
    dtype: str
    device: str
    out: Path
    grid_columns: int
    args: dict


def parse_timesteps(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--timesteps must be comma-separated numbers, got {text!r}") from None
    if len(values) < 2:
        raise ValueError(f"--timesteps needs at least 2 times (one jump), got {text!r}")
    return np.asarray(values, np.float64)


def check_direction(grid: np.ndarray, direction: str | None) -> None:
    """`spec.time_grid.check_direction` with the CLIs' words: ValueError unless `grid` goes the way `direction`
    says (strictly decreasing for generate, the default; strictly increasing for invert)."""
    time_grid_rules.check_direction(grid, direction, "--timesteps",
                                    "; to invert samples (data to noise) pass --direction invert and --init",
                                    direction_name="--direction")


class OutputFolderError(cli_exit.BadInput, ValueError):
    """--out is a file or lies under a file (exit 2)."""


def check_out(path: str) -> None:
    """OutputFolderError naming --out unless it is a folder or can be made one (it may not exist yet)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.lexists(probe) and not os.path.isdir(probe):
        where = "is a file, not a folder" if probe == os.path.abspath(path) else f"lies under {probe}, which is a file"
        raise OutputFolderError(f"--out {path} {where}; choose a folder (the samples are written into it)")


def read_init(path: str) -> np.ndarray:
    """--init: a (B, H, W, C) float .npy (no pickle) -> float32."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init: no file {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"--init: {path} is not a plain .npy array: {err}") from None
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"--init: {path} holds {array.dtype} {array.shape}; expected float (B, H, W, C)")
    return np.ascontiguousarray(array, np.float32)


def needs_encoder_hidden_states(unet_config: dict) -> bool:
    """True if the UNet has cross-attention blocks (it then needs encoder_hidden_states)."""
    blocks = list(unet_config.get("down_block_types") or []) + list(unet_config.get("up_block_types") or [])
    blocks.append(unet_config.get("mid_block_type") or "")
    return any("CrossAttn" in b for b in blocks)


def parse_labels(text: str | None, batch: int, num_labels: int) -> np.ndarray:
    """--labels -> (B,) int64 (see build_parser); num_labels K (label K is the null label)."""
    if text is None or text == "all":
        return np.arange(batch, dtype=np.int64) % num_labels
    if text == "null":
        return np.full((batch,), num_labels, np.int64)
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--labels must be 'all', 'null' or comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError("--labels is empty")
    bad = [v for v in values if not 0 <= v < num_labels]
    if bad:
        raise ValueError(f"--labels {bad} outside 0..{num_labels - 1} (this export has {num_labels} labels)")
    return np.resize(np.asarray(values, np.int64), batch)


def _broadcast(name: str, array: np.ndarray, batch: int, ndim: int) -> np.ndarray:
    array = np.asarray(array, np.float32)
    if array.ndim != ndim or array.shape[0] not in (1, batch):
        raise ValueError(f"--cond: {name} has shape {array.shape}; expected {ndim} axes with a leading 1 or the "
                         f"batch {batch}")
    return np.ascontiguousarray(np.broadcast_to(array, (batch,) + array.shape[1:]))


def read_cond_file(path: str, batch: int) -> dict:
    """{"encoder_hidden_states": (B, L, D)[, "added_cond_kwargs": {...}]} from a conditioning file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--cond: no file {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            tensors = {k: f[k] for k in f.files}
    elif path.endswith(".npy"):
        tensors = {"encoder_hidden_states": np.load(path, allow_pickle=False)}
    else:
        raise ValueError(f"--cond: {path} must be .safetensors, .npz or .npy")
    unknown = sorted(set(tensors) - set(COND_KEYS))
    if unknown:
        raise ValueError(f"--cond: {path} has unknown tensors {unknown}; expected some of {COND_KEYS}")
    cond = {}
    if "encoder_hidden_states" in tensors:
        cond["encoder_hidden_states"] = _broadcast("encoder_hidden_states", tensors["encoder_hidden_states"], batch, 3)
    if "text_embeds" in tensors or "time_ids" in tensors:
        if not ("text_embeds" in tensors and "time_ids" in tensors):
            raise ValueError(f"--cond: {path} must hold both text_embeds and time_ids, or neither")
        cond["added_cond_kwargs"] = {"text_embeds": _broadcast("text_embeds", tensors["text_embeds"], batch, 2),
                                     "time_ids": _broadcast("time_ids", tensors["time_ids"], batch, 2)}
    return cond


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """--prompt (repeatable) and --prompt-file (one per line, blank lines skipped), in that order."""
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise FileNotFoundError(f"--prompt-file: no file {args.prompt_file}")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts or None


@dataclasses.dataclass(frozen=True)
class PipelineCodecs:
    """How a backend reaches a FlowMapPipeline folder's text encoder(s) and VAE (both sampling commands pass
    `flowmap_jax.data.encoders.prompt_conditioning` and `decode_latents`, PyTorch; this module imports no torch).

    encode_prompts(folder, prompts (B,) list of str, image_hw (H, W) pixels) -> the UNet's conditioning
    {"encoder_hidden_states": (B, L, D)[, "added_cond_kwargs": {"text_embeds", "time_ids"}]} float32 numpy;
    decode_latents(folder, latents (B, h, w, C) float32) -> (B, H, W, 3) float32 RGB about [-1, 1];
    encode_images(folder, images (B, H, W, 3) float32 RGB in [-1, 1]) -> (B, h, w, C) float32 latents as the
    UNet sees them (--init-image; None: this backend takes no --init-image).
    """

    encode_prompts: Callable[[Path, list, tuple], dict]
    decode_latents: Callable[[Path, np.ndarray], np.ndarray]
    encode_images: Callable[[Path, np.ndarray], np.ndarray] | None = None


def read_init_image(path: str, factor: int) -> np.ndarray:
    """--init-image: an image file -> (H, W, 3) float32 RGB in [-1, 1]; H and W multiples of `factor`."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-image: no file {path}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), np.float32)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--init-image: {path} is not an image file pillow reads: {err}") from None
    h, w = pixels.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"--init-image: {path} is {w}x{h} pixels; width and height must be multiples of {factor} "
                         f"(the VAE's factor)")
    return pixels / 127.5 - 1.0


def lora_export_info(args: argparse.Namespace) -> tuple[ExportInfo, Path | None]:
    """--lora FOLDER on the base --model: (the LoRA's flowmap.json as an ExportInfo: folder the LoRA folder,
    unet_config the recorded flow-map UNet config; --model as a pipeline folder (model_index.json, its text
    encoder(s) and VAE for --prompt) or None for a UNet folder). Weights are the backend loader's job."""
    model = Path(args.model)
    if not model.is_dir():
        raise FileNotFoundError(f"--model: no base folder at {model} (with --lora: a diffusers pipeline folder "
                                "with unet/, or a UNet folder)")
    if is_pipeline_folder(model) or is_export(model):
        raise ValueError(f"--model {model} is already a flow map; --lora goes on a base UNet (the teacher's pipeline "
                         "folder or UNet folder)")
    lora = read_lora_export(args.lora)
    info = ExportInfo(folder=lora.folder, unet_config=lora.unet_config, config=lora.config, metadata=lora.metadata)
    return info, (model if (model / "model_index.json").is_file() else None)


def prepare(args: argparse.Namespace, codecs: PipelineCodecs | None = None) -> SampleRequest:
    """Flags -> SampleRequest: reads and checks the export, draws the noise, builds the conditioning (prompts
    through `codecs` for a pipeline folder)."""
    check_out(args.out)
    if args.lora is not None:
        info, pipeline = lora_export_info(args)
    else:
        pipeline = Path(args.model) if is_pipeline_folder(args.model) else None
    prompts = read_prompts(args)
    if pipeline is not None and codecs is None:
        raise ValueError(f"{args.model} is a FlowMapPipeline folder, and this sampler reads no pipeline folders; "
                         f"give --model {Path(args.model) / 'unet'} with --cond")
    if prompts is not None and pipeline is None and args.lora is not None:
        raise ValueError(f"--prompt with --lora needs --model to be a diffusers pipeline folder (model_index.json, "
                         f"text encoder(s), vae/); {args.model} is a UNet folder: give --cond instead")
    if prompts is not None and pipeline is None:
        raise ValueError(f"--prompt needs a FlowMapPipeline folder (python -m conversion export RUN OUT --pipeline); "
                         f"{args.model} has no model_index.json with a flow-map unet/")
    if pipeline is not None and prompts is None:
        raise ValueError(f"{args.model} is a pipeline folder: give --prompt (or --prompt-file)")
    if args.lora is None:
        info = read_export(pipeline / "unet" if pipeline is not None else args.model)
    config = info.config
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength needs --init-image (image-to-image)")
    if args.init_image is not None:
        strength = check_strength(0.6 if args.strength is None else args.strength, "--strength")
        for flag, value in (("--init", args.init), ("--timesteps", args.timesteps), ("--direction", args.direction)):
            if value is not None:
                raise ValueError(f"{flag} cannot be combined with --init-image (the grid starts at the time "
                                 f"--strength picks, from the encoded image)")
        if pipeline is None or codecs is None or codecs.encode_images is None:
            raise ValueError(f"--init-image needs --model to be a FlowMapPipeline folder (its vae/ encodes the "
                             f"image); {args.model} is not one")
    if args.init_image is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        grid = img2img_grid(config.schedule, strength, args.steps, spacing=args.spacing, name="--strength")
    elif args.timesteps is not None:
        grid = parse_timesteps(args.timesteps)
        check_time_values(config.schedule, grid, "--timesteps")
    else:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        grid = time_grid(config.schedule, args.steps, spacing=args.spacing)
        if args.direction == "invert":
            grid = grid[::-1].copy()
    if not 0.0 <= args.gamma <= 1.0:
        raise ValueError(f"--gamma must lie in [0, 1], got {args.gamma}")
    if args.gamma > 0 and not np.all(np.diff(grid) < 0):
        raise ValueError("--gamma > 0 needs a decreasing time grid (from noise to data)")
    check_direction(grid, args.direction)
    init = read_init(args.init) if args.init is not None else None
    if args.direction == "invert" and init is None:
        raise ValueError("--direction invert needs --init FILE.npy: the samples to carry from data to noise")
    if init is not None:
        args.batch = init.shape[0]
    h, w, c = default_sample_shape(info)
    factor = None
    if pipeline is not None:
        with open(pipeline / "vae" / "config.json") as f:
            factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    image = None
    if args.init_image is not None:
        image = read_init_image(args.init_image, factor)
        h, w = image.shape[0] // factor, image.shape[1] // factor
        for flag, value, own in (("--height", args.height, h), ("--width", args.width, w)):
            if value is not None and value != own:
                raise ValueError(f"{flag} {value} differs from the --init-image size ({own} latent pixels); leave "
                                 f"it out")
    shape = (args.height or h, args.width or w, c)
    jumps = grid.shape[0] - 1
    noise, renoise = initial_noise(args.seed, args.batch, shape, jumps - 1 if args.gamma > 0 else 0)
    if image is not None:  # x_s = alpha_s x0 + sigma_s eps from the seed's noise (spec.img2img)
        latents = np.asarray(codecs.encode_images(pipeline, image[None]), np.float32)
        if latents.shape[1:] != shape:
            raise ValueError(f"--init-image encodes to latents of shape {latents.shape[1:]}; this flow map samples "
                             f"{shape}")
        latents = np.repeat(latents, args.batch, axis=0)
        noise = np.ascontiguousarray(noised_start(config.schedule, strength, latents, noise, "--strength"),
                                     np.float32)
    if init is not None:
        if init.shape[1:] != shape:
            raise ValueError(f"--init holds examples of shape {init.shape[1:]}; this export samples {shape} "
                             f"(--height/--width change it)")
        noise = init
    cond, labels = {}, None
    if pipeline is not None:
        rows = [prompts[i % len(prompts)] for i in range(args.batch)]
        cond.update(codecs.encode_prompts(pipeline, rows, (shape[0] * factor, shape[1] * factor)))
    if args.cond is not None:
        cond.update(read_cond_file(args.cond, args.batch))
    if config.label_embeddings is not None and "encoder_hidden_states" not in cond:
        table = read_label_embeddings(config.label_embeddings)
        labels = parse_labels(args.labels, args.batch, table.shape[0] - 1)
        cond["encoder_hidden_states"] = labels_to_encoder_hidden_states(table, labels)
    elif args.labels is not None:
        raise ValueError("--labels needs an export with label embeddings (label_embeddings.safetensors); this one "
                         "has none" + (" (or --cond already gives encoder_hidden_states)" if args.cond else ""))
    if needs_encoder_hidden_states(info.unet_config) and "encoder_hidden_states" not in cond:
        raise ValueError(f"{info.folder} is a cross-attention UNet: give encoder_hidden_states with --cond FILE "
                         "(it has no label embeddings)")
    if info.unet_config.get("addition_embed_type") == "text_time" and "added_cond_kwargs" not in cond:
        raise ValueError(f"{info.folder} is an SDXL-style UNet: --cond must hold text_embeds and time_ids")
    guidance = resolve_guidance(config, args.guidance)
    return SampleRequest(info=info, noise=noise, renoise=renoise if args.gamma > 0 else None, timesteps=grid,
                         gamma=float(args.gamma), cond=cond or None, guidance_scale=guidance, labels=labels,
                         dtype=args.dtype, device=args.device, out=Path(args.out),
                         grid_columns=max(1, int(args.grid_columns)), args=vars(args), pipeline=pipeline,
                         prompts=None if prompts is None else [prompts[i % len(prompts)] for i in range(args.batch)],
                         lora=None if args.lora is None else Path(args.lora))


def write_outputs(request: SampleRequest, samples: np.ndarray, backend: str, seconds: float, device: str,
                  codecs: PipelineCodecs | None = None) -> dict:
    """samples.npy, noise.npy, labels.npy, grid.png and sample_info.json in request.out (for a pipeline folder
    also images/NNNN.png decoded through `codecs` and prompts.txt); returns the paths."""
    from flowmap_jax.spec.image_grid import save_grid

    samples = np.asarray(samples, np.float32)
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {"samples": out / "samples.npy", "noise": out / "noise.npy", "grid": out / "grid.png",
             "info": out / "sample_info.json"}
    np.save(paths["samples"], samples)
    np.save(paths["noise"], request.noise)
    if request.labels is not None:
        paths["labels"] = out / "labels.npy"
        np.save(paths["labels"], request.labels)
    jumps = request.timesteps.shape[0] - 1
    cols = request.grid_columns
    if request.pipeline is not None:  # latents -> images through the pipeline's VAE (PyTorch)
        from PIL import Image

        decoded = np.asarray(codecs.decode_latents(request.pipeline, samples), np.float32)
        pixels = np.clip(np.round((decoded + 1.0) * 127.5), 0, 255).astype(np.uint8)
        paths["images"] = out / "images"
        paths["images"].mkdir(exist_ok=True)
        for i, image in enumerate(pixels):
            Image.fromarray(image).save(paths["images"] / f"{i:04d}.png")
        (out / "prompts.txt").write_text("\n".join(request.prompts) + "\n")
        samples = decoded
    rows = []
    for r, start in enumerate(range(0, samples.shape[0], cols)):
        name = f"{jumps} jump{'s' if jumps > 1 else ''}" if r == 0 else ""
        rows.append((name, samples[start:start + cols]))
    save_grid(str(paths["grid"]), rows)
    info = {"backend": backend, "device": device, "dtype": request.dtype, "seconds": round(seconds, 3),
            "model": str(request.info.folder) if request.lora is None else str(request.args["model"]),
            "lora": None if request.lora is None else str(request.lora),
            "timesteps": [float(t) for t in request.timesteps],
            "gamma": request.gamma, "guidance_scale": request.guidance_scale,
            "labels": None if request.labels is None else request.labels.tolist(),
            "shape": list(samples.shape), "layout": "(B, H, W, C)", "flags": request.args}
    paths["info"].write_text(json.dumps(info, indent=2, default=str) + "\n")
    return paths


def main(argv, backend: str, prog: str, run: Callable[[SampleRequest], tuple[np.ndarray, str]],
         codecs: PipelineCodecs | None = None, needs: tuple[str, ...] = ()) -> int:
    """Parse, prepare, `run(request) -> (samples (B, H, W, C) float32, device description)`, write; `codecs`
    lets --model name a FlowMapPipeline folder (prompts in, images out); `needs`: modules `run` imports, imported
    first, so that a missing extra stops the command before any work (ModuleNotFoundError: `cli_exit.run_main`
    makes it one line and exit code 2).
    Exit codes (`flowmap_jax.cli.cli_exit`): 0 done, 2 bad flags or bad input (a folder that is not a
    flow-map export, a bad conditioning file; a missing extra); an unexpected failure keeps its traceback and
    exits 1."""
    args = build_parser(prog, backend).parse_args(argv)
    for module in needs:
        importlib.import_module(module)
    try:
        request = prepare(args, codecs)
        start = time.perf_counter()
        samples, device = run(request)
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as err:
        cli_exit.report(err)
        return cli_exit.USAGE
    try:
        paths = write_outputs(request, samples, backend, seconds, device, codecs)
    except OSError as err:  # --out taken meanwhile (2), disk full (1): the table of cli_exit decides
        code = cli_exit.exit_code(err)
        if code is None:
            raise
        cli_exit.report(err)
        return code
    print(f"{samples.shape[0]} samples, {request.timesteps.shape[0] - 1} jump(s), {backend} on {device} "
          f"({request.dtype}) in {seconds:.1f}s -> {paths['grid']}, {paths['samples']}")
    return 0
