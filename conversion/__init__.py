"""diffusers/PyTorch <-> Flax weight conversion for the UNet (numpy and safetensors; torch optional).

CLI: `python -m conversion --help`.
"""

from conversion.diffusers_io import (
    load_diffusers_unet,
    read_state_dict,
    read_unet_config,
    resolve_folder,
    save_diffusers_unet,
    save_state_dict,
)
from conversion.state_dict import ConversionError, flax_to_state_dict, state_dict_to_flax

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
