"""Train the digits classifier used by the quality metrics.

Command that produced the shipped `flowmap_jax/assets/digits_classifier/`:

    python -m flowmap_jax.digits.train_classifier --out flowmap_jax/assets/digits_classifier --seed 0

Trains `DigitsClassifier` on the train split of `flowmap_jax.digits.data` (1297 images) with AdamW
(warm-up + cosine decay, optax) and light augmentation so it also reads generated samples:
random shifts of up to `--max-shift` pixels (background-filled, at 16x16), and additive Gaussian
noise of a random level in [0, `--max-noise`]. Reports (and stores in `config.json`) the accuracy on
the 500 held-out real digits. Deterministic for a seed on CPU: numpy `default_rng(seed)` drives data
order and augmentation, `jax.random.key(seed)` the initialisation and dropout.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from flowmap_jax.cli import cli_exit
from flowmap_jax.digits import CLASSIFIER_DIR
from flowmap_jax.digits.data import load_digits


def augment(images, rng, max_shift, max_noise):
    """Random integer shifts (filled with the background, -1) plus Gaussian noise.

    Args:
      images: (B, H, W, 1) float32 in [-1, 1].
      rng: numpy Generator.
    Returns:
      (B, H, W, 1) float32 (noise may leave [-1, 1]).
    """
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
    dy = rng.integers(0, 2 * max_shift + 1, size=b)
    dx = rng.integers(0, 2 * max_shift + 1, size=b)
    out = np.stack([padded[i, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])
    sigma = rng.uniform(0.0, max_noise, size=(b, 1, 1, 1))
    return (out + sigma * rng.standard_normal(out.shape)).astype(np.float32)


def train(seed=0, steps=1500, batch_size=128, lr=2e-3, weight_decay=1e-4, max_shift=2, max_noise=0.2,
          log_every=250):
    """Train and return (config, params, info). `info` holds the held-out accuracy."""
    import jax
    import jax.numpy as jnp
    import optax

    from flowmap_jax.digits.classifier import ClassifierConfig, DigitsClassifier

    config = ClassifierConfig()
    model = DigitsClassifier(config)
    images, labels = load_digits("train")
    heldout_images, heldout_labels = load_digits("heldout")
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1,) + images.shape[1:]))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.01)
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    opt_state = optimizer.init(params)

    @jax.jit
    def step_fn(params, opt_state, x, y, key):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.mean(jnp.argmax(logits, -1) == y)

    @jax.jit
    def predict(params, x):
        return jnp.argmax(model.apply({"params": params}, x)[0], -1)

    n = len(labels)
    order, cursor = rng.permutation(n), 0
    start, losses, accs = time.time(), [], []
    for step in range(steps):
        if cursor + batch_size > n:
            order, cursor = rng.permutation(n), 0
        index = order[cursor: cursor + batch_size]
        cursor += batch_size
        x = augment(images[index], rng, max_shift, max_noise)
        key, dropout_key = jax.random.split(key)
        params, opt_state, loss, acc = step_fn(params, opt_state, x, labels[index], dropout_key)
        losses.append(float(loss))
        accs.append(float(acc))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            heldout_acc = float(np.mean(np.asarray(predict(params, heldout_images)) == heldout_labels))
            print(f"step {step + 1}/{steps}  loss {np.mean(losses):.4f}  train-aug acc {np.mean(accs):.4f}  "
                  f"held-out acc {heldout_acc:.4f}  {time.time() - start:.0f}s", flush=True)
            losses, accs = [], []
    params = jax.tree.map(np.asarray, params)
    heldout_acc = float(np.mean(np.asarray(predict(params, heldout_images)) == heldout_labels))
    train_acc = float(np.mean(np.asarray(predict(params, images)) == labels))
    info = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "max_shift": max_shift, "max_noise": max_noise, "heldout_accuracy": round(heldout_acc, 4),
        "train_accuracy": round(train_acc, 4), "num_heldout": len(heldout_labels), "num_train": n,
        "train_seconds": round(time.time() - start, 1), "jax_version": jax.__version__,
        "features": "penultimate dense layer (64-d) before its GELU",
    }
    return config, params, info


def main(argv=None):
    parser = cli_exit.ArgumentParser(prog="python -m flowmap_jax.digits.train_classifier",
                                     description="Train the digits classifier for the quality metrics.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=CLASSIFIER_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-shift", type=int, default=2, help="max shift in pixels (at 16x16)")
    parser.add_argument("--max-noise", type=float, default=0.2, help="max std of added Gaussian noise")
    args = parser.parse_args(argv)

    from flowmap_jax.digits.classifier import save_classifier

    config, params, info = train(args.seed, args.steps, args.batch_size, args.lr, args.weight_decay,
                                 args.max_shift, args.max_noise)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    info["command"] = f"python -m flowmap_jax.digits.train_classifier {argv_text}".strip()
    save_classifier(args.out, params, config, info)
    print(f"held-out accuracy {info['heldout_accuracy']:.4f} (train {info['train_accuracy']:.4f}); saved to {args.out}")


if __name__ == "__main__":
    cli_exit.run_main(main)
