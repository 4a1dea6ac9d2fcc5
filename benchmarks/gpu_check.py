"""GPU check (issue 6): the GPU-dependent tests and the backend-speed table at Stable Diffusion 1.5 size.

    python benchmarks/gpu_check.py OUT_DIR                       # < 8 minutes on one H100/A100
    python benchmarks/gpu_check.py OUT_DIR --batch 8 --torch-compile all --peak-tflops 989
    python benchmarks/gpu_check.py OUT_DIR --train-step --skip parity,torch   # + the full-size SD 1.5 train step
    python benchmarks/gpu_check.py OUT_DIR --train-step --train-lora-rank 64 --skip parity,jax,torch   # its LoRA step
    python benchmarks/gpu_check.py --help

Needs an NVIDIA GPU with JAX's CUDA build (`pip install -e ".[torch,dev,cuda12]"`) and a CUDA build of
torch (diffusers may come as a wheel). Without a GPU it stops at once with exit code 2 and says what is
missing. Everything it prints goes to OUT_DIR: gpu_check.md (the tables), gpu_check.json, logs/*.log.

Stages, each in its own process (so JAX and torch do not share the GPU's memory, and a stage that runs
long is cut off without losing what the others measured); the whole run keeps inside `--budget` seconds
(default 450), each stage inside its own cap:

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
5. **trainstep** (only with `--train-step`, its own cap of 420 s on top of `--budget`): the full-size SD 1.5
   flow-map training step of `benchmarks/sd15_step_plan.py` (the sd15 preset's step as the trainer builds it:
   eulerian JVP, CFG teacher, bf16, remat, AdamW + EMA, data parallel over every GPU of the machine) at
   `--train-batch` examples per GPU (default 32, what each of 8 GPUs gets at the preset's batch 256), with real
   randomly initialised weights: XLA's memory analysis of the compiled step, the device's peak memory, the
   loss (finite), the step time (median of `--repeats`) and its MFU (model FLOPs: 6 UNet forward passes per
   example, see sd15_step_plan.forward_equivalents). A batch that does not fit is recorded and the stage
   tries half of it, down to 1.
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
STAGE_CAPS = {"env": 40, "parity": 120, "jax": 190, "torch": 100, "trainstep": 420,
              "pytest": 120}  # seconds (scaled by --budget / 450)
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
    p.add_argument("--train-step", action="store_true", help="also compile and run the full-size SD 1.5 flow-map "
                   "training step (benchmarks/sd15_step_plan.py) with its own 420 s cap")
    p.add_argument("--train-batch", type=int, default=32, help="--train-step: examples per GPU (default 32: the "
                   "sd15 preset's batch 256 over 8 GPUs)")
    p.add_argument("--train-lora-rank", type=int, default=0, help="--train-step: a LoRA run of this rank (the "
                   "adapters on the frozen UNet, sd15_step_plan --lora-rank); 0 (default): the full fine-tune")
    p.add_argument("--skip", default="", help="comma-separated stages to skip (parity, jax, torch)")
    p.add_argument("--_stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    # Development only: every stage on the CPU with the small digits UNet (checks the plumbing, not the GPU).
    p.add_argument("--_cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    return p


def check_args(args) -> None:
    if args.batch < 1 or args.repeats < 1 or args.train_batch < 1:
        raise SystemExit("gpu_check: --batch, --repeats and --train-batch must be >= 1")
    if args.budget < 60:
        raise SystemExit("gpu_check: --budget must be at least 60 seconds")
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


def stage_trainstep(args, work: Path, rec: Recorder):
    """The full-size SD 1.5 flow-map train step (sd15_step_plan.build_step, data parallel over every local
    device) compiled and run with real random weights at --train-batch per device (halved on failure)."""
    import jax
    import numpy as np
    import sd15_step_plan as plan_lib

    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    peak = env.get("bf16_peak_tflops")
    size = "small" if args._cpu_dry_run else "sd15"
    devices = jax.local_devices()
    rec["size"], rec["devices"] = size, [str(d) for d in devices]
    rows = []
    per_device = args.train_batch
    while per_device >= 1:
        batch = per_device * len(devices)
        row = {"per_device_batch": per_device, "global_batch": batch}
        rows.append(row)
        log(f"trainstep: {size}, batch {per_device} per device on {len(devices)} device(s): compiling")
        try:
            plan = plan_lib.build_step(size, "dp", batch, devices=devices, lora_rank=args.train_lora_rank)
            row["lora_rank"] = args.train_lora_rank
            result = plan_lib.compile_plan(plan)
            compiled = result.pop("compiled")
            row.update(result)
            config = plan["config"]  # the preset's objective (sd15: pairs): its own forward-equivalent passes
            equivalents = plan_lib.forward_equivalents(plan["objectives"], config.objective.options,
                                                       guided=config.teacher.guidance_scale != 1.0)
            row["objective"] = "+".join(plan["objectives"])
            row["model_flops_per_step"] = (plan_lib.forward_flops_per_example(plan) * plan_lib.passes(equivalents)[0]
                                           * batch)
            rec["rows"] = rows
            state, teacher, batch_arrays, rng = plan_lib.concrete_args(plan)
            log("trainstep: first step")
            t0 = time.perf_counter()
            state, metrics = compiled(state, teacher, batch_arrays, rng)
            row["loss"] = float(jax.device_get(metrics["loss"]))
            row["first_step_s"] = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                state, metrics = compiled(state, teacher, batch_arrays, rng)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            row["times_s"], row["median_s"] = times, float(np.median(times))
            row["loss_finite"] = bool(np.isfinite(float(jax.device_get(metrics["loss"]))))
            row["images_per_s"] = batch / row["median_s"]
            row["tflops_per_s_per_device"] = row["model_flops_per_step"] / row["median_s"] / len(devices) / 1e12
            if peak:
                row["mfu"] = row["tflops_per_s_per_device"] / peak
            stats = devices[0].memory_stats() or {}
            row["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
            rec["rows"] = rows
            log(f"trainstep: {row['median_s']:.3f}s per step, loss {row['loss']:.4g}")
            del state, teacher, batch_arrays, compiled
            return
        except Exception as error:  # noqa: BLE001  (out of memory: record it, try half the batch)
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            rec["rows"] = rows
            log(f"trainstep: batch {per_device} per device failed: {row['error']}")
            per_device //= 2


STAGE_FUNCS = {"env": stage_env, "parity": stage_parity, "jax": stage_jax, "torch": stage_torch,
               "trainstep": stage_trainstep}


# --------------------------------------------------------------------------------------------------
# The driver.

def run_stage(stage: str, args, work: Path, out_dir: Path, timeout: float) -> dict:
    """Runs one stage in a child process with a timeout; returns its saved results plus status."""
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out_dir), "--_stage", stage, "--_work", str(work),
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--torch-compile", args.torch_compile]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.remat:
        cmd.append("--remat")
    cmd += ["--attention", args.attention, "--train-batch", str(args.train_batch),
            "--train-lora-rank", str(args.train_lora_rank)]
    if args._cpu_dry_run:
        cmd.append("--_cpu-dry-run")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=str(ROOT))
    log_path = out_dir / "logs" / f"{stage}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        # Its own process group: a stage cut off by its cap takes its helpers (compile workers) with it.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code}, see logs/{stage}.log)"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"cut off at its {timeout:.0f}s cap (partial results)"
    saved = work / f"{stage}.json"
    result = json.loads(saved.read_text()) if saved.is_file() else {}
    result["status"], result["seconds"] = status, time.perf_counter() - start
    if status != "ok":
        tail = log_path.read_text().strip().splitlines()[-3:]
        result["log_tail"] = tail
    return result


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


def trainstep_report(result: dict | None) -> list[str]:
    """Markdown lines for the trainstep stage (none if it did not run)."""
    if not result:
        return []
    def gib(value):
        return f"{value / 2**30:.2f}" if value is not None else "-"

    title = (f"## Full-size SD 1.5 flow-map train step ({result.get('size', '?')}; sd15_step_plan.py, data "
             f"parallel over {len(result.get('devices', []))} device(s)): {result['status']}")
    header = ("| batch / device | XLA total GiB (temp) | peak in use GiB | per step (s) | images/s | TFLOP/s per device "
              "| MFU | loss | first step (s) | compile (s) |")
    lines = ["", title, "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result.get("rows", []):
        if "error" in row:
            lines.append(f"| {row['per_device_batch']} | {row['error']} | | | | | | | | |")
            continue
        memory = row.get("memory", {})
        mfu = f"{row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "-"
        if "median_s" not in row:
            lines.append(f"| {row['per_device_batch']} | {gib(memory.get('total'))} ({gib(memory.get('temp'))}) | "
                         f"| not run | | | | | | {row.get('compile_s', 0):.0f} |")
            continue
        lines.append(f"| {row['per_device_batch']} | {gib(memory.get('total'))} ({gib(memory.get('temp'))}) | "
                     f"{gib(row.get('peak_bytes_in_use'))} | {row['median_s']:.3f} | {row['images_per_s']:.1f} | "
                     f"{row['tflops_per_s_per_device']:.3g} | {mfu} | {row['loss']:.4g} | {row['first_step_s']:.1f} | "
                     f"{row['compile_s']:.0f} |")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args._stage:
        work = Path(args._work)
        rec = Recorder(work, args._stage)
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
    deadline = started + args.budget + (STAGE_CAPS["trainstep"] if "trainstep" in plan else 0.0)
    for i, stage in enumerate(plan):
        left = deadline - time.perf_counter()
        reserve = 20.0 * (len(plan) - i - 1)
        cap = STAGE_CAPS[stage] * max(1.0, args.budget / 450.0)  # a larger budget stretches every cap
        timeout = min(cap, left - reserve) if stage != "pytest" else left - 10
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
