"""Reading and writing diffusers UNet folders (config.json + safetensors), with no torch and no pickle.

A folder is `<root>/<subfolder>/config.json` plus `diffusion_pytorch_model[.<variant>].safetensors`,
or a sharded set with `diffusion_pytorch_model[.<variant>].safetensors.index.json`. A hub id is
fetched with `huggingface_hub.snapshot_download` (safetensors and config only) where a network
exists. Legacy `.bin` / `.ckpt` files are refused unless the caller opts in, and are then read with
`torch.load(weights_only=True)`, never as an arbitrary pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from flowmap_jax.unet import UNetConfig
from flowmap_jax.unet.state_dict import flax_to_state_dict, state_dict_to_flax

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"


def resolve_folder(path_or_hub_id: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local folder (joined with `subfolder`), or a hub snapshot of it; errors name the path."""
    path = Path(path_or_hub_id)
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder} (teacher {path_or_hub_id!r}, subfolder {subfolder!r})")
        return folder
    repo_id = str(path_or_hub_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_hub_id!r} is neither an existing folder nor a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        root = snapshot_download(repo_id, allow_patterns=[f"{prefix}{CONFIG_NAME}", f"{prefix}*.safetensors*"])
    except Exception as err:  # offline, unknown repo, ...
        raise FileNotFoundError(f"could not fetch hub id {repo_id!r} (subfolder {subfolder!r}): {err}") from None
    return resolve_folder(root, subfolder)


def read_unet_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder} (is this a diffusers UNet folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return []


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy; a truncated or corrupt file names itself."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {err}") from None


def read_state_dict(folder: Path, variant: str | None = None, allow_torch_bin: bool = False) -> dict[str, np.ndarray]:
    """The UNet weights of `folder` as {diffusers key: numpy array}."""
    folder = Path(folder)
    files = _weight_files(folder, variant)
    if files:
        state = {}
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file} listed in the index of {folder} is missing")
            state.update(read_safetensors(file))
        return state
    legacy = [p for p in folder.glob(f"{WEIGHTS_NAME}*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    if legacy and not allow_torch_bin:
        raise ValueError(
            f"{folder} has only pickle-based weights ({legacy[0].name}); refusing to unpickle a user file. "
            "Convert it to safetensors, or pass allow_torch_bin=True (--allow-torch-bin) to read it with "
            "torch.load(weights_only=True)."
        )
    if legacy:
        import pickle

        import torch

        try:
            state = torch.load(legacy[0], map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
            raise ValueError(f"refused to load {legacy[0]}: torch.load(weights_only=True) found more than tensors "
                             f"in it or could not read it ({detail}); nothing in it was run") from None
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
    raise FileNotFoundError(f"no {WEIGHTS_NAME}{'.' + variant if variant else ''}.safetensors in {folder}")


def load_diffusers_unet(path_or_hub_id, subfolder: str | None = None, variant: str | None = None,
                        dtype=np.float32, allow_torch_bin: bool = False) -> tuple[dict, dict]:
    """A diffusers UNet folder or hub id -> (config dict, nested Flax params of numpy arrays).

    `dtype` casts the weights (float32 by default: fp16 variants are trained in fp32 here); None
    keeps them as stored.
    """
    folder = resolve_folder(path_or_hub_id, subfolder)
    config = read_unet_config(folder)
    try:
        unet_config = UNetConfig.from_dict(config)
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG_NAME}: {err}") from None
    state = read_state_dict(folder, variant, allow_torch_bin)
    params = state_dict_to_flax(state, unet_config, dtype=dtype, source=f"weights in {folder}")
    return config, params


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename: a failure leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state_dict: dict[str, np.ndarray], config: dict, folder) -> Path:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` into `folder` (atomically each)."""
    from safetensors.numpy import save

    folder = Path(folder)
    atomic_write_bytes(folder / f"{WEIGHTS_NAME}.safetensors", save(state_dict, metadata={"format": "pt"}))
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def save_diffusers_unet(params, config, folder) -> Path:
    """Flax params + config (dict or UNetConfig) -> a diffusers folder `from_pretrained` loads."""
    unet_config = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(dict(config))
    state = flax_to_state_dict(params, unet_config)
    return save_state_dict(state, unet_config.to_dict(), folder)
