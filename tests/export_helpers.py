"""A tiny training run on disk for the export tests: teacher folder, Orbax checkpoints, run config.

No training and no Flax init (slow on CPU): the flow-map UNet's parameters are drawn with numpy on the
shapes of `abstract_unet_params`, every tensor random (the target-time hook's last layer included, so
the target time changes the output), and saved with the trainer's own `checkpointing.Checkpointer`
inside a real `train_step.TrainState` (params, EMA, AdamW state, step).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax.spec.target_time_hook import add_target_time_hook_config

TEACHER_UNET_CONFIG = dict(
    _class_name="UNet2DConditionModel", sample_size=8, in_channels=1, out_channels=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64], layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
SCHEDULER_CONFIG = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", clip_sample=False,
                        set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")
GUIDANCE_DIM = 16
SAMPLE_SHAPE = (8, 8, 1)
NUM_LABELS = 10
STEPS = (5, 7)  # checkpoints written; 7 is the newest


def student_config() -> dict:
    """The flow map's UNet config: the teacher's, the target-time hook, a guidance input (as a run
    distilling the guidance scale would have)."""
    return dict(add_target_time_hook_config(TEACHER_UNET_CONFIG), time_cond_proj_dim=GUIDANCE_DIM)


def random_params(config: dict, seed: int = 0) -> dict:
    """Numpy float32 params of the Flax UNet for `config`: kernels ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1),
    biases N(0, 0.05)."""
    from flowmap_jax.unet import UNetConfig, abstract_unet_params

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_unet_params(UNetConfig.from_dict(config)))


def write_teacher(folder: str) -> str:
    """unet/config.json (weights are not needed to export), scheduler/scheduler_config.json and
    label_embeddings.safetensors ((K + 1, D), row K the null label)."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "unet", "config.json"), "w") as f:
        json.dump(TEACHER_UNET_CONFIG, f)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f)
    table = np.random.default_rng(1).standard_normal((NUM_LABELS + 1, 32)).astype(np.float32)
    save_file({"weight": table}, os.path.join(folder, "label_embeddings.safetensors"))
    return folder


def write_run(run_dir: str, teacher_dir: str, params: dict, ema_params: dict) -> str:
    """A run folder as the trainer leaves it: config.json and checkpoints/<step> for each of STEPS
    (step k holds params + k / 100 and ema_params + k / 1000: each step and each choice is recognisable)."""
    import optax

    from flowmap_jax.training import checkpointing
    from flowmap_jax.training import train_step as ts
    from flowmap_jax.training.config import (
        DataConfig,
        ObjectiveConfig,
        RunConfig,
        TeacherConfig,
        TrainConfig,
    )

    config = TrainConfig(
        run=RunConfig(dir=run_dir, steps=STEPS[-1], seed=0),
        teacher=TeacherConfig(path=teacher_dir, guidance_scale=2.0),
        data=DataConfig(sample_shape=SAMPLE_SHAPE, batch_size=4),
        objective=ObjectiveConfig(names=("eulerian", "pairs"), weights=(1.0, 0.5), options=json.dumps(
            {"guidance_embedding_dim": GUIDANCE_DIM, "guidance_scale_range": [1.0, 3.0]})))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(config.to_json())
    optimizer = optax.adamw(1e-3)
    with checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=5, async_save=False) as ckpt:
        for step in STEPS:
            p = jax.tree.map(lambda x: jnp.asarray(x + step / 100.0), params)
            e = jax.tree.map(lambda x: jnp.asarray(x + step / 1000.0), ema_params)
            state = ts.TrainState(step=jnp.int32(step), params=p, ema_params=e, opt_state=optimizer.init(p))
            ckpt.save(state, jax.random.key(0), data_position=4 * step, extra={"baseline": 1.0})
    return run_dir


def checkpoint_params(params: dict, step: int, weights: str) -> dict:
    """What write_run stored for (step, weights)."""
    shift = step / 100.0 if weights == "params" else step / 1000.0
    return jax.tree.map(lambda x: np.asarray(jnp.asarray(x + shift)), params)


def read_tensors(path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))
