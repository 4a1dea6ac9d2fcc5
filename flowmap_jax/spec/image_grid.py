"""The one image-grid writer: PNG grids of samples, one row per sampler, names on the left (numpy, pillow).

Used by the trainer's sample grids (`flowmap_jax.training.reporting`), both sampling commands (`cli.sample_cli`)
and the benchmarks. Images are (N, H, W, C) in model space: C = 1 or 3 in [-1, 1]; other channel counts
(latents without a decoder) are shown per-channel rescaled.
"""

from __future__ import annotations

import os

import numpy as np


def to_display(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) model-space images -> (N, H, W, 3) uint8. C = 1 or 3: [-1, 1] -> 0..255.
    Other C (latents without a decoder): the first three channels, each scaled by its own range."""
    images = np.asarray(images, np.float32)
    channels = images.shape[-1]
    if channels == 1:
        images = np.repeat(images, 3, axis=-1)
    elif channels != 3:
        images = images[..., :3] if channels > 3 else np.concatenate(
            [images, np.repeat(images[..., -1:], 3 - channels, -1)], -1)
        lo = images.min(axis=(0, 1, 2), keepdims=True)
        hi = images.max(axis=(0, 1, 2), keepdims=True)
        images = (images - lo) / np.maximum(hi - lo, 1e-6) * 2 - 1
    return np.round(np.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def display_scale(height: int) -> int:
    """The default upscaling of `save_grid`: 3 for images under 64 px (16x16 digits, tiny latents), else 1."""
    return 3 if height < 64 else 1


def save_grid(path: str, rows: list[tuple[str, np.ndarray]], scale: int | None = None, pad: int = 2) -> str:
    """Write a PNG with one row per (name, images (N, H, W, C)), names on the left.

    Images are upscaled `scale` times (nearest; default `display_scale(H)`) so 16x16 digits are visible and
    512 px images stay 512 px. Tile size (H * scale, W * scale), `pad` pixels apart. Returns `path`.
    """
    from PIL import Image, ImageDraw

    tiles = [(name, to_display(images)) for name, images in rows]
    n = max(t.shape[0] for _, t in tiles)
    h, w = tiles[0][1].shape[1:3]
    scale = display_scale(h) if scale is None else int(scale)
    h, w = h * scale, w * scale
    label_width = 8 + 7 * max(len(name) for name, _ in tiles)
    canvas = Image.new("RGB", (label_width + n * (w + pad) + pad, len(tiles) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(tiles):
        top = pad + r * (h + pad)
        draw.text((4, top + h // 2 - 5), name, fill=(0, 0, 0))
        for c in range(images.shape[0]):
            tile = Image.fromarray(images[c]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (w + pad), top))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
