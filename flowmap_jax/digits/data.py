"""scikit-learn's handwritten digits at 16x16 in [-1, 1], with a fixed train / held-out split.

The source is `sklearn.datasets.load_digits` (1797 images, 8x8, integer intensities 0..16, bundled
with scikit-learn, no download). Numpy only: no jax, no torch.

Preprocessing, fixed for every user of the task (teacher, classifier, flow map, benchmarks):

1. Upsample 8x8 -> 16x16 with **bilinear interpolation, half-pixel centres, edges clamped**
   (`align_corners=False`; the same as PIL's `Image.resize(..., BILINEAR)`, `jax.image.resize(...,
   "bilinear")` and `torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`
   for a 2x upscale; antialiasing is irrelevant when upsampling). Bilinear rather than nearest
   gives smooth strokes that a small UNet can model, instead of 2x2 blocks.
2. Scale intensities 0..16 to [-1, 1] (`x / 8 - 1`): background is exactly -1.
3. Layout (N, 16, 16, 1) float32 (Flax NHWC); labels (N,) int32 in 0..9.

Split: for each class, a seeded permutation (numpy `default_rng(seed)`) puts `heldout_per_class`
images (default 50, so 500 in all) in the held-out split; the remaining 1297 are the train split.
Both splits keep the dataset's original order. The teacher and the classifier train on the train
split only; the benchmarks compute the Frechet distance against the held-out split.
"""

import numpy as np

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_LABEL = 10  # index of the unconditional (classifier-free guidance) label embedding
SPLIT_SEED = 0
HELDOUT_PER_CLASS = 50
SPLITS = ("train", "heldout", "all")


def bilinear_matrix(size_in, size_out):
    """(size_out, size_in) float64 interpolation matrix: half-pixel centres, clamped edges.

    Output pixel i samples input coordinate (i + 0.5) * size_in / size_out - 0.5, clamped to
    [0, size_in - 1], linearly between its two neighbours. Rows sum to 1.
    """
    coords = (np.arange(size_out, dtype=np.float64) + 0.5) * size_in / size_out - 0.5
    coords = np.clip(coords, 0.0, size_in - 1)
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, size_in - 1)
    frac = coords - lower
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    np.add.at(matrix, (np.arange(size_out), lower), 1.0 - frac)
    np.add.at(matrix, (np.arange(size_out), upper), frac)
    return matrix


def upsample_bilinear(images, size=IMAGE_SIZE):
    """Bilinear upsampling of square images (see module docstring for the convention).

    Args:
      images: (N, h, h) array, any real dtype.
      size: output side length.
    Returns:
      (N, size, size) float64.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"upsample_bilinear expects (N, h, h) images, got shape {images.shape}")
    matrix = bilinear_matrix(images.shape[1], size)
    return np.einsum("ij,njk,lk->nil", matrix, images, matrix)


def _raw_digits():
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64) from scikit-learn."""
    from sklearn.datasets import load_digits  # local import: keeps `import data` cheap

    bunch = load_digits()
    return bunch.images, bunch.target


def split_indices(labels, seed=SPLIT_SEED, heldout_per_class=HELDOUT_PER_CLASS):
    """Deterministic stratified split of dataset indices.

    Args:
      labels: (N,) integer class labels of the full dataset.
      seed: seed of `np.random.default_rng`; classes are visited in order 0..9.
      heldout_per_class: images of each class that go to the held-out split.
    Returns:
      (train_indices, heldout_indices): sorted int64 arrays, disjoint, covering 0..N-1.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    heldout = []
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        if len(members) <= heldout_per_class:
            raise ValueError(f"class {label} has {len(members)} images, cannot hold out {heldout_per_class}")
        heldout.append(rng.permutation(members)[:heldout_per_class])
    heldout = np.sort(np.concatenate(heldout))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def load_digits(split="train", seed=SPLIT_SEED, heldout_per_class=HELDOUT_PER_CLASS):
    """The digits at 16x16 in [-1, 1].

    Args:
      split: "train" (1297 images by default), "heldout" (500) or "all" (1797).
      seed, heldout_per_class: the split (see `split_indices`); keep the defaults to match the
        shipped teacher, classifier and benchmark numbers.
    Returns:
      images: (N, 16, 16, 1) float32 in [-1, 1] (background -1).
      labels: (N,) int32 in 0..9.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    raw_images, raw_labels = _raw_digits()
    if split == "all":
        index = np.arange(len(raw_labels))
    else:
        train, heldout = split_indices(raw_labels, seed, heldout_per_class)
        index = train if split == "train" else heldout
    images = upsample_bilinear(raw_images[index]) / 8.0 - 1.0
    images = np.clip(images, -1.0, 1.0).astype(np.float32)[..., None]
    return images, raw_labels[index].astype(np.int32)


def to_uint8(images):
    """[-1, 1] float images (any shape) -> uint8 0..255 (values outside [-1, 1] are clipped)."""
    images = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5, 0.0, 255.0)
    return np.round(images).astype(np.uint8)


def make_grid(images, nrow, pad=1, pad_value=0):
    """Tile images into one uint8 picture (for PNGs of samples).

    Args:
      images: (N, H, W, 1) or (N, H, W) float in [-1, 1]; filled row by row, `nrow` per row.
      nrow: images per row.
      pad: pixels between images; pad_value: their uint8 value.
    Returns:
      (rows * (H + pad) + pad, nrow * (W + pad) + pad) uint8.
    """
    images = to_uint8(images)
    if images.ndim == 4:
        images = images[..., 0]
    n, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return grid
