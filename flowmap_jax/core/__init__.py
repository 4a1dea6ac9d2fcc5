"""The flow-map core in JAX: the math every user of a flow map needs, training or not.

`schedules` -> `predictions` -> `teacher`, `flow_map` -> `samplers` -> `objectives`; `time_pairs` (training
(s, t) draws); `export_loading` (an exported flow map into JAX); `atomic_folder` (folder replacement for
writers). `torch_ref` mirrors the numerical modules by name. Imports `spec`, `unet`, `cli` and `data`'s
pure teacher folder only; never `training`. Import the modules directly (`from flowmap_jax.core import
samplers`); importing this package loads nothing.
"""
