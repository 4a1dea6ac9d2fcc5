"""What decoding a latent teacher's sample grid through its VAE costs (`flowmap_jax.training.grid_decoder`).

    python benchmarks/grid_decode_cost.py                 # tiny test pipeline, SD 1.5's decoder at 128 px
    python benchmarks/grid_decode_cost.py --measure-size 256 --json results/grid_decode_cost.json

Rows:
- the tiny SD 1.x pipeline of the tests (`tests/sd_pipelines.py`, 8x8x4 latents -> 32 px): load time and the
  decode of one trainer grid (rows x columns latents) through `GridDecoder`, as the trainer calls it;
- SD 1.5's AutoencoderKL decoder (its published config, random weights, nothing downloaded): FLOPs per image
  counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (no compute) at 512 px, and a
  decode measured at `--measure-size` px (real compute, float32, this CPU), scaled to 512 px by the FLOP ratio
  for the estimate of one 512 px image and of the sd15 preset's grid.
Prints a markdown table; timings are of this machine (load average printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
"""stable-diffusion-v1-5's vae/config.json (the fields that set its size)."""


def decoder_flops(vae, latent_size: int) -> int:
    """FLOPs of `vae.decode` on one (1, 4, s, s) latent, counted on the meta device (nothing computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = type(vae)(**SD15_VAE)
        latents = torch.zeros(1, 4, latent_size, latent_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.decode(latents)
    return int(counter.get_total_flops())


def seconds_of(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure-size", type=int, default=128, help="image size (px) of the measured SD 1.5 "
                        "decode (default 128; its FLOPs scale with the pixel count)")
    parser.add_argument("--grid", default="4,4", help="rows,columns of the sd15 preset's grid (jumps 1, 2, 4 and "
                        "the teacher; 4 columns)")
    parser.add_argument("--tiny-grid", default="3,4", help="rows,columns of the tiny run's grid")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from flowmap_jax.training.grid_decoder import GridDecoder
    from tests.sd_pipelines import LATENT_CHANNELS, LATENT_SIZE, write_sd15_pipeline

    rows, cols = (int(v) for v in args.grid.split(","))
    tiny_rows, tiny_cols = (int(v) for v in args.tiny_grid.split(","))
    out = {"load_average": os.getloadavg(), "torch_threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = write_sd15_pipeline(Path(tmp) / "sd15")
        decoder = GridDecoder(str(pipeline), "vae")
        latents = np.random.default_rng(0).standard_normal(
            (tiny_rows * tiny_cols, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)).astype(np.float32)
        images = decoder(latents)
        out["tiny_first_call_s"] = decoder.seconds  # load + decode
        out["tiny_decode_s"] = seconds_of(lambda: decoder(latents), repeats=3)
        out["tiny_shape"] = list(images.shape)

    vae = AutoencoderKL(**SD15_VAE).eval()
    flops_512 = decoder_flops(vae, 64)
    size = int(args.measure_size)
    flops_measured = decoder_flops(vae, size // 8)
    latent = torch.randn(1, 4, size // 8, size // 8)
    with torch.no_grad():
        measured = seconds_of(lambda: vae.decode(latent), repeats=2)
    per_image_512 = measured * flops_512 / flops_measured
    out.update(sd15_decoder_tflop_512=flops_512 / 1e12, measured_size=size, measured_s=measured,
               measured_gflops_per_s=flops_measured / measured / 1e9, sd15_512_s_estimate=per_image_512,
               sd15_grid_images=rows * cols, sd15_grid_s_estimate=per_image_512 * rows * cols)

    print(f"load average {out['load_average'][0]:.2f}, torch threads {out['torch_threads']}\n")
    print("| what | images | size | seconds | notes |")
    print("|---|---|---|---|---|")
    print(f"| tiny pipeline VAE: load + first grid decode | {tiny_rows * tiny_cols} | 32 px | "
          f"{out['tiny_first_call_s']:.2f} | `GridDecoder`, as the trainer calls it |")
    print(f"| tiny pipeline VAE: grid decode | {tiny_rows * tiny_cols} | 32 px | {out['tiny_decode_s']:.3f} | "
          f"best of 3 |")
    print(f"| SD 1.5 decoder, measured | 1 | {size} px | {measured:.2f} | "
          f"{flops_measured / 1e9:.0f} GFLOP, {out['measured_gflops_per_s']:.0f} GFLOP/s |")
    print(f"| SD 1.5 decoder, estimate | 1 | 512 px | {per_image_512:.0f} | {flops_512 / 1e12:.2f} TFLOP (FLOP "
          f"counter), at the measured GFLOP/s |")
    print(f"| SD 1.5 grid (sd15 preset), estimate | {rows * cols} | 512 px | {out['sd15_grid_s_estimate']:.0f} | "
          f"{rows} rows x {cols} columns |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
