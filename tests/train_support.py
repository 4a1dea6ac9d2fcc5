"""Stand-in parts for the training tests: a tiny MLP flow map and an analytic teacher.

The trainer's mechanics (sharding, checkpoints, resume, preemption, NaN, distributed) do not depend
on the network, so most training tests use this instead of the digits UNet: it compiles in a second.
Run as a program it is the trainer with these parts:

    python -m tests.train_support --run.dir /tmp/x --run.steps 20 ...   (same flags as flowmap_jax.train)

Extra environment knobs (subprocess tests): STANDIN_STEP_SLEEP (seconds to sleep after each batch is
drawn, to make a run slow enough to kill), STANDIN_NAN_AFTER=K (batches after the K-th are NaN, so
the loss of step K + 1 is NaN), STANDIN_DISK_FULL_AT=K (the checkpoint of step K fails as on a full
disk: its metadata file is cut short and the write raises OSError(ENOSPC) in Orbax's save thread while
the array item is still being written; see `fill_disk_at`).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax.core import example_keys
from flowmap_jax.training import assembly, train_cli
from flowmap_jax.data import datasets

SHAPE = (4, 4, 1)
HIDDEN = 64


def teacher_map(teacher, x, s, t):
    """The 'exact' flow map of the stand-in teacher: a linear contraction x -> exp(-(s - t)) A x."""
    flat = x.reshape(x.shape[0], -1)
    out = jnp.exp(-(s - t))[:, None] * (flat @ teacher["A"])
    return out.reshape(x.shape)


def network(params, x, s, t):
    flat = x.reshape(x.shape[0], -1)
    h = jnp.concatenate([flat, s[:, None], t[:, None]], axis=1)
    h = jnp.tanh(h @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    out = flat + h @ params["dense2"]["kernel"]
    return out.reshape(x.shape)


def init_params(seed=0):
    d = int(np.prod(SHAPE))
    rng = np.random.default_rng(seed)
    return {"dense1": {"kernel": (rng.normal(size=(d + 2, HIDDEN)) / np.sqrt(d + 2)).astype(np.float32),
                       "bias": np.zeros(HIDDEN, np.float32)},
            "dense2": {"kernel": (rng.normal(size=(HIDDEN, d)) * 0.01).astype(np.float32)}}


def make_loss():
    def loss_fn(params, teacher, batch, rng):
        x0 = batch["x0"]
        b = x0.shape[0]
        k_noise, k_s, k_t = example_keys.split(rng, 3)  # rng: the step's (B,) per-example keys
        s = example_keys.draw(k_s, b, lambda key, n: jax.random.uniform(key, (n,)))
        t = s * example_keys.draw(k_t, b, lambda key, n: jax.random.uniform(key, (n,)))
        x_s = x0 + s[:, None, None, None] * example_keys.draw(
            k_noise, b, lambda key, n: jax.random.normal(key, (n,) + x0.shape[1:]))
        err = network(params, x_s, s, t) - teacher_map(teacher, x_s, s, t)
        loss = jnp.mean(err ** 2)
        return loss, {"mse": jnp.mean(err ** 2)}
    return loss_fn


def dataset(n=256, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    centres = np.stack([np.full(SHAPE, v, np.float32) for v in (-0.5, 0.0, 0.5)])
    x0 = centres[labels] + 0.1 * rng.normal(size=(n, *SHAPE)).astype(np.float32)
    return datasets.ArrayDataset(x0.astype(np.float32))


def build(config, mesh) -> assembly.Parts:
    del mesh
    teacher = {"A": (np.eye(int(np.prod(SHAPE))) * 0.9).astype(np.float32)}
    nan_after = int(os.environ.get("STANDIN_NAN_AFTER", "0"))
    sleep = float(os.environ.get("STANDIN_STEP_SLEEP", "0"))
    data = dataset()
    if nan_after:
        calls = [0]
        get_finite = data.get

        def get_with_nan(indices):
            calls[0] += 1
            batch = get_finite(indices)
            if calls[0] > nan_after:
                batch["x0"] = np.full_like(batch["x0"], np.nan)
            return batch

        data.get = get_with_nan
    if sleep:
        get = data.get

        def slow_get(indices):
            time.sleep(sleep)
            return get(indices)

        data.get = slow_get

    def eval_inputs(n, seed):
        return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32), None, None

    @jax.jit
    def _jumps(params, noise, grid):
        x = noise
        for i in range(grid.shape[0] - 1):
            s = jnp.full((x.shape[0],), grid[i])
            t = jnp.full((x.shape[0],), grid[i + 1])
            x = network(params, x, s, t)
        return x

    def sample_flow(params, teacher, noise, cond, jumps):
        return _jumps(params, noise, jnp.linspace(1.0, 0.0, jumps + 1))

    def sample_teacher(teacher, noise, cond, steps):
        s = jnp.ones((noise.shape[0],))
        return teacher_map(teacher, noise, s, 0.0 * s)

    def export(params, folder, provenance):
        os.makedirs(folder, exist_ok=True)
        from safetensors.numpy import save_file

        flat = {"/".join(k): np.asarray(v) for k, v in _flatten(params)}
        save_file(flat, os.path.join(folder, "params.safetensors"))
        return folder

    return assembly.Parts(params=init_params(config.run.seed), teacher=teacher, loss_fn=make_loss(),
                          dataset=data, eval_inputs=eval_inputs, sample_flow=sample_flow,
                          sample_teacher=sample_teacher, quality=lambda samples, labels: None, export=export)


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


STANDIN_FLAGS = ["--data.sample_shape", "4,4,1", "--objective.names", "pairs", "--data.batch_size", "16",
                 "--optim.lr", "3e-3", "--optim.warmup_steps", "5", "--run.quality_samples", "32",
                 "--run.progress_bar", "false"]
"""Flags that describe the stand-in (prepended; later flags override). Its `build` ignores the objective;
`--objective.names` is a real name because the parser accepts only those."""


def fill_disk_at(step: int, late_write_s: float = 0.5) -> None:
    """Make the checkpoint of `step` fail with ENOSPC inside Orbax's background save, with the step's
    other writes still running when the failure is reported: the worst case, made certain.

    Orbax writes a step's items concurrently (one thread per write) and its background thread awaits
    them in item-name order ("meta" before "state"), stopping at the first failure. So the JSON "meta"
    item's ENOSPC is raised while the "state" item's arrays and metadata may still be written. Here
    the state item's last write (its metadata, after its arrays) is held until the JSON write has
    failed and then `late_write_s` more, so it lands in the step's temporary folder after the trainer
    has heard of the failure; the trainer must wait for it before removing that folder."""
    import asyncio
    import errno
    import threading

    from orbax.checkpoint._src.handlers import (
        base_pytree_checkpoint_handler as pytree_handler,
    )
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

    def of_step(directory) -> bool:  # <checkpoints>/<step>.orbax-checkpoint-tmp*/<item>.orbax-checkpoint-tmp*
        return str(directory).split(os.sep)[-2].startswith(f"{step}.")

    json_failed = threading.Event()
    write_json = json_handler.JsonCheckpointHandler._save_fn
    write_state_metadata = pytree_handler.BasePyTreeCheckpointHandler._write_metadata_after_commits

    async def full(self, x, directory):
        if of_step(directory):
            (directory / self._filename).write_text('{"step": ')
            json_failed.set()
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / self._filename))
        return await write_json(self, x, directory)

    async def late(self, commit_futures, *, param_infos, **kwargs):
        if of_step(jax.tree.leaves(param_infos)[0].parent_dir):
            await asyncio.to_thread(json_failed.wait, 60)
            await asyncio.sleep(late_write_s)
        return await write_state_metadata(self, commit_futures, param_infos=param_infos, **kwargs)

    json_handler.JsonCheckpointHandler._save_fn = full
    pytree_handler.BasePyTreeCheckpointHandler._write_metadata_after_commits = late


def main(argv) -> int:
    """The trainer with the stand-in parts. STANDIN_DUMP=path.npz ("{process}" is replaced by the
    process index): also write the final params and EMA ("params/dense1/kernel", ...) of each process."""
    from flowmap_jax import train

    if os.environ.get("STANDIN_DISK_FULL_AT"):
        fill_disk_at(int(os.environ["STANDIN_DISK_FULL_AT"]))
    dump = os.environ.get("STANDIN_DUMP")
    if not dump:
        return train.main(STANDIN_FLAGS + argv, build=build)
    config = train_cli.parse_args(STANDIN_FLAGS + argv)
    result = train.run(config, build)
    host = train._to_host({"params": result.state.params, "ema": result.state.ema_params})
    np.savez(dump.replace("{process}", str(jax.process_index())),
             **{"/".join(k): np.asarray(v) for k, v in _flatten(host)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------------
# A tiny diffusers teacher folder (same layout as the embedded digits teacher), random weights.

TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[8, 16], layers_per_block=1,
    cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)
TINY_SCHEDULER_CONFIG = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_schedule="linear",
                             beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", clip_sample=False,
                             timestep_spacing="trailing", steps_offset=0)


def make_tiny_teacher(folder, seed=0, label_embeddings=True):
    """Write a random tiny class-conditional UNet teacher as a diffusers folder: unet/, scheduler/,
    label_embeddings.safetensors ((11, 8), row 10 the null label). Returns the folder."""
    import json as _json

    from safetensors.numpy import save_file

    from conversion import save_diffusers_unet
    from flowmap_jax.unet import UNetConfig, abstract_unet_params

    folder = str(folder)
    config = dict(TINY_UNET_CONFIG, _class_name="UNet2DConditionModel")
    rng = np.random.default_rng(seed)

    def init(path, leaf):  # LeCun-normal kernels, zero biases, unit norm scales (no compilation)
        name = str(path[-1].key)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if len(leaf.shape) < 2:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, abstract_unet_params(UNetConfig.from_dict(config)))
    save_diffusers_unet(params, config, os.path.join(folder, "unet"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        _json.dump(TINY_SCHEDULER_CONFIG, f)
    if label_embeddings:
        table = np.random.default_rng(seed).normal(size=(11, 8)).astype(np.float32)
        save_file({"weight": table}, os.path.join(folder, "label_embeddings.safetensors"))
    return folder
