"""Write training shards (format "flowmap-shards/1", see `flowmap_jax.datasets`): model-space
examples plus their conditioning, so training reads arrays and runs no VAE or text encoder.

    # digits with the embedded teacher's label embeddings (a worked example; no torch needed)
    python -m flowmap_jax.write_shards --out /data/digits_shards --source digits

    # arrays computed elsewhere: an .npz with "x0" (N, H, W, C) and "cond.<name>" (N, ...) arrays,
    # optionally "uncond.<name>" (1, ...) for classifier-free guidance
    python -m flowmap_jax.write_shards --out /data/shards --source npz --input latents_and_embeddings.npz

    # an image folder through a diffusers VAE, captions (<image>.txt) through a CLIP text encoder
    # (needs the [torch] extra, and `transformers` for captions)
    python -m flowmap_jax.write_shards --out /data/sd_shards --source folder --images /data/images \\
        --vae stable-diffusion-v1-5/stable-diffusion-v1-5 --text-encoder stable-diffusion-v1-5/stable-diffusion-v1-5 --image-size 512

Then: `python -m flowmap_jax.train --data.source shards --data.path /data/sd_shards ...`.
Latents are NHWC and already multiplied by the VAE's `scaling_factor` (what the UNet sees).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from flowmap_jax.datasets import SHARDS_FORMAT, DataError
from flowmap_jax.encoders import encode_captions, encode_with_vae
from flowmap_jax.spec import cli_exit


def write_shards(out: str, x0: np.ndarray, cond: dict | None = None, uncond: dict | None = None,
                 shard_size: int = 4096, dtype: str = "float16", source: dict | None = None) -> str:
    """Write x0 (N, H, W, C) and cond {name: (N, ...)} as shards into `out`; uncond {name: (1, ...)}.

    Files are written under temporary names and renamed, index.json last, so a folder with an
    index.json is complete. Returns `out`.
    """
    from safetensors.numpy import save_file

    x0 = np.asarray(x0)
    if x0.ndim != 4:
        raise DataError(f"x0 must be (N, H, W, C), got shape {x0.shape}")
    cond = {k: np.asarray(v) for k, v in (cond or {}).items()}
    for name, value in cond.items():
        if value.shape[0] != x0.shape[0]:
            raise DataError(f"cond {name!r} has {value.shape[0]} rows for {x0.shape[0]} examples")
    if dtype not in ("float16", "float32"):
        raise DataError(f"--dtype must be float16 or float32, got {dtype!r}")
    os.makedirs(out, exist_ok=True)
    n = x0.shape[0]
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        name = f"shard-{i:05d}.safetensors"
        tensors = {"x0": np.ascontiguousarray(x0[start:stop].astype(dtype))}
        tensors.update({f"cond.{k}": np.ascontiguousarray(v[start:stop].astype(dtype)) for k, v in cond.items()})
        save_file(tensors, os.path.join(out, name + ".tmp"))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        shards.append({"file": name, "num_examples": stop - start})
    uncond_file = None
    if uncond:
        missing = sorted(set(cond) - set(uncond))
        if missing:
            raise DataError(f"uncond lacks {missing}")
        uncond_file = "uncond.safetensors"
        save_file({f"cond.{k}": np.ascontiguousarray(np.asarray(v, np.float32).reshape(1, *cond[k].shape[1:]))
                   for k, v in uncond.items() if k in cond}, os.path.join(out, uncond_file))
    index = {"format": SHARDS_FORMAT, "num_examples": int(n), "sample_shape": list(x0.shape[1:]),
             "cond": {k: list(v.shape[1:]) for k, v in cond.items()}, "uncond": uncond_file,
             "shards": shards, "source": source or {}}
    with open(os.path.join(out, "index.json.tmp"), "w") as f:
        json.dump(index, f, indent=2)
    os.replace(os.path.join(out, "index.json.tmp"), os.path.join(out, "index.json"))
    return out


def _digits(args):
    from flowmap_jax.datasets import LabelConditioner
    from flowmap_jax.digits.data import load_digits
    from flowmap_jax.spec.label_table import LABEL_EMBEDDINGS_NAME
    from flowmap_jax.teacher_folder import resolve_teacher_path

    teacher = resolve_teacher_path(args.teacher)
    conditioner = LabelConditioner.from_file(os.path.join(teacher, LABEL_EMBEDDINGS_NAME))
    images, labels = load_digits(args.split)
    return images, conditioner(labels), conditioner.uncond(), {"source": "digits", "split": args.split,
                                                               "teacher": args.teacher}


def _npz(args):
    with np.load(args.input, allow_pickle=False) as f:
        if "x0" not in f.files:
            raise DataError(f"{args.input} has no array 'x0' (found {f.files})")
        x0 = f["x0"]
        cond = {k[len("cond."):]: f[k] for k in f.files if k.startswith("cond.")}
        uncond = {k[len("uncond."):]: f[k] for k in f.files if k.startswith("uncond.")} or None
    return x0, cond, uncond, {"source": "npz", "input": os.path.abspath(args.input)}


def _folder(args):
    from flowmap_jax.datasets import _list_images, load_images

    files, _ = _list_images(args.images)
    if not files:
        raise DataError(f"--images: no images in {args.images}")
    images = load_images(files, args.image_size, 3)
    x0 = encode_with_vae(images, args.vae, args.vae_subfolder) if args.vae else images
    cond, uncond = {}, None
    if args.text_encoder:
        captions = []
        for path in files:
            caption_file = os.path.splitext(path)[0] + ".txt"
            captions.append(open(caption_file).read().strip() if os.path.exists(caption_file) else "")
        states, empty = encode_captions(captions, args.text_encoder)
        cond, uncond = {"encoder_hidden_states": states}, {"encoder_hidden_states": empty}
    return x0, cond, uncond, {"source": "folder", "images": os.path.abspath(args.images), "vae": args.vae,
                              "text_encoder": args.text_encoder, "image_size": args.image_size}


def main(argv=None) -> int:
    """Exit codes (`flowmap_jax.spec.cli_exit`): 0 written, 2 bad flags or bad input (a missing or malformed
    input file, no images); an unexpected failure keeps its traceback and exits 1."""
    parser = cli_exit.ArgumentParser(prog="python -m flowmap_jax.write_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--source", choices=("digits", "npz", "folder"), required=True)
    parser.add_argument("--shard-size", type=int, default=4096, help="examples per shard")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--teacher", default="embedded:digits_teacher", help="digits: folder with label_embeddings")
    parser.add_argument("--split", default="train", help="digits: train, heldout or all")
    parser.add_argument("--input", help="npz: the .npz file")
    parser.add_argument("--images", help="folder: the image folder")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--vae", default="", help="folder: diffusers AutoencoderKL folder or hub id")
    parser.add_argument("--vae-subfolder", default="vae")
    parser.add_argument("--text-encoder", default="", help="folder: CLIP text encoder folder or hub id")
    args = parser.parse_args(argv)
    try:
        if args.source == "npz" and not args.input:
            raise DataError("--source npz needs --input FILE.npz")
        if args.source == "folder" and not args.images:
            raise DataError("--source folder needs --images DIR")
        x0, cond, uncond, source = {"digits": _digits, "npz": _npz, "folder": _folder}[args.source](args)
        write_shards(args.out, x0, cond, uncond, args.shard_size, args.dtype, source)
    except (DataError, FileNotFoundError) as error:
        cli_exit.report(error)
        return cli_exit.USAGE
    print(f"wrote {len(x0)} examples of shape {tuple(x0.shape[1:])} to {args.out}")
    return 0


if __name__ == "__main__":
    cli_exit.run_main(main)
