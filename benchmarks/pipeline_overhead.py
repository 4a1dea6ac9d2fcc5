"""FlowMapPipeline's own overhead against its networks, at 1 and 4 jumps (issue 27).

    python benchmarks/pipeline_overhead.py                       # the tiny test pipeline and SD 1.5's shapes
    python benchmarks/pipeline_overhead.py --sizes tiny           # the tiny one only (seconds)

Each call of `pipe(prompt, num_inference_steps=N)` (PyTorch, CPU, fp32, one prompt, PIL output) is timed whole,
and so are, inside it, every call of the UNet's forward, the VAE's decode and the text encoder(s)' forward
(wrapped on the instance). Overhead = total - UNet - VAE - text encoder: prompt handling, time grids, the flow
map's coefficients, latents, conditioning moves, post-processing. Median of `--repeats` calls after one
warm-up.

Sizes:
- tiny: `tests/sd_pipelines.write_sd15_pipeline` with an untrained flow map exported on it (32 px images);
- sd15: SD 1.5's shapes with random weights (no download): the SD 1.5 UNet config (`sd15_step_plan.SD15_UNET_CONFIG`)
  with the target-time hook, diffusers' default AutoencoderKL (SD's VAE shapes), a 12-layer 768-wide CLIP text
  encoder, the test tokenizer; `--sd15-size` px images (default 512).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


class _Timed:
    """Wraps `obj.name` (a bound method) on the instance, summing its wall time into `self.seconds`."""

    def __init__(self, obj, name: str):
        self.seconds = 0.0
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(obj, name, timed)


def tiny_pipeline(work: Path):
    from conversion.pipeline_export import write_pipeline
    from tests.sd_pipelines import export_untrained_flow_map, write_sd15_pipeline
    from torch_ref.pipeline import FlowMapPipeline

    base = write_sd15_pipeline(work / "tiny_sd15")
    unet = export_untrained_flow_map(base, work / "unet")
    return FlowMapPipeline.from_pretrained(write_pipeline(unet, str(base), work / "pipeline")), None


def sd15_pipeline(work: Path, size: int):
    """SD 1.5's shapes, random weights; the flow-map metadata of the tiny pipeline's export (same schedule)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from flowmap_jax.spec.target_time_hook import add_target_time_hook_config
    from sd15_step_plan import SD15_UNET_CONFIG
    from tests.sd_pipelines import write_clip_tokenizer
    from torch_ref.pipeline import FlowMapPipeline

    tiny, _ = tiny_pipeline(work)
    torch.manual_seed(0)
    config = add_target_time_hook_config({k: v for k, v in SD15_UNET_CONFIG.items() if not k.startswith("_")})
    unet = UNet2DConditionModel.from_config(config).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512, scaling_factor=0.18215).eval()
    tokenizer = write_clip_tokenizer(work / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        projection_dim=768)).eval()
    flow_map = dict(tiny.config.flow_map, sample_shape=[size // 8, size // 8, 4])
    return FlowMapPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, flow_map=flow_map), size


def measure(pipe, steps: int, repeats: int, size) -> dict:
    import torch

    pipe.set_progress_bar_config(disable=True)
    timers = {"unet": _Timed(pipe.unet, "forward"), "vae": _Timed(pipe.vae, "decode"),
              "text": _Timed(pipe.text_encoder, "forward")}
    kwargs = {"height": size, "width": size} if size else {}
    rows = []
    for i in range(repeats + 1):
        for t in timers.values():
            t.seconds = 0.0
        start = time.perf_counter()
        with torch.no_grad():
            pipe("a photo of a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(i), **kwargs)
        total = time.perf_counter() - start
        if i:  # the first call warms up
            rows.append({"total": total, **{k: t.seconds for k, t in timers.items()}})
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["overhead"] = statistics.median(r["total"] - r["unet"] - r["vae"] - r["text"] for r in rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,sd15", help="tiny and/or sd15 (default both)")
    p.add_argument("--sd15-size", type=int, default=512, help="image size for sd15 (default 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = []
    print("| pipeline | jumps | total ms | UNet ms | VAE decode ms | text encoder ms | overhead ms | overhead % |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size_name in args.sizes.split(","):
            work = Path(tmp) / size_name
            work.mkdir()
            pipe, size = tiny_pipeline(work) if size_name == "tiny" else sd15_pipeline(work, args.sd15_size)
            label = "tiny (32 px)" if size_name == "tiny" else f"SD 1.5 shapes, random weights ({size} px)"
            for steps in (1, 4):
                r = measure(pipe, steps, args.repeats, size)
                results.append(dict(r, pipeline=size_name, jumps=steps, size=size))
                print(f"| {label} | {steps} | {1e3 * r['total']:.1f} | {1e3 * r['unet']:.1f} | {1e3 * r['vae']:.1f} | "
                      f"{1e3 * r['text']:.1f} | {1e3 * r['overhead']:.1f} | {100 * r['overhead'] / r['total']:.1f} |",
                      flush=True)
            del pipe
    print(f"\nCPU, fp32, {os.cpu_count()} threads; median of {args.repeats} calls after a warm-up; load average "
          f"{os.getloadavg()[0]:.1f} at the end.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
