"""flowmap_jax.digits.data: shapes, range, labels, split determinism, the upsampling convention."""

import numpy as np
import pytest

from flowmap_jax.digits import data


@pytest.fixture(scope="module")
def splits():
    return {name: data.load_digits(name) for name in data.SPLITS}


def test_shapes_dtypes_range(splits):
    sizes = {"train": 1297, "heldout": 500, "all": 1797}
    for name, (images, labels) in splits.items():
        assert images.shape == (sizes[name], 16, 16, 1) and images.dtype == np.float32
        assert labels.shape == (sizes[name],) and labels.dtype == np.int32
        assert images.min() == -1.0 and images.max() <= 1.0 and images.max() > 0.99
        assert set(np.unique(labels)) == set(range(10))
    assert np.array_equal(np.bincount(splits["heldout"][1]), np.full(10, 50))


def test_split_is_deterministic_and_disjoint(splits):
    _, labels = data._raw_digits()
    train, heldout = data.split_indices(labels)
    train2, heldout2 = data.split_indices(labels)
    assert np.array_equal(train, train2) and np.array_equal(heldout, heldout2)
    assert len(np.intersect1d(train, heldout)) == 0 and len(train) + len(heldout) == len(labels)
    other_train, _ = data.split_indices(labels, seed=1)
    assert not np.array_equal(train, other_train)
    images, _ = data.load_digits("train")
    assert np.array_equal(images, splits["train"][0])
    np.testing.assert_array_equal(splits["all"][0][heldout], splits["heldout"][0])


def test_bilinear_matches_half_pixel_convention():
    raw, _ = data._raw_digits()
    up = data.upsample_bilinear(raw[:3])
    # Independent reference: explicit half-pixel-centre bilinear interpolation with clamped edges.
    ref = np.zeros_like(up)
    for i in range(16):
        for j in range(16):
            y, x = np.clip((i + 0.5) / 2 - 0.5, 0, 7), np.clip((j + 0.5) / 2 - 0.5, 0, 7)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, 7), min(x0 + 1, 7)
            fy, fx = y - y0, x - x0
            ref[:, i, j] = ((1 - fy) * (1 - fx) * raw[:3, y0, x0] + (1 - fy) * fx * raw[:3, y0, x1]
                            + fy * (1 - fx) * raw[:3, y1, x0] + fy * fx * raw[:3, y1, x1])
    np.testing.assert_allclose(up, ref, atol=1e-12)


def test_make_grid():
    images, _ = data.load_digits("heldout")
    grid = data.make_grid(images[:12], nrow=5, pad=1)
    assert grid.shape == (3 * 17 + 1, 5 * 17 + 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[1:17, 1:17], data.to_uint8(images[0, ..., 0]))
