"""Checkpoints of a run: Orbax CheckpointManager, resume with fallback, preemption.

Layout: `<run>/checkpoints/<step>/` with two items,
  state: {"train_state": TrainState (params, ema_params, opt_state, step), "rng": (2,) uint32 key data}
         (Orbax StandardSave: sharded arrays, restored directly onto the current mesh)
  meta:  JSON {"step", "data_position" (global batches consumed), "fingerprint", "time", "extra"}.
         fingerprint: [sum, sum of squares] (float32 reductions) of every TrainState leaf in pytree
         order (step, then params, ema_params, opt_state), followed by the rng's key words; it detects
         silently corrupted data. `read_checkpoint_params` relies on this order to check the EMA weights.
The newest `keep` checkpoints are kept; saves are asynchronous (the arrays are copied to host before
`save` returns, so the next step may overwrite the device buffers).

Resume (`restore`): try the newest checkpoint; if it cannot be read or its fingerprint does not match
(a half-written or corrupted directory), say so and fall back to the next older one, and so on.
A save interrupted by a kill leaves an `*.orbax-checkpoint-tmp-*` directory that Orbax never lists
as a step; it is removed when the run restarts. The checkpoints skipped by a fallback are moved to
`<checkpoints>/rejected/<step>-<reason>` (`set_aside_rejected`, `rejected_checkpoints`), so the run's
own save at that step can be written.

A save that fails (disk full, permissions; raised by Orbax's background thread at the next `save`,
`wait` or `close`) is a `CheckpointWriteError` naming the step, the cause and the last good
checkpoint; the step's temporary folder is removed, and the older checkpoints are untouched. Orbax's
own error logs of a failed save (tracebacks from its threads) go to `<checkpoints>/save_errors.log`
instead of stderr.

Preemption (`PreemptionGuard`): SIGTERM sets a flag; the training loop asks `reached(step)` each step
and, when true, saves and exits. With several processes JAX's preemption sync point makes every
process stop at the same step (SIGTERM to any one of them is enough).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flowmap_jax import rejected_checkpoints
from flowmap_jax.spec.cli_exit import RunFailure

log = logging.getLogger("flowmap_jax.checkpointing")
ERROR_LOG_NAME = "save_errors.log"


class NoGoodCheckpoint(RunFailure, RuntimeError):
    """Checkpoints exist but none of them could be restored."""


class CheckpointWriteError(RunFailure, OSError):
    """A checkpoint could not be written (disk full...); names the step and the last good checkpoint."""


class _OrbaxErrorsToFile(logging.Filter):
    """On the "absl" logger: Orbax's ERROR records (tracebacks of its save threads) are appended to
    a file instead of being printed; the failure itself reaches the caller as CheckpointWriteError."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
            return True
        try:
            text = logging.Formatter("%(asctime)s %(levelname)s %(message)s").format(record)
            with open(self.path, "a") as f:
                f.write(text + "\n")
        except OSError:
            pass  # the disk may be full: the error still reaches the caller
        return False


@jax.jit
def fingerprint(tree) -> jax.Array:
    """(2 * num_leaves,) float32: sum and sum of squares of every leaf (float32). Detects corrupted
    checkpoint data cheaply; compare with `fingerprints_match` (reductions differ across meshes)."""
    parts = []
    for leaf in jax.tree.leaves(tree):
        x = jnp.asarray(leaf, jnp.float32)
        parts += [jnp.sum(x), jnp.sum(x * x)]
    return jnp.stack(parts) if parts else jnp.zeros((0,), jnp.float32)


def fingerprints_match(a, b, rtol: float = 1e-4) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    return bool(np.all(np.abs(a - b) <= rtol * (np.abs(a) + np.abs(b)) + 1e-6))


def _fingerprint_list(tree) -> list[float]:
    """Fingerprint of the train state (on device) followed by the rng words (on host)."""
    values = np.asarray(jax.device_get(fingerprint(tree["train_state"])), np.float64)
    rng_words = np.asarray(jax.device_get(tree["rng"]), np.float64).ravel()
    return [float(v) for v in np.concatenate([values, rng_words])]


def _state_tree(train_state, rng) -> dict:
    return {"train_state": train_state, "rng": jax.random.key_data(rng) if _is_typed_key(rng) else rng}


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class Checkpointer:
    """Save and restore a run's TrainState, rng and data position under `directory`.

    All processes must call `save` and `restore` together (Orbax writes each process's shards and
    process 0 writes the metadata). `directory` must be shared by all processes.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self.rejected: list[tuple[int, str]] = []  # (step, reason) skipped by the last fallback
        self._in_flight: int | None = None  # the step of an asynchronous save not yet known to be on disk
        self._failed: int | None = None  # the step whose save failed
        self._error_filter = _OrbaxErrorsToFile(os.path.join(self.directory, ERROR_LOG_NAME))
        logging.getLogger("absl").addFilter(self._error_filter)

    # -- saving --------------------------------------------------------------------------------
    def save(self, train_state, rng, data_position: int, extra: dict | None = None, wait: bool = False) -> int:
        """Save at `train_state.step` (an int). Returns the step. `wait`: block until on disk.
        CheckpointWriteError if this save (or the previous asynchronous one) fails."""
        if self._failed is not None:
            raise CheckpointWriteError(f"an earlier checkpoint in {self.directory} failed to write; not saving")
        self.wait()  # an error of the previous asynchronous save surfaces here, under its own step
        step = int(jax.device_get(train_state.step))
        tree = _state_tree(train_state, rng)
        meta = {"step": step, "data_position": int(data_position), "time": time.time(),
                "fingerprint": _fingerprint_list(tree),
                "extra": extra or {}}
        self._in_flight = step
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as error:  # noqa: BLE001 - any failure of the write: report it under its step
            self._write_failed(step, error)
        if wait:
            self.wait()
        return step

    def wait(self) -> None:
        """Block until the asynchronous save is on disk; CheckpointWriteError if it failed."""
        if self._failed is not None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            self._write_failed(self._in_flight, error)
        self._in_flight = None

    def _write_failed(self, step, error) -> None:
        """Remove the step's temporary folder and raise CheckpointWriteError (once)."""
        self._failed = step
        self._remove_partial(step)
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, OSError):
                break
            cause = cause.__cause__ or cause.__context__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        good = [s for s in _step_folders(self.directory) if s != step]
        kept = (f"the last good checkpoint is step {good[-1]} in {self.directory} (kept); resume from it with "
                f"the same command once the cause is fixed") if good else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} in {self.directory} "
                                   f"({reason[:300]}); its partial folder was removed; {kept}") from None

    def close(self) -> None:
        """Finish the asynchronous save and release Orbax. After a failed save nothing more is raised."""
        try:
            self.wait()
        finally:
            logging.getLogger("absl").removeFilter(self._error_filter)
            try:
                self.manager.close()
            except Exception:
                if self._failed is None:
                    raise
            if self._failed is not None:  # Orbax's threads may have written more into it meanwhile
                self._remove_partial(self._failed)

    def _remove_partial(self, step) -> None:
        if jax.process_index() == 0:
            for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(tmp, ignore_errors=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring -----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, rng_like, step: int | None = None,
                say=print) -> tuple[Any, Any, dict] | None:
        """Restore the newest readable checkpoint (or exactly `step`).

        abstract_state: a TrainState of `jax.ShapeDtypeStruct`s with shardings (where to put it).
        rng_like: the run's key (its type and sharding are reused). Returns (train_state, rng, meta)
        or None when there is no checkpoint. A checkpoint that fails to load or whose fingerprint
        does not match is reported through `say` and skipped in favour of the next older one;
        `NoGoodCheckpoint` if none is left.
        """
        candidates = self.steps() if step is None else [step]
        if not candidates:
            return None
        failures = []
        for candidate in reversed(candidates):
            try:
                result = self._restore_step(candidate, abstract_state, rng_like)
            except Exception as error:  # noqa: BLE001 - any failure means: not a good checkpoint
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                failures.append((candidate, reason))
                older = [s for s in candidates if s < candidate]
                where = f"falling back to step {older[-1]}" if older else "no older checkpoint left"
                say(f"checkpoint at step {candidate} in {self.directory} is unreadable or corrupted "
                    f"({reason[:300]}); {where}")
                continue
            if failures:
                say(f"resumed from the previous good checkpoint, step {candidate}")
            self.rejected = failures
            return result
        listing = "; ".join(f"step {s}: {r[:200]}" for s, r in failures)
        raise NoGoodCheckpoint(f"no checkpoint in {self.directory} could be restored ({listing})")

    def set_aside_rejected(self, is_main: bool = True, say=print) -> list[str]:
        """Move the checkpoints the last `restore` fell back from to rejected/ (process 0 moves; every
        process reloads the step list). Call on all processes together. Returns the new paths."""
        moved = []
        if is_main:
            for step, reason in self.rejected:
                target = rejected_checkpoints.set_aside(self.directory, step, reason)
                if target:
                    moved.append(target)
                    say(f"moved the rejected checkpoint of step {step} to {target}")
        if self.rejected:
            from flowmap_jax import distributed

            distributed.sync("rejected checkpoints")
            self.manager.reload()
        self.rejected = []
        return moved

    def _restore_step(self, step, abstract_state, rng_like):
        rng_data = jax.random.key_data(rng_like) if _is_typed_key(rng_like) else rng_like
        abstract = {"train_state": abstract_state,
                    "rng": jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype,
                                                sharding=getattr(rng_data, "sharding", None))}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        tree, meta = restored["state"], restored["meta"]
        if meta is None or "fingerprint" not in meta:
            raise ValueError("metadata missing")
        if int(meta["step"]) != step:
            raise ValueError(f"metadata says step {meta['step']}")
        if not fingerprints_match(_fingerprint_list(tree), meta["fingerprint"]):
            raise ValueError("fingerprint mismatch: the saved arrays do not match what was written")
        rng = tree["rng"]
        if _is_typed_key(rng_like):
            rng = jax.random.wrap_key_data(rng, impl=jax.random.key_impl(rng_like))
        return tree["train_state"], rng, meta


def _step_folders(directory: str) -> list[int]:
    """Steps with a finished folder (numeric name) in `directory`, sorted."""
    try:
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
    except OSError:
        return []


def find_checkpoint_dir(path: str) -> tuple[str, int | None]:
    """Interpret a `--resume PATH`: a run folder (has checkpoints/), a checkpoints folder, or one
    step's folder (`.../checkpoints/400`). Returns (checkpoints folder, step or None for newest)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--run.resume: {path} is not a folder")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(base)
    return path, None


def abstract_like(tree, shardings):
    """ShapeDtypeStructs (with shardings) of `tree`: a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s),
                        tree, shardings)


class PreemptionGuard:
    """SIGTERM -> save and stop at a step all processes agree on.

    Single process: a SIGTERM handler sets a flag that `reached(step)` returns. Several processes:
    JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM and
    `multihost_utils.reached_preemption_sync_point` picks the same step on every process.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.requested, self.signal_name = True, "SIGTERM"
            except RuntimeError:  # preemption service not running: only the local flag
                pass
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# --------------------------------------------------------------------------------------------------
# Reading only the parameters of a checkpoint (partial restore), for the export.

WEIGHT_CHOICES = ("ema", "params")


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported (unreadable, corrupted, no such step); names the folder."""



@dataclasses.dataclass
class CheckpointParams:
    """Parameters read from one checkpoint: params (nested dict of numpy float32), which ("ema" or
    "params"), step, the checkpoint's folder, its meta JSON, and the run folder (or None)."""

    params: dict
    weights: str
    step: int
    directory: Path
    meta: dict
    run_dir: Path | None


def _checkpoint_steps(directory: Path) -> list[int]:
    """Finished steps under a checkpoints folder (Orbax's in-progress `*.orbax-checkpoint-tmp-*` excluded)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir())


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _restore_weights(step_dir: Path, weights: str) -> tuple[dict, dict]:
    """(params, meta) of `weights` from one step folder, fingerprint-checked."""
    meta_path = step_dir / "meta" / "metadata"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the checkpoint metadata {meta_path}: {err}") from None
    state_dir = step_dir / "state"
    name = "ema_params" if weights == "ema" else "params"
    with _quiet_absl():
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            tree = checkpointer.metadata(state_dir).item_metadata.tree
            subtree = tree["train_state"][name]
        except Exception as err:  # noqa: BLE001 - unreadable, or not a training checkpoint
            raise CheckpointError(f"{state_dir} is not a readable training checkpoint (no train_state/{name}): "
                                  f"{type(err).__name__}: {err}") from None
        item = {"train_state": {name: subtree}}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot restore train_state/{name} from {state_dir}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from None
    params = restored["train_state"][name]
    # The checkpoint's fingerprint: (sum, sum of squares) per leaf of TrainState(step, params, ema_params, ...).
    leaves = jax.tree_util.tree_leaves_with_path(params)
    n = len(leaves)
    offset = 2 * (1 + (n if weights == "ema" else 0))
    saved = list(meta.get("fingerprint") or [])
    if len(saved) < 2 * (1 + 2 * n):
        raise CheckpointError(f"{meta_path}: its fingerprint has {len(saved)} values, too few for "
                              f"{n} parameter arrays (not a checkpoint of this flow map?)")
    bad = [jax.tree_util.keystr(path) for i, (path, leaf) in enumerate(leaves)
           if not _leaf_matches_fingerprint(leaf, saved[offset + 2 * i], saved[offset + 2 * i + 1])]
    if bad:
        raise CheckpointError(f"{state_dir}: the {name} arrays {bad[:5]}{' ...' if len(bad) > 5 else ''} do not "
                              "match the fingerprint written with them (a corrupted checkpoint)")
    return jax.tree.map(np.asarray, params), meta


def _leaf_matches_fingerprint(leaf, saved_sum: float, saved_sumsq: float) -> bool:
    """Compares one array with the (sum, sum of squares) the trainer saved (`checkpointing.fingerprint`,
    float32 reductions on whatever device trained). Ours are float64, so the tolerance covers float32
    accumulation error, which grows with the size n: |sum| within 1e-4 relative plus 1e-5 * sqrt(n * sumsq)
    (about 100 float32 epsilons times n * rms), the sum of squares within 1e-3 relative. A corrupted
    block of more than about 1e-3 of an array's entries (or any non-finite value) fails."""
    x = np.asarray(leaf, np.float64)
    total, sumsq = float(x.sum()), float(np.square(x).sum())
    if not (np.isfinite(total) and np.isfinite(sumsq)):
        return False
    ok_sum = abs(saved_sum - total) <= 1e-4 * abs(total) + 1e-5 * np.sqrt(x.size * sumsq) + 1e-6
    ok_sumsq = abs(saved_sumsq - sumsq) <= 1e-3 * sumsq + 1e-6
    return bool(ok_sum and ok_sumsq)


def read_checkpoint_params(source, weights: str = "ema", step: int | None = None,
                           say: Callable[[str], Any] = print) -> CheckpointParams:
    """The EMA (`weights="ema"`, default) or raw (`"params"`) flow-map parameters of a training checkpoint.

    source: a run folder (with checkpoints/), a checkpoints folder, or one step's folder
    (`.../checkpoints/400`). `step`: that step; default the newest, falling back to older ones (reported
    through `say`) when the newest is unreadable or corrupted, like the trainer's resume.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    try:
        directory, found_step = find_checkpoint_dir(os.fspath(source))
    except FileNotFoundError:
        raise FileNotFoundError(f"no run or checkpoint folder at {source}") from None
    directory = Path(directory)
    step = found_step if step is None else int(step)
    steps = _checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory} (expected step folders like {directory}/400 with "
                              "state/ and meta/)")
    if step is not None and step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; steps found: {steps}")
    candidates = [step] if step is not None else list(reversed(steps))
    failures = []
    for candidate in candidates:
        try:
            params, meta = _restore_weights(directory / str(candidate), weights)
        except CheckpointError as err:
            failures.append(str(err))
            if step is None and candidate != candidates[-1]:
                say(f"checkpoint at step {candidate} is unusable ({err}); falling back to an older one")
            continue
        run_dir = directory.parent if (directory.parent / "config.json").is_file() else None
        return CheckpointParams(params=params, weights=weights, step=int(meta.get("step", candidate)),
                                directory=directory / str(candidate), meta=meta, run_dir=run_dir)
    raise CheckpointError("; ".join(failures))
