"""Load an exported flow map (`python -m conversion export`) into JAX: the twin of `torch_ref.export_loading`.

The folder is a stock diffusers `UNet2DConditionModel` (class_embed_type="timestep": `class_labels` is the
target time t) plus flowmap.json (`flowmap_jax.spec.export_format`). `load_flow_map_export(folder, dtype)`
reads config.json, flowmap.json and the safetensors weights into Flax parameters (nested dict of numpy
arrays, every key and shape checked against the config); `jax_flow_map(exported, dtype)` wraps the Flax UNet
port as a `flowmap_jax.core.flow_map.FlowMap` (images (B, H, W, C), channels last). Uses: to continue training,
to initialise a student or a teacher from it, and to sample (`flowmap_jax.sample`).

Unlike the PyTorch twin, the parameters and the network are separate (Flax modules hold no weights), so
`load_flow_map_export` returns the parameters and `jax_flow_map` builds the map to call with them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from flowmap_jax.spec.export_format import (
    UNET_CONFIG_NAME,
    ExportFormatError,
    FlowMapConfig,
    read_export,
)
from flowmap_jax.spec.label_table import read_label_embeddings
from flowmap_jax.unet.config import UNetConfig
from flowmap_jax.unet.diffusers_io import read_state_dict
from flowmap_jax.unet.state_dict import state_dict_to_flax

__all__ = ["FlowMapExport", "jax_flow_map", "load_flow_map_export"]


@dataclasses.dataclass
class FlowMapExport:
    """An exported flow map read back for JAX.

    params: Flax parameters (nested dict of numpy arrays, float32 as stored unless a dtype was asked),
        to continue training or to sample; unet_config: the diffusers config dict; config: schedule,
        prediction type, guidance, conditioning; metadata: flowmap.json as read (provenance included).
    """

    folder: Path
    params: dict
    unet_config: dict
    config: FlowMapConfig
    metadata: dict

    @property
    def provenance(self) -> dict:
        return dict(self.metadata.get("provenance") or {})

    def label_table(self) -> np.ndarray | None:
        """(K + 1, D) float32 label embeddings (row K the null label), or None."""
        return None if self.config.label_embeddings is None else read_label_embeddings(self.config.label_embeddings)


def load_flow_map_export(folder, dtype=None) -> FlowMapExport:
    """Reads an exported flow map into JAX-ready numpy params. `dtype` (e.g. np.float32) casts the weights;
    None keeps them as stored (bit-exact re-export). Raises ExportFormatError / FileNotFoundError /
    ConversionError naming the file and key when the folder is not a valid flow-map export."""
    info = read_export(folder)
    try:
        config = UNetConfig.from_dict(info.unet_config)
    except ValueError as err:
        raise ExportFormatError(f"{info.folder / UNET_CONFIG_NAME}: {err}") from None
    state = read_state_dict(info.folder)
    params = state_dict_to_flax(state, config, dtype=dtype, source=f"weights in {info.folder}")
    return FlowMapExport(folder=info.folder, params=params, unet_config=info.unet_config, config=info.config,
                         metadata=info.metadata)


def jax_flow_map(exported: FlowMapExport, dtype=None, jit: bool = True):
    """A `flowmap_jax.core.flow_map.FlowMap` over the exported UNet (Flax port, compute dtype `dtype`, default
    float32; parameters stay as stored). The network is jitted once per input shape (`jit=False` for
    use inside an enclosing jit). Call it as flow_map(params, x (B, H, W, C), s, t, cond)."""
    import jax
    import jax.numpy as jnp

    from flowmap_jax.core.flow_map import FlowMap, unet_network
    from flowmap_jax.unet import FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(exported.unet_config), dtype=dtype or jnp.float32)
    net = unet_network(unet)
    return FlowMap(net=jax.jit(net) if jit else net, schedule=exported.config.schedule,
                   prediction_type=exported.config.prediction_type,
                   parameterization=exported.config.parameterization)
