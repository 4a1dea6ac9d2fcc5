"""What a LoRA flow map costs to ship and to load: file sizes and load times at Stable Diffusion 1.5 size.

    python benchmarks/lora_export_cost.py                  # SD 1.5, ranks 8, 32, 64 sizes; load timed at rank 64
    python benchmarks/lora_export_cost.py --ranks 64 --no-load   # sizes only (seconds)
    python benchmarks/lora_export_cost.py --small          # the tiny test UNet (CI-sized smoke run)

Sizes are counted from the SD 1.5 UNet's parameter shapes (`benchmarks/sd15_step_plan.SD15_UNET_CONFIG`) with the
default targets (diffusers' LCM-LoRA list, `flowmap_jax.spec.lora_format.DEFAULT_LORA_TARGETS`): adapter parameters,
pytorch_lora_weights.safetensors in float32 and float16, flowmap_inputs.safetensors (the target-time embedding),
against the full UNet's float32 safetensors.

Load time (`--load`, default on): a randomly initialised SD 1.5-size base (no real weights are needed for timing),
saved as a diffusers folder, and a rank-R LoRA folder with random adapters written by the exporter
(`training.lora_export_writer.export_lora_flow_map`); then timed, each once:
- PyTorch, `torch_ref.lora_loading.lora_flow_map_unet` on the loaded base (what `FlowMapPipeline.load_flow_map`
  does: the hooked UNet, the base weights, the inputs, the adapters through diffusers' `load_lora_adapter`), and
  the same with `fuse=True` (adapters merged, peft layers removed);
- JAX, `flowmap_jax.core.lora_loading.load_lora_flow_map` from the folders (reads the base's safetensors too).
Prints one table; wall times on this machine, with the load average.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def adapter_counts(unet_config: dict, rank: int) -> dict:
    """{"modules", "adapter_params", "inputs_params", "unet_params"} of a LoRA of `rank` on `unet_config`."""
    import jax
    import numpy as np

    from flowmap_jax.core import flow_map, lora
    from flowmap_jax.spec.lora_format import DEFAULT_LORA_TARGETS
    from flowmap_jax.unet import UNetConfig
    from flowmap_jax.unet.unet_2d_condition import abstract_unet_params

    base = abstract_unet_params(UNetConfig.from_dict(unet_config))
    modules = lora.adapted_modules(base, DEFAULT_LORA_TARGETS)
    params = 0
    for path in modules:
        shape = lora._get(base, path)["kernel"].shape
        fan_in = math.prod(shape[:-1])
        params += rank * (fan_in + shape[-1])
    student = jax.eval_shape(lambda p: flow_map.add_target_time_hook(unet_config, p, jax.random.key(0))[1], base)
    inputs = lora.flow_map_inputs(student, base)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    return {"modules": len(modules), "adapter_params": params, "inputs_params": count(inputs),
            "unet_params": count(student)}


def _mib(n_bytes) -> str:
    return f"{n_bytes / 2**20:.1f}"


def time_loads(unet_config: dict, rank: int, work: Path, log) -> dict:
    """Seconds of the PyTorch and JAX loads of a random rank-`rank` LoRA onto a random base (see the docstring)."""
    import jax
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from flowmap_jax.core import flow_map, lora
    from flowmap_jax.core.lora_loading import load_lora_flow_map as jax_load
    from flowmap_jax.spec.export_format import FlowMapConfig
    from flowmap_jax.spec.lora_format import read_lora_export
    from flowmap_jax.spec.schedule import load_scheduler
    from flowmap_jax.training.lora_export_writer import export_lora_flow_map
    from flowmap_jax.unet.diffusers_io import load_diffusers_unet
    from sd15_step_plan import SD15_SCHEDULER_CONFIG
    from torch_ref.lora_loading import lora_flow_map_unet

    t0 = time.perf_counter()
    torch.manual_seed(0)
    base_unet = UNet2DConditionModel.from_config(unet_config).eval()
    base_unet.save_pretrained(work / "base")
    log(f"random base written in {time.perf_counter() - t0:.0f}s")
    _, base = load_diffusers_unet(work / "base")
    student = flow_map.add_target_time_hook(unet_config, base, jax.random.key(0))[1]
    settings = lora.LoraSettings.create(rank)
    trainable = lora.init_trainable(student, base, settings, jax.random.key(1))
    rng = np.random.default_rng(0)
    for _, pair in lora.adapter_pairs(trainable["adapters"]):
        pair["lora_B"]["kernel"] = rng.standard_normal(pair["lora_B"]["kernel"].shape).astype(np.float32) * 1e-3
    schedule, prediction_type = load_scheduler(SD15_SCHEDULER_CONFIG)
    config = FlowMapConfig(schedule=schedule, prediction_type=prediction_type, parameterization="angle")
    folder = export_lora_flow_map(trainable, settings, unet_config, config, work / "lora", {})
    del base, student, trainable
    info = read_lora_export(folder)
    out = {}
    for fuse in (False, True):
        key = "torch fused" if fuse else "torch"
        t0 = time.perf_counter()
        unet = lora_flow_map_unet(base_unet, info, fuse=fuse)
        out[key] = time.perf_counter() - t0
        del unet
        log(f"{key} load: {out[key]:.1f}s")
    t0 = time.perf_counter()
    jax_load(work / "base", folder, subfolder=None)
    out["jax"] = time.perf_counter() - t0
    out["files"] = {p.name: p.stat().st_size for p in Path(folder).iterdir()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="8,32,64", help="ranks whose sizes are counted (default 8,32,64)")
    p.add_argument("--load-rank", type=int, default=64, help="rank of the timed load (default 64)")
    p.add_argument("--no-load", action="store_true", help="sizes only")
    p.add_argument("--small", action="store_true", help="the tiny test UNet instead of SD 1.5")
    args = p.parse_args(argv)
    from sd15_step_plan import SD15_UNET_CONFIG, SMALL_UNET_CONFIG

    unet_config = {k: v for k, v in (SMALL_UNET_CONFIG if args.small else SD15_UNET_CONFIG).items()
                   if not k.startswith("_")}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    name = "tiny test UNet" if args.small else "SD 1.5 UNet"
    print(f"{name}, default LoRA targets (diffusers' LCM-LoRA list)\n")
    print("| rank | adapted modules | adapter parameters | % of the UNet | LoRA file fp32 MiB | LoRA file fp16 MiB | "
          "inputs file MiB | full UNet fp32 MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for rank in ranks:
        c = adapter_counts(unet_config, rank)
        print(f"| {rank} | {c['modules']} | {c['adapter_params'] / 1e6:.2f}M | "
              f"{100 * c['adapter_params'] / c['unet_params']:.2f} | {_mib(4 * c['adapter_params'])} | "
              f"{_mib(2 * c['adapter_params'])} | {_mib(4 * c['inputs_params'])} | {_mib(4 * c['unet_params'])} |")
    if not args.no_load:
        with tempfile.TemporaryDirectory() as tmp:
            times = time_loads(unet_config, args.load_rank, Path(tmp), log)
        print(f"\nLoad of a rank-{args.load_rank} LoRA onto the base (files: "
              + ", ".join(f"{k} {_mib(v)} MiB" for k, v in sorted(times['files'].items())) + ")\n")
        print("| backend | what | seconds |\n|---|---|---|")
        print(f"| PyTorch | lora_flow_map_unet on a loaded base (FlowMapPipeline.load_flow_map) | {times['torch']:.1f} |")
        print(f"| PyTorch | the same with fuse=True (merged, peft layers removed) | {times['torch fused']:.1f} |")
        print(f"| JAX | load_lora_flow_map from the folders (reads the base too) | {times['jax']:.1f} |")
    print(f"\n{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at the end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
