"""Every command line of the project, run as a user runs it (a subprocess): bad usage or bad input exits 2
with one line on stderr naming the bad flag or value and no traceback; `--help` into a closed pipe
(`--help | head -1`) ends with 0 and nothing on stderr. The rules live in `flowmap_jax.cli.cli_exit`."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = os.path.join(ROOT, "no_such_folder_for_cli_tests")

# (module, argv, a word the error line must contain)
BAD_USAGE = [
    ("flowmap_jax.train", ["--optim.lrr", "1"], "--optim.lrr"),
    ("flowmap_jax.train", ["--objective.names", "eulerain"], "eulerain"),
    ("flowmap_jax.train", ["--optim.microbatch_size", "-1"], "--optim.microbatch_size"),
    # bad input: 3 divides neither 32 (1 device) nor 4 (tests/conftest.py's 8 simulated devices) examples per device
    ("flowmap_jax.train", ["--optim.microbatch_size", "3", "--run.dir", MISSING], "does not divide the per-device"),
    ("flowmap_jax.sample", ["--model", MISSING, "--dtype", "fp8"], "fp8"),
    ("flowmap_jax.sample", ["--model", MISSING], MISSING),  # bad input: no export there
    ("torch_ref.sample", ["--model", MISSING, "--spacing", "karras"], "karras"),
    ("conversion", ["frob"], "frob"),
    ("conversion", ["to-flax", MISSING, os.path.join(MISSING, "out"), "--dtype", "half"], "half"),
    ("conversion", ["export", MISSING, os.path.join(MISSING, "out")], MISSING),  # bad input
    ("flowmap_jax.write_shards", ["--out", MISSING, "--source", "tfds"], "tfds"),
    ("flowmap_jax.write_shards", ["--out", MISSING, "--source", "npz"], "--input"),  # bad input
    ("torch_ref.train_digits_teacher", ["--steps", "many"], "many"),
    ("flowmap_jax.digits.train_classifier", ["--lr", "fast"], "fast"),
]

HELP = ["flowmap_jax.train", "flowmap_jax.sample", "torch_ref.sample", "conversion", "flowmap_jax.write_shards",
        "torch_ref.train_digits_teacher", "flowmap_jax.digits.train_classifier"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.parametrize("module, argv, word", BAD_USAGE, ids=[f"{m}:{' '.join(a)[:40]}" for m, a, _ in BAD_USAGE])
def test_bad_usage_exits_2_with_one_line(module, argv, word):
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "error" in lines[0] and word in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert not os.path.exists(MISSING)  # nothing was written


@pytest.mark.parametrize("module", HELP)
def test_help_into_a_closed_pipe_is_not_an_error(module):
    """The reader is gone before the command writes (the read end is closed first), so every write fails
    with EPIPE: the command must still end with 0 and print nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=_env(), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("module, first", [("flowmap_jax.train", "usage: python -m flowmap_jax.train"),
                                           ("conversion", "usage: python -m conversion")])
def test_help_piped_to_head(module, first):
    """`--help | head -1` as a user types it (bash, pipefail off): the first line, no traceback."""
    done = subprocess.run(["bash", "-c", f"set +o pipefail; {sys.executable} -m {module} --help | head -1"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith(first), done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_conversion_help_lists_every_command():
    from conversion import cli_commands

    done = subprocess.run([sys.executable, "-m", "conversion", "--help"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0
    for command in cli_commands.COMMANDS:
        assert command.name in done.stdout and command.help.split(" (")[0] in " ".join(done.stdout.split())


from tests.test_backend_independence import export_folder  # noqa: E402,F401  (a tiny export, module-scoped fixture)


@pytest.mark.parametrize("module", ["flowmap_jax.sample", "torch_ref.sample"])
def test_sample_out_naming_an_existing_file_exits_2_with_one_line(module, export_folder, tmp_path):
    out = tmp_path / "taken"
    out.write_text("user data")
    done = subprocess.run([sys.executable, "-m", module, "--model", export_folder, "--batch", "2", "--labels", "1,2",
                           "--steps", "1", "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --out {out} is a file, not a folder; choose a folder (the samples are written into it)"]
    assert out.read_text() == "user data"
