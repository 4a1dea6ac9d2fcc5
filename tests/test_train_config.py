"""Presets and command-line overrides of the trainer (pure Python, fast)."""

import os
import subprocess
import sys

import pytest

from flowmap_jax import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_is_digits_and_sd15_is_data():
    assert presets.parse_args([]) == presets.digits()
    sd = presets.sd15()
    assert sd.data.sample_shape == (64, 64, 4)
    assert sd.model.dtype == "bfloat16" and sd.model.remat
    assert sd.data.source == "shards"
    # A preset is a complete value: round-trips through its dict form.
    assert presets.TrainConfig.from_dict(sd.to_dict()) == sd


def test_overrides_long_short_and_equals_forms():
    c = presets.parse_args(["--optim.lr", "1e-4", "--steps=7", "--objective.names", "eulerian,pairs",
                            "--objective.weights", "1,0.5", "--teacher", "/some/folder", "--run.progress_bar",
                            "--mesh.fsdp", "2", "--data.sample_shape", "8,8,3"])
    assert c.optim.lr == 1e-4 and c.run.steps == 7
    assert c.objective.names == ("eulerian", "pairs") and c.objective.weights == (1.0, 0.5)
    assert c.teacher.path == "/some/folder" and c.run.progress_bar is True
    assert c.mesh.fsdp == 2 and c.data.sample_shape == (8, 8, 3)


def test_preset_applies_before_overrides_whatever_the_order():
    c = presets.parse_args(["--optim.lr", "5e-5", "--preset", "sd15", "--data.path", "/x"])
    assert c.preset == "sd15" and c.optim.lr == 5e-5 and c.model.dtype == "bfloat16"


@pytest.mark.parametrize("argv, words", [
    (["--optim.lrr", "1"], ["--optim.lrr", "--optim.lr"]),
    (["--lr", "fast"], ["--lr", "number"]),
    (["--steps"], ["--steps", "needs a value"]),
    (["--nonsense", "1"], ["--nonsense"]),
    (["--run.async_checkpoints", "maybe"], ["--run.async_checkpoints", "boolean"]),
    (["--preset", "sd99"], ["--preset", "sd99"]),
    (["--objective.weights", "1,2"], ["--objective.weights"]),
    (["--objective.options", "{not json"], ["--objective.options"]),
    (["--data.source", "tfds"], ["--data.source"]),
    (["--data.source", "shards"], ["--data.path"]),
    (["--sample.spacing", "karras"], ["--sample.spacing", "karras"]),
    (["positional"], ["positional"]),
])
def test_bad_flags_name_the_flag(argv, words):
    with pytest.raises(presets.ConfigError) as info:
        presets.parse_args(argv)
    for word in words:
        assert word in str(info.value)


def test_help_lists_every_field():
    text = presets.help_text()
    for dotted in presets._fields():
        assert f"--{dotted}" in text


def test_cli_help_and_bad_flag_exit_codes():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ok = subprocess.run([sys.executable, "-m", "flowmap_jax.train", "--help"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "--optim.lr" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "flowmap_jax.train", "--optim.lrr", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown flag --optim.lrr; did you mean --optim.lr?" in bad.stderr
