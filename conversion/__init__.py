"""diffusers/PyTorch <-> Flax weight conversion for the UNet (numpy and safetensors; torch optional).

The command-line tools (`python -m conversion --help`). The weight mapping itself lives with the Flax UNet
port (`flowmap_jax.unet.key_map`, `.state_dict`, `.diffusers_io`) and the export writer in
`flowmap_jax.training.export_writer`; this package re-exports their public functions (`conversion.export`) and
imports nothing from the trainer (`tests/test_import_graph.py`).

The re-exports below are imported on first use (PEP 562 `__getattr__`): the Flax port needs the "jax" extra,
and `python -m conversion` imports this package before its command line, which then says on one line which
extra to install instead of failing here with a traceback.
"""

_STATE_DICT = ("ConversionError", "flax_to_state_dict", "state_dict_to_flax")
_DIFFUSERS_IO = ("load_diffusers_unet", "read_state_dict", "read_unet_config", "resolve_folder",
                 "save_diffusers_unet", "save_state_dict")

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


def __getattr__(name: str):
    if name in _STATE_DICT:
        from flowmap_jax.unet import state_dict

        return getattr(state_dict, name)
    if name in _DIFFUSERS_IO:
        from flowmap_jax.unet import diffusers_io

        return getattr(diffusers_io, name)
    raise AttributeError(f"module 'conversion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
