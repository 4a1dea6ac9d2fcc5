"""Label tables: class labels -> encoder_hidden_states through a (K + 1, D) embedding table.

The one reader of `label_embeddings.safetensors` (in a teacher folder and in an export), used by the
training data (`flowmap_jax.data.datasets.LabelConditioner`), the export writer, and both samplers:
"weight" (K + 1, D) float32, rows 0..K-1 the class labels, row K the null label (the unconditional
embedding, used for classifier-free guidance). Numpy only.
"""

from __future__ import annotations

import os

import numpy as np

from flowmap_jax.spec.export_format import LABEL_EMBEDDINGS_NAME, ExportFormatError

__all__ = [
    "LABEL_EMBEDDINGS_NAME",
    "check_labels",
    "labels_to_encoder_hidden_states",
    "read_label_embeddings",
    "unconditional_encoder_hidden_states",
]


def read_label_embeddings(path: str | os.PathLike) -> np.ndarray:
    """The (K + 1, D) float32 "weight" table of a label-embeddings file (row K the null label)."""
    from safetensors.numpy import load_file

    tensors = load_file(os.fspath(path))
    if "weight" not in tensors or np.ndim(tensors["weight"]) != 2:
        raise ExportFormatError(f"{path}: expected a tensor 'weight' of shape (K + 1, D), found "
                                f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    return np.asarray(tensors["weight"], np.float32)


def labels_to_encoder_hidden_states(table: np.ndarray, labels) -> np.ndarray:
    """(B,) int labels in 0..K-1 -> (B, 1, D) float32 rows of the (K + 1, D) table (the digits teacher's
    "text encoder"); label K (the null label) is allowed: the unconditional embedding."""
    labels = check_labels(labels, table.shape[0] - 1)
    return table[labels][:, None, :]


def check_labels(labels, num_labels: int) -> np.ndarray:
    """(B,) labels as int64, checked to lie in 0..num_labels, label `num_labels` (K) being the null label
    (the unconditional embedding); ValueError naming the range otherwise."""
    labels = np.asarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > num_labels):
        raise ValueError(f"labels must lie in 0..{num_labels - 1} (or {num_labels} for the null label), "
                         f"got {labels.min()}..{labels.max()}")
    return labels


def unconditional_encoder_hidden_states(table: np.ndarray) -> np.ndarray:
    """(1, 1, D) float32: the null label's row K of the (K + 1, D) table."""
    return np.asarray(table, np.float32)[table.shape[0] - 1][None, None, :]
