"""Full-size UNet check (issue 2): the SD 1.5 UNet config at random init, converted diffusers -> Flax,
run in both backends on one 64x64x4 latent. Prints a markdown table: max abs / relative error,
conversion time and peak memory, and each backend's forward time (Flax after compile, median of runs).

    python benchmarks/unet_parity_full_size.py                 # SD 1.5 (needs ~14 GB RAM, ~5-10 min on 2 cores)
    python benchmarks/unet_parity_full_size.py --config tiny   # diffusers' tiny test config, seconds

Each stage runs in its own process so that peak memory is measured per stage (ru_maxrss of the child).
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD15 = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
TINY = dict(
    block_out_channels=[32, 64], norm_num_groups=32, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8,
    out_channels=4, in_channels=4, layers_per_block=2, sample_size=32,
)
CONFIGS = {"sd15": (SD15, 64, 77), "tiny": (TINY, 32, 8)}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def stage_torch(work: Path, name: str, repeats: int):
    """Random-init diffusers UNet -> saved folder; torch forward on fixed inputs -> reference output."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    config, size, seq = CONFIGS[name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    unet.save_pretrained(work / "unet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, size, size)).astype(np.float32)
    ctx = rng.standard_normal((1, seq, config["cross_attention_dim"])).astype(np.float32)
    np.save(work / "x.npy", x)
    np.save(work / "ctx.npy", ctx)
    with torch.no_grad():
        run = lambda: unet(torch.from_numpy(x), 500, encoder_hidden_states=torch.from_numpy(ctx)).sample  # noqa: E731
        out = run()
        seconds = _median_time(run, repeats)
    np.save(work / "torch_out.npy", out.numpy())
    weight_mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    return {"torch_forward_s": seconds, "weights_mb": weight_mb, "torch_threads": torch.get_num_threads()}


def stage_convert(work: Path, name: str, repeats: int):
    """diffusers folder -> Flax params (numpy): time and this process's peak memory."""
    base = _peak_rss_mb()
    from conversion import load_diffusers_unet

    after_import = _peak_rss_mb()
    start = time.perf_counter()
    config, params = load_diffusers_unet(work / "unet")
    seconds = time.perf_counter() - start
    return {"convert_s": seconds, "convert_peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": after_import,
            "rss_at_start_mb": base}


def stage_flax(work: Path, name: str, repeats: int):
    """Converted params -> jitted Flax forward; compile time, median run time, errors vs torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from conversion import load_diffusers_unet
    from flowmap_jax.spec.layout import nchw_to_nhwc, nhwc_to_nchw
    from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig

    config, params = load_diffusers_unet(work / "unet")
    params = jax.device_put(params)
    model = FlaxUNet2DConditionModel(UNetConfig.from_dict(config))
    x = jnp.asarray(nchw_to_nhwc(np.load(work / "x.npy")))
    ctx = jnp.asarray(np.load(work / "ctx.npy"))
    forward = jax.jit(lambda p, x, ctx: model.apply({"params": p}, x, 500, ctx))
    start = time.perf_counter()
    compiled = forward.lower(params, x, ctx).compile()
    compile_s = time.perf_counter() - start
    out = compiled(params, x, ctx).block_until_ready()
    seconds = _median_time(lambda: compiled(params, x, ctx).block_until_ready(), repeats)
    ref = np.load(work / "torch_out.npy")
    out = nhwc_to_nchw(np.asarray(out))
    abs_err = float(np.max(np.abs(out - ref)))
    return {"flax_compile_s": compile_s, "flax_forward_s": seconds, "max_abs_err": abs_err,
            "rel_err": abs_err / max(1.0, float(np.max(np.abs(ref)))), "max_abs_torch": float(np.max(np.abs(ref)))}


STAGES = {"torch": stage_torch, "convert": stage_convert, "flax": stage_flax}


def run_stage(stage: str, work: Path, name: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--_stage", stage, "--_work", str(work), "--config", name, "--repeats", str(repeats)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward runs after warm-up (median)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--_work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._stage:
        print(json.dumps(STAGES[args._stage](Path(args._work), args.config, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"config": args.config}
        for stage in ("torch", "convert", "flax"):
            results.update(run_stage(stage, work, args.config, args.repeats))
    r = results
    convert_extra_mb = r["convert_peak_rss_mb"] - r["rss_after_imports_mb"]
    rows = [
        ("config", f"{args.config} (64x64 latent, batch 1)" if args.config == "sd15" else args.config),
        ("weights (fp32)", f"{r['weights_mb']:.0f} MB"),
        ("max abs error", f"{r['max_abs_err']:.3e}"),
        ("relative error (max abs / max(1, max|torch|))", f"{r['rel_err']:.3e}"),
        ("conversion time", f"{r['convert_s']:.1f} s"),
        ("conversion peak RSS (whole process)", f"{r['convert_peak_rss_mb']:.0f} MB"),
        ("conversion peak RSS above imports", f"{convert_extra_mb:.0f} MB = {convert_extra_mb / r['weights_mb']:.2f}x weights"),
        ("PyTorch eager forward (median)", f"{r['torch_forward_s'] * 1000:.0f} ms ({r['torch_threads']} threads)"),
        ("Flax jit compile", f"{r['flax_compile_s']:.1f} s"),
        ("Flax jit forward (median)", f"{r['flax_forward_s'] * 1000:.0f} ms"),
        ("Flax / PyTorch time ratio", f"{r['flax_forward_s'] / r['torch_forward_s']:.2f}"),
    ]
    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
