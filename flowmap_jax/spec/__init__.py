"""The backend-free specification layer: what both backends, `conversion` and the trainer agree on.

Pure Python and numpy (pillow and safetensors where a file is read or written); nothing here imports
jax, flax, optax or torch, so `torch_ref` and the command-line front ends can use it without loading
either framework. Each module has one job:

- `prediction_types`: what a network predicts (epsilon, v_prediction, sample, flow).
- `schedule`: `ScheduleConfig` (the teacher's noise schedule and the time convention), read from a
  diffusers scheduler config; a float64 numpy `alpha_sigma`.
- `time_grid`: sampling time grids (uniform, log-SNR).
- `img2img`: image-to-image: `strength` -> the start time and grid, the noised start.
- `time_pairs`: `TimePairConfig`, how training (s, t) pairs are drawn.
- `objective_options`: `ObjectiveOptions`, the switches of the objectives.
- `target_time_hook`: the flow map's target-time hook as a diffusers UNet config.
- `export_format`: the exported flow-map folder (flowmap.json) and its reader.
- `label_table`: the label-embedding table (class labels -> encoder_hidden_states), one reader.
- `sampling_inputs`: the backend-independent inputs of sampling (noise, shape, guidance).
- `pipeline_folder`: the FlowMapPipeline folder's fixed names (model_index class, pipeline.py).
- `image_grid`: the PNG grid writer.
- `layout`: the flip between (B, C, H, W) and (B, H, W, C).

Import the modules directly (`from flowmap_jax.spec.schedule import ScheduleConfig`).
"""
