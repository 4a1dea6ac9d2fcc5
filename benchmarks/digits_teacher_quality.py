"""Score a digits teacher: DDIM-50 samples at several classifier-free guidance scales, their quality
against the held-out real digits, and the recommended scale, written into the teacher's
`teacher_info.json` (about 10 CPU-minutes for 500 samples per scale).

    python -m torch_ref.train_digits_teacher --out flowmap_jax/assets/digits_teacher --no-eval   # train
    python benchmarks/digits_teacher_quality.py --teacher flowmap_jax/assets/digits_teacher --guidance-scale 1.5

The teacher is sampled in PyTorch (`torch_ref.train_digits_teacher.sample_ddim`, diffusers' DDIM) and scored
with the JAX digits classifier (`flowmap_jax.digits.quality.digits_quality_report`): the one place that uses
both, so `torch_ref` itself never imports jax.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from flowmap_jax.digits import TEACHER_DIR
from flowmap_jax.digits.data import IMAGE_SIZE, NUM_CLASSES
from flowmap_jax.digits.quality import digits_quality_report
from flowmap_jax.spec.image_grid import save_grid
from flowmap_jax.spec.layout import nchw_to_nhwc
from torch_ref.train_digits_teacher import _write_info, load_teacher, sample_ddim

EVAL_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)


def evaluate(folder, scales=EVAL_SCALES, num_samples=500, num_steps=50, seed=1234, threads=1):
    """DDIM-`num_steps` CFG samples at each guidance scale: grid PNGs and quality numbers.

    Samples `num_samples` images (labels cycling 0..9, the same noise for every scale), writes
    `samples_ddim{num_steps}_cfg{scale}.png` (10 x 10 grid, one digit class per column, `spec.image_grid.save_grid`) into `folder`,
    and scores them with `flowmap_jax.digits.quality.digits_quality_report` (Frechet distance against
    the held-out real digits, classifier accuracy against the label).

    Returns:
      {str(scale): report dict}.
    """
    torch.set_num_threads(threads)
    unet, label_table, scheduler = load_teacher(folder)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % NUM_CLASSES
    noise = torch.randn((num_samples, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    results = {}
    for scale in scales:
        start = time.time()
        chunks = [sample_ddim(unet, label_table, scheduler.config, labels[i: i + 250], scale, num_steps,
                              noise=noise[i: i + 250]) for i in range(0, num_samples, 250)]
        samples = nchw_to_nhwc(torch.cat(chunks).numpy())
        report = digits_quality_report(samples, labels.numpy())
        report["sample_seconds"] = round(time.time() - start, 1)
        results[str(scale)] = report
        print(f"DDIM-{num_steps} cfg {scale}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in report.items()), flush=True)
        rows = [(f"cfg {scale:g}" if r == 0 else "", samples[r * NUM_CLASSES:(r + 1) * NUM_CLASSES])
                for r in range(min(10, -(-len(samples) // NUM_CLASSES)))]
        save_grid(os.path.join(folder, f"samples_ddim{num_steps}_cfg{scale:g}.png"), rows)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", default=TEACHER_DIR, help="the teacher folder (written by torch_ref.train_digits_teacher)")
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="recommended CFG scale to record (default: best Frechet distance in the eval)")
    args = parser.parse_args(argv)
    results = evaluate(args.teacher, num_samples=args.eval_samples, threads=args.threads)
    best = min(results, key=lambda s: results[s]["frechet_distance"])
    scale = args.guidance_scale if args.guidance_scale is not None else float(best)
    _write_info(args.teacher, {"eval_ddim50_cfg": results, "recommended_guidance_scale": scale,
                               "eval_note": f"DDIM 50 steps (eta 0, trailing), {args.eval_samples} samples, "
                                            "labels cycling 0..9, seed 1234; Frechet distance vs the "
                                            "held-out real digits in digits-classifier feature space"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
