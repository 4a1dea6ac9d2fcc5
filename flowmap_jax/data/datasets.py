"""Training data: the built-in digits, an image folder, or precomputed shards; a resumable stream.

Every source is a `Dataset`: `num_examples`, `sample_shape` (H, W, C), `get(indices) -> {"x0":
(n, H, W, C) float32, "cond": {name: (n, ...) float32} or None}` and `uncond` (the conditioning of
one "empty" example, leading axis 1, for classifier-free guidance; None if the data has none).

`BatchStream` turns a dataset into the training stream, deterministic and resumable from a single
integer: `position`, the number of global batches consumed. Global example j of the stream (j =
position * B + row) is example `perm_e[j % N]` of epoch e = j // N, perm_e a permutation seeded with
(seed, e). Process p of P takes rows [p * B/P, (p + 1) * B/P) of every global batch and loads only
those. Each batch also carries "example_id" (B/P,) int32 = j mod 2^31, the key of the example's
randomness in the train step, so the run does not depend on how the batch is split.

Conditioning from class labels (digits, class sub-folders): the teacher folder's
`label_embeddings.safetensors` ("weight" (K + 1, D), row K the null label) maps label l to
`{"encoder_hidden_states": weight[l][None, :]}` (1, D) per example, as the digits teacher was trained.

Shards (written by `python -m flowmap_jax.write_shards`, `flowmap_jax.data.shard_writer`), format "flowmap-shards/1":
  <dir>/index.json        {"format": "flowmap-shards/1", "num_examples": N, "sample_shape": [H, W, C],
                           "cond": {name: shape without batch} (may be empty), "uncond": file or null,
                           "shards": [{"file": "shard-00000.safetensors", "num_examples": n}, ...],
                           "source": {free-form provenance: VAE, scaling factor, text encoder}}
  <dir>/shard-*.safetensors  "x0": (n, H, W, C) float16 or float32, model space (latents already
                           multiplied by the VAE's scaling_factor; NHWC), and "cond.<name>": (n, ...)
                           for each conditioning input (SD: "cond.encoder_hidden_states" (n, 77, 768)).
  <dir>/uncond.safetensors "cond.<name>": (1, ...) the unconditional conditioning of classifier-free
                           guidance (SD: the empty prompt's; SDXL: zeros, as its pipeline's
                           force_zeros_for_empty_prompt). A name it lacks is taken from each example's own
                           conditioning (SDXL's time_ids: diffusers gives both branches the same).
A conditioning name is a keyword argument of the UNet; a dotted name is a nested one: SDXL's shards hold
"cond.added_cond_kwargs.text_embeds" (n, P) (the second text encoder's pooled projection) and
"cond.added_cond_kwargs.time_ids" (n, 6) (original (h, w), crop top-left (top, left), target (h, w), in
pixels), which `get` returns as cond["added_cond_kwargs"] = {"text_embeds", "time_ids"}.
Shards are read with numpy memory maps (random rows, no whole-file loads, no pickle).
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np

from flowmap_jax.data.data_error import DataError
from flowmap_jax.spec import label_table

SHARDS_FORMAT = "flowmap-shards/1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


class Dataset(Protocol):
    num_examples: int
    sample_shape: tuple[int, int, int]
    uncond: dict | None

    def get(self, indices: np.ndarray) -> dict: ...


# --------------------------------------------------------------------------------------------------
# Sources.

class LabelConditioner:
    """Class labels -> {"encoder_hidden_states": (n, 1, D)} through a (K + 1, D) embedding table
    (row K: the null label used for classifier-free guidance), read and applied by `spec.label_table` (the
    same reader as the exported flow map's and the samplers'). The data's own labels must lie in 0..K-1
    (`check_data_labels`); the null label K is the unconditional embedding (`uncond`)."""

    def __init__(self, table: np.ndarray):
        self.table = np.asarray(table, np.float32)
        if self.table.ndim != 2:
            raise DataError(f"label embeddings must be (K + 1, D), got shape {self.table.shape}")
        self.null_label = self.table.shape[0] - 1

    @classmethod
    def from_file(cls, path: str) -> LabelConditioner:
        try:
            return cls(label_table.read_label_embeddings(path))
        except ValueError as error:
            raise DataError(str(error)) from None

    def check_data_labels(self, labels) -> None:
        """DataError unless every label of the data lies in 0..K-1 (K, the null label, is not a class)."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= self.null_label):
            raise DataError(f"labels must lie in 0..{self.null_label - 1}, got {labels.min()}..{labels.max()}")

    def __call__(self, labels) -> dict:
        try:
            return {"encoder_hidden_states": label_table.labels_to_encoder_hidden_states(self.table, labels)}
        except ValueError as error:
            raise DataError(str(error)) from None

    def uncond(self) -> dict:
        return {"encoder_hidden_states": label_table.unconditional_encoder_hidden_states(self.table)}


class ArrayDataset:
    """In-memory examples: x0 (N, H, W, C) float32 and optional labels (N,) with a conditioner."""

    def __init__(self, x0: np.ndarray, labels: np.ndarray | None = None,
                 conditioner: LabelConditioner | None = None):
        x0 = np.asarray(x0, np.float32)
        if x0.ndim != 4:
            raise DataError(f"x0 must be (N, H, W, C), got shape {x0.shape}")
        self.x0 = x0
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.conditioner = conditioner if self.labels is not None else None
        if self.conditioner is not None:
            self.conditioner.check_data_labels(self.labels)
        self.num_examples = int(x0.shape[0])
        self.sample_shape = tuple(int(d) for d in x0.shape[1:])
        self.uncond = self.conditioner.uncond() if self.conditioner is not None else None

    def get(self, indices) -> dict:
        indices = np.asarray(indices)
        cond = self.conditioner(self.labels[indices]) if self.conditioner is not None else None
        return {"x0": self.x0[indices], "cond": cond}

    def labels_of(self, indices) -> np.ndarray | None:
        return None if self.labels is None else self.labels[np.asarray(indices)]


def digits_dataset(conditioner: LabelConditioner | None, split: str = "train") -> ArrayDataset:
    """scikit-learn digits at 16x16 in [-1, 1], (N, 16, 16, 1) (`flowmap_jax.digits.data`)."""
    from flowmap_jax.digits.data import load_digits

    images, labels = load_digits(split)
    return ArrayDataset(images, labels, conditioner)


def _list_images(folder: str) -> tuple[list[str], list[int] | None]:
    """Image files under `folder`, sorted. Class sub-folders named 0, 1, ... give integer labels."""
    if not os.path.isdir(folder):
        raise DataError(f"--data.path: image folder {folder} does not exist")
    subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if subdirs and all(d.isdigit() for d in subdirs):
        files, labels = [], []
        for d in subdirs:
            for name in sorted(os.listdir(os.path.join(folder, d))):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(folder, d, name))
                    labels.append(int(d))
        return files, labels
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return files, None


def load_images(files: list[str], size: int, channels: int) -> np.ndarray:
    """Images -> (N, size, size, channels) float32 in [-1, 1] (centre crop to square, bicubic
    resize with PIL; channels 1 = grayscale, 3 = RGB)."""
    from PIL import Image

    out = np.empty((len(files), size, size, channels), np.float32)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            w, h = image.size
            side = min(w, h)
            image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            image = image.resize((size, size), Image.BICUBIC)
            array = np.asarray(image, np.float32) / 127.5 - 1.0
        out[i] = array.reshape(size, size, channels)
    return out


def folder_dataset(folder: str, image_size: int, sample_shape, conditioner: LabelConditioner | None,
                   vae: str = "", vae_subfolder: str = "vae") -> ArrayDataset:
    """Every image of `folder` (class sub-folders 0, 1, ... give labels), resized to `image_size`.

    Pixel-space teacher (no `vae`): channels from `sample_shape` (1 or 3). Latent teacher: `vae`
    names a diffusers AutoencoderKL folder or hub id; the images (RGB) are encoded once, at start-up,
    with PyTorch (the `[torch]` extra; there is no Flax VAE here), latents = mean * scaling_factor.
    For large folders write shards once instead (`python -m flowmap_jax.write_shards`).
    """
    files, labels = _list_images(folder)
    if not files:
        raise DataError(f"--data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    if vae:
        from flowmap_jax.data.encoders import encode_with_vae

        x0 = encode_with_vae(load_images(files, image_size, 3), vae, vae_subfolder)
    else:
        x0 = load_images(files, image_size, int(sample_shape[-1]))
    if labels is not None and conditioner is None:
        labels = None
    return ArrayDataset(x0, None if labels is None else np.asarray(labels), conditioner)


def _safetensors_memmaps(path: str) -> dict[str, np.ndarray]:
    """name -> read-only np.memmap of each tensor in a safetensors file (F16/F32/I32/I64/U8)."""
    dtypes = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32,
              "I64": np.int64, "U8": np.uint8}
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not a readable safetensors file (truncated or malformed: {error})") from None
    start = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise DataError(f"{path}: tensor {name} has dtype {info['dtype']}; shards must be F16 or F32")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if (end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtypes[info["dtype"]]).itemsize
                or start + end > size):
            raise DataError(f"{path}: tensor {name} is truncated or malformed")
        out[name] = np.memmap(path, dtype=dtypes[info["dtype"]], mode="r", offset=start + begin, shape=shape)
    return out


class ShardsDataset:
    """Precomputed shards (format in the module docstring), read through memory maps."""

    def __init__(self, folder: str):
        index_path = os.path.join(folder, "index.json")
        if not os.path.isfile(index_path):
            raise DataError(f"--data.path: {folder} has no index.json; write shards with "
                            f"`python -m flowmap_jax.write_shards`")
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != SHARDS_FORMAT:
            raise DataError(f"{index_path}: format {index.get('format')!r}, expected {SHARDS_FORMAT!r}")
        self.folder = folder
        self.index = index
        self.sample_shape = tuple(int(d) for d in index["sample_shape"])
        self.cond_names = sorted(index.get("cond", {}))
        self.shards = []
        counts = []
        for entry in index["shards"]:
            path = os.path.join(folder, entry["file"])
            if not os.path.isfile(path):
                raise DataError(f"shard {path} listed in index.json is missing")
            tensors = _safetensors_memmaps(path)
            n = int(entry["num_examples"])
            if "x0" not in tensors or tuple(tensors["x0"].shape) != (n, *self.sample_shape):
                got = tuple(tensors["x0"].shape) if "x0" in tensors else None
                raise DataError(f"shard {path}: x0 has shape {got}, index.json says {(n, *self.sample_shape)}")
            for name in self.cond_names:
                key = f"cond.{name}"
                want = (n, *index["cond"][name])
                if key not in tensors or tuple(tensors[key].shape) != want:
                    raise DataError(f"shard {path}: {key} missing or not of shape {want}")
            self.shards.append(tensors)
            counts.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_examples = int(self.offsets[-1])
        if self.num_examples != int(index["num_examples"]):
            raise DataError(f"{index_path}: shards hold {self.num_examples} examples, index says {index['num_examples']}")
        self.uncond = None
        if index.get("uncond"):
            uncond_path = os.path.join(folder, index["uncond"])
            if not os.path.isfile(uncond_path):
                raise DataError(f"{uncond_path} listed in index.json is missing")
            tensors = _safetensors_memmaps(uncond_path)
            flat = {}
            for key, value in tensors.items():
                name = key[len("cond."):]
                if not key.startswith("cond.") or name not in self.cond_names:
                    raise DataError(f"{uncond_path}: tensor {key} is not one of the shards' conditioning "
                                    f"{['cond.' + n for n in self.cond_names]}")
                want = (1, *index["cond"][name])
                if tuple(value.shape) != want:
                    raise DataError(f"{uncond_path}: {key} has shape {tuple(value.shape)}, expected {want}")
                flat[name] = np.asarray(value, np.float32)
            self.uncond = nest_cond(flat)

    def get(self, indices) -> dict:
        indices = np.asarray(indices, np.int64)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        x0 = np.empty((len(indices), *self.sample_shape), np.float32)
        cond = {name: np.empty((len(indices), *self.index["cond"][name]), np.float32) for name in self.cond_names}
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            local = indices[rows] - self.offsets[s]
            x0[rows] = self.shards[s]["x0"][local]
            for name in self.cond_names:
                cond[name][rows] = self.shards[s][f"cond.{name}"][local]
        return {"x0": x0, "cond": nest_cond(cond) or None}


def nest_cond(flat: dict) -> dict:
    """{"a": x, "b.c": y} -> {"a": x, "b": {"c": y}} (dotted shard names -> the UNet's nested keywords)."""
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def make_dataset(data_config, conditioner: LabelConditioner | None) -> Dataset:
    """The dataset named by `data_config.source` (a `config.DataConfig`), shape-checked against
    `data_config.sample_shape`."""
    source = data_config.source
    if source == "digits":
        dataset = digits_dataset(conditioner)
    elif source == "folder":
        dataset = folder_dataset(data_config.path, data_config.image_size, data_config.sample_shape,
                                 conditioner, data_config.vae, data_config.vae_subfolder)
    elif source == "shards":
        if not os.path.isdir(data_config.path):
            raise DataError(f"--data.path: shards folder {data_config.path} does not exist")
        dataset = ShardsDataset(data_config.path)
    else:
        raise DataError(f"--data.source: unknown source {source!r} (digits, folder, shards)")
    want = tuple(data_config.sample_shape)
    if tuple(dataset.sample_shape) != want:
        raise DataError(f"data from --data.source {source} has examples of shape (H, W, C) = "
                        f"{tuple(dataset.sample_shape)}, but the run expects {want} (--data.sample_shape, "
                        f"which must match the teacher)")
    if dataset.num_examples < 1:
        raise DataError(f"--data.source {source}: no examples")
    return dataset


# --------------------------------------------------------------------------------------------------
# The stream.

class BatchStream:
    """Deterministic, resumable batches of one process (see the module docstring).

    global_batch: B, divisible by process_count. position: global batches consumed so far (restore
    it from a checkpoint to resume exactly). `next()` returns this process's rows of the next global
    batch: {"x0": (B/P, H, W, C), "cond": dict or None, "example_id": (B/P,) int32}.
    """

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, position: int = 0):
        if global_batch % process_count:
            raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.dataset = dataset
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // process_count
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.position = int(position)
        self._perm_epoch = None
        self._perm = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def stream_indices(self, position: int) -> np.ndarray:
        """Global stream positions j of this process's rows of global batch `position`."""
        start = position * self.global_batch + self.process_index * self.local_batch
        return np.arange(start, start + self.local_batch, dtype=np.int64)

    def dataset_indices(self, stream_positions: np.ndarray) -> np.ndarray:
        n = self.dataset.num_examples
        out = np.empty(len(stream_positions), np.int64)
        epochs = stream_positions // n
        for epoch in np.unique(epochs):
            rows = np.flatnonzero(epochs == epoch)
            out[rows] = self._permutation(int(epoch))[stream_positions[rows] % n]
        return out

    def next(self) -> dict:
        stream = self.stream_indices(self.position)
        batch = self.dataset.get(self.dataset_indices(stream))
        batch["example_id"] = (stream % (2**31)).astype(np.int32)
        self.position += 1
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next()


class Prefetcher:
    """Draws the next `depth` batches of a `BatchStream` in a background thread (data loading overlaps
    the device's step). `position` counts the batches handed out (what a checkpoint must record),
    not the ones drawn ahead. Errors in the thread are raised by `next`."""

    def __init__(self, stream: BatchStream, depth: int = 2):
        import queue
        import threading

        self.position = stream.position
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()

        def work():
            while not self._stop.is_set():
                try:
                    item = (stream.next(), None)
                except BaseException as error:  # noqa: BLE001 - handed to the consumer
                    item = (None, error)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[1] is not None:
                    return

        self._thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
        self._thread.start()

    def next(self) -> dict:
        batch, error = self._queue.get()
        if error is not None:
            raise error
        self.position += 1
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
