"""`conversion.export`: the export writer's public functions, re-exported for the command line and scripts.

The writer is `flowmap_jax.training.export_writer` (`export_flow_map`, `student_unet_config`), the command's entry
point `flowmap_jax.training.export_command.export_checkpoint` (full and LoRA runs);
reading an export back is `flowmap_jax.core.export_loading.load_flow_map_export`. `python -m conversion export`
(`conversion.cli_commands.Export`) calls `export_checkpoint`.
"""

from flowmap_jax.core.export_loading import load_flow_map_export
from flowmap_jax.training.export_command import export_checkpoint
from flowmap_jax.training.export_writer import export_flow_map, student_unet_config

__all__ = ["export_checkpoint", "export_flow_map", "load_flow_map_export", "student_unet_config"]
