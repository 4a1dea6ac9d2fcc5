"""`flowmap_jax.training.run_record`: the one check of a checkpoint step folder (`verify`) and its fingerprint.

- verify returns a typed reason for each kind of damage: a missing or broken meta file (BAD_METADATA),
  arrays that cannot be read (UNREADABLE), arrays that differ from what was written (FINGERPRINT_MISMATCH);
  the reason's slug names the rejected/ folder;
- the fingerprint catches what a sum and a sum of squares alone miss (entries permuted, a zero-sum array
  negated), on a real Orbax checkpoint through both readers (trainer's resume, export's reader);
- checkpoints with the older flat-list fingerprint still restore and are still checked.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap_jax.training import checkpointing, rejected_checkpoints, run_record
from flowmap_jax.training import sharding as sh
from flowmap_jax.training import train_step as ts
from flowmap_jax.training.config import OptimConfig
from flowmap_jax.training.run_record import RejectReason
from tests import train_support


def _write_step(step_dir, tree, step=3):
    """A step folder's meta file (as the trainer writes it) for `tree`; the arrays come from `read`."""
    os.makedirs(run_record.meta_path(step_dir).parent, exist_ok=True)
    os.makedirs(run_record.state_path(step_dir), exist_ok=True)
    meta = run_record.meta_record(tree, step, data_position=12)
    run_record.meta_path(step_dir).write_text(json.dumps(meta))
    return meta


def _tree():
    rng = np.random.default_rng(0)
    return {"train_state": {"step": np.int32(3), "params": {"w": rng.standard_normal((4, 6)).astype(np.float32),
                                                            "b": np.array([1.0, -1.0, 2.0, -2.0], np.float32)}},
            "rng": np.array([7, 11], np.uint32)}


def test_verify_accepts_what_was_written(tmp_path):
    tree = _tree()
    meta = _write_step(tmp_path / "3", tree)
    verdict = run_record.verify(tmp_path / "3", lambda: tree, step=3)
    assert verdict.ok and verdict.reason is None and verdict.meta == meta and verdict.tree is tree
    assert set(meta["fingerprint"]) == {"train_state/step", "train_state/params/w", "train_state/params/b", "rng"}
    assert meta["fingerprint"]["train_state/params/w"][0] == 24  # [size, sum, sum of squares, weighted sum]
    assert set(meta) == set(run_record.META_KEYS)


@pytest.mark.parametrize("damage, reason", [
    ("no_meta_file", RejectReason.BAD_METADATA),
    ("meta_not_json", RejectReason.BAD_METADATA),
    ("meta_without_fingerprint", RejectReason.BAD_METADATA),
    ("meta_of_another_step", RejectReason.BAD_METADATA),
    ("arrays_unreadable", RejectReason.UNREADABLE),
    ("array_changed", RejectReason.FINGERPRINT_MISMATCH),
    ("array_not_in_fingerprint", RejectReason.FINGERPRINT_MISMATCH),
    ("array_not_finite", RejectReason.FINGERPRINT_MISMATCH),
])
def test_verify_names_each_kind_of_damage(tmp_path, damage, reason):
    tree = _tree()
    step_dir = tmp_path / "3"
    meta = _write_step(step_dir, tree)
    path = run_record.meta_path(step_dir)
    read = lambda: tree
    if damage == "no_meta_file":
        os.remove(path)
    elif damage == "meta_not_json":
        path.write_text("{half a json")
    elif damage == "meta_without_fingerprint":
        path.write_text(json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}))
    elif damage == "meta_of_another_step":
        path.write_text(json.dumps(dict(meta, step=5)))
    elif damage == "arrays_unreadable":
        def read():
            raise OSError("Error reading byte range of local file state/d/0123 (simulated)")
    elif damage == "array_changed":
        changed = jax.tree.map(lambda x: x, tree)
        changed["train_state"]["params"]["w"] = tree["train_state"]["params"]["w"].copy()
        changed["train_state"]["params"]["w"][1, 2] += 0.5
        read = lambda: changed
    elif damage == "array_not_in_fingerprint":
        read = lambda: dict(tree, extra_leaf=np.ones(3, np.float32))
    else:
        changed = jax.tree.map(lambda x: x, tree)
        changed["train_state"]["params"]["b"] = np.array([1.0, np.nan, 2.0, -2.0], np.float32)
        read = lambda: changed
    verdict = run_record.verify(step_dir, read, step=3)
    assert verdict.reason is reason and not verdict.ok
    assert verdict.detail  # one line saying why
    if reason is RejectReason.BAD_METADATA:
        assert str(path) in verdict.detail
    if damage == "arrays_unreadable":
        assert verdict.detail.startswith("OSError: Error reading byte range")
    if damage == "array_changed":
        assert "fingerprint mismatch" in verdict.detail and "train_state/params/w" in verdict.detail


def test_reasons_have_stable_slugs_that_name_the_rejected_folder(tmp_path):
    assert {r: r.slug for r in RejectReason} == {RejectReason.BAD_METADATA: "bad-metadata",
                                                 RejectReason.UNREADABLE: "unreadable",
                                                 RejectReason.FINGERPRINT_MISMATCH: "fingerprint-mismatch"}
    for reason in RejectReason:
        (tmp_path / "4").mkdir()
        target = rejected_checkpoints.set_aside(str(tmp_path), 4, reason)
        assert target == str(tmp_path / "rejected" / f"4-{reason.slug}") and os.path.isdir(target)
    assert rejected_checkpoints.set_aside(str(tmp_path), 4, RejectReason.UNREADABLE) is None  # nothing there


def test_fingerprint_catches_what_sum_and_sum_of_squares_miss():
    """A permutation of entries (a reversed array, two swapped rows) and a zero-sum array negated keep the
    sum and the sum of squares; the position-weighted sum tells them apart."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    b = np.array([1.0, -1.0, 2.0, -2.0], np.float32)  # sum 0: negated, it keeps both sums
    base = run_record.fingerprint({"w": w, "b": b})
    for corrupted in ({"w": w[::-1].copy(), "b": b}, {"w": w[[1, 0, *range(2, 8)]], "b": b},
                      {"w": w.reshape(-1)[::-1].reshape(8, 16).copy(), "b": b}, {"w": w, "b": -b}):
        actual = run_record.fingerprint(corrupted)
        for path in ("w", "b"):  # what the older fingerprint compared: equal
            np.testing.assert_allclose(actual[path][1:3], base[path][1:3], rtol=1e-5, atol=1e-5)
        assert not run_record.fingerprints_match(base, actual)
        assert run_record.mismatched_leaves(base, actual) == ["w" if corrupted["b"] is b else "b"]
    assert run_record.fingerprints_match(base, run_record.fingerprint({"w": w.copy(), "b": b.copy()}))


def test_fingerprint_agrees_across_device_placements_and_dtypes():
    """Sharded on a mesh of 2 or on one device, jax or numpy: the same fingerprint within the tolerance
    (float32 reductions differ in order), and large arrays whose sums cancel match too."""
    x = np.random.default_rng(2).standard_normal((64, 1024)).astype(np.float32)
    mesh = sh.make_mesh(1, 2, jax.devices()[:2]) if len(jax.devices()) >= 2 else sh.make_mesh(1, 1, jax.devices()[:1])
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, mesh.axis_names[-1])))
    on_host = run_record.fingerprint({"x": x})
    assert run_record.fingerprints_match(on_host, run_record.fingerprint({"x": sharded}))
    assert run_record.fingerprints_match(on_host, run_record.fingerprint({"x": jnp.asarray(x)}))
    assert run_record.fingerprints_match(run_record.fingerprint({"x": x.astype(np.float64)}), on_host)


# ---------------------------------------------------------------------------------------------------
# Real checkpoints (Orbax), read by the trainer's resume and by the export's reader.

def _state(mesh, transform=lambda x: x, step=0):
    params = jax.tree.map(transform, train_support.init_params())
    optimizer = ts.make_optimizer(OptimConfig(), 10)
    specs = sh.param_specs(params, mesh, 1)
    shardings = ts.state_shardings(params, optimizer, mesh, specs)
    state = ts.init_state(params, optimizer, mesh, specs).replace(step=jnp.int32(step))
    return state, shardings


def _save(directory, mesh, transforms):
    with checkpointing.Checkpointer(str(directory), keep=5, async_save=False) as ckpt:
        for step, transform in transforms.items():
            ckpt.save(_state(mesh, transform, step)[0], jax.random.key(7), data_position=step)


def test_permuted_arrays_are_rejected_by_both_readers(tmp_path):
    """Step 3's arrays replaced by those of a checkpoint whose every array is reversed (same sums, same sums
    of squares, Orbax reads them fine): the resume falls back to step 2 and moves step 3 to
    rejected/3-fingerprint-mismatch; the export's reader refuses step 3 and falls back too."""
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save(tmp_path / "run", mesh, {2: lambda x: x + 0.5, 3: lambda x: x})
    _save(tmp_path / "other", mesh, {3: lambda x: jnp.flip(x)})
    shutil.rmtree(tmp_path / "run" / "3" / "state")
    shutil.copytree(tmp_path / "other" / "3" / "state", tmp_path / "run" / "3" / "state")
    state, shardings = _state(mesh)
    abstract = checkpointing.abstract_like(state, shardings)
    said = []
    with pytest.raises(checkpointing.CheckpointError, match="fingerprint mismatch.*do not match the fingerprint"):
        checkpointing.read_checkpoint_params(tmp_path / "run", "ema", step=3)
    loaded = checkpointing.read_checkpoint_params(tmp_path / "run", "ema", say=said.append)
    assert loaded.step == 2 and "checkpoint at step 3 is unusable" in said[0]
    with checkpointing.Checkpointer(str(tmp_path / "run")) as ckpt:
        restored, _, meta = ckpt.restore(abstract, jax.random.key(0), say=said.append)
        assert [(step, v.reason) for step, v in ckpt.rejected] == [(3, RejectReason.FINGERPRINT_MISMATCH)]
        moved = ckpt.set_aside_rejected(say=said.append)
    assert meta["step"] == 2 and int(restored.step) == 2
    assert moved == [str(tmp_path / "run" / "rejected" / "3-fingerprint-mismatch")]


@pytest.mark.parametrize("damage, slug", [("remove_meta_file", "bad-metadata"), ("remove_state_folder", "unreadable"),
                                          ("edit_fingerprint", "fingerprint-mismatch")])
def test_damaged_checkpoint_is_set_aside_under_its_reason(tmp_path, damage, slug):
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save(tmp_path, mesh, {1: lambda x: x, 2: lambda x: x + 1.0})
    step_dir = tmp_path / "2"
    if damage == "remove_meta_file":
        os.remove(run_record.meta_path(step_dir))
    elif damage == "remove_state_folder":  # (damaged array files: tests/test_train_checkpoint.py, test_run_folder.py)
        shutil.rmtree(run_record.state_path(step_dir))
    else:
        meta = json.loads(run_record.meta_path(step_dir).read_text())
        meta["fingerprint"]["train_state/params/dense1/kernel"][3] += 1.0  # the weighted sum only
        run_record.meta_path(step_dir).write_text(json.dumps(meta))
    state, shardings = _state(mesh)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        restored, _, _ = ckpt.restore(checkpointing.abstract_like(state, shardings), jax.random.key(0),
                                      say=lambda _: None)
        assert int(restored.step) == 1
        assert ckpt.set_aside_rejected(say=lambda _: None) == [str(tmp_path / "rejected" / f"2-{slug}")]


def _as_legacy(meta: dict, tree_order: list[str], rng_words) -> dict:
    """The older on-disk fingerprint: [sum, sum of squares] per TrainState leaf (TrainState order), then
    the rng's key words."""
    values = []
    for path in tree_order:
        values += meta["fingerprint"][path][1:3]
    return dict(meta, fingerprint=values + [float(w) for w in rng_words])


def test_checkpoints_with_the_older_list_fingerprint_still_restore_and_are_checked(tmp_path):
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save(tmp_path, mesh, {1: lambda x: x, 2: lambda x: x + 1.0})
    state, shardings = _state(mesh, step=2)
    order = ["train_state/" + run_record.leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    rng_words = np.asarray(jax.random.key_data(jax.random.key(7)))
    for step in (1, 2):
        path = run_record.meta_path(tmp_path / str(step))
        path.write_text(json.dumps(_as_legacy(json.loads(path.read_text()), order, rng_words)))
    abstract = checkpointing.abstract_like(state, shardings)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        restored, rng, meta = ckpt.restore(abstract, jax.random.key(0))
    assert int(restored.step) == 2 and isinstance(meta["fingerprint"], list)
    np.testing.assert_array_equal(jax.random.key_data(rng), rng_words)
    for weights, shift in (("ema", 1.0), ("params", 1.0)):
        loaded = checkpointing.read_checkpoint_params(tmp_path, weights)
        assert loaded.step == 2
        np.testing.assert_array_equal(loaded.params["dense1"]["kernel"],
                                      np.asarray(train_support.init_params()["dense1"]["kernel"]) + shift)
    # Still checked: step 2's EMA entries of the list altered -> the export's reader and the resume fall back.
    path = run_record.meta_path(tmp_path / "2")
    meta = json.loads(path.read_text())
    n = len(jax.tree.leaves(state.params))
    ema = slice(2 * (1 + n), 2 * (1 + 2 * n))
    meta["fingerprint"][ema] = [v * 1.5 + 1.0 for v in meta["fingerprint"][ema]]
    path.write_text(json.dumps(meta))
    said = []
    assert checkpointing.read_checkpoint_params(tmp_path, "ema", say=said.append).step == 1
    assert checkpointing.read_checkpoint_params(tmp_path, "params").step == 2  # its own entries are intact
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        restored, _, _ = ckpt.restore(abstract, jax.random.key(0), say=said.append)
        assert int(restored.step) == 1 and ckpt.rejected[0][1].reason is RejectReason.FINGERPRINT_MISMATCH
