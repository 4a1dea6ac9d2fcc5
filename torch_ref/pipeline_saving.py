"""What `FlowMapPipeline.save_pretrained` adds to diffusers' own save so the folder stays a FlowMapPipeline
folder (`flowmap_jax.spec.pipeline_folder`): model_index.json's `_class_name` ["pipeline", "FlowMapPipeline"],
pipeline.py, and unet/flowmap.json, the flow map's metadata as a full flow-map export's.

A pipeline whose flow map is a LoRA (`load_flow_map`) is saved as a full flow-map pipeline folder: unet/ is the
flow-map UNet with the adapters merged (W + B A; `fused_unet_copy`), and its flowmap.json the LoRA's with
"network" naming that UNet's own files (`full_export_metadata`); the LoRA's record stays under "lora" with
"merged": true. Loading that folder needs no base and no peft.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from flowmap_jax.spec.export_format import (
    FLOWMAP_JSON,
    LORA_NETWORK_KIND,
    UNET_CONFIG_NAME,
    WEIGHTS_NAME,
    read_export,
)
from flowmap_jax.spec.pipeline_folder import (
    PIPELINE_CLASS_NAME,
    PIPELINE_MODULE_FILE,
    PIPELINE_MODULE_SOURCE,
)

__all__ = ["finish_pipeline_folder", "full_export_metadata", "fused_unet_copy", "has_lora_layers"]


def has_lora_layers(unet) -> bool:
    """True if `unet` holds peft LoRA layers (a `load_flow_map(fuse=False)` UNet, or `load_lora_weights`)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def fused_unet_copy(unet):
    """A copy of `unet` with every peft adapter merged into its weights and the LoRA layers removed (`unet`
    itself is left as it is): a plain UNet2DConditionModel, W + scale B A in each adapted module."""
    fused = copy.deepcopy(unet)
    fused.fuse_lora()
    fused.unload_lora()
    return fused


def full_export_metadata(metadata: dict) -> dict:
    """flowmap.json for a full UNet export: a LoRA export's with "network" naming config.json and the weights
    (the LoRA record kept under "lora", "merged": true); a full export's unchanged."""
    meta = copy.deepcopy(metadata)
    network = meta.get("network") or {}
    if network.get("kind") == LORA_NETWORK_KIND:
        meta["network"] = {"class": "UNet2DConditionModel", "config": UNET_CONFIG_NAME, "weights": WEIGHTS_NAME,
                           "layout": network.get("layout", "PyTorch (B, C, H, W); the Flax port takes (B, H, W, C)")}
        meta["lora"] = {**(meta.get("lora") or {}), "merged": True}
    return meta


def finish_pipeline_folder(folder, metadata: dict, label_source=None) -> Path:
    """After diffusers' `save_pretrained` into `folder`: model_index.json's class and flow_map, pipeline.py,
    unet/flowmap.json (and the label file from `label_source`, a folder, where flowmap.json names one).
    Checks unet/ reads as a flow-map export (`read_export`); returns the folder."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = list(PIPELINE_CLASS_NAME)
    index["flow_map"] = metadata
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / PIPELINE_MODULE_FILE).write_text(PIPELINE_MODULE_SOURCE)
    unet_dir = folder / "unet"
    (unet_dir / FLOWMAP_JSON).write_text(json.dumps(metadata, indent=2) + "\n")
    label = (metadata.get("conditioning") or {}).get("label_embeddings")
    if label:
        source = None if label_source is None else Path(label_source) / label
        if source is None or not source.is_file():
            raise FileNotFoundError(f"save_pretrained: flowmap.json names the label file {label!r} but it is not "
                                    f"at {source}")
        shutil.copyfile(source, unet_dir / label)
    read_export(unet_dir)  # what the sampling CLIs and the JAX loader read
    return folder
