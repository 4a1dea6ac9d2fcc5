"""Checkpoints of a run: Orbax CheckpointManager, resume with fallback, preemption.

Layout: `<run>/checkpoints/<step>/` with two Orbax items, state (StandardSave: sharded arrays,
restored directly onto the current mesh) and meta (JSON); what they hold, the fingerprint and the check
of a step folder (`verify`, with its typed `RejectReason`) are `flowmap_jax.training.run_record`, which both
readers here call: `Checkpointer.restore` (resume) and `read_checkpoint_params` (the export's reader).
The newest `keep` checkpoints are kept; saves are asynchronous (the arrays are copied to host before
`save` returns, so the next step may overwrite the device buffers).

Resume (`restore`): try the newest checkpoint; if it cannot be read or its fingerprint does not match
(a half-written or corrupted directory: `run_record.verify`), say so and fall back to the next older one, and so on
(Orbax's abandoned reads of the failed one are kept off stderr: `_quiet_abandoned_orbax_reads`).
A save interrupted by a kill leaves an `*.orbax-checkpoint-tmp-*` directory that Orbax never lists
as a step; it is removed when the run restarts. The checkpoints skipped by a fallback are moved to
`<checkpoints>/rejected/<step>-<reason>` (`set_aside_rejected`, `rejected_checkpoints`), so the run's
own save at that step can be written.

A save that fails (disk full, permissions; raised by Orbax's background thread at the next `save`,
`wait` or `close`) is a `CheckpointWriteError` naming the step, the cause and the last good
checkpoint. Orbax reports the first write of a step that fails while the step's other writes (each in
its own thread) may still be running, so the failure path first waits for all of them
(`_wait_for_orbax_writes`), then removes every `<step>.orbax-checkpoint-tmp*` folder of the step; the
older checkpoints are untouched. Orbax's own error reports of a failed save are dropped, not printed: the
ERROR records of its threads (absl logger) and asyncio's "... exception was never retrieved" records of its
write tasks, logged when they are collected, possibly at exit (hundreds of tracebacks on a full disk). The
CheckpointWriteError line carries the first failure's reason; nothing is written beside the checkpoints.

Preemption (`PreemptionGuard`): SIGTERM sets a flag; the training loop asks `reached(step)` each step
and, when true, saves and exits. With several processes JAX's preemption sync point makes every
process stop at the same step (SIGTERM to any one of them is enough).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flowmap_jax.training import rejected_checkpoints, run_record
from flowmap_jax.cli.cli_exit import RunFailure

log = logging.getLogger("flowmap_jax.training.checkpointing")
_WRITE_WAIT_S = 1200  # the longest wait for the other writes of a failed save (Orbax's AsyncOptions.timeout_secs)


class NoGoodCheckpoint(RunFailure, RuntimeError):
    """Checkpoints exist but none of them could be restored."""


class CheckpointWriteError(RunFailure, OSError):
    """A checkpoint could not be written (disk full...); names the step and the last good checkpoint."""


class _QuietOrbaxErrors(logging.Filter):
    """Drops Orbax's own error reports; the failure itself reaches the caller as CheckpointWriteError.
    On the "absl" logger: ERROR records logged from Orbax's code (tracebacks of its save threads). On the
    "asyncio" logger: "... exception was never retrieved" records of Orbax's write tasks and futures (their
    message or traceback names Orbax). Everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return not ("never retrieved" in str(record.msg) and _names_orbax(record))
        return f"{os.sep}orbax{os.sep}" not in (record.pathname or "")


def _names_orbax(record: logging.LogRecord) -> bool:
    """Whether an asyncio record's message (the task's or future's repr) or its exception's traceback is Orbax's."""
    try:
        if "orbax" in record.getMessage():
            return True
    except Exception:  # noqa: BLE001 (a repr that fails: look at the traceback only)
        pass
    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
        if any("orbax" in frame.filename for frame in traceback.extract_tb(error.__traceback__)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _state_tree(train_state, rng) -> dict:
    return run_record.state_tree(train_state, jax.random.key_data(rng) if _is_typed_key(rng) else rng)


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
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(run_record.STATE_ITEM, run_record.META_ITEM))
        self.rejected: list[tuple[int, run_record.Verdict]] = []  # (step, verdict) skipped by the last fallback
        self._in_flight: int | None = None  # the step of an asynchronous save not yet known to be on disk
        self._failed: int | None = None  # the step whose save failed
        self._error_filter = _QuietOrbaxErrors()
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self._error_filter)
        # A save that fails (disk full) fails in Orbax's threads before the step loop hears of it, and TensorStore's
        # writes still in flight then call back into Orbax's closed event loop: their "Event loop is closed"
        # reports must be dropped from the start, not once the failure is known.
        _install_unraisable_orbax_filter()

    # -- saving --------------------------------------------------------------------------------
    def save(self, train_state, rng, data_position: int, extra: dict | None = None, wait: bool = False) -> int:
        """Save at `train_state.step` (an int). Returns the step. `wait`: block until on disk.
        CheckpointWriteError if this save (or the previous asynchronous one) fails."""
        if self._failed is not None:
            raise CheckpointWriteError(f"an earlier checkpoint in {self.directory} failed to write; not saving")
        self.wait()  # an error of the previous asynchronous save surfaces here, under its own step
        step = int(jax.device_get(train_state.step))
        tree = _state_tree(train_state, rng)
        meta = run_record.meta_record(tree, step, data_position, extra)
        self._in_flight = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**{
                run_record.STATE_ITEM: ocp.args.StandardSave(tree), run_record.META_ITEM: ocp.args.JsonSave(meta)}),
                force=True)
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
        """Wait for the step's other writes, remove its temporary folders, raise CheckpointWriteError (once)."""
        self._failed = step
        _install_unraisable_orbax_filter()  # again, in case something replaced it since (pytest does)
        self._wait_for_orbax_writes()
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
        """Finish the asynchronous save and release Orbax. After a failed save nothing more is raised.
        Orbax's error reports stay dropped until its threads are done (after a failed save: for good, since
        its write tasks may be collected as late as the interpreter's exit)."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                if self._failed is None:
                    raise
            finally:
                if self._failed is not None:  # nothing of the failed step may be left behind
                    self._wait_for_orbax_writes()
                    self._remove_partial(self._failed)
                if self._failed is None:
                    for name in ("absl", "asyncio"):
                        logging.getLogger(name).removeFilter(self._error_filter)

    def _wait_for_orbax_writes(self) -> None:
        """Block until every write of the last save has ended, successfully or not.

        Orbax runs each write of a step (an item's arrays, its metadata, the JSON item) in a thread of
        its own and awaits them in item-name order, stopping at the first failure: its background
        thread (all `wait_until_finished` joins) and a synchronous `save` end while the step's other
        writes may still be running, and those would recreate or write into a folder removed under
        them. So also wait for the last save's commit futures and any other Orbax write thread still
        alive (both are Orbax internals; tests/test_run_folder.py's disk-full test holds a write back
        to check this). Their errors are not raised here (the first one already was)."""
        with contextlib.suppress(Exception):  # the failure being handled, raised again by Orbax
            self.manager.wait_until_finished()
        async_manager = getattr(getattr(self.manager, "_checkpointer", None), "_async_manager", None)
        writes = list(getattr(async_manager, "_commit_futures", None) or []) + _orbax_write_threads()
        for write in writes:
            with contextlib.suppress(Exception):  # each failed write was logged by Orbax
                write.result(timeout=_WRITE_WAIT_S)

    def _remove_partial(self, step) -> None:
        """Remove every temporary folder of `step` (`<step>.orbax-checkpoint-tmp*`, process 0)."""
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
            verdict = self._restore_step(candidate, abstract_state, rng_like)
            if not verdict.ok:
                failures.append((candidate, verdict))
                older = [s for s in candidates if s < candidate]
                where = f"falling back to step {older[-1]}" if older else "no older checkpoint left"
                say(f"checkpoint at step {candidate} in {self.directory} is unreadable or corrupted "
                    f"({verdict.detail[:300]}); {where}")
                continue
            if failures:
                say(f"resumed from the previous good checkpoint, step {candidate}")
            self.rejected = failures
            rng = verdict.tree["rng"]
            if _is_typed_key(rng_like):
                rng = jax.random.wrap_key_data(rng, impl=jax.random.key_impl(rng_like))
            return verdict.tree["train_state"], rng, verdict.meta
        listing = "; ".join(f"step {s}: {v.detail[:200]}" for s, v in failures)
        raise NoGoodCheckpoint(f"no checkpoint in {self.directory} could be restored ({listing})")

    def set_aside_rejected(self, is_main: bool = True, say=print) -> list[str]:
        """Move the checkpoints the last `restore` fell back from to rejected/ (process 0 moves; every
        process reloads the step list). Call on all processes together. Returns the new paths."""
        moved = []
        if is_main:
            for step, verdict in self.rejected:
                target = rejected_checkpoints.set_aside(self.directory, step, verdict.reason)
                if target:
                    moved.append(target)
                    say(f"moved the rejected checkpoint of step {step} to {target}")
        if self.rejected:
            from flowmap_jax.training import distributed

            distributed.sync("rejected checkpoints")
            self.manager.reload()
        self.rejected = []
        return moved

    def _restore_step(self, step, abstract_state, rng_like) -> run_record.Verdict:
        """The state of `step` read onto `abstract_state`'s shardings, checked by `run_record.verify`."""
        rng_data = jax.random.key_data(rng_like) if _is_typed_key(rng_like) else rng_like
        abstract = run_record.state_tree(abstract_state, jax.ShapeDtypeStruct(
            rng_data.shape, rng_data.dtype, sharding=getattr(rng_data, "sharding", None)))

        def read():  # with the meta item (verify reads its file): alone, a failed state read logs asyncio errors
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    run_record.STATE_ITEM: ocp.args.StandardRestore(abstract),
                    run_record.META_ITEM: ocp.args.JsonRestore()}))
            except Exception as error:  # noqa: BLE001 - named by verify (UNREADABLE)
                failure = run_record.ReadError(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
                error.__traceback__ = None  # Orbax's frames (and the reads they hold) go now, quietly
                del error
                _quiet_abandoned_orbax_reads()
                raise failure from None
            return restored[run_record.STATE_ITEM]

        return run_record.verify(os.path.join(self.directory, str(step)), read, step)


def _quiet_abandoned_orbax_reads() -> None:
    """After a failed restore: Orbax stops at the first unreadable array and closes its event loop with
    the sibling reads still pending; when such a read coroutine is garbage-collected, Orbax's own
    `except BaseException` turns the GeneratorExit into an Exception that Python prints to stderr
    ("Exception ignored in: <coroutine ...>", a traceback), at a moment nobody chooses. The failure was
    already reported (the first unreadable array), so from the first failed restore on, those go to this
    module's debug log: a narrow `sys.unraisablehook` (only coroutines of Orbax's code; everything else
    goes to the previous hook), installed once for the process. TensorStore finishing such a read later
    into the closed loop ("Event loop is closed" from `call_soon_threadsafe`) is treated the same way.
    The garbage collection is run here (its "coroutine ... was never awaited" warnings, of reads Orbax never
    started, are dropped)."""
    _install_unraisable_orbax_filter()
    with warnings.catch_warnings():  # Orbax's read coroutines that never started, collected here
        warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
        gc.collect()


_previous_unraisablehook = None


def _install_unraisable_orbax_filter() -> None:
    """The narrow `sys.unraisablehook` of `_unraisable_orbax_read_to_log`, installed once for the process (again
    if something replaced it since, as pytest does). After a failed restore, and after a failed save: there
    TensorStore's writes still in flight finish into Orbax's closed event loop, each callback raising "Event
    loop is closed" from `call_soon_threadsafe` (hundreds of tracebacks on a full disk, printed after the
    error line, measured on a 40 MiB tmpfs); they go to this module's debug log."""
    global _previous_unraisablehook
    if sys.unraisablehook is not _unraisable_orbax_read_to_log:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _unraisable_orbax_read_to_log


def _unraisable_orbax_read_to_log(unraisable) -> None:
    if _is_abandoned_orbax_read(unraisable):
        log.debug("an abandoned Orbax read of a failed restore raised %s: %s",
                  type(unraisable.exc_value).__name__, unraisable.exc_value)
        return
    (_previous_unraisablehook or sys.__unraisablehook__)(unraisable)


def _is_abandoned_orbax_read(unraisable) -> bool:
    """A read coroutine of Orbax's code, or TensorStore completing a read into a closed event loop
    (`call_soon_threadsafe` raising "Event loop is closed" from a callback, no object)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return f"{os.sep}orbax{os.sep}" in code.co_filename
    tb = unraisable.exc_traceback
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _orbax_write_threads() -> list:
    """Orbax's write threads (`_SignalingThread`, one per write of a save) still running."""
    try:
        from orbax.checkpoint._src.futures import future as orbax_future

        kind = orbax_future._SignalingThread
    except (ImportError, AttributeError):
        return []
    return [t for t in threading.enumerate()
            if isinstance(t, kind) and t is not threading.current_thread() and hasattr(t, "result")]


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
    if base.isdigit() and os.path.isdir(run_record.state_path(path)):
        return os.path.dirname(path), int(base)
    return path, None


def abstract_like(tree, shardings):
    """ShapeDtypeStructs (with shardings) of `tree`: a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s),
                        tree, shardings)


class PreemptionGuard:
    """SIGTERM -> save and stop at a step all processes agree on; Ctrl-C (SIGINT) -> stop, never swallowed.

    Single process: a SIGTERM handler sets a flag that `reached(step)` returns. Several processes:
    JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM and
    `multihost_utils.reached_preemption_sync_point` picks the same step on every process.

    SIGINT raises KeyboardInterrupt at once, as Python's default does, and also records it: Python drops an
    exception raised inside a garbage-collection callback (XLA's `_xla_gc_callback`: "Exception ignored in"),
    which let the run go on to the end and exit 0. `check_interrupt()`, called at every step, raises it again,
    so the command exits 130 (`cli.cli_exit`). A checkpoint being written at that moment is abandoned; the
    last complete one is kept.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.interrupted = False
        self._previous = None
        self._previous_int = None
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous_int = signal.signal(signal.SIGINT, self._handle_interrupt)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def _handle_interrupt(self, signum, frame):
        self.interrupted = True
        raise KeyboardInterrupt

    def check_interrupt(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came and its exception was swallowed on the way."""
        if self.interrupted:
            raise KeyboardInterrupt

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
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None


# --------------------------------------------------------------------------------------------------
# Reading only the parameters of a checkpoint (partial restore), for the export.

WEIGHT_CHOICES = ("ema", "params")


class CheckpointError(run_record.ReadError, ValueError):
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


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_weights(step_dir: Path, name: str) -> dict:
    """{"train_state": {name: params}} (numpy) restored alone from a step folder's state item (partial
    restore; CheckpointError naming the folder when it is not there or cannot be read)."""
    state_dir = run_record.state_path(step_dir)
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
            return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot restore train_state/{name} from {state_dir}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from None


def _restore_weights(step_dir: Path, weights: str, step: int) -> tuple[dict, dict]:
    """(params, meta) of `weights` from one step folder, checked by `run_record.verify`."""
    name = "ema_params" if weights == "ema" else "params"
    with jax.default_device(jax.devices("cpu")[0]):  # the fingerprint of numpy arrays: on the host
        verdict = run_record.verify(step_dir, lambda: _read_weights(step_dir, name), step)
    if not verdict.ok:
        raise CheckpointError(verdict.detail)
    return jax.tree.map(np.asarray, verdict.tree["train_state"][name]), verdict.meta


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
    steps = run_record.step_folders(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory} (expected step folders like {directory}/400 with "
                              "state/ and meta/)")
    if step is not None and step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; steps found: {steps}")
    candidates = [step] if step is not None else list(reversed(steps))
    failures = []
    for candidate in candidates:
        try:
            params, meta = _restore_weights(directory / str(candidate), weights, candidate)
        except CheckpointError as err:
            failures.append(str(err))
            if step is None and candidate != candidates[-1]:
                say(f"checkpoint at step {candidate} is unusable ({err}); falling back to an older one")
            continue
        run_dir = directory.parent if (directory.parent / "config.json").is_file() else None
        return CheckpointParams(params=params, weights=weights, step=int(meta.get("step", candidate)),
                                directory=directory / str(candidate), meta=meta, run_dir=run_dir)
    raise CheckpointError("; ".join(failures))
