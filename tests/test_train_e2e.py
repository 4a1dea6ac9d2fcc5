"""End to end: the trainer on a real diffusers teacher folder (the embedded digits teacher, or a tiny
random one), from the command line's entry point, and its clear errors.

`test_default_preset_short_run` is the default job with fewer steps and samples: training lowers the
1-jump error against the teacher's 50-step DDIM solution compared with the untrained flow map (which
is the teacher's own DDIM step), and the run folder holds what it should.
"""

import json
import os

import numpy as np
import pytest

from flowmap_jax import presets, teacher_folder, train
from tests import train_support

EMBEDDED = os.path.isdir(os.path.join(teacher_folder.embedded_teacher_folder(), "unet"))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return train_support.make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def _quality(run_dir):
    with open(os.path.join(run_dir, "quality.json")) as f:
        return {row["sampler"]: row for row in json.load(f)["rows"]}


def _short(run_dir, *flags):
    return ["--run.dir", str(run_dir), "--mesh.data", "1", "--run.progress_bar", "false", *flags]


@pytest.mark.skipif(not EMBEDDED, reason="the embedded digits teacher is not in this checkout")
def test_default_preset_short_run(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(_short(run_dir, "--run.steps", "40", "--data.batch_size", "16", "--optim.lr", "2e-4",
                             "--optim.warmup_steps", "10", "--run.quality_samples", "16", "--sample.jumps", "1,2",
                             "--run.checkpoint_every", "20", "--sample.grid_columns", "8")) == 0
    rows = _quality(run_dir)
    assert rows["flow map 1 jump"]["mse_to_teacher"] < rows["flow map 1 jump, untrained"]["mse_to_teacher"]
    for name in ("checkpoints/20", "checkpoints/40", "samples/step_000040.png", "quality.md",
                 "export/config.json", "export/diffusion_pytorch_model.safetensors", "metrics.jsonl",
                 "config.json"):
        assert (run_dir / name).exists(), name
    assert "frechet_distance" in rows["flow map 2 jumps"]


def test_tiny_teacher_folder_run_writes_the_run_folder(tmp_path, tiny_teacher):
    """The whole job on a user's diffusers folder (a tiny random UNet: mechanics only, no learning)."""
    run_dir = tmp_path / "run"
    flags = _short(run_dir, "--teacher", tiny_teacher, "--run.steps", "4", "--data.batch_size", "8",
                   "--run.quality_samples", "0", "--run.checkpoint_every", "2", "--sample.teacher_steps", "2",
                   "--sample.grid_columns", "4", "--sample.jumps", "1,2")
    assert train.main(flags) == 0
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["class_embed_type"] == "timestep"
    assert (export / "diffusion_pytorch_model.safetensors").exists()
    assert (run_dir / "samples" / "step_000004.png").exists()
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4] and np.isfinite(records[0]["loss"])
    # The run's own config.json is accepted back (`--config`): the same configuration.
    assert presets.parse_args(["--config", str(run_dir / "config.json")]) == presets.parse_args(flags)
    # Running again finds the finished run: nothing to train, nothing rewritten.
    mtime = (export / "config.json").stat().st_mtime
    assert train.main(flags) == 0
    assert (export / "config.json").stat().st_mtime == mtime


# A teacher, data or batch that does not fit is bad input: exit 2 (flowmap_jax.spec.cli_exit), one line.

def test_missing_teacher_is_a_clear_error(tmp_path, capsys):
    assert train.main(_short(tmp_path / "run", "--teacher", str(tmp_path / "no_such_teacher"))) == 2
    err = capsys.readouterr().err
    assert "error: --teacher.path" in err and "no_such_teacher" in err


def test_wrong_data_shape_is_a_clear_error(tmp_path, tiny_teacher, capsys):
    assert train.main(_short(tmp_path / "run", "--teacher", tiny_teacher, "--data.sample_shape", "8,8,1")) == 2
    err = capsys.readouterr().err
    assert "(16, 16, 1)" in err and "(8, 8, 1)" in err and "--data.sample_shape" in err


def test_guidance_without_unconditional_embedding_is_a_clear_error(tmp_path, capsys):
    folder = train_support.make_tiny_teacher(tmp_path / "teacher", label_embeddings=False)
    assert train.main(_short(tmp_path / "run", "--teacher", folder, "--teacher.guidance_scale", "3")) == 2
    assert "--teacher.guidance_scale" in capsys.readouterr().err


def test_unknown_objective_is_a_flag_error(tmp_path, tiny_teacher, capsys):
    assert train.main(_short(tmp_path / "run", "--teacher", tiny_teacher, "--objective.names", "eulerain")) == 2
    assert "eulerain" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused at parse time: no config.json, no run folder


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--run.dir", str(tmp_path / "run"), "--data.batch_size", "12"]) == 2
    assert "--data.batch_size 12" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not EMBEDDED, reason="the embedded digits teacher is not in this checkout")
def test_default_job_reaches_teacher_quality_with_two_jumps(tmp_path):
    """The default job exactly as a newcomer runs it (`python -m flowmap_jax.train`, no arguments, in
    an empty folder). Target (issue 4): under 10 minutes on an idle 2-core CPU, and 2-jump samples
    within 10% of the teacher's 50-step Frechet distance. That target is not met by the 300-step default
    job (benchmarks/README.md: +15.9% at 4000 samples), so this test asserts what the job reliably reaches
    on its 100-sample table, with margins for the noise of 100 samples (issue 16; to be re-measured over
    seeds when the job changes):
    - 2-jump Frechet distance <= 1.6x the teacher's: 1.16x at 4000 samples; at 500-1000 samples the ratio
      alone moved between 0.98x and 1.23x, and 100 samples are noisier still;
    - 2-jump label accuracy >= 0.95: 0.994 at 4000 samples (binomial sd at 100 samples ~0.8%);
    - training lowers the 1-jump MSE to the teacher against the untrained map (the teacher's DDIM step)."""
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the job as a user runs it: one CPU device, all threads
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "flowmap_jax.train", "--run.compilation_cache", ""],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    elapsed = time.time() - start
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _quality(tmp_path / "runs" / "digits")
    teacher = rows["teacher DDIM 50 steps"]["frechet_distance"]
    two = rows["flow map 2 jumps"]["frechet_distance"]
    print(f"default job: {elapsed:.0f}s wall; FD teacher {teacher:.1f}, 2 jumps {two:.1f}")
    assert two <= 1.6 * teacher
    assert rows["flow map 2 jumps"]["label_accuracy"] >= 0.95
    assert rows["flow map 1 jump"]["mse_to_teacher"] < rows["flow map 1 jump, untrained"]["mse_to_teacher"]
