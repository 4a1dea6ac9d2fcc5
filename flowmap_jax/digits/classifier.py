"""A small Flax CNN for 16x16 digits: class logits and a 64-d feature vector for Frechet distances.

Architecture (flax.linen, NHWC, fp32):

    (B, 16, 16, 1) in [-1, 1]
    conv3x3 32 - gelu - conv3x3 32 - gelu - avgpool 2   -> (B, 8, 8, 32)
    conv3x3 64 - gelu - conv3x3 64 - gelu - avgpool 2   -> (B, 4, 4, 64)
    flatten - dense 64                                   -> features (B, 64), pre-activation
    gelu - dropout - dense 10                            -> logits (B, 10)

The feature vector is the penultimate layer *before* its nonlinearity: a linear function of the
conv features, closer to Gaussian than post-ReLU activations and without dead (constant-zero)
coordinates, so its covariance is well conditioned for the Frechet distance. Convolutions use
explicit padding of 1. No batch norm: the forward pass is a pure function of (params, images).

Parameters are a plain nested dict (`{"params": {"conv1": {"kernel", "bias"}, ...}}`); the shipped
weights store it flattened with '/'-joined keys (`"conv1/kernel"`) in safetensors.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from flowmap_jax.digits.data import IMAGE_SIZE, NUM_CLASSES


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Pure-Python description of `DigitsClassifier` (stored as the asset's `config.json`)."""

    channels: tuple = (32, 64)
    feature_dim: int = 64
    num_classes: int = NUM_CLASSES
    dropout: float = 0.2
    image_size: int = IMAGE_SIZE

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown DigitsClassifier config keys: {sorted(unknown)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


class DigitsClassifier(nn.Module):
    """Digits CNN. `__call__(images (B, 16, 16, 1) float32 in [-1, 1], train=False)` returns
    `(logits (B, num_classes) float32, features (B, feature_dim) float32)`. With `train=True`, dropout
    is active and needs a `"dropout"` rng."""

    config: ClassifierConfig = ClassifierConfig()

    @nn.compact
    def __call__(self, images, train: bool = False):
        c = self.config
        x = jnp.asarray(images, jnp.float32)
        pad = ((1, 1), (1, 1))
        for level, width in enumerate(c.channels):
            for j in range(2):
                x = nn.gelu(nn.Conv(width, (3, 3), padding=pad, name=f"conv{level + 1}_{j + 1}")(x), approximate=False)
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.Dense(c.feature_dim, name="features")(x)
        h = nn.Dropout(c.dropout, deterministic=not train)(nn.gelu(features, approximate=False))
        logits = nn.Dense(c.num_classes, name="logits")(h)
        return logits, features


WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_classifier(folder, params, config: ClassifierConfig, info=None):
    """Write `model.safetensors` (flattened '/'-joined keys, float32) and `config.json`.

    Args:
      params: the `params` collection (nested dict of arrays), without the `{"params": ...}` wrapper.
      info: extra JSON-able provenance (seed, steps, accuracy, command) stored under "training".
    """
    import json
    import os

    import numpy as np
    from flax import traverse_util
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    flat = traverse_util.flatten_dict(params, sep="/")
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()},
              os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({"model": config.to_dict(), "training": info or {}}, f, indent=2, sort_keys=True)
        f.write("\n")


def load_classifier_weights(folder):
    """Read a folder written by `save_classifier`.

    Returns:
      (config: ClassifierConfig, params: nested dict of float32 numpy arrays, info: dict).
    """
    import json
    import os

    from flax import traverse_util
    from safetensors.numpy import load_file

    with open(os.path.join(folder, CONFIG_FILE)) as f:
        meta = json.load(f)
    flat = load_file(os.path.join(folder, WEIGHTS_FILE))
    params = traverse_util.unflatten_dict(flat, sep="/")
    return ClassifierConfig.from_dict(meta["model"]), params, meta.get("training", {})
