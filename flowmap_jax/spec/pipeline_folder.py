"""The FlowMapPipeline folder (`python -m conversion export RUN OUT --pipeline`, read by `torch_ref.pipeline`):
the names both sides agree on, and how to recognise one. Pure Python.

    OUT/model_index.json   _class_name = PIPELINE_CLASS_NAME, the components, flowmap.json under "flow_map"
    OUT/pipeline.py        PIPELINE_MODULE_SOURCE: how diffusers finds the class (it imports FlowMapPipeline; where
                           flowmap-jax is not installed, an ImportError saying `pip install "flowmap-jax[torch]"`)
    OUT/unet/              the flow map (a flow-map export: config.json, safetensors, flowmap.json)
    OUT/vae/, text_encoder/, tokenizer/ [text_encoder_2/, tokenizer_2/], scheduler/   the teacher's
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PIPELINE_CLASS_NAME", "PIPELINE_MODULE_FILE", "PIPELINE_MODULE_SOURCE", "PIPELINE_MODULE_SOURCES",
           "is_flow_map_pipeline", "is_pipeline_folder"]

PIPELINE_MODULE_FILE = "pipeline.py"
PIPELINE_CLASS_NAME = ["pipeline", "FlowMapPipeline"]
# The class is imported by name: diffusers scans a folder's module file for import lines and, for a module it
# cannot import, advises `pip install <module>`, which for `torch_ref` would name some other project.
PIPELINE_MODULE_SOURCE = '''"""diffusers loads this folder's pipeline class from here: FlowMapPipeline, from flowmap-jax (PyTorch,
no JAX needed). Install: pip install "flowmap-jax[torch]"."""

import importlib

try:
    FlowMapPipeline = importlib.import_module("torch_ref.pipeline").FlowMapPipeline
except ModuleNotFoundError as missing:
    raise ImportError(f"{missing}: this folder's FlowMapPipeline comes from flowmap-jax; "
                      'install it with: pip install "flowmap-jax[torch]"') from None
'''
# Every pipeline.py this project has written, newest first: `FlowMapPipeline.from_pretrained` trusts exactly these.
PIPELINE_MODULE_SOURCES = (
    PIPELINE_MODULE_SOURCE,
    ('"""diffusers loads this folder\'s pipeline class from here (flowmap-jax must be installed)."""\n\n'
     "from torch_ref.pipeline import FlowMapPipeline  # noqa: F401\n"),
)


def is_flow_map_pipeline(folder) -> bool:
    """True if `folder` holds a model_index.json naming FlowMapPipeline."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == PIPELINE_CLASS_NAME


def is_pipeline_folder(folder) -> bool:
    """A diffusers pipeline folder (model_index.json) whose unet/ is a flow-map export (flowmap.json)."""
    return (Path(folder) / "model_index.json").is_file() and (Path(folder) / "unet" / "flowmap.json").is_file()
