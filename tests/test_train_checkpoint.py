"""Checkpoints: save/restore across meshes, fallback from a corrupted or half-written latest
checkpoint, SIGKILL and resume (bit for bit), SIGTERM, and a NaN loss.

The run-level tests start the trainer with the stand-in parts (tests/train_support.py) in
subprocesses with 2 simulated CPU devices.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flowmap_jax.training import checkpointing
from flowmap_jax.training import sharding as sh
from flowmap_jax.training import train_step as ts
from flowmap_jax.training.config import OptimConfig
from tests import train_support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(mesh, bump=0.0):
    params = jax.tree.map(lambda x: x + bump, train_support.init_params())
    optimizer = ts.make_optimizer(OptimConfig(), 10)
    specs = sh.param_specs(params, mesh, 1)
    shardings = ts.state_shardings(params, optimizer, mesh, specs)
    state = ts.init_state(params, optimizer, mesh, specs)
    return state, shardings


def _save_steps(directory, mesh, steps):
    ckpt = checkpointing.Checkpointer(directory, keep=5)
    for step in steps:
        state, _ = _state(mesh, bump=step)
        state = state.replace(step=jax.numpy.int32(step))
        ckpt.save(state, jax.random.key(7), data_position=10 * step, extra={"baseline": 1.5})
    ckpt.close()


def test_restore_onto_another_mesh(tmp_path):
    _save_steps(str(tmp_path), sh.make_mesh(2, 4), [1, 2])
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    state, shardings = _state(mesh)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        new_state, rng, meta = ckpt.restore(checkpointing.abstract_like(state, shardings), jax.random.key(0))
    assert int(new_state.step) == 2 and meta["data_position"] == 20 and meta["extra"]["baseline"] == 1.5
    np.testing.assert_array_equal(np.asarray(new_state.params["dense1"]["kernel"]),
                                  train_support.init_params()["dense1"]["kernel"] + 2)
    assert new_state.params["dense1"]["kernel"].sharding.mesh.size == 1
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(7)))


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "delete_metadata", "bad_json"])
def test_corrupted_latest_falls_back_to_previous(tmp_path, damage):
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save_steps(str(tmp_path), mesh, [1, 2, 3])
    latest = tmp_path / "3"
    files = [f for f in glob.glob(str(latest / "state" / "**" / "d" / "*"), recursive=True) if os.path.isfile(f)]
    if damage == "flip_bytes":
        for f in files:
            data = bytearray(open(f, "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(f, "wb").write(bytes(data))
    elif damage == "truncate":
        for f in files:
            os.truncate(f, os.path.getsize(f) // 3)
    elif damage == "delete_metadata":
        os.remove(latest / "state" / "_METADATA")
    else:
        (latest / "meta" / "metadata").write_text("{half a json")
    said = []
    state, shardings = _state(mesh)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        restored = ckpt.restore(checkpointing.abstract_like(state, shardings), jax.random.key(0), say=said.append)
    assert int(restored[0].step) == 2
    assert "step 3" in said[0] and "falling back to step 2" in said[0]
    assert "previous good checkpoint, step 2" in said[-1]


def test_half_written_checkpoint_is_ignored_and_nothing_good_is_an_error(tmp_path):
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save_steps(str(tmp_path), mesh, [1])
    # What a kill during an asynchronous save leaves behind: a temporary folder.
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-123")
    state, shardings = _state(mesh)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.steps() == [1]
        shutil.rmtree(tmp_path / "1" / "state")
        with pytest.raises(checkpointing.NoGoodCheckpoint, match="step 1"):
            ckpt.restore(checkpointing.abstract_like(state, shardings), jax.random.key(0), say=lambda _: None)


# ---------------------------------------------------------------------------------------------------
# Whole runs in subprocesses.

def _xla_flags(devices):
    """The test process's XLA flags (tests/conftest.py: single-threaded kernels) with `devices` devices."""
    return (f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false "
            "intra_op_parallelism_threads=1")


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_xla_flags(2),
               PYTHONPATH=ROOT)
    env.pop("STANDIN_STEP_SLEEP", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _command(run_dir, steps, *flags):
    return [sys.executable, "-m", "tests.train_support", "--run.dir", str(run_dir), "--run.steps", str(steps),
            "--run.log_every", "1", "--run.checkpoint_every", "5", "--run.quality_samples", "0",
            "--run.export", "false", *flags]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def _run(cmd, env, timeout=240):
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    steps = 30
    whole = _run(_command(tmp_path / "whole", steps), _env(STANDIN_DUMP=tmp_path / "whole.npz"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed_dir, steps), cwd=ROOT, env=_env(STANDIN_STEP_SLEEP=0.15),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (killed_dir / "checkpoints" / "15").exists():
        time.sleep(0.1)
    time.sleep(0.5)  # a few steps past the checkpoint, likely with a save of step 20 in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = _losses(killed_dir)
    assert 15 <= partial[-1][0] < steps

    resumed = _run(_command(killed_dir, steps), _env(STANDIN_DUMP=tmp_path / "resumed.npz"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    assert _losses(killed_dir) == _losses(tmp_path / "whole")  # every step's loss, bit for bit
    a, b = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_command(run_dir, 400, "--run.checkpoint_every", "1000"), cwd=ROOT,
                            env=_env(STANDIN_STEP_SLEEP=0.05), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(_losses(run_dir)) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved the checkpoint at step" in stderr
    with checkpointing.Checkpointer(str(run_dir / "checkpoints")) as ckpt:
        saved = ckpt.steps()
    assert len(saved) == 1 and 3 <= saved[0] < 400
    resumed = _run(_command(run_dir, saved[0] + 3), _env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved[0]}" in resumed.stderr


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    done = _run(_command(run_dir, 40, "--run.log_every", "4"), _env(STANDIN_NAN_AFTER=12))
    assert done.returncode == 1, done.stderr[-3000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("error:")][0]
    assert "the loss became nan" in message and "at step 13;" in message
    assert "the last good checkpoint is step 10" in message
    with checkpointing.Checkpointer(str(run_dir / "checkpoints")) as ckpt:
        assert ckpt.steps() == [5, 10]
    # The kept checkpoint is finite.
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    state, shardings = _state(mesh)
    with checkpointing.Checkpointer(str(run_dir / "checkpoints")) as ckpt:
        restored, _, _ = ckpt.restore(checkpointing.abstract_like(state, shardings), jax.random.key(0))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.params))
