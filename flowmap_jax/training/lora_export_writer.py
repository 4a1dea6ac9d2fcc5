"""Export a LoRA flow map: adapters in diffusers' LoRA format, the flow map's own inputs, flowmap.json.

    python -m conversion export runs/lora OUT            # a LoRA run: the LoRA folder (as --lora)
    python -m conversion export runs/lora OUT --lora     # the same, said explicitly
    python -m conversion export runs/lora OUT --merge    # adapters merged into the base: a full export

The folder format is `flowmap_jax.spec.lora_format` (read back by `flowmap_jax.core.lora_loading` and
`torch_ref.lora_loading`). Written atomically as a whole, like the full export (`export_writer`).

- `export_lora_flow_map(trainable, lora, base_unet_config, flow_map_config, out_dir, provenance, ...)`: the
  trainable tree of a LoRA run (`flowmap_jax.core.lora`: {"adapters", "inputs"}) -> LoRA folder.
- `export_merged_flow_map(trainable, lora, base_params, base_unet_config, ...)`: base + adapters merged in
  float32 -> a full flow-map export (`export_writer.export_flow_map`), what a full fine-tune exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flowmap_jax.core import lora as lora_core
from flowmap_jax.spec.export_format import (
    FLOWMAP_JSON,
    LABEL_EMBEDDINGS_NAME,
    FlowMapConfig,
    check_unet_hooks,
)
from flowmap_jax.spec.lora_format import FLOW_MAP_INPUTS_NAME, LORA_WEIGHTS_NAME, lora_metadata
from flowmap_jax.training.export_writer import (
    _write_folder_atomically,
    export_flow_map,
    export_metadata,
    student_unet_config,
)
from flowmap_jax.unet.diffusers_io import atomic_write_bytes
from flowmap_jax.unet.key_map import flax_path_to_torch_key, flax_to_torch_layout

__all__ = ["export_lora_flow_map", "export_merged_flow_map", "flow_map_unet_config"]

LORA_DTYPES = {"float32": np.float32, "float16": np.float16}


def flow_map_unet_config(base_unet_config: dict, inputs) -> dict:
    """The flow-map UNet's diffusers config: the base's plus the target-time hook, and time_cond_proj_dim where
    the trained inputs hold a guidance input (`export_writer.student_unet_config`)."""
    return student_unet_config(dict(base_unet_config), inputs)


def _inputs_state_dict(inputs) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {flax_path_to_torch_key(path): flax_to_torch_layout(np.asarray(leaf, np.float32), path[-1])
            for path, leaf in traverse_util.flatten_dict(inputs).items()}


def export_lora_flow_map(trainable, lora: lora_core.LoraSettings, base_unet_config: dict,
                         flow_map_config: FlowMapConfig, out_dir, provenance: dict | None = None, *,
                         base_fingerprint: str | None = None, dtype: str = "float32",
                         exported_at: str | None = None) -> Path:
    """Writes the LoRA folder of `trainable` ({"adapters", "inputs"}, as trained; numpy or jax arrays).

    lora: rank, alpha, targets of the run; alpha / rank is folded into lora_B. base_unet_config: the teacher's
    diffusers UNet config (the base). dtype: "float32" or "float16" for the adapters (the inputs stay float32).
    base_fingerprint: `core.lora.base_fingerprint` of the base weights trained on (recorded, not checked here).
    Returns the folder (absolute); atomic (see `export_writer._write_folder_atomically`).
    """
    if dtype not in LORA_DTYPES:
        raise ValueError(f"LoRA export dtype must be one of {sorted(LORA_DTYPES)}, got {dtype!r}")
    adapters, inputs = trainable[lora_core.ADAPTERS], trainable[lora_core.INPUTS]
    unet_config = flow_map_unet_config(base_unet_config, inputs)
    check_unet_hooks(unet_config, flow_map_config, "the LoRA flow map's UNet config")
    lora_state = lora_core.adapters_to_lora_state_dict(adapters, lora.scale, LORA_DTYPES[dtype])
    inputs_state = _inputs_state_dict(inputs)
    full, label_bytes = export_metadata(flow_map_config, unet_config, provenance, exported_at)
    meta = lora_metadata(full, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, unet_config=unet_config,
                         base_config=dict(base_unet_config), base_fingerprint=base_fingerprint,
                         num_adapters=lora_core.num_adapters(adapters))
    meta_bytes = (json.dumps(meta, indent=2, default=str) + "\n").encode()

    def write(folder: Path):
        from safetensors.numpy import save

        atomic_write_bytes(folder / LORA_WEIGHTS_NAME, save(lora_state, metadata={"format": "pt"}))
        atomic_write_bytes(folder / FLOW_MAP_INPUTS_NAME, save(inputs_state, metadata={"format": "pt"}))
        if label_bytes is not None:
            atomic_write_bytes(folder / LABEL_EMBEDDINGS_NAME, label_bytes)
        atomic_write_bytes(folder / FLOWMAP_JSON, meta_bytes)

    return _write_folder_atomically(Path(out_dir), write)


def export_merged_flow_map(trainable, lora: lora_core.LoraSettings, base_params, base_unet_config: dict,
                           flow_map_config: FlowMapConfig, out_dir, provenance: dict | None = None, **kwargs) -> Path:
    """The adapters merged into float32 copies of `base_params` (W + (alpha / r) B A) and written as a full
    flow-map export (`export_writer.export_flow_map`)."""
    import jax

    base32 = jax.tree.map(lambda x: np.asarray(x, np.float32), base_params)
    merged = jax.tree.map(np.asarray, lora_core.merge_params(base32, trainable, lora.scale))
    unet_config = flow_map_unet_config(base_unet_config, trainable[lora_core.INPUTS])
    provenance = dict(provenance or {}, lora={"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
                                             "merged": True})
    return export_flow_map(merged, unet_config, flow_map_config, out_dir, provenance, **kwargs)
