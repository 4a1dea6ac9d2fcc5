"""The run folder of one training run: checked, owned, configured; removed again if the start fails.

`RunFolder.open(run, config, is_main)` (`run` the `--run.*` section, `config` the whole configuration as a dict,
`TrainConfig.to_dict()`), before anything is built:
  1. `--run.dir` must be a folder or not exist yet, and not lie under a file; an existing folder must be
     empty or a run's folder (`is_run_folder`: only the names a run writes, `RUN_NAMES`, and its run.lock
     or checkpoints/); anything else, a user's own folder, is refused before anything is written (`RunDirError`);
  2. process 0 creates it (os.mkdir: exactly one start creates it) and takes its lock before writing
     anything else (`run_lock`: one run per folder; a stale lock of a process that is gone is taken over);
  3. if the folder holds checkpoints (a resume), the new configuration is compared with the run's
     (`run_config_check`: config.json is kept as first written, accepted changes are appended to
     config_changes.jsonl); otherwise config.json is (re)written with this configuration.
`abandon()` when the start fails before training: a folder this start created is removed (with its
lock); an existing one is put back exactly as it was (the entries this start added are removed, its
config.json and config_changes.jsonl get their bytes back). `close()` at the end releases the lock.
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


RUN_NAMES = frozenset({"run.lock", run_config_check.CONFIG_NAME, run_config_check.CONFIG_NAME + ".tmp",
                       run_config_check.CHANGES_NAME, "checkpoints", "samples", "tensorboard", "metrics.jsonl",
                       "eval", "quality.json", "quality.md", "export", "finished.json"})
"""The top-level entries a run writes into its folder (besides `.export.tmp-*`, an export being written)."""


def _is_run_name(name: str) -> bool:
    return name in RUN_NAMES or name.startswith(".export.tmp-")


def foreign_entries(path: str) -> list[str]:
    """The entries of the existing folder `path` that make it not a run's folder (sorted): names a run
    does not write, or, where the folder holds no run.lock and no checkpoints/, every entry."""
    names = sorted(os.listdir(path))
    foreign = [n for n in names if not _is_run_name(n)]
    if foreign or not names:
        return foreign
    return [] if ("run.lock" in names or "checkpoints" in names) else names


def check_claimable(path: str) -> None:
    """RunDirError naming `path` and its first foreign entries if the existing folder is neither empty nor a run's."""
    if not os.path.isdir(path):
        return
    foreign = foreign_entries(path)
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunDirError(f"--run.dir {path} holds files that are not a training run's ({listed}); choose an "
                          f"empty or new folder, or a previous run's folder to resume it")


def has_checkpoints(path: str) -> bool:
    folder = os.path.join(path, "checkpoints")
    try:
        return any(name.isdigit() for name in os.listdir(folder))
    except OSError:
        return False


class RunFolder:
    """An opened run folder: `path` (absolute), whether this start `created` it, its `lock` (process
    0 only), the accepted configuration `changes` ({field: (old, new)}) and `notes` for the user."""

    def __init__(self, path: str, created: bool, lock: RunLock | None, changes: dict, notes: list[str],
                 before: dict | None = None):
        self.path, self.created, self.lock, self.changes, self.notes = path, created, lock, changes, notes
        self._before = before  # existing folder: {top-level name: bytes of config.json/changes, else None}

    @classmethod
    def open(cls, run, config: dict, is_main: bool) -> RunFolder:
        """Check, create and lock `run.dir` (a `config.RunConfig`); `config` (`TrainConfig.to_dict()`) is compared
        with the run's on resume (`run.allow_config_change` accepts a change) or written as its config.json."""
        path = os.path.abspath(run.dir)
        check_run_dir(path)
        check_claimable(path)
        allow = bool(getattr(run, "allow_config_change", False))
        if not is_main:  # process 0 owns the folder; the others only check the configuration
            return cls(path, False, None, _check(path, config, allow), [])
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkdir(path)
            created = True
        except FileExistsError:
            created = False
        except OSError as error:
            raise RunDirError(f"--run.dir {path}: cannot create the folder ({error.strerror or error})") from None
        lock, before = None, None
        try:
            if not created:
                before = _top_level(path)
            lock = RunLock.acquire(path)
            if not created:
                check_claimable(path)  # filled by someone else between the check and the lock
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
            folder = cls(path, created, lock, {}, [], before)
            folder.abandon()
            raise
        return cls(path, created, lock, changes, notes, before)

    def abandon(self) -> None:
        """The start failed before training: remove the folder if this start made it, else put back what
        it held (the entries this start added removed, config.json and config_changes.jsonl restored);
        then release the lock."""
        if self.lock is None:
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self._before is not None:
            for name in os.listdir(self.path):
                if name not in self._before and name != "run.lock":
                    entry = os.path.join(self.path, name)
                    if os.path.isdir(entry) and not os.path.islink(entry):
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        os.remove(entry)
            for name in (run_config_check.CONFIG_NAME, run_config_check.CHANGES_NAME):
                if self._before.get(name) is not None:
                    _write_bytes(os.path.join(self.path, name), self._before[name])
            if "run.lock" not in self._before:
                os.remove(os.path.join(self.path, "run.lock"))  # still flocked by us: no one else holds it
        self.lock.release()
        self.lock = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _check(path: str, config: dict, allow: bool) -> dict:
    if not has_checkpoints(path):
        return {}
    return run_config_check.check_resume(path, config, allow)


def _top_level(path: str) -> dict:
    """{name: None} for each entry of `path`, with the bytes of config.json and config_changes.jsonl."""
    found = dict.fromkeys(os.listdir(path))
    for name in (run_config_check.CONFIG_NAME, run_config_check.CHANGES_NAME):
        if name in found and os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                found[name] = f.read()
    return found


def _write_bytes(target: str, data: bytes) -> None:
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


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
