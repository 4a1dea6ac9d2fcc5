"""Load an exported flow map (`python -m conversion export`) in PyTorch, with no jax.

The folder is a stock diffusers `UNet2DConditionModel` (class_embed_type="timestep": `class_labels` is the
target time t) plus flowmap.json (`flowmap_jax.spec.export_format`: schedule, prediction type, guidance,
conditioning). `load_flow_map_export(folder, device, dtype)` builds the UNet from config.json, loads the
safetensors strictly (every key, every shape), checks flowmap.json, and wraps it as a
`torch_ref.flow_map.FlowMap`: X(x_s, s, t) in the teacher's own parameterisation, images (B, C, H, W).

Precision: the UNet runs in `dtype` (float32, float16 or bfloat16); the sampler's state x, the times and the
jump coefficients stay float32 (`ExportedUNetNetwork` casts the network's inputs to `dtype` and its output
back to float32), so low precision only touches the network evaluations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from flowmap_jax.spec.export_format import (
    ExportFormatError,
    FlowMapConfig,
    check_unet_hooks,
    config_from_metadata,
    read_export,
)
from flowmap_jax.spec.label_table import check_labels, read_label_embeddings
from flowmap_jax.spec.sampling_inputs import resolve_guidance
from torch_ref.flow_map import FlowMap, UNetNetwork, guidance_input_cond

__all__ = [
    "DTYPES",
    "ExportedUNetNetwork",
    "TorchFlowMapExport",
    "flow_map_from_unet",
    "load_flow_map_export",
    "load_unet",
    "torch_dtype",
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cast_tree(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype) for k, v in value.items()}
    return value


class ExportedUNetNetwork(UNetNetwork):
    """`UNetNetwork` (target time -> class_labels) that runs the UNet in its own dtype: x and the floating
    cond tensors are cast to it, the prediction back to x's dtype. In float32 it is `UNetNetwork` exactly."""

    def forward(self, x, t_source, t_target, cond=None):
        dtype = self.unet.dtype
        kwargs = _cast_tree(dict(cond or {}), dtype)
        out = self.unet(x.to(dtype), t_source, class_labels=t_target, **kwargs).sample
        return out.to(x.dtype)


@dataclasses.dataclass
class TorchFlowMapExport:
    """An exported flow map in PyTorch.

    unet: diffusers UNet2DConditionModel (eval, on `device`, in `dtype`); flow_map: FlowMap over it
    (call flow_map(None, x (B, C, H, W) float32, s, t, cond)); config: schedule, prediction type, guidance,
    conditioning; unet_config: config.json; metadata: flowmap.json; label_table: (K + 1, D) float32 tensor
    on `device` or None.
    """

    folder: Path
    unet: torch.nn.Module
    flow_map: FlowMap
    config: FlowMapConfig
    unet_config: dict
    metadata: dict
    label_table: torch.Tensor | None
    device: torch.device
    dtype: torch.dtype

    def cond(self, batch: int, labels=None, encoder_hidden_states=None, added_cond_kwargs=None,
             guidance_scale=None) -> dict | None:
        """The UNet keyword arguments for a batch: encoder_hidden_states from `labels` ((B,) ints, through the
        label table) or given ((B, L, D)), added_cond_kwargs as given, and timestep_cond = LCM embedding of
        (w - 1) where the guidance scale is an input (w default: the recorded scale). float32 on `device`."""
        cond = {}
        if labels is not None:
            if self.label_table is None:
                raise ValueError(f"{self.folder} has no label embeddings; pass encoder_hidden_states")
            labels = torch.as_tensor(labels).cpu().numpy()
            labels = torch.as_tensor(check_labels(labels, self.label_table.shape[0] - 1), device=self.device)
            cond["encoder_hidden_states"] = self.label_table[labels][:, None, :]
        if encoder_hidden_states is not None:
            cond["encoder_hidden_states"] = torch.as_tensor(encoder_hidden_states, dtype=torch.float32,
                                                            device=self.device)
        if added_cond_kwargs is not None:
            cond["added_cond_kwargs"] = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device)
                                         for k, v in added_cond_kwargs.items()}
        w = resolve_guidance(self.config, guidance_scale)
        if w is not None:
            scales = torch.full((batch,), float(w), dtype=torch.float32, device=self.device)
            cond = guidance_input_cond(cond, scales, self.config.guidance_embedding_dim)
        return cond or None


def torch_dtype(dtype) -> torch.dtype:
    """A torch dtype, or its name in DTYPES ("fp32", "bf16", "float16", ...) -> the torch dtype; ValueError naming
    the known names otherwise."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return dtype


def load_unet(folder, device="cpu", dtype=torch.float32):
    """The stock diffusers UNet2DConditionModel of an export, weights loaded strictly from its safetensors
    (a missing, unexpected or wrong-shape key is an ExportFormatError naming the file and the keys)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    info = read_export(folder)
    unet = UNet2DConditionModel.from_config(info.unet_config)
    state = load_file(str(info.weights_path))
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        lines = [f"{info.weights_path} does not match {info.folder / 'config.json'}:"]
        lines += [f"  missing key {k}" for k in missing[:20]]
        lines += [f"  unexpected key {k}" for k in unexpected[:20]]
        lines += [f"  wrong shape for {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:20]]
        raise ExportFormatError("\n".join(lines))
    unet.load_state_dict(state, strict=True)
    unet = unet.to(device=device)
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    return unet.eval().requires_grad_(False), info


def load_flow_map_export(folder, device="cpu", dtype=torch.float32) -> TorchFlowMapExport:
    """An exported flow map as a PyTorch FlowMap. dtype: a torch dtype or "fp32"/"fp16"/"bf16"."""
    dtype = torch_dtype(dtype)
    device = torch.device(device)
    unet, info = load_unet(folder, device, dtype)
    return flow_map_from_unet(unet, info.unet_config, info.metadata, info.folder)


def flow_map_from_unet(unet, unet_config: dict, metadata: dict, folder=None) -> TorchFlowMapExport:
    """A loaded flow-map UNet (diffusers UNet2DConditionModel, e.g. a pipeline's `unet/`) wrapped as the
    export's FlowMap, by `metadata` (flowmap.json as a dict; `folder` resolves its label file). Device and
    dtype are the UNet's. ExportFormatError if the metadata or the UNet's hooks do not fit."""
    where = f"{folder}/flowmap.json" if folder is not None else "flowmap.json"
    config = config_from_metadata(metadata, None if folder is None else Path(folder), where)
    check_unet_hooks(dict(unet_config), config, "the flow-map UNet's config")
    flow_map = FlowMap(net=ExportedUNetNetwork(unet), schedule=config.schedule,
                       prediction_type=config.prediction_type,
                       parameterization=config.parameterization)
    device = unet.device
    table = None
    if config.label_embeddings is not None:
        table = torch.as_tensor(np.asarray(read_label_embeddings(config.label_embeddings)), device=device)
    return TorchFlowMapExport(folder=None if folder is None else Path(folder), unet=unet, flow_map=flow_map,
                              config=config, unet_config=dict(unet_config), metadata=metadata, label_table=table,
                              device=device, dtype=unet.dtype)
