"""The one place where image layout flips between PyTorch (B, C, H, W) and Flax (B, H, W, C)."""

import numpy as np


def nchw_to_nhwc(array):
    """(B, C, H, W) -> (B, H, W, C). Accepts numpy arrays or anything np.asarray takes."""
    array = np.asarray(array)
    if array.ndim != 4:
        raise ValueError(f"nchw_to_nhwc expects a 4-d array (B, C, H, W), got shape {array.shape}")
    return np.transpose(array, (0, 2, 3, 1))


def nhwc_to_nchw(array):
    """(B, H, W, C) -> (B, C, H, W). Accepts numpy arrays or anything np.asarray takes."""
    array = np.asarray(array)
    if array.ndim != 4:
        raise ValueError(f"nhwc_to_nchw expects a 4-d array (B, H, W, C), got shape {array.shape}")
    return np.transpose(array, (0, 3, 1, 2))
