"""GPU check (issue 6): the GPU-dependent tests and the backend-speed table at Stable Diffusion 1.5 size.

    python benchmarks/gpu_check.py OUT_DIR                       # < 8 minutes on one H100/A100
    python benchmarks/gpu_check.py OUT_DIR --batch 8 --torch-compile all --peak-tflops 989
    python benchmarks/gpu_check.py OUT_DIR --train-step --skip parity,torch   # + the sd15 and sdxl train steps, < 8 min
    python benchmarks/gpu_check.py OUT_DIR --train-step --skip parity,jax,torch --train-budget 420   # more time
    python benchmarks/gpu_check.py OUT_DIR --train-step --train-presets sdxl --train-batch 4 --skip parity,jax,torch
    python benchmarks/gpu_check.py OUT_DIR --train-step --train-lora-rank 64 --skip parity,jax,torch   # LoRA steps
    python benchmarks/gpu_check.py --help

Needs an NVIDIA GPU with JAX's CUDA build (`pip install -e ".[torch,dev,cuda12]"`) and a CUDA build of
torch (diffusers may come as a wheel). Without a GPU it stops at once with exit code 2 and says what is
missing. Everything it prints goes to OUT_DIR: gpu_check.md (the tables), gpu_check.json, logs/*.log.

Stages, each in its own process (so JAX and torch do not share the GPU's memory, and a stage that runs
long is cut off without losing what the others measured); the stages before trainstep keep inside `--budget`
seconds (default 450; caps env 40, parity 120, jax 190, torch 100 s, stretched by --budget / 450 when larger),
each inside its own cap, and the trainstep stage inside `--train-budget` more (default 230 s) plus whatever
the stages before it left unused. So the whole check ends within the planned stages' caps (at most
`--budget`) + `--train-budget`: `--train-step --skip parity,torch` within 40 + 190 + 230 = 460 s (7 min 40 s,
under 8 minutes), `--train-step --skip parity,jax,torch` within 270 s (460 s with `--train-budget 420`),
every stage and `--train-step` within 450 + 230 = 680 s.

1. **env**: GPU name and memory (nvidia-smi), JAX sees a GPU, torch sees CUDA, versions.
2. **parity** (fp32, TF32 off: `torch.backends.cuda.matmul.allow_tf32 = False`, cuDNN TF32 off,
   `jax_default_matmul_precision = "highest"`): the SD 1.5 UNet with the flow map's target-time hook,
   random init, diffusers vs the Flax port on the GPU: one flow-map jump (max error relative to max |torch|,
   threshold 1e-3) and a 4-jump sample (threshold 2e-3); the `eulerian` objective's loss and parameter
   gradient at the digits config (relative error, threshold 1e-3).
3. **jax** (bf16 compute, fp32 parameters): bf16 sanity (the bf16 jump against stage 2's fp32 one: finite,
   relative RMS error below 5e-2; the bf16 train step's loss finite), then the speed rows.
4. **torch** (bf16 autocast): the same sanity and rows, eager, then `torch.compile` (`--torch-compile`:
   none, forward (network only, default: compiling the JVP train step is slow), all).
5. **trainstep** (only with `--train-step`, in `--train-budget` seconds, see above): for each preset of
   `--train-presets` (default sd15,sdxl) in turn, its full-size flow-map training step as the trainer builds it
   (`benchmarks/sd15_step_plan.build_step`: the preset's objective, `pairs` with 8-step DPM-Solver++(2M)
   targets of the CFG teacher; bf16, remat, AdamW + EMA), on every local GPU in the preset's mesh mode (sd15
   data parallel; sdxl FSDP, its `--mesh.fsdp -1`; on one GPU both are the 1x1 mesh, every array whole), with
   real randomly initialised weights, at the largest per-GPU batch that runs: searched by halving from
   `--train-batch` (default: the preset's batch over 8 GPUs, sd15 256 / 8 = 32, sdxl 128 / 8 = 16) down to 1.
   Each attempt runs in its own process (its own GPU memory, so the peak is that batch's; cut off when the
   preset's time is up). The time is split sd15 2 : sdxl 3 (TRAIN_SHARES; what sd15 leaves goes to sdxl), so a
   preset that keeps failing cannot take the other's; with the default 230 s, sd15 has at least 92 s and sdxl
   138 s. A batch that runs out of memory (or whose process dies) is recorded and half of it tried; one cut off
   by the time, or failing with another error, ends that preset's search; batches left untried for lack of
   time are listed. Printed per preset (one row each in gpu_check.md, each attempt below it): the largest
   batch per GPU that ran, examples/s, the step time (median of `--repeats` after the first step), the first
   step's time with lowering and compilation, the device's peak bytes in use (`memory_stats()`, GiB), the loss
   (finite) and MFU against the GPU's bf16 peak (model FLOPs: the student's UNet forward FLOPs x the objective's
   forward-equivalent passes per example without the remat recompute, 19 for pairs with 8 guided teacher
   steps, x batch; `sd15_step_plan.forward_equivalents` and `passes`); per attempt also XLA's memory analysis
   of the compiled step, and for the batches that failed, why: out of memory, timeout (and in which phase:
   compiling, first step, ...), error or crashed.
6. **pytest** (only with `--pytest`, in the time left): tests/test_unet_parity.py and tests/test_core_parity.py
   with JAX on the GPU (torch on the CPU, as those tests are written).

Speed rows (`benchmarks/backend_speed.py`, the same code as the CPU table): forward (one jump), train step
(eulerian objective with a CFG teacher, its gradient and AdamW) and a 4-jump sample, SD 1.5 at a 64x64x4
latent with 77x768 context, batch `--batch`; median of `--repeats` after warm-up. Per-step time,
images/s (batch / time) and model FLOP utilisation: model FLOPs (counted from the JAX program: 2 x MACs
of convolutions and matmuls, ~803 GFLOP per image per forward) / time / the GPU's dense bf16 peak (from
its name: H100 SXM/H200 989, H100 NVL 835, H100 PCIe 756, A100 312, L40S 362 TFLOP/s; `--peak-tflops`
overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the device name.
BF16_PEAK_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.5), ("H100", 989.4),
    ("A100", 312.0), ("L40S", 362.0),
)
STAGES = ("env", "parity", "jax", "torch", "trainstep", "pytest")
STAGE_CAPS = {"env": 40, "parity": 120, "jax": 190, "torch": 100,
              "pytest": 120}  # seconds (scaled by --budget / 450); trainstep: --train-budget
TRAIN_PRESETS = ("sd15", "sdxl")  # the --train-presets choices (flowmap_jax.training.presets)
TRAIN_BUDGET = 230  # seconds: the default --train-budget (env 40 + jax 190 + 230 = 460 s < 8 min)
TRAIN_SHARES = {"sd15": 2.0, "sdxl": 3.0}  # how --train-budget is split between the presets (weights)
TRAIN_REFERENCE_GPUS = 8  # the presets' batch is for 8 GPUs: the default --train-batch is a GPU's share of it
MIN_ATTEMPT_S = 20.0  # a train-step attempt is not started with less time left than this
OOM_MARKERS = ("resource_exhausted", "out of memory", "cuda_error_out_of_memory", "failed to allocate",
               "oom when allocating")  # lower case; an error containing one is "out of memory"
OPT_IN_STAGES = {"trainstep": "train_step", "pytest": "pytest"}  # stage -> the flag that turns it on
WEIGHTS = "flow_map_unet.safetensors"  # the stages' shared random weights, deleted at the end
THRESHOLDS = {"forward": 1e-3, "sample": 2e-3, "loss": 1e-3, "grad": 1e-3, "bf16_rms": 5e-2}


def bf16_peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak of a GPU from its name (None if unknown), or `override`."""
    if override:
        return float(override)
    name = device_name.upper()
    for key, peak in BF16_PEAK_TFLOPS:
        if key.upper() in name:
            return peak
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder for gpu_check.md, gpu_check.json and logs/")
    p.add_argument("--batch", type=int, default=4, help="batch of every timed op (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up (median; default 5)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak in TFLOP/s "
                   "(default: from the device name)")
    p.add_argument("--torch-compile", choices=("none", "forward", "all"), default="forward",
                   help="torch.compile the network (forward), also the train step (all), or nothing")
    p.add_argument("--remat", action="store_true", help="JAX: rematerialise each UNet block (less memory)")
    p.add_argument("--attention", choices=("default", "chunked", "xla", "cudnn"), default="default",
                   help="JAX speed rows: the UNet's attention kernel (flowmap_jax/unet/attention_kernels.py; "
                        "default: query blocks when the logits are large; cudnn has no JVP, so no train step)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    p.add_argument("--pytest", action="store_true", help="also run the parity test files with JAX on the GPU "
                   "in the time left")
    p.add_argument("--train-step", action="store_true", help="also compile and run each --train-presets preset's "
                   "full-size flow-map training step (benchmarks/sd15_step_plan.py) in --train-budget seconds")
    p.add_argument("--train-presets", type=parse_train_presets, default=TRAIN_PRESETS,
                   help="--train-step: the presets whose step is run, in order (default sd15,sdxl)")
    p.add_argument("--train-batch", type=parse_train_batch, default=None,
                   help="--train-step: the first per-GPU batch tried (halved until it fits), one number for every "
                        "preset or per preset (sd15=32,sdxl=8); default: each preset's batch over 8 GPUs (sd15 "
                        "256 / 8 = 32, sdxl 128 / 8 = 16)")
    p.add_argument("--train-budget", type=float, default=TRAIN_BUDGET,
                   help=f"--train-step: seconds for the whole trainstep stage, on top of --budget, split between "
                        f"the presets (default {TRAIN_BUDGET}; it also gets what the earlier stages leave)")
    p.add_argument("--train-lora-rank", type=int, default=0, help="--train-step: a LoRA run of this rank (the "
                   "adapters on the frozen UNet, sd15_step_plan --lora-rank); 0 (default): the full fine-tune")
    p.add_argument("--skip", default="", help="comma-separated stages to skip (parity, jax, torch)")
    p.add_argument("--_stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    p.add_argument("--_name", help=argparse.SUPPRESS)  # the stage's results file: WORK/NAME.json (default: the stage)
    p.add_argument("--_train-preset", choices=TRAIN_PRESETS, help=argparse.SUPPRESS)  # one trainstep attempt:
    p.add_argument("--_train-per-device", type=int, help=argparse.SUPPRESS)  # this preset at this batch per device
    # Development only: every stage on the CPU with the small digits UNet, trainstep with each preset's toy stand-in
    # (sd15_step_plan.SMALL_SIZES: small, small-sdxl) on the local CPU devices (checks the plumbing, not the GPU).
    p.add_argument("--_cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_train_presets(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in TRAIN_PRESETS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct presets among {','.join(TRAIN_PRESETS)}, got {text!r}")
    return names


def parse_train_batch(text: str):
    """"32" -> 32 (every preset); "sd15=32,sdxl=8" -> {"sd15": 32, "sdxl": 8}. Values are checked in check_args."""
    try:
        if "=" not in text:
            return int(text)
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        batches = {name.strip(): int(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or PRESET=N,... (sd15=32,sdxl=8), got {text!r}") from None
    unknown = sorted(set(batches) - set(TRAIN_PRESETS))
    if unknown or not batches:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {unknown} in {text!r}; presets are {TRAIN_PRESETS}")
    return batches


def preset_train_plan(name: str, dry_run: bool = False) -> dict:
    """How the trainstep stage runs preset `name`: the sd15_step_plan size (the full-size UNet, or its toy stand-in
    in the CPU dry run), the mesh mode the preset's `mesh` asks for (`--mesh.fsdp` other than 1: fsdp, else dp; on
    one GPU both are the 1x1 mesh) and its default per-GPU batch (the preset's batch over 8 GPUs)."""
    import sd15_step_plan as plan_lib

    from flowmap_jax.training.presets import PRESETS

    config = PRESETS[name]()
    return {"size": plan_lib.SMALL_SIZES[name] if dry_run else name, "mode": "fsdp" if config.mesh.fsdp != 1 else "dp",
            "default_batch": max(1, config.data.batch_size // TRAIN_REFERENCE_GPUS),
            "preset_batch": config.data.batch_size}


def train_start_batch(args, name: str) -> int:
    """The first per-GPU batch tried for preset `name` (--train-batch, else the preset's batch over 8 GPUs)."""
    if isinstance(args.train_batch, int):
        return args.train_batch
    if isinstance(args.train_batch, dict) and name in args.train_batch:
        return args.train_batch[name]
    return preset_train_plan(name)["default_batch"]


def check_args(args) -> None:
    batches = (list(args.train_batch.values()) if isinstance(args.train_batch, dict)
               else [1 if args.train_batch is None else args.train_batch])
    if args.batch < 1 or args.repeats < 1 or min(batches) < 1:
        raise SystemExit("gpu_check: --batch, --repeats and --train-batch must be >= 1")
    if args.budget < 60:
        raise SystemExit("gpu_check: --budget must be at least 60 seconds")
    if args.train_budget < MIN_ATTEMPT_S * len(args.train_presets):
        raise SystemExit(f"gpu_check: --train-budget must be at least {MIN_ATTEMPT_S:.0f} seconds per preset of "
                         f"--train-presets ({len(args.train_presets)})")
    if isinstance(args.train_batch, dict) and set(args.train_batch) - set(args.train_presets):
        raise SystemExit(f"gpu_check: --train-batch names {sorted(set(args.train_batch) - set(args.train_presets))}, "
                         f"not in --train-presets {','.join(args.train_presets)}")
    unknown = sorted(set(filter(None, args.skip.split(","))) - set(STAGES))
    if unknown:
        raise SystemExit(f"gpu_check: --skip: unknown stage(s) {unknown}; stages are {STAGES[1:]}")


def nvidia_smi() -> tuple[bool, str]:
    """(ok, text): the GPUs nvidia-smi lists, or why there are none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False, "nvidia-smi not found: no NVIDIA driver on this machine"
    try:
        proc = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"nvidia-smi failed: {error}"
    if proc.returncode != 0 or not proc.stdout.strip():
        return False, f"nvidia-smi found no GPU: {(proc.stderr or proc.stdout).strip()[:300]}"
    return True, proc.stdout.strip()


# --------------------------------------------------------------------------------------------------
# Stages (each runs in a child process: `--_stage NAME --_work DIR`); each saves its results as it goes
# to DIR/NAME.json so that a stage cut off by its time cap still reports what it measured.

class Recorder:
    def __init__(self, work: Path, stage: str):
        self.path = work / f"{stage}.json"
        self.data = {}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _spec(args):
    import backend_speed as bs

    return bs.case_spec("digits" if args._cpu_dry_run else "sd15", args.batch)


def _device(args) -> str:
    return "cpu" if args._cpu_dry_run else "cuda"


def _empty_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ensure_weights(work: Path, spec) -> Path:
    """work/WEIGHTS: the flow-map UNet's random weights (torch.manual_seed(0)), written by the parity stage,
    or here when that stage was skipped."""
    path = work / WEIGHTS
    if not path.is_file():
        import backend_speed as bs
        from safetensors.numpy import save_file

        save_file(bs.state_dict_numpy(bs.make_torch_unet(spec)), str(path))
    return path


def _load_unet(work: Path, spec):
    """The flow-map UNet (diffusers, fp32 CPU) from work/WEIGHTS."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from flowmap_jax.spec.target_time_hook import add_target_time_hook_config

    _ensure_weights(work, spec)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**add_target_time_hook_config(spec["unet"]))
    unet.load_state_dict(load_file(str(work / WEIGHTS)), assign=True)
    return unet.eval()


def _rel_max(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def _rel_rms(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(float(np.sqrt(np.mean(b ** 2))), 1e-12))


def stage_env(args, work: Path, rec: Recorder):
    import jax
    import torch

    rec["jax_version"], rec["torch_version"] = jax.__version__, torch.__version__
    if args._cpu_dry_run:
        import diffusers

        rec["diffusers_version"], rec["device_name"], rec["torch_cuda"] = diffusers.__version__, "CPU dry run", None
        rec["bf16_peak_tflops"] = args.peak_tflops
        return
    try:
        gpus = jax.devices("gpu")
    except RuntimeError as error:
        raise SystemExit(f"JAX has no GPU backend ({error}); install it with pip install -e '.[cuda12]'")
    rec["jax_devices"] = [str(d) for d in gpus]
    if not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} has no CUDA (a CPU build?): install a CUDA build of torch")
    rec["torch_device"] = torch.cuda.get_device_name(0)
    rec["torch_cuda"] = torch.version.cuda
    import diffusers

    rec["diffusers_version"] = diffusers.__version__
    rec["device_name"] = rec["torch_device"]
    rec["bf16_peak_tflops"] = bf16_peak_tflops(rec["device_name"], args.peak_tflops)


def stage_parity(args, work: Path, rec: Recorder):
    """fp32 with TF32 off: SD 1.5 jump and 4-jump sample, eulerian loss/gradient at the digits config."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import backend_speed as bs
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from flowmap_jax.spec.layout import nhwc_to_nchw

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    rec["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    spec = _spec(args)
    start = time.perf_counter()
    unet = bs.make_torch_unet(spec)
    state = bs.state_dict_numpy(unet)
    save_file(state, str(work / WEIGHTS))
    rec["sd15_init_s"] = time.perf_counter() - start
    inputs = bs.make_inputs(spec)
    log("parity: SD 1.5 jump, torch fp32")
    tcase = bs.TorchCase(spec, unet, inputs, device=_device(args), train=False)
    del unet
    out_t = tcase.forward().float().cpu().numpy()
    sample_t = tcase.sample().float().cpu().numpy()
    np.save(work / "torch_fp32_forward.npy", out_t)
    del tcase
    _empty_cache()
    log("parity: SD 1.5 jump, JAX fp32")
    jcase = bs.JaxCase(spec, state, inputs)
    out_j = nhwc_to_nchw(np.asarray(jcase.forward()))
    sample_j = nhwc_to_nchw(np.asarray(jcase.sample()))
    np.save(work / "jax_fp32_forward.npy", out_j)
    rec["sd15_forward_rel_err"] = _rel_max(out_j, out_t)
    rec["sd15_sample_rel_err"] = _rel_max(sample_j, sample_t)
    del jcase, state
    log(f"parity: forward {rec['sd15_forward_rel_err']:.2e}, sample {rec['sd15_sample_rel_err']:.2e}")
    loss_rel, grad_rel = objective_parity(_device(args))
    rec["eulerian_loss_rel_err"], rec["eulerian_grad_rel_err"] = loss_rel, grad_rel
    log(f"parity: eulerian loss {loss_rel:.2e}, gradient {grad_rel:.2e}")


def objective_parity(device="cuda"):
    """(loss, gradient) relative errors of the eulerian objective, JAX vs torch, digits config (fp32)."""
    import backend_speed as bs
    import jax
    import numpy as np
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from conversion import state_dict_to_flax
    from flowmap_jax.core import flow_map as jf
    from flowmap_jax.core import objectives as jo
    from flowmap_jax.spec.layout import nhwc_to_nchw
    from flowmap_jax.spec.target_time_hook import add_target_time_hook_config
    from flowmap_jax.core.teacher import Teacher as JTeacher
    from flowmap_jax.core.teacher import unet_teacher_fn as j_teacher_fn
    from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig
    from torch_ref import flow_map as tf
    from torch_ref import objectives as to
    from torch_ref.teacher import Teacher as TTeacher
    from torch_ref.teacher import unet_teacher_fn as t_teacher_fn

    spec = bs.case_spec("digits", 8)
    inputs = bs.make_inputs(spec)
    unet = bs.make_torch_unet(spec).to(device)
    unet.set_attn_processor(AttnProcessor())
    schedule = bs.schedule_config(spec)
    config = add_target_time_hook_config(spec["unet"])
    state = bs.state_dict_numpy(unet)
    params = jax.tree.map(jax.numpy.asarray, state_dict_to_flax(state, config, dtype=np.float32))
    flax_unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(config))
    uncond_j = {"encoder_hidden_states": jax.numpy.asarray(inputs["uncond"])}
    teacher_j = JTeacher.create(j_teacher_fn(flax_unet), params, schedule, "epsilon", guidance_scale=bs.GUIDANCE_SCALE,
                                uncond=uncond_j)
    batch_j = {"x0": inputs["x0"], "noise": inputs["noise"], "cond": {"encoder_hidden_states": inputs["context"]},
               "t_source": inputs["t_source"], "t_target": inputs["t_target"]}
    batch_j = jax.tree.map(jax.numpy.asarray, batch_j)
    loss_j = jo.make_objective("eulerian", jf.FlowMap(jf.unet_network(flax_unet), schedule, "epsilon"))
    (value_j, _), grads_j = jax.jit(jax.value_and_grad(loss_j, has_aux=True))(params, teacher_j, batch_j,
                                                                              jax.random.key(0))
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    teacher_unet = bs.make_torch_unet(spec).to(device).requires_grad_(False)
    teacher_t = TTeacher.create(t_teacher_fn(teacher_unet), schedule, "epsilon", guidance_scale=bs.GUIDANCE_SCALE,
                                uncond={"encoder_hidden_states": tensor(inputs["uncond"])})
    batch_t = {"x0": tensor(nhwc_to_nchw(inputs["x0"])), "noise": tensor(nhwc_to_nchw(inputs["noise"])),
               "cond": {"encoder_hidden_states": tensor(inputs["context"])},
               "t_source": tensor(inputs["t_source"]), "t_target": tensor(inputs["t_target"])}
    net = tf.unet_network(unet)
    loss_t = to.make_objective("eulerian", tf.FlowMap(net, schedule, "epsilon"))
    tparams = dict(net.named_parameters())
    value_t, _ = loss_t(tparams, teacher_t, batch_t, 0)
    grads_t = torch.autograd.grad(value_t, list(tparams.values()))
    grads_t = {k[len("unet."):]: g.detach().cpu().numpy() for k, g in zip(tparams, grads_t)}
    grads_t_flax = state_dict_to_flax(grads_t, config, dtype=np.float32)
    flat_j = np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree.leaves(grads_j)])
    flat_t = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_t_flax)])
    value_t = float(value_t.detach())
    loss_rel = abs(float(value_j) - value_t) / max(abs(value_t), 1e-12)
    grad_rel = float(np.linalg.norm(flat_j - flat_t) / max(np.linalg.norm(flat_t), 1e-30))
    return loss_rel, grad_rel


def _speed_rows(case, backend, batch, flops, repeats, rec, peak, train=True, rows=None):
    """Times forward, 4-jump sample and (with train) train step of `case`; appends to `rows` and saves them
    as rec["rows"] one by one (a stage cut off by its cap keeps what it measured)."""
    import backend_speed as bs

    rows = [] if rows is None else rows
    ops = (("forward", case.forward), ("4-jump sample", case.sample), ("train step", case.train_step))
    for op, fn in ops if train else ops[:2]:
        log(f"{backend}: {op}")
        timing = bs.time_round_robin({backend: {op: fn}}, repeats, warmup=2)[backend][op]
        row = {"backend": backend, "op": op, "batch": batch, **timing}
        if "median_s" in timing:
            row["images_per_s"] = batch / timing["median_s"]
            if flops and flops.get(op):
                row["tflops_per_s"] = flops[op] / timing["median_s"] / 1e12
                if peak:
                    row["mfu"] = row["tflops_per_s"] / peak
        if op == "train step":
            row["loss"] = case.last_loss
        rows.append(row)
        rec["rows"] = rows
    return rows


def stage_jax(args, work: Path, rec: Recorder):
    import backend_speed as bs
    import numpy as np

    from flowmap_jax.spec.layout import nhwc_to_nchw

    spec = _spec(args)
    env = json.loads((work / "env.json").read_text())
    peak = env.get("bf16_peak_tflops")
    from safetensors.numpy import load_file

    state = load_file(str(_ensure_weights(work, spec)))
    inputs = bs.make_inputs(spec)
    case = bs.JaxCase(spec, state, inputs, dtype="bfloat16", remat=args.remat,
                      attention=None if args.attention == "default" else args.attention)
    rec["attention"] = args.attention
    del state
    log("jax: bf16 jump (compiles)")
    out = nhwc_to_nchw(np.asarray(case.forward(), np.float32))
    rec["bf16_finite"] = bool(np.all(np.isfinite(out)))
    if (work / "jax_fp32_forward.npy").is_file():  # from the parity stage
        rec["bf16_rel_rms"] = _rel_rms(out, np.load(work / "jax_fp32_forward.npy"))
    log("jax: counting model FLOPs")
    try:
        flops = case.flops()
    except Exception as err:  # e.g. --attention cudnn: no JVP for the train step's count
        flops = None
        rec["flops_error"] = f"{type(err).__name__}: {err}"[:300]
    rec["flops"] = flops
    backend = "JAX jit (bf16)" if args.attention == "default" else f"JAX jit (bf16, {args.attention} attention)"
    _speed_rows(case, backend, spec["batch"], flops, args.repeats, rec, peak)
    rec["bf16_train_loss_finite"] = bool(np.isfinite(case.last_loss)) if case.last_loss is not None else None


def stage_torch(args, work: Path, rec: Recorder):
    import backend_speed as bs
    import numpy as np
    import torch

    spec = _spec(args)
    env = json.loads((work / "env.json").read_text())
    peak = env.get("bf16_peak_tflops")
    jax_flops = None
    if (work / "jax.json").is_file():
        jax_flops = json.loads((work / "jax.json").read_text()).get("flops")
    unet = _load_unet(work, spec)
    inputs = bs.make_inputs(spec)
    case = bs.TorchCase(spec, unet, inputs, device=_device(args), autocast=torch.bfloat16)
    out = case.forward().float().cpu().numpy()
    rec["bf16_finite"] = bool(np.all(np.isfinite(out)))
    if (work / "torch_fp32_forward.npy").is_file():  # from the parity stage
        rec["bf16_rel_rms"] = _rel_rms(out, np.load(work / "torch_fp32_forward.npy"))
    rows = _speed_rows(case, "torch eager (bf16)", spec["batch"], jax_flops, args.repeats, rec, peak)
    rec["bf16_train_loss_finite"] = bool(np.isfinite(case.last_loss)) if case.last_loss is not None else None
    del case
    _empty_cache()
    if args.torch_compile != "none":
        case = bs.TorchCase(spec, unet, inputs, device=_device(args), autocast=torch.bfloat16, compile_mode="default",
                            train=args.torch_compile == "all")
        name = "torch.compile (bf16)" if args.torch_compile == "all" else "torch.compile net (bf16)"
        _speed_rows(case, name, spec["batch"], jax_flops, args.repeats, rec, peak, train=args.torch_compile == "all",
                    rows=rows)


def stage_pytest(args, work: Path, rec: Recorder, timeout: float):
    env = dict(os.environ, JAX_PLATFORMS="cuda", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_unet_parity.py",
           "tests/test_core_parity.py"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rec["returncode"] = proc.returncode
        rec["summary"] = (proc.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        rec["returncode"] = None
        rec["summary"] = f"timed out after {timeout:.0f}s"


def is_out_of_memory(message: str) -> bool:
    """Whether an error message says a device (or the host) ran out of memory (OOM_MARKERS)."""
    text = message.lower()
    return any(marker in text for marker in OOM_MARKERS)


def stage_trainstep(args, work: Path, rec: Recorder):
    """One attempt of the trainstep stage: preset `--_train-preset`'s flow-map train step (sd15_step_plan.build_step,
    the preset's objective and mesh mode over every local device) compiled and run with real random weights at
    `--_train-per-device` examples per device. Records as it goes (rec["phase"]: building, compiling, placing
    arrays, first step, timing, done), so an attempt cut off by its time says where; an exception is recorded
    with rec["failure"] = "out of memory" (is_out_of_memory) or "error"."""
    import jax
    import numpy as np
    import sd15_step_plan as plan_lib

    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    peak = env.get("bf16_peak_tflops")
    name, per_device = args._train_preset, args._train_per_device
    how = preset_train_plan(name, args._cpu_dry_run)
    devices = jax.local_devices()
    batch = per_device * len(devices)
    rec.data.update(preset=name, size=how["size"], mode=how["mode"], devices=[str(d) for d in devices],
                    per_device_batch=per_device, global_batch=batch, lora_rank=args.train_lora_rank)
    rec["phase"] = "building"
    log(f"trainstep: {name} ({how['size']}, {how['mode']}), batch {per_device} per device on {len(devices)} "
        f"device(s): building")
    try:
        plan = plan_lib.build_step(how["size"], how["mode"], batch, devices=devices, lora_rank=args.train_lora_rank,
                                   fsdp_min_size=2**10 if args._cpu_dry_run else None)
        config = plan["config"]  # the preset's objective (pairs, 8-step targets): its own forward-equivalent passes
        equivalents = plan_lib.plan_equivalents(plan)
        rec.data.update(objective="+".join(plan["objectives"]), mesh=dict(plan["mesh"].shape),
                        model_passes=plan_lib.passes(equivalents)[0])
        rec["model_flops_per_step"] = (plan_lib.forward_flops_per_example(plan) * plan_lib.passes(equivalents)[0]
                                       * batch)
        rec["phase"] = "compiling"
        log("trainstep: compiling")
        result = plan_lib.compile_plan(plan)
        compiled = result.pop("compiled")
        rec.data.update(result)
        rec["phase"] = "placing arrays"
        state, teacher, batch_arrays, rng = plan_lib.concrete_args(plan)
        rec["phase"] = "first step"
        log("trainstep: first step")
        t0 = time.perf_counter()
        state, metrics = compiled(state, teacher, batch_arrays, rng)
        rec["loss"] = float(jax.device_get(metrics["loss"]))
        rec["first_step_s"] = time.perf_counter() - t0
        rec["first_step_with_compile_s"] = rec["lower_s"] + rec["compile_s"] + rec["first_step_s"]
        rec["phase"] = "timing"
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = compiled(state, teacher, batch_arrays, rng)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        row = {"times_s": times, "median_s": float(np.median(times)),
               "loss_finite": bool(np.isfinite(float(jax.device_get(metrics["loss"]))))}
        row["examples_per_s"] = batch / row["median_s"]
        row["tflops_per_s_per_device"] = rec["model_flops_per_step"] / row["median_s"] / len(devices) / 1e12
        if peak:
            row["mfu"] = row["tflops_per_s_per_device"] / peak
        stats = devices[0].memory_stats() or {}  # this attempt's process only: its own peak
        row["peak_bytes_in_use"], row["bytes_limit"] = stats.get("peak_bytes_in_use"), stats.get("bytes_limit")
        rec.data.update(row)
        rec["phase"] = "done"
        log(f"trainstep: {row['median_s']:.3f}s per step, loss {rec['loss']:.4g}")
    except Exception as error:  # noqa: BLE001  (recorded; the driver halves the batch when it is out of memory)
        message = f"{type(error).__name__}: {error}"
        rec.data["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        rec["failure"] = "out of memory" if is_out_of_memory(message) else "error"
        log(f"trainstep: batch {per_device} per device failed ({rec['failure']} while {rec['phase']}): "
            f"{rec['error']}")


STAGE_FUNCS = {"env": stage_env, "parity": stage_parity, "jax": stage_jax, "torch": stage_torch,
               "trainstep": stage_trainstep}


# --------------------------------------------------------------------------------------------------
# The driver.

def run_stage(stage: str, args, work: Path, out_dir: Path, timeout: float, name: str | None = None,
              extra: tuple[str, ...] = ()) -> dict:
    """Runs one stage in a child process with a timeout; returns its saved results (WORK/NAME.json, NAME
    defaulting to the stage; its log is logs/NAME.log) plus status."""
    name = name or stage
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out_dir), "--_stage", stage, "--_work", str(work),
           "--_name", name, "--batch", str(args.batch), "--repeats", str(args.repeats), "--torch-compile",
           args.torch_compile]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.remat:
        cmd.append("--remat")
    cmd += ["--attention", args.attention, "--train-lora-rank", str(args.train_lora_rank), *extra]
    if args._cpu_dry_run:
        cmd.append("--_cpu-dry-run")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=str(ROOT))
    log_path = out_dir / "logs" / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        # Its own process group: a stage cut off by its cap takes its helpers (compile workers) with it.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code}, see logs/{name}.log)"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = None, f"cut off at its {timeout:.0f}s cap (partial results)"
    saved = work / f"{name}.json"
    result = json.loads(saved.read_text()) if saved.is_file() else {}
    result["status"], result["seconds"], result["returncode"] = status, time.perf_counter() - start, code
    if status != "ok":
        tail = log_path.read_text().strip().splitlines()[-3:]
        result["log_tail"] = tail
    return result


def attempt_outcome(result: dict) -> tuple[str, str]:
    """(outcome, why) of one trainstep attempt from run_stage's result: ok; out of memory (the step or its arrays
    did not fit); timeout (cut off at the preset's time while `phase`); error (any other exception: a smaller
    batch would fail the same way); crashed (the process died without a Python error, e.g. an abort inside XLA
    on an allocation failure, so it is treated like out of memory); a Python error outside the attempt's own
    try (exit code > 0) is an error."""
    if result.get("error"):
        return result.get("failure", "error"), f"{result['error']} (while {result.get('phase', '?')})"
    if result["status"].startswith("cut off"):
        return "timeout", f"cut off after {result.get('seconds', 0):.0f}s while {result.get('phase', 'starting')}"
    if result["status"] != "ok":
        code = result.get("returncode")
        outcome = "crashed" if code is None or code < 0 or code >= 128 else "error"
        return outcome, f"{result['status']}: {' | '.join(result.get('log_tail', []))[:300]}"
    if "median_s" not in result:
        return "error", f"no step time recorded (phase {result.get('phase', '?')})"
    return "ok", ""


def search_train_batch(name: str, start_batch: int, seconds: float, attempt) -> dict:
    """The largest per-GPU batch of preset `name` whose train step runs, searched by halving from `start_batch`
    within `seconds`: `attempt(per_device, timeout) -> run_stage's result` runs one. Halves after out of memory
    (and a crash); stops at the first batch that runs, at an error, at a timeout (a smaller batch compiles as
    long), or when the time left is less than MIN_ATTEMPT_S or than the last attempt's compile; the batches left
    untried are listed with why (out["not_tried"], out["not_tried_why"])."""
    started = time.perf_counter()
    deadline = started + seconds
    out = {"preset": name, "start_batch": start_batch, "seconds_allowed": seconds, "attempts": [], "best": None,
           "not_tried": []}
    per_device, last_compile = start_batch, 0.0
    while per_device >= 1:
        left = deadline - time.perf_counter()
        if left < max(MIN_ATTEMPT_S, last_compile):
            out["not_tried"] = [per_device >> i for i in range(per_device.bit_length())]
            out["not_tried_why"] = (f"timeout: {left:.0f}s of the preset's {seconds:.0f}s left"
                                    + (f", the last compile took {last_compile:.0f}s" if last_compile else ""))
            break
        log(f"trainstep: {name}, batch {per_device} per device ({left:.0f}s left for {name})")
        result = attempt(per_device, left)
        outcome, why = attempt_outcome(result)
        row = dict(result, per_device_batch=per_device, outcome=outcome)
        if why:
            row["why"] = why
        out["attempts"].append(row)
        log(f"trainstep: {name}, batch {per_device}: {outcome}{': ' + why if why else ''}")
        last_compile = float(result.get("lower_s", 0.0)) + float(result.get("compile_s", 0.0))
        if outcome == "ok":
            out["best"] = row
            break
        per_device //= 2
        if outcome not in ("out of memory", "crashed"):
            if per_device >= 1:
                out["not_tried"] = [per_device >> i for i in range(per_device.bit_length())]
                out["not_tried_why"] = f"the search stops at {'a' if outcome == 'timeout' else 'an'} {outcome}"
            break
    out["seconds"] = time.perf_counter() - started
    return out


def run_trainstep(args, work: Path, out_dir: Path, timeout: float, attempt=None) -> dict:
    """The trainstep stage: each --train-presets preset in turn, its batch searched (search_train_batch), each
    attempt in its own process (its own GPU memory and peak; killed at the preset's time). `timeout` is split
    between the presets by TRAIN_SHARES, what one leaves going to those after it, so a preset that keeps failing
    cannot take the others' time. `attempt(name, per_device, seconds)` replaces the child process (tests)."""
    started = time.perf_counter()
    deadline = started + timeout
    presets = list(args.train_presets)
    out = {"presets": {}, "order": presets, "seconds_allowed": timeout}
    for i, name in enumerate(presets):
        left = deadline - time.perf_counter()
        share = left * TRAIN_SHARES[name] / sum(TRAIN_SHARES[p] for p in presets[i:])
        how = preset_train_plan(name, args._cpu_dry_run)
        if attempt is None:
            def run_one(per_device, seconds, name=name):
                return run_stage("trainstep", args, work, out_dir, seconds, name=f"trainstep-{name}-{per_device}",
                                 extra=("--_train-preset", name, "--_train-per-device", str(per_device)))
        else:
            def run_one(per_device, seconds, name=name):
                return attempt(name, per_device, seconds)
        found = search_train_batch(name, train_start_batch(args, name), share, run_one)
        out["presets"][name] = dict(found, size=how["size"], mode=how["mode"], preset_batch=how["preset_batch"])
    out["seconds"] = time.perf_counter() - started
    missing = [name for name, found in out["presets"].items() if not found["best"]]
    out["status"] = "ok" if not missing else f"failed: no batch ran for {', '.join(missing)}"
    return out


def _pass(value, threshold):
    if value is None:
        return "not run"
    return f"{value:.2e} ({'pass' if value <= threshold else 'FAIL'}, <= {threshold:g})"


def report(results: dict, args, seconds: float) -> str:
    env = results.get("env", {})
    lines = [f"# GPU check: {env.get('device_name', '?')}", "",
             f"jax {env.get('jax_version', '?')}, torch {env.get('torch_version', '?')} (CUDA "
             f"{env.get('torch_cuda', '?')}), diffusers {env.get('diffusers_version', '?')}; bf16 peak "
             f"{env.get('bf16_peak_tflops') or 'unknown (pass --peak-tflops)'} TFLOP/s; {seconds:.0f}s in all.", "",
             "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for stage in STAGES:
        if stage in results:
            lines.append(f"| {stage} | {results[stage]['status']} | {results[stage]['seconds']:.0f} |")
    parity, jx, th = results.get("parity", {}), results.get("jax", {}), results.get("torch", {})
    lines += ["", "## Tests", "", "| check | result |", "|---|---|",
              f"| fp32 parity (TF32 off): SD 1.5 flow-map jump, max err / max abs | "
              f"{_pass(parity.get('sd15_forward_rel_err'), THRESHOLDS['forward'])} |",
              f"| fp32 parity: SD 1.5 4-jump sample | {_pass(parity.get('sd15_sample_rel_err'), THRESHOLDS['sample'])} |",
              f"| fp32 parity: eulerian loss (digits UNet) | {_pass(parity.get('eulerian_loss_rel_err'), THRESHOLDS['loss'])} |",
              f"| fp32 parity: eulerian parameter gradient | {_pass(parity.get('eulerian_grad_rel_err'), THRESHOLDS['grad'])} |",
              f"| bf16 sanity JAX: jump rel. RMS vs fp32 | {_pass(jx.get('bf16_rel_rms'), THRESHOLDS['bf16_rms'])}, "
              f"finite {jx.get('bf16_finite')}, train loss finite {jx.get('bf16_train_loss_finite')} |",
              f"| bf16 sanity torch: jump rel. RMS vs fp32 | {_pass(th.get('bf16_rel_rms'), THRESHOLDS['bf16_rms'])}, "
              f"finite {th.get('bf16_finite')}, train loss finite {th.get('bf16_train_loss_finite')} |"]
    if "pytest" in results:
        lines.append(f"| pytest parity files, JAX on GPU | {results['pytest'].get('summary')} |")
    lines += trainstep_report(results.get("trainstep"))
    lines += ["", f"## Speed: SD 1.5 UNet, 64x64x4 latent, 77x768 context, batch {args.batch}, bf16",
              "", "| backend | op | per step (ms) | images/s | TFLOP/s | MFU | first call (s) |",
              "|---|---|---|---|---|---|---|"]
    jax_times = {}
    for row in jx.get("rows", []) + th.get("rows", []):
        if "median_s" not in row:
            lines.append(f"| {row['backend']} | {row['op']} | {row.get('error', 'not measured')} | | | | |")
            continue
        if row["backend"].startswith("JAX"):
            jax_times[row["op"]] = row["median_s"]
        mfu = f"{row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "-"
        tf = f"{row['tflops_per_s']:.3g}" if row.get("tflops_per_s") is not None else "-"
        lines.append(f"| {row['backend']} | {row['op']} | {row['median_s'] * 1e3:.1f} | {row['images_per_s']:.1f} | "
                     f"{tf} | {mfu} | {row.get('first_s', 0):.1f} |")
    ratios = []
    for row in th.get("rows", []):
        if "median_s" in row and row["op"] in jax_times:
            ratios.append(f"{row['backend']} / JAX, {row['op']}: {row['median_s'] / jax_times[row['op']]:.2f}")
    if ratios:
        lines += ["", "Time ratios (> 1: JAX faster): " + "; ".join(ratios) + "."]
    flops = jx.get("flops")
    if flops:
        lines += ["", "Model FLOPs per step (from the JAX program): " + ", ".join(
            f"{op} {v / 1e12:.4g} TFLOP" for op, v in flops.items()) + "."]
    return "\n".join(lines) + "\n"


TRAIN_SUMMARY_COLUMNS = ("preset", "objective", "mode, devices", "largest batch / device", "examples/s",
                         "step (s, median)", "first step (s, compile included)", "peak in use GiB", "MFU",
                         "batches that failed")


def _gib(value):
    return f"{value / 2**30:.2f}" if value is not None else "-"


def _train_presets_of(result: dict) -> dict:
    """{preset: its search (search_train_batch's dict)} of a trainstep result; a result of the earlier
    single-preset stage (rows at the top, sd15 only) is read as the sd15 preset's attempts."""
    if "presets" in result:
        return result["presets"]
    attempts = [dict(row, outcome=row.get("outcome") or ("ok" if "median_s" in row else row.get("failure", "error")))
                for row in result.get("rows", [])]
    best = next((row for row in attempts if row["outcome"] == "ok"), None)
    return {"sd15": {"size": result.get("size", "?"), "mode": "dp", "devices": result.get("devices", []),
                     "attempts": attempts, "best": best, "not_tried": []}}


def _failed_batches(found: dict) -> str:
    """The batches of one preset's search that did not run, each with its outcome; then those not tried."""
    cells = [f"{row['per_device_batch']}: {row['outcome']}" for row in found.get("attempts", [])
             if row["outcome"] != "ok"]
    if found.get("not_tried"):
        cells.append(f"{', '.join(map(str, found['not_tried']))}: not tried ({found.get('not_tried_why', '')})")
    return "; ".join(cells) or "none"


def trainstep_summary_row(name: str, found: dict) -> str:
    """One markdown row of the per-preset table: the largest batch that ran and its numbers, or why none did."""
    best = found.get("best")
    first = (found.get("attempts") or [{}])[0]
    devices = len((best or first).get("devices", [])) or "?"
    objective = (best or first).get("objective", "pairs")
    size = found.get("size", name)
    lead = f"| {name if size == name else f'{name} ({size})'} | {objective} | {found.get('mode', '?')}, {devices} |"
    if not best:
        return lead + f" none | - | - | - | - | - | {_failed_batches(found)} |"
    mfu = f"{best['mfu'] * 100:.1f}%" if best.get("mfu") is not None else "-"
    first_step = best.get("first_step_with_compile_s")
    first_step = f"{first_step:.1f}" if first_step is not None else f"{best.get('first_step_s', 0):.1f}"
    examples = best.get("examples_per_s", best.get("images_per_s"))
    return (lead + f" {best['per_device_batch']} | {examples:.1f} | {best['median_s']:.3f} | {first_step} | "
            f"{_gib(best.get('peak_bytes_in_use'))} | {mfu} | {_failed_batches(found)} |")


def trainstep_report(result: dict | None) -> list[str]:
    """Markdown lines for the trainstep stage (none if it did not run): one row per preset, then each preset's
    attempts."""
    if not result:
        return []
    presets = _train_presets_of(result)
    sizes = "full size" if all(found.get("size") in (None, name) for name, found in presets.items()) else "toy size"
    title = (f"## Flow-map train step per preset, {sizes} (sd15_step_plan.build_step; each preset's objective and "
             f"mesh; per-GPU batch halved until it fits): {result['status']}")
    lines = ["", title, "", "| " + " | ".join(TRAIN_SUMMARY_COLUMNS) + " |", "|" + "---|" * len(TRAIN_SUMMARY_COLUMNS)]
    lines += [trainstep_summary_row(name, found) for name, found in presets.items()]
    header = ("| batch / device | XLA total GiB (temp) | peak in use GiB | per step (s) | images/s | TFLOP/s per device "
              "| MFU | loss | first step (s) | compile (s) |")
    for name, found in presets.items():
        spent = f"{found.get('seconds', 0):.0f}s of {found.get('seconds_allowed', 0):.0f}s"
        lines += ["", f"### {name}: attempts ({spent})",
                  "", header, "|---|---|---|---|---|---|---|---|---|---|"]
        for row in found.get("attempts", []):
            if row["outcome"] != "ok":
                cell = f"{row['outcome']}: {row['why']}" if row.get("why") else row.get("error", row["outcome"])
                if row.get("memory"):
                    cell += (f" (XLA plan {_gib(row['memory'].get('total'))} GiB, temp "
                             f"{_gib(row['memory'].get('temp'))})")
                lines.append(f"| {row['per_device_batch']} | {cell} | | | | | | | | |")
                continue
            memory = row.get("memory", {})
            mfu = f"{row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "-"
            examples = row.get("examples_per_s", row.get("images_per_s"))
            lines.append(f"| {row['per_device_batch']} | {_gib(memory.get('total'))} ({_gib(memory.get('temp'))}) | "
                         f"{_gib(row.get('peak_bytes_in_use'))} | {row['median_s']:.3f} | {examples:.1f} | "
                         f"{row['tflops_per_s_per_device']:.3g} | {mfu} | {row['loss']:.4g} | "
                         f"{row['first_step_s']:.1f} | {row['compile_s']:.0f} |")
        if found.get("not_tried"):
            lines.append(f"| {', '.join(map(str, found['not_tried']))} | not tried ({found.get('not_tried_why', '')}) "
                         f"| | | | | | | | |")
    return lines


def stage_cap(stage: str, args) -> float:
    """A stage's cap in seconds: STAGE_CAPS, stretched by --budget / 450 when --budget is larger."""
    return STAGE_CAPS[stage] * max(1.0, args.budget / 450.0)


def time_window(plan, args) -> float:
    """Seconds from the start the check must end within: the planned stages' caps (at most --budget; all of
    --budget with --pytest, which runs in the time left), plus --train-budget with the trainstep stage, which
    takes every second left when it starts (so it also gets what the stages before it did not use)."""
    caps = sum(stage_cap(stage, args) for stage in plan if stage not in ("trainstep", "pytest"))
    window = args.budget if "pytest" in plan else min(args.budget, caps)
    return window + (args.train_budget if "trainstep" in plan else 0.0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args._stage:
        work = Path(args._work)
        rec = Recorder(work, args._name or args._stage)
        STAGE_FUNCS[args._stage](args, work, rec)
        return 0
    started = time.perf_counter()
    ok, text = (True, "CPU dry run") if args._cpu_dry_run else nvidia_smi()
    if not ok:
        print(f"gpu_check: no usable NVIDIA GPU: {text}. This script needs an NVIDIA GPU, JAX's CUDA build "
              f"(pip install -e '.[cuda12]') and a CUDA build of torch.", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    for stale in list(work.glob("*.json")) + list(work.glob("*.npy")):  # results of an earlier check
        stale.unlink()
    log(f"GPU(s): {text}")
    skip = set(filter(None, args.skip.split(",")))
    results = {}
    plan = [s for s in STAGES if s not in skip and getattr(args, OPT_IN_STAGES.get(s, ""), True)]
    deadline = started + time_window(plan, args)
    for i, stage in enumerate(plan):
        left = deadline - time.perf_counter()
        reserve = 20.0 * (len(plan) - i - 1)
        if stage == "trainstep":  # every second left, but pytest's cap when it comes after
            timeout = left - reserve - (stage_cap("pytest", args) if "pytest" in plan else 0.0)
        elif stage == "pytest":
            timeout = left - 10
        else:
            timeout = min(stage_cap(stage, args), left - reserve)
        if timeout < 20:
            results[stage] = {"status": "skipped (time budget)", "seconds": 0.0}
            continue
        log(f"stage {stage} (cap {timeout:.0f}s)")
        if stage == "pytest":
            rec = Recorder(work, "pytest")
            t0 = time.perf_counter()
            stage_pytest(args, work, rec, timeout)
            results[stage] = dict(rec.data, status="ok" if rec.get("returncode") == 0 else "failed",
                                  seconds=time.perf_counter() - t0)
        elif stage == "trainstep":
            results[stage] = run_trainstep(args, work, out_dir, timeout)
        else:
            results[stage] = run_stage(stage, args, work, out_dir, timeout)
        log(f"stage {stage}: {results[stage]['status']} in {results[stage]['seconds']:.0f}s")
        if stage == "env" and results[stage]["status"] != "ok":
            print(f"gpu_check: the environment check failed: {results[stage].get('log_tail')}", file=sys.stderr)
            break
    seconds = time.perf_counter() - started
    text = report(results, args, seconds)
    (out_dir / "gpu_check.md").write_text(text)
    (out_dir / "gpu_check.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                                  if not k.startswith("_")},
                                                         "seconds": seconds, "results": results}, indent=2,
                                                        default=str))
    weights = work / WEIGHTS
    if weights.exists():
        weights.unlink()  # 3.4 GB of random weights
    print(text)
    failed = [s for s, r in results.items() if r["status"] != "ok" and not r["status"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
