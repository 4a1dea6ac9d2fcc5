"""Load a LoRA flow map onto a base UNet in JAX: the twin of `torch_ref.lora_loading`.

    exported = load_lora_flow_map("path/to/sd15", "runs/lora/export")   # base pipeline folder (UNet in unet/)
    flow_map = jax_flow_map(exported)                                     # flowmap_jax.core.export_loading

The base is any diffusers UNet folder of the architecture the LoRA records (the teacher, or a fine-tune of it:
how good the map is there is for the user to judge). The result is a `FlowMapExport` whose params are the
base's with the target-time hook (and guidance input) from flowmap_inputs.safetensors and each adapted kernel
merged, W + B A (the file's lora_B carries alpha / r), in float32; unet_config is the base's config plus the
hooks. Errors name the file and the key: a missing file, a rank that is not flowmap.json's, an adapter or input
that does not fit the base, a base of another architecture.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from flowmap_jax.core import lora as lora_core
from flowmap_jax.core.export_loading import FlowMapExport
from flowmap_jax.spec.export_format import FLOWMAP_JSON, ExportFormatError
from flowmap_jax.spec.lora_format import (
    base_unet_subfolder,
    check_base_architecture,
    check_flow_map_inputs,
    check_lora_rank,
    read_lora_export,
)
from flowmap_jax.spec.target_time_hook import hooked_unet_config
from flowmap_jax.unet.config import UNetConfig
from flowmap_jax.unet.diffusers_io import load_diffusers_unet, read_safetensors
from flowmap_jax.unet.key_map import expected_key_map, torch_to_flax_layout
from flowmap_jax.unet.unet_2d_condition import abstract_unet_params

__all__ = ["load_lora_flow_map", "read_flow_map_inputs"]


def read_flow_map_inputs(path: Path, unet_config: dict, base_params) -> dict:
    """flowmap_inputs.safetensors -> the Flax tree of the flow map's own inputs: exactly the parameters the hooked
    config has and the base lacks, each of the expected shape (ExportFormatError naming the key otherwise)."""
    from flax import traverse_util

    expected = expected_key_map(abstract_unet_params(UNetConfig.from_dict(unet_config)))
    base_paths = set(traverse_util.flatten_dict(base_params))
    wanted = {key: value for key, value in expected.items() if value[0] not in base_paths}
    state = read_safetensors(path)
    check_flow_map_inputs({key: shape for key, (_, shape) in wanted.items()}, {k: v.shape for k, v in state.items()},
                          path)
    flat = {flax_path: torch_to_flax_layout(np.asarray(state[key], np.float32), flax_path[-1])
            for key, (flax_path, _) in wanted.items()}
    return traverse_util.unflatten_dict(flat)


def load_lora_flow_map(base, lora_folder, subfolder: str | None = "unet") -> FlowMapExport:
    """A LoRA flow map (`python -m conversion export RUN OUT --lora`) on the diffusers UNet at base/subfolder
    (subfolder None or "" when `base` is the UNet folder itself; a folder without unet/ is taken as the UNet
    folder). Returns a FlowMapExport with merged float32 params (see the module docstring)."""
    info = read_lora_export(lora_folder)
    subfolder, config_path = base_unet_subfolder(base, subfolder)
    base_config, base_params = load_diffusers_unet(base, subfolder=subfolder)
    check_base_architecture(base_config, info.base_architecture, str(info.folder / FLOWMAP_JSON), str(config_path))
    state = read_safetensors(info.lora_weights_path)
    check_lora_rank({k: v.shape for k, v in state.items()}, info)
    try:
        adapters = lora_core.adapters_from_lora_state_dict(state, str(info.lora_weights_path))
        lora_core.check_adapters_fit(adapters, base_params, str(info.lora_weights_path))
    except ValueError as err:
        raise ExportFormatError(str(err)) from None
    unet_config = hooked_unet_config(base_config, info.config.guidance_embedding_dim)
    inputs = read_flow_map_inputs(info.inputs_path, unet_config, base_params)
    merged = lora_core.merge_params(base_params, {lora_core.ADAPTERS: adapters, lora_core.INPUTS: inputs}, 1.0)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), merged)
    return FlowMapExport(folder=info.folder, params=params, unet_config=unet_config, config=info.config,
                         metadata=info.metadata)
