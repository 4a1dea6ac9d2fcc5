"""The run folder of one training run: checked, owned, configured; removed again if the start fails.

`RunFolder.open(run, config, is_main)` (`run` the `--run.*` section, `config` the whole configuration as a dict,
`TrainConfig.to_dict()`), before anything is built:
  1. `--run.dir` must be a folder or not exist yet, and not lie under a file (`RunDirError`);
  2. process 0 creates it and takes its lock (`run_lock`: one run per folder; a stale lock of a
     process that is gone is taken over);
  3. if the folder holds checkpoints (a resume), the new configuration is compared with the run's
     (`run_config_check`: config.json is kept as first written, accepted changes are appended to
     config_changes.jsonl); otherwise config.json is (re)written with this configuration.
`abandon()` when the start fails before training: a folder this start created is removed (with its
lock); an existing one keeps what it had. `close()` at the end releases the lock.
"""

from __future__ import annotations

import json
import os
import shutil

from flowmap_jax.training import run_config_check
from flowmap_jax.training.run_lock import RunLock
from flowmap_jax.cli.cli_exit import BadInput


class RunDirError(BadInput, ValueError):
    """--run.dir is a file, lies under a file, or cannot be created."""


def check_run_dir(path: str) -> None:
    """RunDirError if `path` (absolute) is a file or lies under a file."""
    probe = path
    while True:
        if os.path.lexists(probe):
            if not os.path.isdir(probe):
                where = "is a file, not a folder" if probe == path else f"lies under {probe}, which is a file"
                raise RunDirError(f"--run.dir {path} {where}; choose a folder")
            return
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent


def has_checkpoints(path: str) -> bool:
    folder = os.path.join(path, "checkpoints")
    try:
        return any(name.isdigit() for name in os.listdir(folder))
    except OSError:
        return False


class RunFolder:
    """An opened run folder: `path` (absolute), whether this start `created` it, its `lock` (process
    0 only), the accepted configuration `changes` ({field: (old, new)}) and `notes` for the user."""

    def __init__(self, path: str, created: bool, lock: RunLock | None, changes: dict, notes: list[str]):
        self.path, self.created, self.lock, self.changes, self.notes = path, created, lock, changes, notes

    @classmethod
    def open(cls, run, config: dict, is_main: bool) -> RunFolder:
        """Check, create and lock `run.dir` (a `config.RunConfig`); `config` (`TrainConfig.to_dict()`) is compared
        with the run's on resume (`run.allow_config_change` accepts a change) or written as its config.json."""
        path = os.path.abspath(run.dir)
        check_run_dir(path)
        allow = bool(getattr(run, "allow_config_change", False))
        if not is_main:  # process 0 owns the folder; the others only check the configuration
            return cls(path, False, None, _check(path, config, allow), [])
        created = not os.path.exists(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"--run.dir {path}: cannot create the folder ({error.strerror or error})") from None
        lock = None
        try:
            lock = RunLock.acquire(path)
            notes = []
            if lock.took_over is not None:
                notes.append(f"took over the lock of {path} from {lock.took_over.describe()}, which is no "
                             f"longer running")
            changes = _check(path, config, allow)
            if has_checkpoints(path) and os.path.isfile(os.path.join(path, run_config_check.CONFIG_NAME)):
                run_config_check.record_changes(path, changes)
                if changes:
                    notes.append("configuration changed on resume (--run.allow_config_change, recorded in "
                                 f"{run_config_check.CHANGES_NAME}): " + ", ".join(
                                     f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
            else:  # a new run (or one that never saved, or lost its config.json): this configuration is the run's
                _write_config(path, config)
        except BaseException:
            folder = cls(path, created, lock, {}, [])
            folder.abandon()
            raise
        return cls(path, created, lock, changes, notes)

    def abandon(self) -> None:
        """The start failed before training: release the lock; remove the folder if this start made it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            if self.created:
                shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _check(path: str, config: dict, allow: bool) -> dict:
    if not has_checkpoints(path):
        return {}
    return run_config_check.check_resume(path, config, allow)


def _write_config(path: str, config: dict) -> None:
    """<run>/config.json: `config` as `TrainConfig.to_json` writes it (indent 2), replaced atomically."""
    target = os.path.join(path, run_config_check.CONFIG_NAME)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(config, indent=2))
    os.replace(tmp, target)
    changes = os.path.join(path, run_config_check.CHANGES_NAME)
    if os.path.exists(changes):
        os.remove(changes)
