"""The run record: what one checkpoint step folder holds, and the one check of it (`verify`).

Layout: `<run>/checkpoints/<step>/` (written by `checkpointing.Checkpointer`, Orbax items) with
  state/          STATE_KEYS: {"train_state": TrainState(step, params, ema_params, opt_state),
                               "rng": (2,) uint32 key data} (Orbax StandardSave, sharded arrays)
  meta/metadata   JSON, META_KEYS: {"step", "data_position" (global batches consumed), "fingerprint",
                  "time", "extra"} (`meta_record`)

Fingerprint (`fingerprint`, the one function both readers use): {leaf path: [size, sum, sum of squares,
weighted sum]} of every leaf of the state tree, paths '/'-joined from the tree's keys
("train_state/ema_params/conv_in/kernel", "train_state/step", "rng"). The reductions are float32 on
whatever device holds the arrays, one axis at a time (so float32 accumulation error stays small on every
backend). The weighted sum uses POSITION_WEIGHTS of each entry's flat (C-order) index, so a permutation of
entries (swapped rows, a reversed array, a zero-sum array negated), which keeps the sum and the sum of
squares, changes it. Compared by `mismatched_leaves` under ONE tolerance (`_close`).
Older checkpoints wrote a flat list instead (LEGACY: [sum, sum of squares] per TrainState leaf in
TrainState order step, params, ema_params, opt_state, then the rng's key words); it is still read
(`saved_fingerprint`).

`verify(step_dir, read, step)` reads the meta file, the arrays (through `read`, Orbax lives in
`checkpointing`) and compares them with the fingerprint; it returns a `Verdict` whose `reason` is None
(good) or a `RejectReason` with a stable `slug` (the `<checkpoints>/rejected/<step>-<slug>` folder name):
  BAD_METADATA          meta/metadata missing, not JSON, without a fingerprint, or of another step;
  UNREADABLE            the arrays in state/ cannot be read (a missing, truncated or damaged file);
  FINGERPRINT_MISMATCH  the arrays read differ from what was written (or have no fingerprint entry).
Both the trainer's resume (`Checkpointer.restore`) and the export's reader (`read_checkpoint_params`) call it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

STATE_ITEM = "state"
META_ITEM = "meta"
META_FILE = "metadata"  # Orbax's JsonSave file inside meta/
STATE_KEYS = ("train_state", "rng")
META_KEYS = ("step", "data_position", "fingerprint", "time", "extra")
TRAIN_STATE_FIELDS = ("step", "params", "ema_params", "opt_state")  # TrainState's order (the legacy list's)
FINGERPRINT_FIELDS = ("size", "sum", "sum_of_squares", "weighted_sum")
RTOL = 1e-4  # relative, of |saved| + |actual|
SPREAD = 1e-5  # times sqrt(size * sum of squares): float32 accumulation error of a sum with cancellation
ATOL = 1e-6


class RejectReason(enum.Enum):
    """Why a checkpoint step folder is not used; `slug` names its rejected/ folder."""

    BAD_METADATA = "bad-metadata"
    UNREADABLE = "unreadable"
    FINGERPRINT_MISMATCH = "fingerprint-mismatch"

    @property
    def slug(self) -> str:
        return self.value


class ReadError(Exception):
    """Raised by a `verify` reader with a complete message, which becomes the verdict's detail as it is
    (any other exception is named by its type and first line)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of `verify`: reason None (good: `tree` and `meta` hold what was read) or a RejectReason
    with `detail`, one human-readable line naming the file or arrays."""

    reason: RejectReason | None
    detail: str = ""
    tree: Any = None
    meta: dict | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def meta_path(step_dir) -> Path:
    return Path(step_dir) / META_ITEM / META_FILE


def state_path(step_dir) -> Path:
    return Path(step_dir) / STATE_ITEM


def step_folders(directory) -> list[int]:
    """Finished steps under a checkpoints folder: numeric folders with state/ (Orbax's in-progress
    `*.orbax-checkpoint-tmp-*` and rejected/ excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and state_path(p).is_dir())


def state_tree(train_state, rng_data) -> dict:
    """The state item's tree (STATE_KEYS): the TrainState and the rng's key data."""
    return {"train_state": train_state, "rng": rng_data}


def meta_record(tree, step: int, data_position: int, extra: dict | None = None) -> dict:
    """The meta item of a step (META_KEYS), its fingerprint computed from `tree` (`state_tree`)."""
    return {"step": int(step), "data_position": int(data_position), "time": time.time(),
            "fingerprint": fingerprint(tree), "extra": extra or {}}


# --------------------------------------------------------------------------------------------------
# Fingerprint.

def leaf_path(key_path) -> str:
    """'/'-joined names of a jax key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _position_weights(shape) -> jax.Array:
    """POSITION_WEIGHTS: float32 in [-0.5, 0.5) from each entry's flat index i (uint32, C order): the top
    16 bits of i * 0x9E3779B9 (mod 2**32) / 2**16 - 0.5. Exact in float32, the same on every device."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    hashed = (index * jnp.uint32(0x9E3779B9)) >> jnp.uint32(16)
    return hashed.astype(jnp.float32) / 65536.0 - 0.5


def _sum_by_axes(x: jax.Array) -> jax.Array:
    """Sum of all entries, one axis at a time from the last (short float32 accumulations)."""
    while x.ndim:
        x = jnp.sum(x, axis=-1)
    return x


@jax.jit
def _leaf_sums(leaves) -> jax.Array:
    """(num_leaves, 3) float32: sum, sum of squares and weighted sum of each leaf (float32)."""
    rows = []
    for leaf in leaves:
        x = jnp.asarray(leaf, jnp.float32)
        rows.append(jnp.stack([_sum_by_axes(x), _sum_by_axes(x * x), _sum_by_axes(x * _position_weights(x.shape))]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 3), jnp.float32)


def fingerprint(tree) -> dict[str, list[float]]:
    """{leaf path: [size, sum, sum of squares, weighted sum]} (FINGERPRINT_FIELDS) of every leaf of `tree`
    (jax or numpy arrays; the reductions run where the arrays are, float32). Compare with `mismatched_leaves`."""
    with_paths = jax.tree_util.tree_leaves_with_path(tree)
    sums = np.asarray(jax.device_get(_leaf_sums([leaf for _, leaf in with_paths])), np.float64)
    return {leaf_path(path): [int(np.size(leaf)), *(float(v) for v in row)]
            for (path, leaf), row in zip(with_paths, sums)}


def _close(saved: float, actual: float, scale: float) -> bool:
    """The tolerance: float32 reductions of the same data on different devices (or meshes) agree to well
    within RTOL of the values plus SPREAD * sqrt(size * sum of squares) (about 100 float32 epsilons times
    size * rms, for sums that cancel); a corrupted block of more than about 1e-4 of an array's entries
    (or any non-finite value) does not."""
    return abs(saved - actual) <= RTOL * (abs(saved) + abs(actual)) + SPREAD * scale + ATOL


def _leaf_matches(saved, actual) -> bool:
    """`saved`: [size or None, sum, sum of squares, weighted sum or None]; `actual`: a `fingerprint` entry."""
    size, total, sumsq, weighted = actual
    if not all(math.isfinite(v) for v in (total, sumsq, weighted)):
        return False
    if saved[0] is not None and int(saved[0]) != size:
        return False
    scale = math.sqrt(size * max(sumsq, 0.0))
    return (_close(saved[1], total, scale) and _close(saved[2], sumsq, 0.0)
            and (saved[3] is None or _close(saved[3], weighted, scale)))


def mismatched_leaves(saved: dict, actual: dict) -> list[str]:
    """Paths of `actual` (a `fingerprint`) whose saved entry is missing or differs; [] when all match.
    `saved` may cover more leaves than were read (a partial read)."""
    return [path for path, values in actual.items()
            if path not in saved or not _leaf_matches(saved[path], values)]


def fingerprints_match(saved: dict, actual: dict) -> bool:
    return not mismatched_leaves(saved, actual)


def saved_fingerprint(meta: dict, tree) -> dict:
    """The fingerprint written with a step, {path: [size or None, sum, sum of squares, weighted sum or None]};
    a LEGACY flat list is laid onto the paths of `tree` (the tree read, whole or a part of the state)."""
    saved = meta["fingerprint"]
    if isinstance(saved, dict):
        return {path: list(values) for path, values in saved.items()}
    return _legacy_fingerprint([float(v) for v in saved], tree)


def _legacy_fingerprint(values: list[float], tree) -> dict:
    """LEGACY: 2 values per TrainState leaf (TrainState order), then the rng's key words. Each field's
    leaves are found by count: step 1, params and ema_params alike (the same structure), opt_state as
    read (needed only when it was read, as the rng after it)."""
    by_field: dict[str, list[str]] = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        name = leaf_path(path)
        parts = name.split("/")
        key = parts[1] if parts[0] == "train_state" and len(parts) > 1 else parts[0]
        by_field.setdefault(key, []).append(name)
    n_params = len(by_field.get("params") or by_field.get("ema_params") or [])
    counts = {"step": 1, "params": n_params, "ema_params": n_params, "opt_state": len(by_field.get("opt_state", []))}
    out, offset = {}, 0
    for field in TRAIN_STATE_FIELDS:
        for i, name in enumerate(by_field.get(field, [])):
            k = 2 * (offset + i)
            if k + 1 < len(values):
                out[name] = [None, values[k], values[k + 1], None]
        offset += counts[field]
    if "rng" in by_field and "opt_state" in by_field:
        words = np.asarray(values[2 * offset:], np.float64)
        out["rng"] = [int(words.size), float(words.sum()), float(np.square(words).sum()), None]
    return out


# --------------------------------------------------------------------------------------------------
# The check.

def _first_line(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, ReadError):
        return text
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def read_meta(step_dir, step: int | None = None) -> tuple[dict | None, str]:
    """(meta, "") of a step folder, or (None, why) when meta/metadata is missing, not a JSON object, has no
    fingerprint, or names another step than `step`."""
    path = meta_path(step_dir)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"cannot read the checkpoint metadata {path}: {err}"
    if not isinstance(meta, dict) or "fingerprint" not in meta:
        return None, f"the checkpoint metadata {path} has no fingerprint (metadata missing)"
    if step is not None and meta.get("step") is not None and int(meta["step"]) != int(step):
        return None, f"the checkpoint metadata {path} says step {meta['step']}, not {step}"
    return meta, ""


def verify(step_dir, read: Callable[[], Any], step: int | None = None) -> Verdict:
    """Read and check one step folder: its meta (BAD_METADATA), the arrays `read()` returns (the state
    tree or a part of it, leaves keyed like `state_tree`; any exception: UNREADABLE, named by its first
    line) and their fingerprint (FINGERPRINT_MISMATCH). Returns a Verdict (reason None when good)."""
    meta, why = read_meta(step_dir, step)
    if meta is None:
        return Verdict(RejectReason.BAD_METADATA, why)
    try:
        tree = read()
    except Exception as err:  # noqa: BLE001 - any failure to read the arrays: an unreadable checkpoint
        return Verdict(RejectReason.UNREADABLE, _first_line(err), meta=meta)
    actual = fingerprint(tree)
    saved = saved_fingerprint(meta, tree)
    bad = mismatched_leaves(saved, actual)
    if bad:
        missing = [p for p in bad if p not in saved]
        listed = f"{bad[:5]}{' ...' if len(bad) > 5 else ''}"
        if missing:
            detail = (f"fingerprint mismatch: {meta_path(step_dir)} has no fingerprint for {len(missing)} of the "
                      f"{len(actual)} arrays read, e.g. {missing[:3]} (not a checkpoint of this flow map?)")
        else:
            detail = (f"fingerprint mismatch: the arrays {listed} of {state_path(step_dir)} do not match the "
                      "fingerprint written with them (a corrupted checkpoint)")
        return Verdict(RejectReason.FINGERPRINT_MISMATCH, detail, tree, meta)
    return Verdict(None, "", tree, meta)
