"""Training data: the resumable stream, process shards, shards on disk, image folders, bad data."""

import json
import os

import numpy as np
import pytest

from flowmap_jax.data import datasets
from flowmap_jax import write_shards
from flowmap_jax.training.config import DataConfig


def _dataset(n=37):
    x0 = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    return datasets.ArrayDataset(x0)


def test_stream_is_deterministic_resumable_and_covers_each_epoch():
    data = _dataset()
    first = datasets.BatchStream(data, 8, seed=3)
    batches = [first.next() for _ in range(10)]
    resumed = datasets.BatchStream(data, 8, seed=3, position=6)
    for expected in batches[6:]:
        got = resumed.next()
        np.testing.assert_array_equal(got["x0"], expected["x0"])
        np.testing.assert_array_equal(got["example_id"], expected["example_id"])
    ids = np.concatenate([b["example_id"] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(80))
    values = np.concatenate([b["x0"][:, 0, 0, 0] for b in batches])
    assert sorted(values[:37]) == list(range(37))  # epoch 0 is a permutation of the data
    assert not np.array_equal(values[:37], values[37:74])  # epoch 1 another
    other_seed = datasets.BatchStream(data, 8, seed=4).next()
    assert not np.array_equal(other_seed["x0"], batches[0]["x0"])


def test_processes_take_disjoint_rows_of_the_same_global_batch():
    data = _dataset()
    whole = datasets.BatchStream(data, 8, seed=0, position=2).next()
    parts = [datasets.BatchStream(data, 8, seed=0, process_index=p, process_count=2, position=2).next()
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["x0"] for p in parts]), whole["x0"])
    np.testing.assert_array_equal(np.concatenate([p["example_id"] for p in parts]), whole["example_id"])
    with pytest.raises(datasets.DataError, match="divisible"):
        datasets.BatchStream(data, 9, seed=0, process_count=2)


def test_label_conditioner():
    table = np.arange(33, dtype=np.float32).reshape(11, 3)
    cond = datasets.LabelConditioner(table)
    out = cond(np.array([0, 9]))["encoder_hidden_states"]
    assert out.shape == (2, 1, 3) and np.array_equal(out[1, 0], table[9])
    assert np.array_equal(cond.uncond()["encoder_hidden_states"][0, 0], table[10])
    # Label 10 is the null label: the unconditional row, as the export's label table reads it
    # (spec.label_table); it is no class of the data, so a dataset holding it is refused.
    assert np.array_equal(cond(np.array([10]))["encoder_hidden_states"], cond.uncond()["encoder_hidden_states"])
    with pytest.raises(datasets.DataError, match="labels"):
        cond(np.array([11]))
    with pytest.raises(datasets.DataError, match="labels"):
        cond.check_data_labels(np.array([10]))
    with pytest.raises(datasets.DataError, match=r"labels must lie in 0\.\.9"):
        datasets.ArrayDataset(np.zeros((2, 4, 4, 1), np.float32), np.array([3, 10]), cond)


def test_shards_round_trip_through_npz_command(tmp_path):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(10, 8, 8, 4)).astype(np.float32)
    states = rng.normal(size=(10, 77, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x0=x0, **{"cond.encoder_hidden_states": states,
                                            "uncond.encoder_hidden_states": states[:1] * 0})
    out = tmp_path / "shards"
    assert write_shards.main(["--out", str(out), "--source", "npz", "--input", str(tmp_path / "in.npz"),
                              "--shard-size", "4", "--dtype", "float32"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["num_examples"] for s in index["shards"]] == [4, 4, 2]
    data = datasets.ShardsDataset(str(out))
    got = data.get(np.array([9, 0, 5, 4]))
    np.testing.assert_array_equal(got["x0"], x0[[9, 0, 5, 4]])
    np.testing.assert_array_equal(got["cond"]["encoder_hidden_states"], states[[9, 0, 5, 4]])
    assert data.uncond["encoder_hidden_states"].shape == (1, 77, 16)
    config = DataConfig(source="shards", path=str(out), sample_shape=(8, 8, 4))
    assert datasets.make_dataset(config, None).num_examples == 10


def test_digits_shards_in_float16(tmp_path):
    table = np.random.default_rng(0).normal(size=(11, 4)).astype(np.float32)
    x0 = np.random.default_rng(1).uniform(-1, 1, size=(6, 16, 16, 1)).astype(np.float32)
    labels = np.arange(6) % 10
    cond = datasets.LabelConditioner(table)
    write_shards.write_shards(str(tmp_path), x0, cond(labels), cond.uncond(), shard_size=4)
    got = datasets.ShardsDataset(str(tmp_path)).get(np.arange(6))
    np.testing.assert_allclose(got["x0"], x0, atol=1e-3)
    assert got["x0"].dtype == np.float32


def test_wrong_shape_and_bad_folders_are_clear_errors(tmp_path):
    write_shards.write_shards(str(tmp_path / "s"), np.zeros((3, 8, 8, 4), np.float32))
    bad = DataConfig(source="shards", path=str(tmp_path / "s"), sample_shape=(16, 16, 1))
    with pytest.raises(datasets.DataError, match=r"\(8, 8, 4\).*\(16, 16, 1\).*--data.sample_shape"):
        datasets.make_dataset(bad, None)
    with pytest.raises(datasets.DataError, match="index.json"):
        datasets.ShardsDataset(str(tmp_path))
    os.truncate(tmp_path / "s" / "shard-00000.safetensors", 200)
    with pytest.raises(datasets.DataError, match="truncated"):
        datasets.ShardsDataset(str(tmp_path / "s"))
    with pytest.raises(datasets.DataError, match="does not exist"):
        datasets.make_dataset(DataConfig(source="folder", path=str(tmp_path / "nope")), None)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    for label in (0, 1):
        os.makedirs(tmp_path / str(label))
        for i in range(3):
            Image.fromarray(np.full((20, 24), 80 * label, np.uint8)).save(tmp_path / str(label) / f"{i}.png")
    table = np.eye(11, 5, dtype=np.float32)
    config = DataConfig(source="folder", path=str(tmp_path), image_size=16, sample_shape=(16, 16, 1))
    data = datasets.make_dataset(config, datasets.LabelConditioner(table))
    assert data.num_examples == 6 and data.sample_shape == (16, 16, 1)
    batch = data.get(np.array([0, 5]))
    np.testing.assert_allclose(batch["x0"][0], -1.0)
    np.testing.assert_allclose(batch["x0"][1], 80 / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch["cond"]["encoder_hidden_states"][:, 0], table[[0, 1]])


def test_prefetcher_keeps_order_and_counts_what_it_hands_out():
    data = _dataset()
    reference = datasets.BatchStream(data, 4, seed=1, position=3)
    prefetch = datasets.Prefetcher(datasets.BatchStream(data, 4, seed=1, position=3), depth=2)
    try:
        for _ in range(5):
            np.testing.assert_array_equal(prefetch.next()["x0"], reference.next()["x0"])
        assert prefetch.position == 8
    finally:
        prefetch.close()

    class Broken:
        position = 0

        def next(self):
            raise datasets.DataError("bad batch")

    failing = datasets.Prefetcher(Broken())
    with pytest.raises(datasets.DataError, match="bad batch"):
        failing.next()
    failing.close()
