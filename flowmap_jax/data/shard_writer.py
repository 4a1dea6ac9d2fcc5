"""Streaming writer of training shards (format "flowmap-shards/1", documented in `flowmap_jax.data.datasets`).

`ShardWriter(out, num_examples, ...)` takes examples batch by batch (`add(x0, cond)`) and writes each batch's
rows straight into their place in the current shard file: every shard's safetensors header is written when
the shard is opened (the number of rows is known from `num_examples`), and rows are appended with plain
file writes. Memory therefore holds one batch, whatever the shard size or the number of examples.

The whole folder is built under a temporary sibling name and renamed into place by `close(...)` (index.json
written last), so `out` is either the previous complete folder or the new complete one; a failure (or
`abort()`) removes the temporary folder and leaves `out` as it was. An existing `out` is replaced only if it
is a shards folder (it has an index.json) or empty. The temporary folder's name says whose it is,
`.NAME.tmp-PID@HOST.XXXXXXXX`: a writer killed with -9 leaves it behind, and the next writer of the same `out`
removes those of writers that are gone (`remove_dead_writers_folders`: pid no longer running on this host).

Conditioning is a dict of the UNet's keyword arguments; nested dicts (SDXL's added_cond_kwargs) are stored
under dotted names: {"added_cond_kwargs": {"text_embeds": ...}} -> "cond.added_cond_kwargs.text_embeds".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import uuid

import numpy as np

from flowmap_jax.data.data_error import DataError
from flowmap_jax.data.datasets import SHARDS_FORMAT

SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32"}


def flatten_cond(cond: dict | None, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a": x, "b": {"c": y}} -> {"a": x, "b.c": y} (the names stored in shards)."""
    out = {}
    for key, value in (cond or {}).items():
        if "." in key:
            raise DataError(f"conditioning name {key!r} must not contain '.'")
        if isinstance(value, dict):
            out.update(flatten_cond(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


class _ShardFile:
    """One safetensors file written row block by row block: header first, zero-filled to its final size."""

    def __init__(self, path: str, rows: int, row_shapes: dict[str, tuple], dtype: str):
        self.path, self.rows, self.dtype = path, rows, np.dtype(dtype)
        header, offset, self.layout = {}, 0, {}
        for name, shape in row_shapes.items():
            row_bytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [rows, *shape],
                            "data_offsets": [offset, offset + rows * row_bytes]}
            self.layout[name] = (offset, row_bytes, tuple(shape))
            offset += rows * row_bytes
        header["__metadata__"] = {"format": SHARDS_FORMAT}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
        self.data_start = 8 + len(text)
        self.file = open(path, "wb")  # noqa: SIM115 - open across add() calls, closed by close()
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.file.truncate(self.data_start + offset)
        self.filled = 0

    def write(self, arrays: dict[str, np.ndarray], start: int, stop: int) -> None:
        """Rows [start, stop) of every array go to rows [filled, filled + stop - start) of the file."""
        for name, (offset, row_bytes, shape) in self.layout.items():
            block = np.ascontiguousarray(arrays[name][start:stop], dtype=self.dtype)
            self.file.seek(self.data_start + offset + self.filled * row_bytes)
            self.file.write(block.tobytes())
        self.filled += stop - start

    def close(self) -> None:
        self.file.close()
        if self.filled != self.rows:
            raise DataError(f"{self.path}: {self.filled} rows written of {self.rows}")


class ShardWriter:
    """Writes `num_examples` examples into shards of `shard_size` rows under `out` (see the module docstring).

    add(x0 (n, H, W, C), cond {name: (n, ...)} nested or None): the next n examples; shapes fixed by the first
    call. close(uncond {name: (1, ...)} or None, source dict) -> `out`, once exactly num_examples were added.
    uncond may leave out names (e.g. SDXL's time_ids): those are taken from each example's own conditioning.
    """

    def __init__(self, out: str, num_examples: int, shard_size: int = 4096, dtype: str = "float16"):
        if dtype not in SAFETENSORS_DTYPES:
            raise DataError(f"--dtype must be float16 or float32, got {dtype!r}")
        if num_examples < 1:
            raise DataError(f"no examples to write to {out}")
        if shard_size < 1:
            raise DataError(f"--shard-size must be >= 1, got {shard_size}")
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise DataError(f"--out {out} exists and is not a folder")
        if os.path.isdir(self.out) and os.listdir(self.out) and not os.path.isfile(os.path.join(self.out, "index.json")):
            raise DataError(f"refusing to replace {out}: it is not empty and not a shards folder (no index.json)")
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        remove_dead_writers_folders(self.out)
        self.tmp = tempfile.mkdtemp(dir=os.path.dirname(self.out), prefix=_tmp_prefix(self.out, os.getpid()))
        self.num_examples, self.shard_size, self.dtype = int(num_examples), int(shard_size), dtype
        self.written = 0
        self.shards: list[dict] = []
        self.sample_shape = None
        self.cond_shapes: dict[str, tuple] = {}
        self._file: _ShardFile | None = None

    def _check(self, x0, flat, n):
        if self.sample_shape is None:
            if x0.ndim != 4:
                raise DataError(f"x0 must be (N, H, W, C), got shape {x0.shape}")
            self.sample_shape = tuple(x0.shape[1:])
            self.cond_shapes = {k: tuple(v.shape[1:]) for k, v in flat.items()}
        if tuple(x0.shape[1:]) != self.sample_shape:
            raise DataError(f"x0 rows have shape {x0.shape[1:]}, earlier ones {self.sample_shape}")
        if set(flat) != set(self.cond_shapes):
            raise DataError(f"cond names {sorted(flat)} differ from the first batch's {sorted(self.cond_shapes)}")
        for name, value in flat.items():
            if value.shape[0] != n or tuple(value.shape[1:]) != self.cond_shapes[name]:
                raise DataError(f"cond {name!r} has shape {value.shape}; expected ({n}, *{self.cond_shapes[name]})")
        if self.written + n > self.num_examples:
            raise DataError(f"more than the announced {self.num_examples} examples")

    def add(self, x0, cond: dict | None = None) -> None:
        x0 = np.asarray(x0)
        flat = flatten_cond(cond)
        n = int(x0.shape[0]) if x0.ndim else 0
        self._check(x0, flat, n)
        arrays = {"x0": x0, **{f"cond.{k}": v for k, v in flat.items()}}
        row_shapes = {"x0": self.sample_shape, **{f"cond.{k}": s for k, s in self.cond_shapes.items()}}
        start = 0
        while start < n:
            if self._file is None:
                rows = min(self.shard_size, self.num_examples - self.written)
                name = f"shard-{len(self.shards):05d}.safetensors"
                self._file = _ShardFile(os.path.join(self.tmp, name), rows, row_shapes, self.dtype)
                self.shards.append({"file": name, "num_examples": rows})
            take = min(n - start, self._file.rows - self._file.filled)
            self._file.write(arrays, start, start + take)
            start += take
            self.written += take
            if self._file.filled == self._file.rows:
                self._file.close()
                self._file = None

    def close(self, uncond: dict | None = None, source: dict | None = None) -> str:
        """Writes uncond.safetensors and index.json, then renames the folder into place. Returns `out`."""
        from safetensors.numpy import save_file

        try:
            if self.written != self.num_examples:
                raise DataError(f"{self.written} examples written of the announced {self.num_examples}")
            uncond_file = None
            if uncond:
                flat = flatten_cond(uncond)
                unknown = sorted(set(flat) - set(self.cond_shapes))
                if unknown:
                    raise DataError(f"uncond has {unknown}, which the examples' conditioning lacks")
                tensors = {}
                for name, value in flat.items():
                    want = (1, *self.cond_shapes[name])
                    if int(np.prod(value.shape)) != int(np.prod(want)):
                        raise DataError(f"uncond {name!r} has shape {value.shape}; expected {want}")
                    tensors[f"cond.{name}"] = np.ascontiguousarray(np.asarray(value, np.float32).reshape(want))
                uncond_file = "uncond.safetensors"
                save_file(tensors, os.path.join(self.tmp, uncond_file))
            index = {"format": SHARDS_FORMAT, "num_examples": self.num_examples,
                     "sample_shape": list(self.sample_shape),
                     "cond": {k: list(v) for k, v in self.cond_shapes.items()}, "uncond": uncond_file,
                     "shards": self.shards, "source": source or {}}
            with open(os.path.join(self.tmp, "index.json"), "w") as f:
                json.dump(index, f, indent=2)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes a private (0700) folder
            if os.path.exists(self.out):
                old = os.path.join(os.path.dirname(self.out), f".{os.path.basename(self.out)}.old-{uuid.uuid4().hex[:8]}")
                os.rename(self.out, old)
                try:
                    os.rename(self.tmp, self.out)
                except BaseException:
                    os.rename(old, self.out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.tmp, self.out)
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        """Drops everything written; `out` stays as it was."""
        if self._file is not None:
            self._file.file.close()
            self._file = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.abort()


def _tmp_prefix(out: str, pid: int) -> str:
    return f".{os.path.basename(out)}.tmp-{pid}@{socket.gethostname()}."


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    return True


def remove_dead_writers_folders(out: str) -> list[str]:
    """Remove the temporary folders beside `out` (absolute) left by writers of it that are gone: named
    `.NAME.tmp-PID@HOST.*` with HOST this host and no process PID. A live writer's folder, another host's
    and a name without an owner are kept. Returns the removed paths."""
    parent, name = os.path.dirname(out), os.path.basename(out)
    pattern = re.compile(re.escape(f".{name}.tmp-") + r"(\d+)@(.+)\.[^.]+$")
    removed = []
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match is None or match.group(2) != socket.gethostname() or int(match.group(1)) == os.getpid():
            continue
        if not _pid_runs(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(os.path.join(parent, entry))
    return removed


def write_shards(out: str, x0: np.ndarray, cond: dict | None = None, uncond: dict | None = None,
                 shard_size: int = 4096, dtype: str = "float16", source: dict | None = None) -> str:
    """In-memory arrays -> shards: x0 (N, H, W, C), cond {name: (N, ...)} (nested allowed), uncond
    {name: (1, ...)}. Returns `out` (written atomically, see the module docstring)."""
    x0 = np.asarray(x0)
    if x0.ndim != 4:
        raise DataError(f"x0 must be (N, H, W, C), got shape {x0.shape}")
    for name, value in flatten_cond(cond).items():
        if value.shape[0] != x0.shape[0]:
            raise DataError(f"cond {name!r} has {value.shape[0]} rows for {x0.shape[0]} examples")
    with ShardWriter(out, x0.shape[0], shard_size, dtype) as writer:
        writer.add(x0, cond)
        return writer.close(uncond, source)
