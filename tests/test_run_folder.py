"""A run folder is owned by one run: its lock, the configuration kept on resume, a rejected checkpoint
moved aside, a checkpoint write that fails (disk full) and the resume after it, and one-line errors with
their exit codes (2 bad input, 1 the run failed).

Whole runs use the stand-in parts (tests/train_support.py) in subprocesses with 2 simulated CPU devices,
20 steps with a checkpoint every 5 (about 10 s each). One uninterrupted run (`finished`) is the reference
every other run is copied from or compared with, bit for bit.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flowmap_jax.training import run_config_check, run_lock
from flowmap_jax import train
from flowmap_jax.cli import cli_exit
from tests import train_support
from tests.test_train_checkpoint import ROOT, _env, _losses

STEPS = 20


def _command(run_dir, *flags, steps=STEPS):
    return [sys.executable, "-m", "tests.train_support", "--run.dir", str(run_dir), "--run.steps", str(steps),
            "--run.log_every", "1", "--run.checkpoint_every", "5", "--run.quality_samples", "0",
            "--run.export", "false", *flags]


def _run(run_dir, *flags, env=None, steps=STEPS):
    return subprocess.run(_command(run_dir, *flags, steps=steps), cwd=ROOT, env=env or _env(), capture_output=True,
                          text=True, timeout=300, check=False)


def _errors(stderr):
    """The `error:` lines; the tests also check that no traceback was printed."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _steps(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _assert_same_arrays(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of STEPS steps: its folder and its final params/EMA (npz)."""
    root = tmp_path_factory.mktemp("finished")
    done = _run(root / "run", env=_env(STANDIN_DUMP=root / "final.npz"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run": root / "run", "final": root / "final.npz"}


def _copy(finished, tmp_path):
    shutil.copytree(finished["run"], tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------------
# Defect 1: a corrupt newest checkpoint is moved aside and the rerun finishes.

def test_corrupt_newest_checkpoint_is_moved_aside_and_the_rerun_finishes(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    files = [os.path.join(d, f) for d, _, fs in os.walk(run_dir / "checkpoints" / str(STEPS) / "state") for f in fs]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 3)
    done = _run(run_dir, env=_env(STANDIN_DUMP=tmp_path / "rerun.npz"))
    assert done.returncode == 0, done.stderr[-3000:]  # main: StepAlreadyExistsError at the final save
    assert _errors(done.stderr) == []
    assert f"falling back to step {STEPS - 5}" in done.stderr
    rejected = run_dir / "checkpoints" / "rejected" / f"{STEPS}-unreadable"
    assert f"moved the rejected checkpoint of step {STEPS} to {rejected}" in done.stderr
    assert os.path.getsize(rejected / os.path.relpath(largest, run_dir / "checkpoints" / str(STEPS))) < \
        os.path.getsize(finished["run"] / os.path.relpath(largest, run_dir))  # kept as it was found
    assert _steps(run_dir)[-1] == STEPS and json.loads((run_dir / "finished.json").read_text())["step"] == STEPS
    _assert_same_arrays(finished["final"], tmp_path / "rerun.npz")  # steps 16..20 retrained, bit for bit


# ---------------------------------------------------------------------------------------------------
# Defect 2: one run per folder; a stale lock does not block a resume.

def test_second_trainer_on_a_folder_fails_at_once_and_a_killed_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(_command(run_dir, steps=400), cwd=ROOT, env=_env(STANDIN_STEP_SLEEP=0.05),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.1)
        second = _run(run_dir, steps=400)
        assert second.returncode == 1, second.stderr[-3000:]
        [message] = _errors(second.stderr)
        assert message == (f"error: the run folder {run_dir} is in use by pid {first.pid} on host "
                           f"{socket.gethostname()} (since {message.split('(since ')[1].split(')')[0]}); wait for "
                           f"that run to end or stop it, or choose another --run.dir")
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == first.pid  # stale: its process is gone
    resumed = _run(run_dir, steps=12)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lock of {run_dir} from pid {first.pid} on host {socket.gethostname()}" in resumed.stderr
    assert (run_dir / "run.lock").read_text() == ""  # released at the end


def test_lock_holder_is_named_and_a_stale_or_reused_pid_is_taken_over(tmp_path):
    lock = run_lock.RunLock.acquire(str(tmp_path))
    with pytest.raises(run_lock.RunFolderBusy, match=f"in use by pid {os.getpid()} on host "):
        run_lock.RunLock.acquire(str(tmp_path))  # another open file: flock refuses
    lock.release()
    assert (tmp_path / "run.lock").read_text() == ""
    # A lock file naming a process that has exited, and one naming this very pid (a reused pid).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        (tmp_path / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": 1.0}))
        lock = run_lock.RunLock.acquire(str(tmp_path))
        assert lock.took_over.pid == pid
        lock.release()
    # No flock held, but the file names a live process on this host: where flock is not enforced
    # (some network file systems) the pid still decides.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = run_lock.Holder(alive.pid, socket.gethostname(), run_lock._process_start(alive.pid), time.time())
        (tmp_path / "run.lock").write_text(json.dumps(holder.__dict__))
        with pytest.raises(run_lock.RunFolderBusy, match=f"pid {alive.pid} on host"):
            run_lock.RunLock.acquire(str(tmp_path))
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------------------------------------------
# Defect 3: the configuration is kept on resume.

def test_resume_with_another_configuration_is_refused_naming_fields_old_and_new(finished, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    first_config = (run_dir / "config.json").read_text()
    same = ["--run.dir", str(run_dir), "--run.log_every", "1", "--run.checkpoint_every", "5", "--run.quality_samples",
            "0", "--run.export", "false", "--run.steps", "25"]  # in this process: 8 devices (the mesh may change)
    code, err = _main(tmp_path, capsys, *same, "--data.batch_size", "8", "--run.seed", "3", "--optim.lr", "1e-3")
    assert code == cli_exit.USAGE, err[-3000:]
    assert _errors(err) == [(f"error: {run_dir} was started with another configuration: data.batch_size 16 -> 8, "
                             f"optim.lr 0.003 -> 0.001, run.seed 0 -> 3; resume with the run's values, choose another "
                             f"--run.dir, or pass --run.allow_config_change true to go on with the new values "
                             f"(recorded in config_changes.jsonl)")]
    assert (run_dir / "config.json").read_text() == first_config and _steps(run_dir)[-1] == STEPS
    # Fields that may change (steps, intervals) need nothing; --run.allow_config_change is recorded.
    code, err = _main(tmp_path, capsys, *same, "--optim.lr", "1e-3", "--run.log_every", "2",
                      "--run.allow_config_change", "true")
    assert code == cli_exit.OK, err[-3000:]
    assert "configuration changed on resume (--run.allow_config_change, recorded in config_changes.jsonl): " \
           "optim.lr 0.003 -> 0.001" in err
    assert (run_dir / "config.json").read_text() == first_config and _steps(run_dir)[-1] == 25
    [record] = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert record["changes"] == {"optim.lr": [0.003, 0.001]}
    # The accepted value is now the run's: the same flags again need no flag; the old value is a change.
    assert _main(tmp_path, capsys, *same, "--optim.lr", "1e-3")[0] == cli_exit.OK
    code, err = _main(tmp_path, capsys, *same)
    assert code == cli_exit.USAGE and "optim.lr 0.001 -> 0.003" in err


def test_config_fields_that_may_change_are_listed_in_code():
    old = {"run": {"steps": 10, "seed": 0, "log_every": 5}, "data": {"sample_shape": [4, 4, 1]}}
    new = {"run": {"steps": 99, "seed": 0, "log_every": 1}, "data": {"sample_shape": (4, 4, 1)}}
    assert run_config_check.differences(run_config_check.flatten(old), run_config_check.flatten(new)) == {}
    new["data"]["sample_shape"] = (8, 8, 1)
    assert run_config_check.differences(run_config_check.flatten(old), run_config_check.flatten(new)) == {
        "data.sample_shape": ((4, 4, 1), (8, 8, 1))}
    for field in ("run.seed", "data.batch_size", "teacher.path", "objective.names", "optim.lr", "model.dtype"):
        assert field not in run_config_check.MAY_CHANGE


# ---------------------------------------------------------------------------------------------------
# Defect 4: one-line errors and exit codes.

def _main(tmp_path, capsys, *flags):
    code = train.main(train_support.STANDIN_FLAGS + list(flags), build=train_support.build)
    return code, capsys.readouterr().err


def test_run_dir_that_is_a_file_or_under_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("user data")
    for run_dir, words in ((tmp_path / "file", "is a file, not a folder"),
                           (tmp_path / "file" / "run", f"lies under {tmp_path / 'file'}, which is a file")):
        code, err = _main(tmp_path, capsys, "--run.dir", str(run_dir))
        assert code == cli_exit.USAGE
        assert _errors(err) == [f"error: --run.dir {run_dir} {words}; choose a folder"]
    assert (tmp_path / "file").read_text() == "user data"


def test_a_start_that_fails_before_training_leaves_no_new_folder(tmp_path, capsys):
    run_dir = tmp_path / "new" / "run"
    code = train.main(["--run.dir", str(run_dir), "--teacher", str(tmp_path / "no_teacher"), "--mesh.data", "1",
                       "--run.progress_bar", "false"])
    assert code == cli_exit.USAGE and "no_teacher" in capsys.readouterr().err
    assert not run_dir.exists()  # main: config.json was written into a new run folder


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return train_support.make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("damage", ["unsupported_key", "truncated_weights"])
def test_unusable_teacher_is_a_one_line_error(tiny_teacher, tmp_path, capsys, damage):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, folder)
    unet = folder / "unet"
    if damage == "unsupported_key":
        config = json.loads((unet / "config.json").read_text())
        config["attention_type"] = "gated"
        (unet / "config.json").write_text(json.dumps(config))
        words = [str(unet / "config.json"), "'attention_type'", "gated"]
    else:
        weights = unet / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        words = [str(weights), "truncated or corrupt"]
    code = train.main(["--run.dir", str(tmp_path / "run"), "--teacher", str(folder), "--mesh.data", "1",
                       "--run.progress_bar", "false"])
    [message] = _errors(capsys.readouterr().err)
    assert code == cli_exit.USAGE, message
    assert message.startswith(f"error: --teacher.path: cannot load a diffusers UNet from {unet}: ")
    assert all(w in message for w in words), message
    assert not (tmp_path / "run").exists()


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one_then_resume_finishes(finished, tmp_path):
    run_dir = tmp_path / "run"
    full = _run(run_dir, env=_env(STANDIN_DISK_FULL_AT=15))
    assert full.returncode == cli_exit.FAILURE, full.stderr[-3000:]
    [message] = _errors(full.stderr)  # main: five chained tracebacks
    checkpoints = run_dir / "checkpoints"
    assert message == (f"error: could not write the checkpoint of step 15 in {checkpoints} ([Errno {errno.ENOSPC}] "
                       f"No space left on device: '{checkpoints}/15.orbax-checkpoint-tmp/meta.orbax-checkpoint-tmp/"
                       f"metadata'); its partial folder was removed; the last good checkpoint is step 10 in "
                       f"{checkpoints} (kept); resume from it with the same command once the cause is fixed")
    assert sorted(os.listdir(checkpoints)) == ["10", "5"]  # no half-written folder, no log beside them
    assert "exception was never retrieved" not in full.stderr  # Orbax's own reports of the failure dropped
    resumed = _run(run_dir, env=_env(STANDIN_DUMP=tmp_path / "resumed.npz"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 10" in resumed.stderr
    assert _losses(run_dir) == _losses(finished["run"])
    _assert_same_arrays(finished["final"], tmp_path / "resumed.npz")


def _snapshot(folder):
    """{relative path: bytes (None for a folder)} of everything under `folder`."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def test_a_users_folder_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path, capsys):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "config.json").write_text('{"my": "settings"}')
    (users / "notes.txt").write_text("keep me")
    before = _snapshot(users)
    code = train.main(["--run.dir", str(users), "--teacher", str(tmp_path / "no_teacher"), "--mesh.data", "1",
                       "--run.progress_bar", "false"])
    assert code == cli_exit.USAGE
    assert _errors(capsys.readouterr().err) == [
        f"error: --run.dir {users} holds files that are not a training run's (notes.txt); choose an empty or "
        f"new folder, or a previous run's folder to resume it"]
    assert _snapshot(users) == before


def test_an_empty_existing_folder_is_used_and_left_empty_by_a_start_that_fails(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = train.main(["--run.dir", str(empty), "--teacher", str(tmp_path / "no_teacher"), "--mesh.data", "1",
                       "--run.progress_bar", "false"])
    assert code == cli_exit.USAGE and "no_teacher" in capsys.readouterr().err
    assert empty.is_dir() and _snapshot(empty) == {}  # no config.json, no run.lock


def test_a_start_that_fails_leaves_an_existing_run_folder_as_it_was(finished, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    code = train.main(["--run.dir", str(run_dir), "--teacher", str(tmp_path / "no_teacher"), "--mesh.data", "1",
                       "--run.progress_bar", "false"])
    assert code == cli_exit.USAGE
    assert _snapshot(run_dir) == before


def test_rerunning_a_finished_run_touches_nothing(finished, tmp_path):
    """A rerun of a finished run says so and changes no byte and no file of its folder (no new tensorboard event
    file, metrics.jsonl not rewritten)."""
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    done = _run(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already finished" in done.stderr
    after = _snapshot(run_dir)
    assert sorted(after) == sorted(before)
    assert [name for name in before if after[name] != before[name]] == []
