"""The full-size Stable Diffusion 1.5 flow-map training step, compiled (never run) for 8 devices (issues 12, 24).

    python benchmarks/sd15_step_plan.py --mode dp --per-device-batch 32 --fast-compile \
        --record benchmarks/results/step_plans.json                       # the sd15 preset's step (pairs)
    python benchmarks/sd15_step_plan.py --mode dp --per-device-batch 32 --objective eulerian --fast-compile
    python benchmarks/sd15_step_plan.py --preset sdxl --mode fsdp --per-device-batch 16 --fast-compile   # sdxl's step
    python benchmarks/sd15_step_plan.py --small --devices 2              # a toy UNet: ~1 min of CPU per mode (tested)
    python benchmarks/sd15_step_plan.py --small --preset sdxl --devices 2   # the sdxl preset's step, toy UNet

What is compiled is the trainer's own step (`flowmap_jax.training.train_step.make_train_step`, as
`python -m flowmap_jax.train --preset sd15` builds it): the sd15 preset's optimiser (AdamW after global-norm
clipping), EMA, bf16 compute with float32 parameters, remat of every ResNet and transformer layer, the preset's objective (`pairs`
with 8-step DPM-Solver++(2M) targets) or the one `--objective` names (`eulerian` and `lagrangian` with their
exact JVP), the teacher with classifier-free guidance (7.5, one batched UNet call for both halves), on a
(data, fsdp) mesh of `--devices` simulated CPU devices (`--xla_force_host_platform_device_count`, set here
before jax is imported):
- **dp**: mesh (data=N, fsdp=1); every parameter replicated; the gradient averaged by the step's explicit
  `pmean` inside `shard_map`.
- **fsdp**: mesh (data=1, fsdp=N); parameters, EMA and AdamW moments of at least `--fsdp-min-size` elements
  split over the N devices (`sharding.param_specs`, NamedSharding), all-gathered inside the step.
The teacher is the frozen UNet (without the target-time hook) held in the compute dtype, split over the fsdp
axis like the student (replicated in dp). The UNet runs on each device's whole batch, each example with its own
key (`core.example_keys`), so the attention takes its blocked path at SD sizes. Nothing full-size is ever
allocated: parameters and optimiser state are `jax.eval_shape`s, inputs are `jax.ShapeDtypeStruct`s with their
shardings, and the step is only `jax.jit(...).lower(...).compile()`d.

Printed per mode: XLA's per-device memory analysis of the compiled program (arguments, outputs, temporaries,
generated code, the outputs that alias donated arguments, and total = arguments + outputs + temporaries +
code - aliased), the FLOPs per step from `compiled.cost_analysis()` (for the partitioned per-device program,
times N for the step), an analytic cross-check (see `FORWARD_EQUIVALENTS`), and the model-FLOPs utilisation
a target step time (`--target-step-s`) would mean at the A100's (312 TFLOP/s) and H100's (989 TFLOP/s) dense
bf16 peaks, with the step time that 40% MFU would give.

XLA's FLOP count (`cost_analysis`) counts a loop's body once: the pairs target's solver is a loop over its
steps, so for pairs the XLA column undercounts and the analytic one (`forward_equivalents`) is the reference.

Caveat: this is the XLA CPU compiler's plan. GPU buffer assignment, fusion and the attention kernel differ
(and the CPU backend may widen bf16 arithmetic), so the memory figures are an estimate of the GPU's, not a
measurement; `benchmarks/gpu_check.py --train-step` compiles and runs the same step on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (diffusers UNet2DConditionModel).
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# --small: the smallest UNet with SD 1.5's kinds of blocks (cross-attention down/up, mid block). The step's
# compile time hardly depends on the UNet's size (its program is large either way): ~25 s of CPU with
# --fast-compile, ~50 s without, per mode.
SMALL_UNET_CONFIG = dict(
    SD15_UNET_CONFIG, block_out_channels=[16], layers_per_block=1, cross_attention_dim=16, norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"], sample_size=8)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that differ from diffusers' defaults).
SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_TEXT_EMBEDS = 1280  # the pooled text embedding; + 6 time ids x 256 = 2816
# --small --preset sdxl: the --small UNet with SDXL's conditioning (text_time added embedding of a pooled text
# embedding of SMALL_SDXL_TEXT_EMBEDS and the six time ids, linear projections in the transformer), for the
# sdxl preset's step at toy size (gpu_check.py's CPU dry run).
SMALL_SDXL_TEXT_EMBEDS = 8
SMALL_SDXL_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG, block_out_channels=[16], layers_per_block=1, attention_head_dim=[2],
    transformer_layers_per_block=[1], cross_attention_dim=16, norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"], sample_size=8, addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=SMALL_SDXL_TEXT_EMBEDS + 6 * 4)

# name -> preset, latent (H, W, C), context (length, dim), added conditioning (text_embeds dim) or None,
# default global batch.
SIZES = {
    "sd15": {"preset": "sd15", "unet": SD15_UNET_CONFIG, "latent": (64, 64, 4), "context": (77, 768),
             "text_embeds": None, "batch": 256},
    "sdxl": {"preset": "sdxl", "unet": SDXL_UNET_CONFIG, "latent": (128, 128, 4), "context": (77, 2048),
             "text_embeds": SDXL_TEXT_EMBEDS, "batch": 128},
    "small": {"preset": "sd15", "unet": SMALL_UNET_CONFIG, "latent": (8, 8, 4), "context": (8, 16), "text_embeds": None,
              "batch": 16},
    "small-sdxl": {"preset": "sdxl", "unet": SMALL_SDXL_UNET_CONFIG, "latent": (8, 8, 4), "context": (8, 16),
                   "text_embeds": SMALL_SDXL_TEXT_EMBEDS, "batch": 16},
}
PEAKS_TFLOPS = {"A100": 312.0, "H100": 989.0}  # dense bf16 tensor-core peaks
REFERENCE_MFU = 0.40
FORWARD_EQUIVALENTS = {"teacher (CFG: cond + uncond)": 2, "student primal": 1, "student JVP tangent": 1,
                       "backward (input + weight gradients)": 2, "remat recompute": 1}
"""UNet forward passes per example in one eulerian step: the guided teacher velocity (2 passes), the student's
`jax.jvp` (primal, plus a tangent pass whose convolutions and matmuls repeat the primal's; the attention
products QK^T and PV count twice there, ignored), the backward of the primal only (the stop-gradient residual
form sends no gradient through the tangent) and the recompute of each rematerialised block. The model FLOPs
of MFU leave out the recompute (6 passes); XLA's count includes it (7)."""
MODEL_PASSES = sum(v for k, v in FORWARD_EQUIVALENTS.items() if k != "remat recompute")
HARDWARE_PASSES = sum(FORWARD_EQUIVALENTS.values())


def forward_equivalents(names, options, guided: bool = True, clean_end_step: bool = False) -> dict:
    """UNet-forward equivalents per example of one step of the objectives `names` (their sum), by part:
    - pairs: the target is `teacher_steps` solver evaluations of the teacher (2 passes each with classifier-free
      guidance, one batched call; Heun evaluates twice a step), no gradient, plus, with `clean_end_step` (a
      DDPM schedule, t_eval_min > t_clean: SD's), one more evaluation for DDIM's step from t = 0 into [-1, 0)
      that `samplers.teacher_solve` always takes; the student's forward, its backward (2) and the remat
      recompute (1).
    - eulerian: `FORWARD_EQUIVALENTS` (stop-gradient residual: no backward through the tangent).
    - lagrangian: the teacher at X (2), the student's primal and tangent, the backward through both (direct
      residual form: 2 x 2) and the recompute of both (2).
    The model FLOPs of MFU leave out "remat recompute"."""
    cfg = 2 if guided else 1
    total: dict = {}
    for name in names:
        if name == "pairs":
            own = options.for_objective("pairs")
            evals = own.teacher_steps * (2 if own.teacher_solver == "heun" else 1)
            label = f"teacher target ({evals} solver evaluations{' + the step into the clean end' if clean_end_step else ''})"
            evals += int(bool(clean_end_step))
            parts = {label: cfg * evals, "student forward": 1,
                     "student backward": 2, "remat recompute": 1}
        elif name == "eulerian":
            parts = dict(FORWARD_EQUIVALENTS, **{"teacher (CFG: cond + uncond)": cfg})
        elif name == "lagrangian":
            parts = {"teacher at X": cfg, "student primal": 1, "student JVP tangent": 1,
                     "backward through primal and tangent": 4, "remat recompute": 2}
        else:
            raise ValueError(f"no forward-equivalent count for objective {name!r}")
        for key, value in parts.items():
            total[f"{name}: {key}" if len(names) > 1 else key] = value
    return total


def plan_equivalents(plan) -> dict:
    """`forward_equivalents` of a `build_step` plan: its objectives, options, guidance and schedule."""
    config, schedule = plan["config"], plan["schedule"]
    return forward_equivalents(plan["objectives"], config.objective.options,
                               guided=config.teacher.guidance_scale != 1.0,
                               clean_end_step=schedule.t_eval_min > schedule.t_clean)


def passes(equivalents: dict) -> tuple[int, int]:
    """(model passes: without the recompute, hardware passes: all)."""
    hardware = sum(equivalents.values())
    return hardware - sum(v for k, v in equivalents.items() if k.endswith("remat recompute")), hardware


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/sd15_step_plan.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("sd15", "sdxl"), default="sd15",
                   help="the preset whose step is planned: sd15 (SD 1.5 UNet, 64x64 latents) or sdxl (SDXL base UNet, "
                        "128x128 latents, text_time conditioning)")
    p.add_argument("--devices", type=int, default=8, help="simulated devices (default 8)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: sd15 256, sdxl 128; --small: 16)")
    p.add_argument("--per-device-batch", type=int, default=None,
                   help="examples per device (sets --batch to this x --devices)")
    p.add_argument("--objective", choices=("preset", "pairs", "eulerian", "lagrangian"), default="preset",
                   help="the preset's own objective (sd15: pairs with 8-step targets), or one by name")
    p.add_argument("--cpu-scheduler", choices=("memory", "concurrency"), default="memory",
                   help="XLA CPU's scheduler for the plan: memory-minimising (default; see MEMORY_SCHEDULER_FLAG) or "
                        "the CPU compiler's default, concurrency-optimised, which undoes remat")
    p.add_argument("--cpu-remat", choices=("kept", "merged"), default="kept",
                   help="kept (default): XLA CPU keeps jax.checkpoint's recompute apart from the forward, as a GPU "
                        "compiler does (KEEP_REMAT_FLAG); merged: the CPU compiler's own pipeline, which merges it "
                        "back and so undoes remat")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="plan a LoRA run of this rank (--model.lora_rank; LCM-LoRA targets, alpha = rank); 0: full")
    p.add_argument("--microbatch-size", type=int, default=None,
                   help="--optim.microbatch_size: the most examples a device runs at once; a larger per-device batch "
                        "runs as sequential microbatches, gradients averaged (default: the preset's; 0: all at once)")
    p.add_argument("--peak-report", default=None, metavar="DIR",
                   help="also dump XLA's compiled step to DIR (--xla_dump_to; a few hundred MB at full size) and print "
                        "what is live at its memory peak, grouped by kind and UNet block (benchmarks/plan_peak.py)")
    p.add_argument("--record", default=None,
                   help="merge the rows into this JSON list (benchmarks/results/step_plans.json), replacing rows "
                        "with the same preset, objective, mode, devices, per-device batch and LoRA rank")
    p.add_argument("--mode", choices=("dp", "fsdp", "both"), default="both", help="data parallel, FSDP or both")
    p.add_argument("--target-step-s", type=parse_floats, default=(1.0, 2.0),
                   help="step times (s, comma-separated) to state the implied MFU for (default 1,2)")
    p.add_argument("--fsdp-min-size", type=int, default=None,
                   help="smallest parameter FSDP splits (default: the sd15 preset's 2^18; --small: 2^10)")
    p.add_argument("--small", action="store_true", help="a toy UNet (one cross-attention block of 16 channels, "
                   "8x8x4 latents, context 8x16; with --preset sdxl also SDXL's text_time conditioning): the same "
                   "program at toy size")
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA CPU without LLVM optimisation (--xla_backend_optimization_level=0): about half the "
                        "compile time; HLO passes, buffer assignment, memory and FLOPs unchanged (the program is "
                        "never run)")
    p.add_argument("--json", default=None, help="also write the rows here as JSON")
    return p


def check_args(args) -> None:
    args.size = SMALL_SIZES[args.preset] if args.small else args.preset
    size = SIZES[args.size]
    if args.per_device_batch is not None:
        args.batch = args.per_device_batch * args.devices
    args.batch = size["batch"] if args.batch is None else args.batch
    if args.devices < 1 or args.batch < 1:
        raise SystemExit("sd15_step_plan: --devices and --batch must be >= 1")
    if args.batch % args.devices:
        raise SystemExit(f"sd15_step_plan: --batch {args.batch} is not divisible by --devices {args.devices}")
    if args.fsdp_min_size is None:
        from flowmap_jax.training.presets import sd15

        args.fsdp_min_size = 2**10 if args.small else sd15().mesh.fsdp_min_size


FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
"""XLA CPU's default scheduler orders the program for concurrency, not memory: it runs the rematerialised blocks'
recompute early, so remat saves nothing in its plan (SD 1.5 student gradient at batch 4: 10.7 GiB of temporaries
with remat, 10.6 without, though JAX saves 0.16 GiB of residuals with remat and 9.0 without). With this flag XLA CPU
uses its memory-minimising list/DFS scheduler, as the GPU compiler's scheduler also works under a memory limit:
5.6 GiB with remat. The plan uses it unless `--cpu-scheduler concurrency` (the default CPU compiler's plan)."""


KEEP_REMAT_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander"
"""XLA CPU expands the optimisation barriers that keep `jax.checkpoint`'s recompute apart from the forward (its
`cse_barrier_expander` pass) before its common-subexpression pass, which then merges the recompute back into the
forward and keeps its values to the backward: remat undone (a toy gradient compiles to 8 matrix products with remat
and 8 without; `plan_peak.py --remat-check`). With that pass disabled the barriers stay through CSE, as they are
meant to, and the compiled toy has the 10 products JAX traced. The plan sets it unless `--cpu-remat merged` (the
CPU compiler's own pipeline). On the UNet plans it moved little (sd15 pairs 65.79 -> 65.81 GiB)."""


def set_host_devices(count: int, fast_compile: bool = False, memory_scheduler: bool = True, extra=(),
                     keep_remat: bool = True) -> None:
    """XLA_FLAGS with `count` host devices (and FAST_COMPILE_FLAGS if asked, MEMORY_SCHEDULER_FLAG and
    KEEP_REMAT_FLAG unless not, and the `extra` flags); must run before jax is imported (ValueError otherwise)."""
    if "jax" in sys.modules:
        raise ValueError("set_host_devices: jax is already imported; the device count can no longer change")
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    ours = [f"--xla_force_host_platform_device_count={count}"]
    if fast_compile:
        ours += [f for f in FAST_COMPILE_FLAGS if f not in kept]
    if memory_scheduler and not any("concurrency_optimized_scheduler" in f for f in kept):
        ours.append(MEMORY_SCHEDULER_FLAG)
    if keep_remat and not any("xla_disable_hlo_passes" in f for f in kept):
        ours.append(KEEP_REMAT_FLAG)
    ours += list(extra)
    # Ours first: XLA stops reading at a token that is not a flag (tests/conftest.py passes one).
    os.environ["XLA_FLAGS"] = " ".join(ours + kept)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# --------------------------------------------------------------------------------------------------
# The step, built as `flowmap_jax.train.run` and `flowmap_jax.training.assembly.build` build it, on abstract values.

SMALL_SIZES = {"sd15": "small", "sdxl": "small-sdxl"}
"""The toy stand-in (a SIZES key) of each preset."""


def build_step(size: str, mode: str, batch: int, devices=None, fsdp_min_size: int | None = None,
               objective: str | None = None, lora_rank: int = 0, microbatch_size: int | None = None):
    """The trainer's jitted step for the sd15 or sdxl preset (or the --small stand-in) and abstract arguments.

    size: "sd15", "sdxl", "small" or "small-sdxl" (SIZES); mode: "dp" (mesh data=N) or "fsdp" (mesh fsdp=N; on one
    device both are the 1x1 mesh, every parameter whole); batch: the global batch;
    devices: the jax devices of the mesh (default all); objective: one objective by name, or None for the
    preset's own (sd15: pairs with 8-step DPM-Solver++(2M) targets); microbatch_size: `--optim.microbatch_size`
    (None: the preset's; the step runs each device's batch in `train_step.microbatch_count` passes); lora_rank: > 0 for a LoRA run
    (`--model.lora_rank`, the LCM-LoRA default targets, alpha = rank): the state holds only the adapters and the
    flow map's inputs, merged onto the teacher's arrays inside the step (`core.lora.on_merged_params`). Returns a dict: step (jitted, `.lower(*args)`),
    args (state, teacher, batch, rng as ShapeDtypeStructs with shardings), mesh, specs, params (abstract
    student parameters), unet (the student's Flax module), config (the TrainConfig), counts of parameters.
    """
    import jax
    import jax.numpy as jnp

    from flowmap_jax.core import flow_map, objectives
    from flowmap_jax.training import presets
    from flowmap_jax.training import sharding as sh
    from flowmap_jax.training import train_step as ts
    from flowmap_jax.spec.schedule import load_scheduler
    from flowmap_jax.spec.target_time_hook import add_target_time_hook_config
    from flowmap_jax.core.teacher import Teacher, unet_teacher_fn
    from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig
    from flowmap_jax.unet.unet_2d_condition import abstract_unet_params

    spec = SIZES[size]
    config = presets.PRESETS[spec["preset"]]()
    config.data.batch_size = int(batch)
    config.data.sample_shape = spec["latent"]
    if fsdp_min_size is not None:
        config.mesh.fsdp_min_size = int(fsdp_min_size)
    if mode not in ("dp", "fsdp"):
        raise ValueError(f"mode must be dp or fsdp, got {mode!r}")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = (n, 1) if mode == "dp" else (1, n)
    mesh = sh.make_mesh(data, fsdp, devices)
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32

    # Teacher (assembly.build): the frozen UNet with classifier-free guidance; its params abstract.
    unet_config = {k: v for k, v in spec["unet"].items() if not k.startswith("_")}
    schedule, prediction_type = load_scheduler(SD15_SCHEDULER_CONFIG)
    teacher_params = abstract_unet_params(UNetConfig.from_dict(unet_config))
    # The trainer holds the frozen teacher in the compute dtype (assembly.in_compute_dtype).
    teacher_params_compute = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        teacher_params)
    teacher_unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(unet_config), dtype=dtype, remat=config.model.remat)
    length, dim = spec["context"]
    uncond = {"encoder_hidden_states": jax.ShapeDtypeStruct((1, length, dim), jnp.float32)}
    if spec["text_embeds"]:  # SDXL: the pooled text embedding and the six size/crop time ids
        uncond["added_cond_kwargs"] = {"text_embeds": jax.ShapeDtypeStruct((1, spec["text_embeds"]), jnp.float32),
                                       "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}
    teacher = Teacher.create(unet_teacher_fn(teacher_unet), teacher_params_compute, schedule, prediction_type,
                             guidance_scale=jnp.float32(config.teacher.guidance_scale), uncond=uncond)

    # Student: the teacher's UNet plus the target-time hook, shapes only.
    params = jax.eval_shape(lambda p, key: flow_map.add_target_time_hook(unet_config, p, key)[1], teacher_params,
                            jax.random.key(config.run.seed))
    flow_config = add_target_time_hook_config(unet_config)
    student_unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(flow_config), dtype=dtype, remat=config.model.remat)
    fmap = flow_map.FlowMap(flow_map.unet_network(student_unet), schedule, prediction_type)
    # The preset's objective(s) as assembly.build combines them, or the one asked for.
    names = tuple(config.objective.names) if objective is None else (objective,)
    weights = tuple(config.objective.weights) if objective is None else (1.0,)
    loss_fn = objectives.combine_objectives(
        [(name, weight, objectives.make_objective(name, fmap, config.objective.options))
         for name, weight in zip(names, weights)])

    unet_params = params
    if lora_rank > 0:  # assembly.build's LoRA mode: the trainable tree on the teacher's base
        from flowmap_jax.core import lora

        settings = lora.LoraSettings.create(int(lora_rank))
        trainable = lora.init_trainable(params, teacher_params, settings, jax.random.key(config.run.seed))
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), trainable)
        loss_fn = lora.on_merged_params(loss_fn, settings.scale)

    # Optimiser, shardings, step (train.run, step 4).
    optimizer = ts.make_optimizer(config.optim, config.run.steps)
    specs = sh.param_specs(params, mesh, config.mesh.fsdp_min_size)
    state_sharding = ts.state_shardings(params, optimizer, mesh, specs)
    teacher_specs = sh.param_specs(teacher, mesh, config.mesh.fsdp_min_size)  # split like the student
    if microbatch_size is not None:
        config.optim.microbatch_size = int(microbatch_size)
    microbatches = ts.microbatch_count(batch // n, config.optim.microbatch_size)
    step = ts.make_train_step(loss_fn, optimizer, mesh, specs, ema_decay=config.optim.ema_decay,
                              state_sharding=state_sharding, teacher_specs=teacher_specs, microbatches=microbatches)

    abstract_state = jax.eval_shape(
        lambda p: ts.TrainState(step=jnp.zeros((), jnp.int32), params=p, ema_params=p, opt_state=optimizer.init(p)),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params))
    state = _with_shardings(abstract_state, state_sharding)
    replicated = sh.replicated(mesh)
    teacher = jax.tree.map(lambda x, spec: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=sh.named(mesh, spec)),
                           teacher, teacher_specs)
    batch_sharding = sh.batch_sharding(mesh)
    h, w, c = spec["latent"]
    batch_args = {"x0": jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32, sharding=batch_sharding),
                  "cond": {"encoder_hidden_states": jax.ShapeDtypeStruct((batch, length, dim), jnp.float32,
                                                                         sharding=batch_sharding)},
                  "example_id": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)}
    if spec["text_embeds"]:
        batch_args["cond"]["added_cond_kwargs"] = {
            "text_embeds": jax.ShapeDtypeStruct((batch, spec["text_embeds"]), jnp.float32, sharding=batch_sharding),
            "time_ids": jax.ShapeDtypeStruct((batch, 6), jnp.float32, sharding=batch_sharding)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    sharded = sum(math.prod(x.shape) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(
        specs, is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec))) if sh.FSDP_AXIS in tuple(s))
    return {"step": step, "args": (state, teacher, batch_args, rng), "mesh": mesh, "specs": specs,
            "teacher_specs": teacher_specs, "objectives": names, "schedule": schedule,
            "params": params, "unet_params": unet_params, "unet": student_unet, "config": config, "optimizer": optimizer,
            "unet_config": unet_config, "latent": spec["latent"], "context": spec["context"],
            "text_embeds": spec["text_embeds"],
            "student_params": count(params), "teacher_params": count(teacher_params), "lora_rank": int(lora_rank),
            "microbatches": microbatches,
            "fsdp_sharded_params": sharded, "data": data, "fsdp": fsdp}


def _with_shardings(abstract, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def concrete_args(plan, seed: int = 0):
    """Real (state, teacher, batch, rng) for plan["step"], placed with the plan's shardings: randomly
    initialised UNet parameters (flax defaults) for the teacher, the student = teacher + target-time hook
    (`flow_map.add_target_time_hook`; a LoRA plan: its adapters and inputs), a fresh TrainState (`train_step.init_state`), Gaussian latents and
    text context, zero unconditional context. For running the step on real devices (gpu_check.py)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flowmap_jax.core import flow_map
    from flowmap_jax.training import sharding as sh
    from flowmap_jax.training import train_step as ts
    from flowmap_jax.unet import UNetConfig
    from flowmap_jax.unet.unet_2d_condition import init_unet_params

    mesh = plan["mesh"]
    _, abstract_teacher, abstract_batch, _ = plan["args"]
    replicated = sh.replicated(mesh)
    key = jax.random.key(seed)
    teacher_params = jax.device_put(init_unet_params(UNetConfig.from_dict(plan["unet_config"]), key), replicated)
    _, params = flow_map.add_target_time_hook(plan["unet_config"], teacher_params, jax.random.fold_in(key, 1))
    if plan["lora_rank"]:  # the trainable tree: adapters (B = 0) and the flow map's inputs
        from flowmap_jax.core import lora

        params = lora.init_trainable(params, teacher_params, lora.LoraSettings.create(plan["lora_rank"]),
                                     jax.random.fold_in(key, 2))
    state = ts.init_state(params, plan["optimizer"], mesh, plan["specs"])
    compute = {"bfloat16": jnp.bfloat16}.get(plan["config"].model.dtype, jnp.float32)
    teacher_params_compute = jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, compute), a.sharding),
                                          teacher_params, abstract_teacher.params)
    teacher = abstract_teacher.replace(
        params=teacher_params_compute,
        guidance_scale=jax.device_put(jnp.float32(plan["config"].teacher.guidance_scale), replicated),
        uncond=jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, np.float32), replicated), abstract_teacher.uncond))
    rng = np.random.default_rng(seed)
    batch = jax.tree.map(lambda x: np.asarray(rng.standard_normal(x.shape), np.float32), abstract_batch)
    batch["x0"] = np.clip(batch["x0"], -3.0, 3.0)
    batch["example_id"] = np.arange(abstract_batch["example_id"].shape[0], dtype=np.int32)
    batch = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), batch, abstract_batch)
    step_rng = jax.jit(lambda: jax.random.key(seed), out_shardings=replicated)()
    return state, teacher, batch, step_rng


def forward_flops_per_example(plan) -> int:
    """2 x multiply-adds of the convolutions and matmuls of one student UNet forward at batch 1 (counted
    from its jaxpr, `backend_speed.count_flops`; abstract inputs, nothing computed)."""
    import backend_speed as bs
    import jax
    import jax.numpy as jnp

    h, w, c = plan["latent"]
    length, dim = plan["context"]
    unet = plan["unet"]
    args = (plan["unet_params"], jax.ShapeDtypeStruct((1, h, w, c), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, length, dim), jnp.float32))
    added = None
    if plan.get("text_embeds"):  # SDXL's text_time conditioning
        added = {"text_embeds": jax.ShapeDtypeStruct((1, plan["text_embeds"]), jnp.float32),
                 "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}
    return bs.count_flops(lambda p, x, s, t, ctx, extra: unet.apply({"params": p}, x, s, class_labels=t,
                                                                      encoder_hidden_states=ctx,
                                                                      added_cond_kwargs=extra), *args, added)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_plan(plan) -> dict:
    """Lowers and compiles plan["step"] on its abstract arguments; returns times, memory and FLOPs."""
    t0 = time.perf_counter()
    lowered = plan["step"].lower(*plan["args"])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = _cost(compiled)
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "alias_size_in_bytes", "peak_memory_in_bytes")
    mem = {f.replace("_size_in_bytes", "").replace("_in_bytes", ""): int(getattr(memory, f, 0) or 0) for f in fields}
    mem["total"] = mem["argument"] + mem["output"] + mem["temp"] + mem["generated_code"] - mem["alias"]
    return {"compiled": compiled, "lower_s": t1 - t0, "compile_s": t2 - t1, "memory": mem,
            "xla_flops_per_device": float(cost.get("flops", 0.0)),
            "xla_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0))}


def plan_row(size: str, mode: str, batch: int, fsdp_min_size: int, target_step_s, log=None,
             objective: str | None = None, lora_rank: int = 0, microbatch_size: int | None = None) -> dict:
    import jax

    log = log or (lambda _: None)
    plan = build_step(size, mode, batch, fsdp_min_size=fsdp_min_size, objective=objective, lora_rank=lora_rank,
                      microbatch_size=microbatch_size)
    config = plan["config"]
    equivalents = plan_equivalents(plan)
    model_passes, hardware_passes = passes(equivalents)
    n = plan["mesh"].size
    log(f"{mode}: mesh {dict(plan['mesh'].shape)}, batch {batch} ({batch // n} per device); lowering and compiling")
    forward = forward_flops_per_example(plan)  # before the (long) compile: a mistake here costs seconds
    result = compile_plan(plan)
    del result["compiled"]
    model_flops = forward * model_passes * batch
    row = dict(preset=size if size in ("sd15", "sdxl") else f"{SIZES[size]['preset']} ({size})",
               objective="+".join(plan["objectives"]),
               lora_rank=plan["lora_rank"], microbatches=plan["microbatches"], forward_equivalents=equivalents, model_passes=model_passes,
               hardware_passes=hardware_passes,
               mode=mode, devices=n, mesh=dict(plan["mesh"].shape), global_batch=batch, per_device_batch=batch // n,
               student_params=plan["student_params"], teacher_params=plan["teacher_params"],
               fsdp_sharded_params=plan["fsdp_sharded_params"], fsdp_min_size=fsdp_min_size,
               forward_flops_per_example=forward, model_flops_per_step=model_flops,
               analytic_flops_per_step=forward * hardware_passes * batch,
               xla_flops_per_step=result["xla_flops_per_device"] * n, jax_version=jax.__version__,
               cpu_scheduler="memory" if MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", "") else "concurrency",
               cpu_remat="kept" if KEEP_REMAT_FLAG in os.environ.get("XLA_FLAGS", "") else "merged",
               **result)
    row["xla_vs_analytic"] = row["xla_flops_per_step"] / row["analytic_flops_per_step"]
    mem = row["memory"]
    row.update(arguments_gib=mem["argument"] / 2**30, temp_gib=mem["temp"] / 2**30, total_gib=mem["total"] / 2**30,
               xla_tflop_per_step=row["xla_flops_per_step"] / 1e12,
               analytic_tflop_per_step=row["analytic_flops_per_step"] / 1e12)
    row["mfu"] = {gpu: {str(t): model_flops / (n * peak * 1e12 * t) for t in target_step_s}
                  for gpu, peak in PEAKS_TFLOPS.items()}
    row["step_s_at_40pct_mfu"] = {gpu: model_flops / (n * peak * 1e12 * REFERENCE_MFU)
                                  for gpu, peak in PEAKS_TFLOPS.items()}
    log(f"{mode}: compiled in {result['compile_s']:.0f}s (lowered in {result['lower_s']:.0f}s); "
        f"total {row['memory']['total'] / 2**30:.2f} GiB per device")
    return row


# --------------------------------------------------------------------------------------------------
# Tables.

MEMORY_COLUMNS = ("objective", "mode", "mesh", "batch / device", "argument GiB", "output GiB", "temp GiB", "generated code MiB",
                  "aliased GiB", "total GiB", "compile s")


def _objective_cell(row) -> str:
    """The objective, and the LoRA rank for a LoRA plan."""
    objective = row.get("objective", "eulerian")
    cell = f"{objective}, LoRA rank {row['lora_rank']}" if row.get("lora_rank") else objective
    return cell + (f", {row['microbatches']} microbatches" if row.get("microbatches", 1) > 1 else "")


def _gib(value):
    return f"{value / 2**30:.4g}"


def memory_table(rows) -> str:
    lines = ["| " + " | ".join(MEMORY_COLUMNS) + " |", "|" + "---|" * len(MEMORY_COLUMNS)]
    for r in rows:
        m = r["memory"]
        mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items())
        lines.append(f"| {_objective_cell(r)} | {r['mode']} | {mesh} | {r['per_device_batch']} | {_gib(m['argument'])} | {_gib(m['output'])} | "
                     f"{_gib(m['temp'])} | {m['generated_code'] / 2**20:.4g} | {_gib(m['alias'])} | "
                     f"{_gib(m['total'])} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def flops_columns(target_step_s) -> tuple[str, ...]:
    mfu = tuple(f"MFU {gpu} @ {t:g} s" for gpu in PEAKS_TFLOPS for t in target_step_s)
    return ("objective", "mode", "UNet-forward equivalents / example (model, with recompute)", "XLA TFLOP / device",
            "XLA TFLOP / step", "analytic TFLOP / step", "XLA / analytic", "model TFLOP / step", *mfu,
            *(f"step s @ 40% MFU {gpu}" for gpu in PEAKS_TFLOPS))


def flops_table(rows, target_step_s) -> str:
    columns = flops_columns(target_step_s)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [_objective_cell(r), r["mode"],
                 f"{r.get('model_passes', MODEL_PASSES)}, {r.get('hardware_passes', HARDWARE_PASSES)}",
                 f"{r['xla_flops_per_device'] / 1e12:.4g}", f"{r['xla_flops_per_step'] / 1e12:.4g}",
                 f"{r['analytic_flops_per_step'] / 1e12:.4g}", f"{r['xla_vs_analytic']:.3f}",
                 f"{r['model_flops_per_step'] / 1e12:.4g}"]
        cells += [f"{100 * r['mfu'][gpu][str(t)]:.3g}%" for gpu in PEAKS_TFLOPS for t in target_step_s]
        cells += [f"{r['step_s_at_40pct_mfu'][gpu]:.3g}" for gpu in PEAKS_TFLOPS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(rows, args) -> str:
    r = rows[0]
    h, w, c = SIZES[args.size]["latent"]
    length, dim = SIZES[args.size]["context"]
    split = "; ".join(f"{row['objective']}: " + ", ".join(f"{k} {v}" for k, v in row["forward_equivalents"].items())
                      for row in {row["objective"]: row for row in rows}.values())
    return (f"{ {'small': '--small UNet', 'small-sdxl': '--small UNet with SDXL conditioning', 'sd15': 'SD 1.5 UNet', 'sdxl': 'SDXL base UNet'}[args.size]} ({r['student_params'] / 1e6:.1f}M student parameters "
            f"with the target-time hook, teacher {r['teacher_params'] / 1e6:.1f}M frozen, in the compute dtype, "
            f"split over the fsdp axis like the student), latents "
            f"{h}x{w}x{c}, context {length}x{dim}, global batch {r['global_batch']} on {r['devices']} simulated devices; "
            f"objective {', '.join(sorted({row['objective'] for row in rows}))}, CFG teacher (one batched call), "
            f"bf16 compute, fp32 params, remat per layer, AdamW + EMA, "
            f"{_passes_text(r)}; "
            f"FSDP splits parameters of >= {r['fsdp_min_size']} elements ({r['fsdp_sharded_params'] / 1e6:.1f}M "
            f"of them). jax {r['jax_version']}, XLA CPU.\n\n"
            f"Analytic FLOPs: one student UNet forward = {r['forward_flops_per_example'] / 1e9:.4g} GFLOP per example "
            f"(2 x MACs of its convolutions and matmuls, counted from its jaxpr) x the forward-equivalent passes per "
            f"example ({split}) x batch. Model FLOPs for MFU: without the recompute. MFU = model FLOPs / "
            f"(devices x peak x step time); peaks {', '.join(f'{g} {p:g}' for g, p in PEAKS_TFLOPS.items())} TFLOP/s "
            f"(dense bf16).")


def _passes_text(row) -> str:
    """How the UNet sees a device's batch: whole, or in microbatches (`--optim.microbatch_size`)."""
    count = row.get("microbatches", 1)
    if count == 1:
        return "the UNet on each device's whole batch"
    return (f"the UNet on {row['per_device_batch'] // count} examples at a time ({count} microbatches per device, "
            f"gradients averaged)")


RECORD_KEYS = ("preset", "objective", "mode", "devices", "per_device_batch", "lora_rank", "microbatches", "arguments_gib",
               "temp_gib", "total_gib", "xla_tflop_per_step", "analytic_tflop_per_step")
"""The keys of each row of benchmarks/results/step_plans.json (plus the rest of the row under "detail")."""


def record_rows(path, rows) -> list:
    """Merge `rows` into the JSON list at `path` (created if missing): a row replaces the one with the same
    preset, objective, mode, devices, per-device batch, LoRA rank and microbatches (1 where a row has none).
    Returns the new list."""
    identity = lambda row: tuple(row.get(k, 1) if k == "microbatches" else row[k] for k in RECORD_KEYS[:7])
    existing = json.loads(Path(path).read_text()) if Path(path).exists() else []
    new = [dict({k: row[k] for k in RECORD_KEYS}, detail={k: v for k, v in row.items() if k not in RECORD_KEYS},
                recorded=time.strftime("%Y-%m-%d")) for row in rows]
    keys = {identity(row) for row in new}
    merged = [row for row in existing if identity(row) not in keys] + new
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(merged, indent=2, default=str) + "\n")
    return merged


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.peak_report and args.mode == "both":  # one compiled step per dump
        raise SystemExit("sd15_step_plan: --peak-report needs one --mode (dp or fsdp)")
    dump = (f"--xla_dump_to={args.peak_report}", "--xla_dump_hlo_module_re=jit_step") if args.peak_report else ()
    set_host_devices(args.devices, args.fast_compile, memory_scheduler=args.cpu_scheduler == "memory", extra=dump,
                     keep_remat=args.cpu_remat == "kept")
    import jax

    if jax.device_count() != args.devices:
        raise SystemExit(f"sd15_step_plan: asked for {args.devices} devices, jax sees {jax.device_count()}")
    if args.microbatch_size is not None:  # after jax's import (set_host_devices first): the trainer's own rule
        from flowmap_jax.training.train_step import microbatch_count

        try:
            microbatch_count(args.batch // args.devices, args.microbatch_size)
        except ValueError as error:
            raise SystemExit(f"sd15_step_plan: {error}") from None
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    modes = ("dp", "fsdp") if args.mode == "both" else (args.mode,)
    size = args.size
    objective = None if args.objective == "preset" else args.objective
    rows = [plan_row(size, mode, args.batch, args.fsdp_min_size, args.target_step_s, log, objective=objective,
                     lora_rank=args.lora_rank, microbatch_size=args.microbatch_size) for mode in modes]
    seconds = time.perf_counter() - started
    print(describe(rows, args) + "\n")
    print("Per-device memory (XLA memory_analysis of the compiled step; total = argument + output + temp + "
          "generated code - aliased):\n")
    print(memory_table(rows) + "\n")
    print("FLOPs per step and the MFU a step time implies:\n")
    print(flops_table(rows, args.target_step_s) + "\n")
    if args.peak_report:
        import plan_peak

        print(plan_peak.peak_table(args.peak_report) + "\n")
    print(f"{seconds:.0f}s in all; {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at the end.")
    if args.record:
        record_rows(args.record, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "seconds": seconds,
                                               "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
