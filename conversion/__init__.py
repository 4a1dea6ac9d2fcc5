"""diffusers/PyTorch <-> Flax weight conversion for the UNet (numpy and safetensors; torch optional).

The command-line tools (`python -m conversion --help`). The weight mapping itself lives with the Flax UNet
port (`flowmap_jax.unet.key_map`, `.state_dict`, `.diffusers_io`) and the export writer in
`flowmap_jax.training.export_writer`; this package re-exports their public functions (`conversion.export`) and
imports nothing from the trainer (`tests/test_import_graph.py`).
"""

from flowmap_jax.unet.diffusers_io import (
    load_diffusers_unet,
    read_state_dict,
    read_unet_config,
    resolve_folder,
    save_diffusers_unet,
    save_state_dict,
)
from flowmap_jax.unet.state_dict import (
    ConversionError,
    flax_to_state_dict,
    state_dict_to_flax,
)

__all__ = [
    "ConversionError",
    "flax_to_state_dict",
    "load_diffusers_unet",
    "read_state_dict",
    "read_unet_config",
    "resolve_folder",
    "save_diffusers_unet",
    "save_state_dict",
    "state_dict_to_flax",
]
