"""The one key map between the Flax UNet's parameter tree and diffusers' state dict, both directions.

Flax path segments are diffusers' key segments with list indices joined by `_`:

    down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj/kernel
    down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight

Leaves: Flax `kernel` (Dense, Conv), `scale` (GroupNorm, LayerNorm) and `embedding` (Embed) are
diffusers' `weight`; `bias` is `bias`. Layouts: Dense kernel (in, out) = Linear weight (out, in).T;
Conv kernel (kh, kw, in, out) = Conv2d weight (out, in, kh, kw) transposed (2, 3, 1, 0). Nothing else
changes, so torch -> flax -> torch is exact.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

# Module names that diffusers keeps in nn.ModuleList / nn.Sequential (their children are indexed).
LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
                "upsamplers", "to_out", "net")
_LIST_SEGMENT = re.compile(r"^(%s)_(\d+)$" % "|".join(LIST_MODULES))
_FLAX_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
    *modules, leaf = path
    if leaf not in _FLAX_LEAF_TO_TORCH:
        raise KeyError(f"Flax parameter {'/'.join(path)!r} has an unknown leaf name {leaf!r}")
    segments = [_LIST_SEGMENT.sub(r"\1.\2", m) for m in modules]
    return ".".join(segments + [_FLAX_LEAF_TO_TORCH[leaf]])


def torch_to_flax_layout(array: np.ndarray, flax_leaf: str) -> np.ndarray:
    """A diffusers tensor (numpy) -> the Flax layout of leaf `flax_leaf` (a view where possible)."""
    if flax_leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if flax_leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def flax_to_torch_layout(array: np.ndarray, flax_leaf: str) -> np.ndarray:
    """The inverse of `torch_to_flax_layout`, returned C-contiguous (ready for safetensors)."""
    array = np.asarray(array)
    if flax_leaf == "kernel" and array.ndim == 4:
        array = np.transpose(array, (3, 2, 0, 1))
    elif flax_leaf == "kernel" and array.ndim == 2:
        array = array.T
    return np.ascontiguousarray(array)


def torch_shape(flax_shape: tuple, flax_leaf: str) -> tuple:
    """The diffusers shape of a Flax leaf shape."""
    if flax_leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if flax_leaf == "kernel" and len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def expected_key_map(abstract_params) -> dict[str, tuple[tuple[str, ...], tuple]]:
    """{diffusers key: (flax path, diffusers shape)} for every leaf of an (abstract) Flax param tree."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract_params).items():
        out[flax_path_to_torch_key(path)] = (path, torch_shape(tuple(leaf.shape), path[-1]))
    return out

