"""Write training shards (format "flowmap-shards/1", see `flowmap_jax.data.datasets`): model-space
examples plus their conditioning, so training reads arrays and runs no VAE or text encoder.

    # digits with the embedded teacher's label embeddings (a worked example; no torch needed)
    python -m flowmap_jax.write_shards --out /data/digits_shards --source digits

    # arrays computed elsewhere: an .npz with "x0" (N, H, W, C) and "cond.<name>" (N, ...) arrays,
    # optionally "uncond.<name>" (1, ...) for classifier-free guidance
    python -m flowmap_jax.write_shards --out /data/shards --source npz --input latents_and_embeddings.npz

    # captioned images (metadata.jsonl with file_name/text, or a .txt beside each image) through a Stable
    # Diffusion pipeline's VAE and text encoder(s) (SD 1.x/2.x or SDXL; needs the [torch] extra)
    python -m flowmap_jax.write_shards --out /data/sd_shards --source folder --images /data/images \\
        --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --image-size 512

    # uncaptioned images through a VAE only (unconditional latents), or as pixels (no --vae)
    python -m flowmap_jax.write_shards --out /data/latents --source folder --images /data/images --vae SD_FOLDER

Images are encoded in batches (--batch-size) and written shard by shard (`flowmap_jax.data.shard_writer`): memory
holds one batch whatever the number of images. With --pipeline the shards carry the prompt conditioning
("cond.encoder_hidden_states"; SDXL also "cond.added_cond_kwargs.text_embeds" and
"cond.added_cond_kwargs.time_ids" = original size, crop top-left, target size) and uncond.safetensors holds
the empty prompt's conditioning for classifier-free guidance (zeros where the pipeline sets
force_zeros_for_empty_prompt, as SDXL's does).

Then: `python -m flowmap_jax.train --data.source shards --data.path /data/sd_shards ...`.
Latents are NHWC and already multiplied by the VAE's `scaling_factor` (what the UNet sees).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from flowmap_jax.data.data_error import DataError
from flowmap_jax.data.shard_writer import ShardWriter, write_shards
from flowmap_jax.cli import cli_exit

__all__ = ["main", "write_image_folder", "write_shards"]


def _digits(args):
    from flowmap_jax.data.datasets import LabelConditioner
    from flowmap_jax.digits.data import load_digits
    from flowmap_jax.spec.label_table import LABEL_EMBEDDINGS_NAME
    from flowmap_jax.data.teacher_folder import resolve_teacher_path

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


def write_image_folder(out: str, images: str, image_size: int, pipeline: str = "", vae: str = "",
                       vae_subfolder: str = "vae", batch_size: int = 16, shard_size: int = 4096,
                       dtype: str = "float16", caption_column: str = "text", device: str = "auto",
                       say=print) -> str:
    """An image folder -> shards, streaming (one batch of `batch_size` images in memory at a time).

    pipeline: a diffusers SD / SDXL pipeline folder: latents through its vae/, captions (required, see
    `flowmap_jax.data.captioned_images`) through its text encoder(s), SDXL time ids from each image's geometry, and
    the unconditional conditioning. vae (without pipeline): latents only, no captions. Neither: pixels
    (RGB in [-1, 1]), no conditioning. Returns `out`.
    """
    from flowmap_jax.data.captioned_images import (
        _image_files,
        list_captioned_images,
        load_image,
    )

    if pipeline:
        from flowmap_jax.data.encoders import LatentCodec, PromptEncoder, sdxl_time_ids

        entries = list_captioned_images(images, caption_column)
        codec = LatentCodec.from_pretrained(pipeline, "vae", device, batch_size)
        prompts = PromptEncoder.from_pretrained(pipeline, device, batch_size)
        uncond = prompts.unconditional()
    else:
        if not os.path.isdir(images):
            raise DataError(f"--images: image folder {images} does not exist")
        entries = [(path, None) for path in _image_files(images)]
        if not entries:
            raise DataError(f"--images: no images in {images}")
        codec, prompts, uncond = None, None, None
        if vae:
            from flowmap_jax.data.encoders import LatentCodec

            codec = LatentCodec.from_pretrained(vae, vae_subfolder, device, batch_size)
    source = {"source": "folder", "images": os.path.abspath(images), "image_size": image_size,
              "pipeline": pipeline or None, "vae": (pipeline or vae) or None,
              "vae_scaling_factor": None if codec is None else codec.scaling_factor,
              "vae_shift_factor": None if codec is None else codec.shift_factor,
              "latents": "posterior mean, (mean - shift_factor) * scaling_factor, NHWC" if codec else None,
              "text_encoders": None if prompts is None else len(prompts.text_encoders),
              "uncond": None if prompts is None else ("zeros (force_zeros_for_empty_prompt)"
                                                     if prompts.zeros_for_empty_prompt else "empty prompt"),
              "caption_column": caption_column if prompts is not None else None}
    with ShardWriter(out, len(entries), shard_size, dtype) as writer:
        for start in range(0, len(entries), batch_size):
            batch = entries[start:start + batch_size]
            loaded = [load_image(path, image_size, 3) for path, _ in batch]
            pixels = np.stack([array for array, _ in loaded])
            x0 = pixels if codec is None else codec.encode(pixels)
            cond = None
            if prompts is not None:
                cond = prompts.encode([caption for _, caption in batch])
                if "added_cond_kwargs" in cond:
                    cond["added_cond_kwargs"]["time_ids"] = np.stack([
                        sdxl_time_ids(g.original_size, g.crop_top_left, g.target_size) for _, g in loaded])
            writer.add(x0, cond)
            if say is not None and (start // batch_size) % 50 == 0:
                say(f"encoded {start + len(batch)}/{len(entries)} images")
        return writer.close(uncond, source)


def main(argv=None) -> int:
    """Exit codes (`flowmap_jax.cli.cli_exit`): 0 written, 2 bad flags or bad input (a missing or malformed
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
    parser.add_argument("--image-size", type=int, default=512, help="folder: square size images are cropped "
                        "and resized to (pixels)")
    parser.add_argument("--pipeline", default="", help="folder: a diffusers SD 1.x/2.x or SDXL pipeline folder "
                        "(its VAE encodes the images, its text encoder(s) the captions)")
    parser.add_argument("--vae", default="", help="folder, without --pipeline: a diffusers AutoencoderKL folder "
                        "(latents, no captions)")
    parser.add_argument("--vae-subfolder", default="vae")
    parser.add_argument("--caption-column", default="text", help="folder: the caption key in metadata.jsonl")
    parser.add_argument("--batch-size", type=int, default=16, help="folder: images encoded at once")
    parser.add_argument("--device", default="auto", help="folder: torch device of the encoders (auto, cpu, cuda)")
    args = parser.parse_args(argv)
    try:
        if args.source == "npz" and not args.input:
            raise DataError("--source npz needs --input FILE.npz")
        if args.source == "folder" and not args.images:
            raise DataError("--source folder needs --images DIR")
        if args.source == "folder":
            if args.batch_size < 1:
                raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
            out = write_image_folder(args.out, args.images, args.image_size, args.pipeline, args.vae,
                                     args.vae_subfolder, args.batch_size, args.shard_size, args.dtype,
                                     args.caption_column, args.device)
        else:
            x0, cond, uncond, source = {"digits": _digits, "npz": _npz}[args.source](args)
            out = write_shards(args.out, x0, cond, uncond, args.shard_size, args.dtype, source)
    except (DataError, FileNotFoundError) as error:
        cli_exit.report(error)
        return cli_exit.USAGE
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    print(f"wrote {index['num_examples']} examples of shape {tuple(index['sample_shape'])} "
          f"(conditioning {index['cond'] or 'none'}) to {out}")
    return 0


if __name__ == "__main__":
    cli_exit.run_main(main)
