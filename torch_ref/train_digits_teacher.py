"""Train the embedded digits teacher: a small class-conditional diffusers `UNet2DConditionModel`.

Commands that produced the shipped `flowmap_jax/assets/digits_teacher/` (CPU, 1 thread; 3000 steps
at about 0.55 s each on an idle core, ~28 minutes; the defaults are these values):

    python -m torch_ref.train_digits_teacher --out flowmap_jax/assets/digits_teacher --seed 0 \
        --steps 3000 --ema-decay 0.999 --no-eval
    python benchmarks/digits_teacher_quality.py --teacher flowmap_jax/assets/digits_teacher \
        --guidance-scale 1.5

The second samples DDIM-50 at several CFG scales, writes grids into the folder and the quality
numbers and guidance recommendation into its `teacher_info.json` (about 10 CPU-minutes). It scores
with the JAX digits classifier, so it lives in `benchmarks/`: this module (like all of `torch_ref`)
never imports jax.

The teacher (see `UNET_CONFIG`, `SCHEDULER_CONFIG`):
- data: `flowmap_jax.digits.data.load_digits("train")`, 16x16x1 in [-1, 1] (PyTorch layout
  (B, 1, 16, 16) here; the flip is `flowmap_jax.spec.layout.nhwc_to_nchw`).
- network: stock diffusers blocks only, `class_embed_type=None`, no added embeddings. Labels enter
  through cross-attention: a learned table `label_embeddings` of shape (11, 32), row 10 the null
  label for classifier-free guidance, gives `encoder_hidden_states` (B, 1, 32). Labels are replaced
  by the null label with probability `--p-uncond` (0.1) during training.
- schedule: DDPM, linear betas 1e-4..0.02, 1000 steps, epsilon prediction (DDPM's pixel-space
  schedule, with the SD 1.5 convention of predicting epsilon), `clip_sample=False` so that DDIM is
  the plain PF-ODE step that the flow map learns, `timestep_spacing="trailing"` so an N-step DDIM
  grid starts at t = 999 and ends at t = -1 (alpha = 1, `set_alpha_to_one`).
- weights shipped: the EMA of the parameters (UNet and label table together).

Reproducible from `--seed`: `torch.manual_seed`, one `torch.Generator` for data order, labels
dropped, timesteps and noise, deterministic algorithms, and a fixed thread count (`--threads`;
1 by default, the fastest on a shared 2-core machine and bit-reproducible).

Public helpers (used by tests and benchmarks): `build_unet`, `build_scheduler`, `load_teacher`,
`encode_labels`, `sample_ddim`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from flowmap_jax.cli import cli_exit
from flowmap_jax.cli.cli_exit import ArgumentParser

try:
    import torch
except ModuleNotFoundError as missing:  # without the "torch" extra: one line and exit 2, no traceback
    cli_exit.exit_if_missing_extra(missing, __name__)
    raise
from flowmap_jax.digits import TEACHER_DIR
from flowmap_jax.digits.data import (
    IMAGE_SIZE,
    NULL_LABEL,
    NUM_CLASSES,
    load_digits,
)
from flowmap_jax.spec.layout import nhwc_to_nchw

LABEL_DIM = 32
UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "cross_attention_dim": LABEL_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "class_embed_type": None,
    "addition_embed_type": None,
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}
LABEL_EMBEDDINGS_FILE = "label_embeddings.safetensors"
INFO_FILE = "teacher_info.json"


def build_unet(config=None):
    """A freshly initialised `UNet2DConditionModel` (the current torch RNG state decides the init)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def build_scheduler():
    """The teacher's `DDPMScheduler` (see `SCHEDULER_CONFIG`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def load_teacher(folder=TEACHER_DIR, device="cpu"):
    """Load a digits teacher folder.

    Returns:
      unet: `UNet2DConditionModel` in eval mode, fp32.
      label_table: (11, D) float32 tensor; row 10 is the null (unconditional) label.
      scheduler: the `DDPMScheduler` from `scheduler/`.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).to(device).eval()
    label_table = load_file(os.path.join(folder, LABEL_EMBEDDINGS_FILE))["weight"].to(device)
    scheduler = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    return unet, label_table, scheduler


def encode_labels(label_table, labels):
    """Labels (B,) int in 0..10 -> encoder_hidden_states (B, 1, D) (10 = null label)."""
    return label_table[labels][:, None, :]


@torch.no_grad()
def sample_ddim(unet, label_table, scheduler_config, labels, guidance_scale=2.0, num_steps=50,
                noise=None, generator=None):
    """Deterministic DDIM (eta = 0) with classifier-free guidance, through diffusers' DDIMScheduler.

    eps = eps_null + guidance_scale * (eps_label - eps_null); guidance_scale = 1 is the plain
    conditional model.

    Args:
      unet, label_table: from `load_teacher`.
      scheduler_config: the teacher's scheduler config (e.g. `scheduler.config`).
      labels: (B,) int tensor in 0..9.
      noise: optional (B, 1, 16, 16) float32 starting noise; else drawn with `generator`.
    Returns:
      (B, 1, 16, 16) float32 samples (roughly in [-1, 1], not clipped).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    labels = torch.as_tensor(labels, dtype=torch.long)
    batch = labels.shape[0]
    if noise is None:
        noise = torch.randn((batch, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    x = noise.to(torch.float32) * scheduler.init_noise_sigma
    cond = encode_labels(label_table, labels)
    null = encode_labels(label_table, torch.full_like(labels, NULL_LABEL))
    guided = guidance_scale != 1.0
    context = torch.cat([null, cond]) if guided else cond
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        eps = unet(model_in, t, encoder_hidden_states=context).sample
        if guided:
            eps_null, eps_label = eps.chunk(2)
            eps = eps_null + guidance_scale * (eps_label - eps_null)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _lr_at(step, total, peak, warmup):
    """Linear warm-up to `peak`, then cosine decay to 0.1 * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(args):
    """Train and save the teacher folder; returns training statistics (dict)."""
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits("train")
    data = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(images)))  # (N, 1, 16, 16)
    targets = torch.from_numpy(labels.astype(np.int64))
    n = data.shape[0]

    unet = build_unet().train()
    label_table = torch.nn.Embedding(NUM_CLASSES + 1, LABEL_DIM)
    params = list(unet.parameters()) + list(label_table.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, foreach=True)
    alphas_cumprod = build_scheduler().alphas_cumprod.to(torch.float32)

    order = torch.randperm(n, generator=generator)
    cursor = 0
    start, running = time.time(), []
    for step in range(args.steps):
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        x0, y = data[index], targets[index].clone()
        y[torch.rand(y.shape, generator=generator) < args.p_uncond] = NULL_LABEL
        t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], y.shape, generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps

        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.lr, args.warmup)
        eps_hat = unet(x_t, t, encoder_hidden_states=label_table(y)[:, None, :]).sample
        loss = torch.mean((eps_hat - eps) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)

        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - start
            print(f"step {step + 1}/{args.steps}  loss {np.mean(running):.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed:.0f}s", flush=True)
            running = []
    train_seconds = time.time() - start

    with torch.no_grad():  # ship the EMA weights
        for p, e in zip(params, ema):
            p.copy_(e)
    os.makedirs(args.out, exist_ok=True)
    unet.eval().save_pretrained(os.path.join(args.out, "unet"), safe_serialization=True)
    build_scheduler().save_pretrained(os.path.join(args.out, "scheduler"))
    save_file({"weight": label_table.weight.detach().to(torch.float32).contiguous()},
              os.path.join(args.out, LABEL_EMBEDDINGS_FILE))
    return {"train_seconds": round(train_seconds, 1), "final_loss": round(float(np.mean(running or [loss.item()])), 5)}


def _write_info(folder, info):
    path = os.path.join(folder, INFO_FILE)
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old.update(info)
    with open(path, "w") as f:
        json.dump(old, f, indent=2, sort_keys=True)
        f.write("\n")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m torch_ref.train_digits_teacher", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=TEACHER_DIR, help="output diffusers-style folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--p-uncond", type=float, default=0.1, help="probability of the null label")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for reproducibility)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--no-eval", action="store_true",
                        help="accepted and ignored (the evaluation is benchmarks/digits_teacher_quality.py)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    stats = train(args)
    command = "python -m torch_ref.train_digits_teacher " + " ".join(sys.argv[1:] if argv is None else argv)
    _write_info(args.out, {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "warmup": args.warmup, "ema_decay": args.ema_decay, "p_uncond": args.p_uncond,
        "threads": args.threads, "command": command.strip(), "weights": "EMA",
        "torch_version": torch.__version__, **stats,
        "null_label": NULL_LABEL, "label_embedding_shape": [NUM_CLASSES + 1, LABEL_DIM],
        "scheduler": SCHEDULER_CONFIG, "data": "flowmap_jax.digits.data.load_digits('train'): "
        "sklearn digits 8x8 -> 16x16 bilinear (half-pixel centres), [-1, 1], 1297 images",
    })
    print(f"trained {args.out}; score it with python benchmarks/digits_teacher_quality.py --teacher {args.out}")


if __name__ == "__main__":
    cli_exit.run_main(main)  # the digits data needs scikit-learn (the "jax" extra): one line and exit 2 without it
