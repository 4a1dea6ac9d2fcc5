"""Captioned image folders in the Hugging Face `imagefolder` convention, read one image at a time.

    images/metadata.jsonl    one JSON object per line: {"file_name": "a.png", "text": "a photo of ..."}
    images/a.png, images/sub/b.jpg, ...

Captions come from `metadata.jsonl` at the folder's top (column `text` unless told otherwise; `file_name`
relative to the folder) when it exists; otherwise from a `.txt` file beside each image (`a.png` ->
`a.txt`). Every image needs a caption, and every metadata line an image: anything else is a `DataError`
naming the file. Pure Python plus pillow (no jax, no torch).

`list_captioned_images(folder) -> [(path, caption)]` holds only names and captions; `load_image(path, size)`
reads one image: centre crop to a square, bicubic resize to `size`, RGB (size, size, 3) float32 in [-1, 1],
plus the geometry SDXL conditions on (`ImageGeometry`: original (h, w), crop top-left in the resized
image's pixels, target (h, w)).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from flowmap_jax.data.data_error import DataError
from flowmap_jax.data.datasets import IMAGE_EXTENSIONS

METADATA_FILE = "metadata.jsonl"


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """Where a training image came from, in pixels: original (h, w) of the file, the crop's top-left corner
    (top, left) in the coordinates of the image resized so its short side is the target size, target (h, w).
    SDXL's time ids are these six numbers in this order."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


def _image_files(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def _read_metadata(path: str, column: str) -> dict[str, str]:
    captions = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not valid JSON ({error})") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise DataError(f"{path} line {number}: no 'file_name'")
            if not isinstance(row.get(column), str):
                raise DataError(f"{path} line {number} ({row['file_name']}): no caption column {column!r} "
                                f"(keys: {sorted(row)})")
            captions[os.path.normpath(row["file_name"])] = row[column]
    return captions


def list_captioned_images(folder: str, caption_column: str = "text") -> list[tuple[str, str]]:
    """(image path, caption) for every image under `folder`, sorted by path (see the module docstring)."""
    if not os.path.isdir(folder):
        raise DataError(f"--images: image folder {folder} does not exist")
    files = _image_files(folder)
    if not files:
        raise DataError(f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    metadata = os.path.join(folder, METADATA_FILE)
    out = []
    if os.path.isfile(metadata):
        captions = _read_metadata(metadata, caption_column)
        for path in files:
            key = os.path.normpath(os.path.relpath(path, folder))
            if key not in captions:
                raise DataError(f"{path}: no caption ({METADATA_FILE} has no line with file_name {key!r})")
            out.append((path, captions.pop(key)))
        if captions:
            name = min(captions)
            raise DataError(f"{metadata}: file_name {name!r} is not an image in {folder}"
                            + (f" (and {len(captions) - 1} more)" if len(captions) > 1 else ""))
        return out
    for path in files:
        caption_file = os.path.splitext(path)[0] + ".txt"
        if not os.path.isfile(caption_file):
            raise DataError(f"{path}: no caption (neither {METADATA_FILE} in {folder} nor {caption_file})")
        with open(caption_file, encoding="utf-8") as f:
            out.append((path, f.read().strip()))
    return out


def load_image(path: str, size: int, channels: int = 3) -> tuple[np.ndarray, ImageGeometry]:
    """One image -> ((size, size, channels) float32 in [-1, 1], its geometry). Centre crop to a square, bicubic
    resize; channels 1 grayscale, 3 RGB. A file PIL cannot read is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            w, h = image.size
            side = min(w, h)
            top, left = (h - side) // 2, (w - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            array = np.asarray(image, np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None
    scale = size / side
    geometry = ImageGeometry(original_size=(h, w), crop_top_left=(round(top * scale), round(left * scale)),
                             target_size=(size, size))
    return array.reshape(size, size, channels), geometry
