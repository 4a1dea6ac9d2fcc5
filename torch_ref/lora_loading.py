"""Load a LoRA flow map onto a base UNet in PyTorch: the twin of `flowmap_jax.core.lora_loading`.

    exported = load_lora_flow_map("path/to/sd15", "runs/lora/export")   # base pipeline folder (UNet in unet/)
    x_t = exported.flow_map(None, x_s, s, t, exported.cond(B, encoder_hidden_states=text))   # (B, C, H, W)

The folder is `flowmap_jax.spec.lora_format`'s (`python -m conversion export RUN OUT --lora`). The flow-map UNet
is a diffusers `UNet2DConditionModel` built from the base's config plus the target-time hook (and the guidance
input where flowmap.json has one), holding the base's weights and flowmap_inputs.safetensors (the only keys
the base lacks), with the adapters of pytorch_lora_weights.safetensors loaded by diffusers' own loader
(`UNet2DConditionModel.load_lora_adapter`, peft LoRA layers, adapter name "flow_map", alpha = r: the file's
lora_B already carries alpha / r). `fuse=True` merges them into the weights (`fuse_lora` then `unload_lora`):
a plain UNet, W + B A in each adapted module. Times: teacher timesteps, as in every flow-map export.

Errors name the file and the key: a missing file (FileNotFoundError), a rank that is not flowmap.json's, an
adapter or input that does not fit the base, a base of another architecture (ExportFormatError).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowmap_jax.spec.export_format import FLOWMAP_JSON, ExportFormatError
from flowmap_jax.spec.lora_format import (
    LORA_KEY_PREFIX,
    LORA_WEIGHTS_NAME,
    LoraExportInfo,
    base_unet_subfolder,
    check_base_architecture,
    check_flow_map_inputs,
    check_lora_rank,
    read_lora_export,
)
from flowmap_jax.spec.target_time_hook import hooked_unet_config
from torch_ref.export_loading import TorchFlowMapExport, flow_map_from_unet, torch_dtype

__all__ = ["ADAPTER_NAME", "load_lora_flow_map", "lora_flow_map_unet", "read_flow_map_inputs"]

ADAPTER_NAME = "flow_map"


def read_flow_map_inputs(path: Path, unet, base_state: dict) -> dict:
    """flowmap_inputs.safetensors -> {diffusers key: float32 tensor}: exactly the parameters the hooked `unet`
    has and `base_state` (the base's state dict) lacks, each of the shape the hooked UNet expects
    (ExportFormatError naming the file and the key otherwise)."""
    expected = {key: tuple(value.shape) for key, value in unet.state_dict().items() if key not in base_state}
    state = load_file(str(path))
    check_flow_map_inputs(expected, {key: tuple(value.shape) for key, value in state.items()}, path)
    return {key: value.float() for key, value in state.items()}


def _lora_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a safetensors file, read from its header (no tensor loaded)."""
    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)


def _to(unet, device, dtype):
    """`unet` on `device` in `dtype`, cast only when its dtype differs (diffusers warns on every dtype `to`)."""
    unet = unet.to(device=device)
    return unet if unet.dtype == dtype else unet.to(dtype=dtype)


def _check_adapters_fit(path: Path, unet) -> None:
    """Each adapter of the LoRA file names a Linear or Conv2d of `unet` and fits its weight (lora_A (r, in[, kh,
    kw]), lora_B (out, r[, 1, 1])); ExportFormatError naming the file and the key otherwise. A check before
    diffusers' loader, which would warn and skip an unknown module or fail deep inside peft on a wrong shape."""
    modules = dict(unet.named_modules())
    for key, shape in sorted(_lora_shapes(path).items()):
        name = key[len(LORA_KEY_PREFIX):] if key.startswith(LORA_KEY_PREFIX) else None
        module_name, _, half = (name or "").rpartition(".lora_")
        module = modules.get(module_name)
        if name is None or half not in ("A.weight", "B.weight"):
            raise ExportFormatError(f"{path}: key {key!r} is not a '{LORA_KEY_PREFIX}<module>.lora_A.weight' / "
                                    "'.lora_B.weight' key")
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise ExportFormatError(f"{path}: key {key!r} names no Linear or Conv2d module of the base UNet (a base "
                                    "of another architecture?)")
        weight = tuple(module.weight.shape)
        r = shape[0] if half == "A.weight" else (shape[1] if len(shape) > 1 else -1)
        if half == "A.weight":
            fits = shape == (r, weight[1], *weight[2:])
        else:
            fits = shape == (weight[0], r, *((1, 1) if len(weight) == 4 else ()))
        if not fits:
            raise ExportFormatError(f"{path}: key {key!r} has shape {shape}, which does not fit the base's "
                                    f"{module_name}.weight {weight} (a base of another architecture?)")


def lora_flow_map_unet(base_unet, info: LoraExportInfo, fuse: bool = False,
                       base_where: str = "the base UNet's config"):
    """The flow-map UNet of a LoRA (`info`, from `read_lora_export`) on an already-loaded base
    UNet2DConditionModel (left unchanged: its weights are copied). Returns a new UNet2DConditionModel (eval,
    no gradients) on the base's device and in its dtype, with the adapters loaded as peft LoRA layers named
    ADAPTER_NAME, or merged into the weights when `fuse`. base_where: how errors name the base's config."""
    from diffusers import UNet2DConditionModel

    where = str(info.folder / FLOWMAP_JSON)
    base_config = dict(base_unet.config)
    check_base_architecture(base_config, info.base_architecture, where, base_where)
    check_lora_rank(_lora_shapes(info.lora_weights_path), info)
    unet = UNet2DConditionModel.from_config(hooked_unet_config(base_config, info.config.guidance_embedding_dim))
    base_state = base_unet.state_dict()
    expected = unet.state_dict()
    for key, value in base_state.items():
        if key not in expected:
            raise ExportFormatError(f"{base_where}: the base UNet has key {key!r}, which the flow-map UNet "
                                    "(the base's config plus the hooks) lacks")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ExportFormatError(f"{base_where}: the base UNet's key {key!r} has shape {tuple(value.shape)}, the "
                                    f"flow-map UNet's {tuple(expected[key].shape)}")
    inputs = read_flow_map_inputs(info.inputs_path, unet, base_state)
    unet.load_state_dict({**{k: v.float() for k, v in base_state.items()}, **inputs}, strict=True)
    _check_adapters_fit(info.lora_weights_path, unet)
    unet = _to(unet, base_unet.device, base_unet.dtype)
    unet.load_lora_adapter(str(info.folder), weight_name=LORA_WEIGHTS_NAME, prefix=LORA_KEY_PREFIX.rstrip("."),
                           adapter_name=ADAPTER_NAME)
    if fuse:
        unet.fuse_lora(adapter_names=[ADAPTER_NAME])
        unet.unload_lora()
    unet = _to(unet, base_unet.device, base_unet.dtype)  # peft's new layers too
    return unet.eval().requires_grad_(False)


def _base_unet(base, subfolder: str | None):
    """(UNet2DConditionModel, the path of its config.json) from a pipeline folder (UNet in `subfolder`) or a UNet
    folder; FileNotFoundError naming a missing folder or config.json."""
    from diffusers import UNet2DConditionModel

    path = Path(base)
    if not path.is_dir():
        raise FileNotFoundError(f"no base UNet folder at {path}")
    subfolder, config_path = base_unet_subfolder(path, subfolder)
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json at {config_path.parent} (the base UNet: a diffusers pipeline folder "
                                "with unet/, or a UNet folder)")
    try:
        json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{config_path} is not valid JSON: {err}") from None
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder=subfolder)
    return unet, config_path


def load_lora_flow_map(base, lora_folder, subfolder: str | None = "unet", device="cpu", dtype=torch.float32,
                       fuse: bool = False) -> TorchFlowMapExport:
    """A LoRA flow map (`python -m conversion export RUN OUT --lora`) on the diffusers UNet at base/subfolder
    (subfolder None or "" when `base` is the UNet folder itself; a folder without unet/ is taken as the UNet
    folder), or on an already-loaded UNet2DConditionModel `base`. The UNet runs in `dtype` (a torch dtype or
    "fp32"/"fp16"/"bf16") on `device`; fuse: merge the adapters into the weights (see the module docstring).
    Returns the TorchFlowMapExport (flow_map over x (B, C, H, W) float32, teacher times)."""
    dtype = torch_dtype(dtype)
    info = read_lora_export(lora_folder)
    if isinstance(base, torch.nn.Module):
        base_unet, base_where = base, "the base UNet's config"
    else:
        base_unet, config_path = _base_unet(base, subfolder)
        base_where = str(config_path)
    unet = lora_flow_map_unet(base_unet, info, fuse=fuse, base_where=base_where)
    unet = _to(unet, torch.device(device), dtype)
    return flow_map_from_unet(unet, dict(unet.config), info.metadata, info.folder)
