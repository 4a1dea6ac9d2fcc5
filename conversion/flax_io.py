"""Flax params on disk: a folder with `config.json` (the diffusers UNet config) and
`flax_params.safetensors` (every leaf under its '/'-joined Flax path). No pickle, no Orbax needed to
read it; training checkpoints use Orbax instead (see flowmap_jax.training.checkpointing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import traverse_util

from flowmap_jax.unet.diffusers_io import (
    CONFIG_NAME,
    atomic_write_bytes,
    read_safetensors,
)

FLAX_PARAMS_NAME = "flax_params.safetensors"


def flatten_params(params, sep="/") -> dict[str, np.ndarray]:
    """{'/'-joined Flax path: contiguous numpy array} (`flax.traverse_util.flatten_dict`)."""
    return {key: np.ascontiguousarray(np.asarray(value))
            for key, value in traverse_util.flatten_dict(params, sep=sep).items()}


def unflatten_params(flat: dict, sep="/") -> dict:
    """The nested Flax parameter dict of `flatten_params`'s output."""
    return traverse_util.unflatten_dict(flat, sep=sep)


def save_flax_params(params, config: dict, folder) -> Path:
    from safetensors.numpy import save

    folder = Path(folder)
    atomic_write_bytes(folder / FLAX_PARAMS_NAME, save(flatten_params(params)))
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def load_flax_params(folder) -> tuple[dict, dict]:
    folder = Path(folder)
    config_path, params_path = folder / CONFIG_NAME, folder / FLAX_PARAMS_NAME
    for path in (config_path, params_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {folder} (write one with `python -m conversion to-flax`)")
    return json.loads(config_path.read_text()), unflatten_params(read_safetensors(params_path))
