"""Backend speed (issue 6): the same flow-map network in JAX (jit) and PyTorch (eager, torch.compile).

    python benchmarks/backend_speed.py                          # digits and mid configs, fp32 CPU (~10 min on 2 cores)
    python benchmarks/backend_speed.py --configs digits --repeats 3 --no-compile     # a quick look (~1 min)
    python benchmarks/backend_speed.py --threads 1              # pin both backends to one core

What is timed, per configuration, each backend on the same weights (a diffusers `UNet2DConditionModel`
with the flow map's target-time hook, random init from `torch.manual_seed(0)`, converted to Flax with
`conversion.state_dict_to_flax`) and the same inputs:

- **forward**: one flow-map jump X(x_s, s, t) (the UNet plus the jump coefficients), batch B, no gradient.
- **train step**: the `eulerian` objective of the flow-map core (the JVP objective; `objectives.py` in
  both backends, default options, stop-gradient residual form, forward-mode JVP through the UNet), its
  gradient and one AdamW step (optax.adamw / torch.optim.AdamW, lr 1e-4, no weight decay). The teacher is
  a frozen copy of the same UNet with classifier-free guidance (scale 2, zero unconditional context), so a
  step evaluates the teacher on 2B inputs, the student's JVP on B inputs and its backward pass. Times,
  noise and data come in the batch: both backends compute the same loss (checked: "loss rel. diff").
  This is the core objective with a plain optimiser step, not the trainer's sharded step (no EMA,
  clipping or `shard_map`).
- **4-jump sample**: `samplers.flow_map_sample` on the uniform grid [999, 749, 499, 249, -1]. JAX jits one
  jump (traced times) and loops in Python, as the trainer's sampler does; PyTorch loops over the module.

JAX: `jax.jit` of each function, the UNet's default attention (`flowmap_jax.unet.attention_kernels`: plain
jnp, queries in cache-sized blocks where the logits are large, e.g. the mid config's 32x32 self-attention;
supports `jax.jvp`). PyTorch eager: diffusers' default attention (SDPA) for forward and sampling; the train step's
student uses the plain `AttnProcessor`, because the fused SDPA kernels have no forward-mode AD on CPU
(docs/DESIGN.md). torch.compile: `torch.compile(module)` for forward and sampling, `torch.compile(step)`
for the train step; a failure is caught and reported in the table. The compiled train step is tried
first in a child process, because a torch.compile failure inside `torch.func.jvp` leaves the process's
autograd state broken (seen with torch 2.13: later eager JVPs fail an internal assert in `_make_dual`).

Timing: warm-up calls first (JAX compiles, torch.compile traces), then `--repeats` rounds in which every
variant runs once in turn (round robin, so load changes on a shared machine hit all variants alike); the
median is reported, with ratios torch time / JAX time (> 1: JAX is faster). Threads: XLA's CPU client
sizes its intra-op pool to the CPUs this process may run on (its affinity mask); torch gets
`torch.set_num_threads` of the same number. `--threads N` restricts the affinity to N CPUs before jax
is imported, so both backends see N. OMP_WAIT_POLICY defaults to PASSIVE (set it in the environment to
override): torch's OpenMP threads otherwise spin between parallel regions, and on a loaded 2-core machine
that made a digits forward 6-25x slower (2-8 s instead of 0.33 s), a measure of the load, not of torch.
The load average is printed: timings on a shared machine are noisy.

Model FLOPs are counted from the JAX program (`count_flops`: 2 x multiply-adds of every dot_general and
convolution in the jaxpr, the train step's JVP and backward included), the same count for both backends.

Outputs: markdown tables on stdout, `--json` (default benchmarks/results/backend_speed_cpu.json) and a
bar chart of the ratios `--png` (default benchmarks/results/backend_speed_cpu.png).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

# The digits teacher's UNet (torch_ref/train_digits_teacher.py UNET_CONFIG); the shipped asset's
# config.json is used instead when it exists.
DIGITS_UNET = dict(
    sample_size=16, in_channels=1, out_channels=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=8,
)
# A mid-size SD-like UNet: SD 1.5's block layout and 768-d text context at a third of its width.
MID_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[128, 256, 256], layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32,
)
# Stable Diffusion 1.5's UNet (benchmarks/unet_parity_full_size.py SD15), used by gpu_check.py.
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
DIGITS_SCHEDULE = dict(kind="linear", beta_start=1e-4, beta_end=0.02)
SD_SCHEDULE = dict(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)

# name -> (unet config, (H, W) of the sample, context length, batch, schedule)
CONFIGS = {
    "digits": dict(unet=DIGITS_UNET, hw=(16, 16), context_len=1, batch=64, schedule=DIGITS_SCHEDULE),
    "mid": dict(unet=MID_UNET, hw=(32, 32), context_len=77, batch=2, schedule=SD_SCHEDULE),
    "sd15": dict(unet=SD15_UNET, hw=(64, 64), context_len=77, batch=8, schedule=SD_SCHEDULE),
}
OPS = ("forward", "train step", "4-jump sample")
GUIDANCE_SCALE = 2.0
JUMPS = 4


def digits_unet_config() -> tuple[dict, str]:
    """(config, where it came from): the shipped teacher's config.json, else the equivalent DIGITS_UNET."""
    path = ROOT / "flowmap_jax" / "assets" / "digits_teacher" / "unet" / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        return {k: v for k, v in config.items() if not k.startswith("_")}, str(path.relative_to(ROOT))
    return dict(DIGITS_UNET), "benchmarks/backend_speed.py DIGITS_UNET (teacher asset not present)"


def case_spec(name: str, batch: int | None = None) -> dict:
    """A copy of CONFIGS[name] with the digits config resolved and the batch overridden if given."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}: expected one of {sorted(CONFIGS)}")
    spec = copy.deepcopy(CONFIGS[name])
    spec["name"] = name
    spec["unet_source"] = "benchmarks/backend_speed.py"
    if name == "digits":
        spec["unet"], spec["unet_source"] = digits_unet_config()
    if batch:
        spec["batch"] = int(batch)
    return spec


# --------------------------------------------------------------------------------------------------
# Counting model FLOPs from a jaxpr (no compilation; works for any backend).

def _sub_jaxprs(params):
    """Jaxprs held in an equation's params (pjit, remat, custom_jvp/vjp, scan, while, cond branches)."""
    import jax.extend as jex

    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jex.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex.core.Jaxpr):
                yield item


def jaxpr_flops(jaxpr) -> int:
    """2 x multiply-adds of the dot_generals and convolutions of `jaxpr` (a jax.extend.core.Jaxpr),
    recursing into sub-jaxprs: scan bodies count `length` times, the branches of a cond count as the
    most expensive one, while-loop bodies once (their trip count is unknown). Convolutions with input
    (lhs) dilation, the transposes that backward passes of strided convolutions produce, count only the
    non-zero input positions (divided by the dilation)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            contract = math.prod(lhs.shape[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contract
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            kernel = math.prod(rhs.shape[d] for d in spec[2:]) * rhs.shape[spec[1]]
            dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * kernel // max(dilation, 1)
        elif name == "scan":
            total += eqn.params["length"] * sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
        elif name == "cond":
            total += max((jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)), default=0)
        else:
            total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


def count_flops(fn, *args) -> int:
    """Model FLOPs of fn(*args) (see `jaxpr_flops`); args may be jax.ShapeDtypeStruct stand-ins."""
    import jax

    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# --------------------------------------------------------------------------------------------------
# Building the two backends on the same weights and inputs.

def schedule_config(spec):
    from flowmap_jax.spec.schedule import ScheduleConfig

    s = spec["schedule"]
    return ScheduleConfig.ddpm(s["kind"], s["beta_start"], s["beta_end"])


def make_torch_unet(spec, seed: int = 0):
    """The flow-map UNet (target-time hook) in diffusers, random init from torch.manual_seed(seed), fp32 CPU.
    The hook's last layer is given small random weights (not zero) so the target time matters."""
    import torch
    from diffusers import UNet2DConditionModel

    from flowmap_jax.spec.target_time_hook import add_target_time_hook_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**add_target_time_hook_config(spec["unet"])).eval()
    with torch.no_grad():
        for p in unet.class_embedding.linear_2.parameters():
            p.normal_(0.0, 1e-3)
    return unet


def make_inputs(spec, seed: int = 0) -> dict:
    """numpy inputs, channels last (B, H, W, C): x0, noise, context (B, L, D), uncond (1, L, D) and the
    train step's times (B,) (s from 999 down to ~100, t a third of the way to clean, one t at the clean end)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, (h, w) = spec["batch"], spec["hw"]
    c, d, length = spec["unet"]["in_channels"], spec["unet"]["cross_attention_dim"], spec["context_len"]
    s = np.linspace(999.0, 100.0, b).astype(np.float32)
    t = (s / 3.0).astype(np.float32)
    t[-1] = -1.0
    return dict(x0=rng.standard_normal((b, h, w, c)).astype(np.float32).clip(-1, 1),
                noise=rng.standard_normal((b, h, w, c)).astype(np.float32),
                context=rng.standard_normal((b, length, d)).astype(np.float32),
                uncond=np.zeros((1, length, d), np.float32), t_source=s, t_target=t)


class JaxCase:
    """Jitted forward, train step and 4-jump sampler of the flow map in JAX.

    dtype: compute dtype (parameters stay float32); device: a jax.Device (default the first); attention: the
    UNet's `attention_implementation` (None: its default, see `flowmap_jax.unet.attention_kernels`)."""

    def __init__(self, spec, state_dict_np, inputs, dtype="float32", remat=False, device=None, lr=1e-4,
                 attention=None):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax

        from conversion import state_dict_to_flax
        from flowmap_jax.core import flow_map as jf
        from flowmap_jax.core import objectives as jo
        from flowmap_jax.spec.target_time_hook import add_target_time_hook_config
        from flowmap_jax.spec.time_grid import time_grid
        from flowmap_jax.core.teacher import Teacher, unet_teacher_fn
        from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig

        self.jax = jax
        device = device or jax.devices()[0]
        put = lambda tree: jax.device_put(jax.tree.map(jnp.asarray, tree), device)  # noqa: E731
        config = add_target_time_hook_config(spec["unet"])
        params = state_dict_to_flax(state_dict_np, config, dtype=np.float32)
        unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(config), dtype=getattr(jnp, dtype), remat=remat,
                                        attention_implementation=attention)
        schedule = schedule_config(spec)
        fmap = jf.FlowMap(jf.unet_network(unet), schedule, "epsilon")
        self.params = put(params)
        self.teacher = Teacher.create(unet_teacher_fn(unet), put(params), schedule, "epsilon",
                                      guidance_scale=GUIDANCE_SCALE,
                                      uncond={"encoder_hidden_states": put(inputs["uncond"])})
        self.cond = {"encoder_hidden_states": put(inputs["context"])}
        self.noise = put(inputs["noise"])
        self.batch = {"x0": put(inputs["x0"]), "noise": self.noise, "cond": self.cond,
                      "t_source": put(inputs["t_source"]), "t_target": put(inputs["t_target"])}
        self.grid = time_grid(schedule, JUMPS)
        self.key = jax.random.key(0)
        b = inputs["x0"].shape[0]

        self._jump = jax.jit(lambda p, x, s, t, c: fmap(p, x, s, t, c))
        self.s_full = put(np.full((b,), 999.0, np.float32))
        self.t_full = put(np.full((b,), 499.0, np.float32))
        self.jump_times = [(put(np.full((b,), s, np.float32)), put(np.full((b,), t, np.float32)))
                           for s, t in zip(self.grid[:-1], self.grid[1:])]

        loss_fn = jo.make_objective("eulerian", fmap)
        self.optimizer = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)

        def train_step(params, opt_state, teacher, batch, key):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, teacher, batch, key)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._train_step_fn = train_step
        self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.train_params = self.opt_state = None  # made at the first train step (memory)
        self.last_loss = None

    def _train_state(self):
        if self.train_params is None:
            self.train_params = self.jax.tree.map(lambda v: v.copy(), self.params)
            self.opt_state = self.optimizer.init(self.train_params)

    # The three timed operations (each blocks until its result is ready).
    def forward(self):
        return self._jump(self.params, self.noise, self.s_full, self.t_full, self.cond).block_until_ready()

    def train_step(self):
        self._train_state()
        self.train_params, self.opt_state, loss = self._train_step(self.train_params, self.opt_state, self.teacher,
                                                                   self.batch, self.key)
        self.last_loss = float(loss)
        return loss

    def sample(self):
        x = self.noise
        for s, t in self.jump_times:
            x = self._jump(self.params, x, s, t, self.cond)
        return x.block_until_ready()

    def flops(self) -> dict:
        """Model FLOPs of one forward, one train step and one 4-jump sample (see `count_flops`)."""
        forward = count_flops(self._jump, self.params, self.noise, self.s_full, self.t_full, self.cond)
        self._train_state()
        train = count_flops(self._train_step_fn, self.train_params, self.opt_state, self.teacher, self.batch, self.key)
        return {"forward": forward, "train step": train, "4-jump sample": JUMPS * forward}


class TorchCase:
    """Forward, train step and 4-jump sampler of the flow map in PyTorch (eager, or torch.compile'd).

    unet: the diffusers flow-map UNet (copied here, the caller's is left alone). autocast: a torch dtype
    for torch.autocast (bf16 on GPU) or None (fp32). compile_mode: None (eager) or a torch.compile mode for
    the network (forward, sample) and, with compile_train, for the whole train step. train=False skips the
    train step's copies of the UNet (student with plain attention, teacher) and optimiser."""

    def __init__(self, spec, unet, inputs, device="cpu", compile_mode=None, autocast=None, lr=1e-4,
                 compile_train=True, train=True):
        import torch
        from diffusers.models.attention_processor import AttnProcessor

        from flowmap_jax.spec.layout import nhwc_to_nchw
        from flowmap_jax.spec.time_grid import time_grid
        from torch_ref import flow_map as tf
        from torch_ref import objectives as to
        from torch_ref import samplers as ts
        from torch_ref.teacher import Teacher, unet_teacher_fn

        self.torch, self.device = torch, torch.device(device)
        self.autocast = autocast
        tensor = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        schedule = schedule_config(spec)
        fwd_net = tf.unet_network(copy.deepcopy(unet).to(self.device).eval())
        self.compiled = compile_mode is not None
        if self.compiled:
            fwd_net = torch.compile(fwd_net, mode=compile_mode)
        self.fmap = tf.FlowMap(fwd_net, schedule, "epsilon")
        self.cond = {"encoder_hidden_states": tensor(inputs["context"])}
        self.noise = tensor(nhwc_to_nchw(inputs["noise"]).copy())
        self.batch = {"x0": tensor(nhwc_to_nchw(inputs["x0"]).copy()), "noise": self.noise, "cond": self.cond,
                      "t_source": tensor(inputs["t_source"]), "t_target": tensor(inputs["t_target"])}
        self.grid = time_grid(schedule, JUMPS)
        self.sampler = ts.flow_map_sample
        b = inputs["x0"].shape[0]
        self.s_full = torch.full((b,), 999.0, device=self.device)
        self.t_full = torch.full((b,), 499.0, device=self.device)

        self.last_loss = None
        self._step = None
        if not train:
            return
        train_unet = copy.deepcopy(unet).to(self.device).train(False)
        train_unet.set_attn_processor(AttnProcessor())  # forward-mode AD needs the plain attention
        teacher_unet = copy.deepcopy(unet).to(self.device).eval().requires_grad_(False)
        train_net = tf.unet_network(train_unet)
        train_map = tf.FlowMap(train_net, schedule, "epsilon")
        self.teacher = Teacher.create(unet_teacher_fn(teacher_unet), schedule, "epsilon",
                                      guidance_scale=GUIDANCE_SCALE,
                                      uncond={"encoder_hidden_states": tensor(inputs["uncond"])})
        loss_fn = to.make_objective("eulerian", train_map)
        self.train_params = dict(train_net.named_parameters())
        self.optimizer = torch.optim.AdamW(self.train_params.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0)

        def step():
            with self._autocast():
                loss, _ = loss_fn(self.train_params, self.teacher, self.batch, 0)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return loss.detach()

        self._step = torch.compile(step, mode=compile_mode) if self.compiled and compile_train else step

    def _autocast(self):
        import contextlib

        if self.autocast is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.autocast)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def forward(self):
        with self.torch.no_grad(), self._autocast():
            out = self.fmap(None, self.noise, self.s_full, self.t_full, self.cond)
        self._sync()
        return out

    def train_step(self):
        loss = self._step()
        self.last_loss = float(loss)
        self._sync()
        return loss

    def sample(self):
        with self.torch.no_grad(), self._autocast():
            out = self.sampler(self.fmap, None, self.noise, self.grid, self.cond)
        self._sync()
        return out


def state_dict_numpy(unet) -> dict:
    return {k: v.detach().cpu().float().numpy() for k, v in unet.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Timing.

def time_round_robin(variants: dict, repeats: int, warmup: int = 1, log=None) -> dict:
    """variants: {name: {op: fn}}. Warm-up calls (the first one timed as "first_s": compile + run), then
    `repeats` rounds, each op of each variant once per round. A variant whose op raises is recorded as
    {"error": message} for that op and skipped afterwards. Returns {name: {op: {"median_s", "times_s",
    "first_s"} or {"error"}}}."""
    out = {name: {} for name in variants}
    ops = []
    for name, fns in variants.items():
        for op in fns:
            ops.append((name, op))
    for name, op in ops:
        fn = variants[name][op]
        try:
            for i in range(max(warmup, 1)):
                start = time.perf_counter()
                fn()
                if i == 0:
                    out[name][op] = {"first_s": time.perf_counter() - start, "times_s": []}
        except Exception as error:  # noqa: BLE001 - report any backend failure in the table
            out[name][op] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}
        if log:
            log(f"  warm-up {name} {op}: " + (f"{out[name][op]['first_s']:.2f}s" if "first_s" in out[name][op]
                                             else out[name][op]["error"]))
    for r in range(repeats):
        for name, op in ops:
            entry = out[name][op]
            if "error" in entry:
                continue
            start = time.perf_counter()
            try:
                variants[name][op]()
            except Exception as error:  # noqa: BLE001
                out[name][op] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                continue
            entry["times_s"].append(time.perf_counter() - start)
    for name in out:
        for op, entry in out[name].items():
            if entry.get("times_s"):
                entry["median_s"] = statistics.median(entry["times_s"])
    return out


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def markdown_table(result: dict) -> str:
    """One configuration's timings as a markdown table (ms, medians; ratios torch / JAX)."""
    timings = result["timings"]
    has_compile = "torch.compile" in timings
    head = ["op", "JAX jit (ms)", "torch eager (ms)", "eager / JAX"]
    if has_compile:
        head += ["torch.compile (ms)", "compile / JAX"]
    head += ["GFLOP", "JAX GFLOP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in OPS:
        get = lambda name: timings.get(name, {}).get(op, {})  # noqa: E731
        jax_s, eager_s = get("jax").get("median_s"), get("torch eager").get("median_s")
        row = [op, _ms(jax_s) if jax_s else get("jax").get("error", "-"),
               _ms(eager_s) if eager_s else get("torch eager").get("error", "-"), _fmt_ratio(ratio(eager_s, jax_s))]
        if has_compile:
            comp_s = get("torch.compile").get("median_s")
            row += [_ms(comp_s) if comp_s else "failed: " + get("torch.compile").get("error", "?"),
                    _fmt_ratio(ratio(comp_s, jax_s))]
        flops = result.get("flops", {}).get(op)
        row += [f"{flops / 1e9:.2f}" if flops else "-", f"{flops / jax_s / 1e9:.1f}" if flops and jax_s else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def first_call_line(result: dict) -> str:
    parts = []
    for name, ops in result["timings"].items():
        firsts = [f"{op} {entry['first_s']:.1f}s" for op, entry in ops.items() if "first_s" in entry]
        if firsts:
            parts.append(f"{name}: " + ", ".join(firsts))
    return "first calls (compile/trace + one run): " + "; ".join(parts)


def run_config(name: str, repeats: int, warmup: int, use_compile: bool, batch: int | None, log) -> dict:
    import jax
    import numpy as np
    import torch

    spec = case_spec(name, batch)
    log(f"[{name}] building: UNet {spec['unet']['block_out_channels']}, sample {spec['hw']}, batch {spec['batch']}")
    unet = make_torch_unet(spec)
    n_params = sum(p.numel() for p in unet.parameters())
    inputs = make_inputs(spec)
    jcase = JaxCase(spec, state_dict_numpy(unet), inputs)
    eager = TorchCase(spec, unet, inputs)
    variants = {"jax": {"forward": jcase.forward, "train step": jcase.train_step, "4-jump sample": jcase.sample},
                "torch eager": {"forward": eager.forward, "train step": eager.train_step,
                                "4-jump sample": eager.sample}}
    probe = None
    if use_compile:
        # The compiled train step is first tried in a child process: when torch.compile fails on
        # torch.func.jvp it leaves this process's autograd state broken (every later eager JVP then fails
        # an internal assert), which would take the eager row down with it.
        log(f"[{name}] torch.compile of the train step: trying it in a child process")
        probe = probe_compiled_train_step(name, batch)
        log(f"[{name}] torch.compile train step: " + ("works" if probe["ok"] else probe["error"]))
        compiled = TorchCase(spec, unet, inputs, compile_mode="default", train=probe["ok"])
        variants["torch.compile"] = {"forward": compiled.forward, "4-jump sample": compiled.sample}
        if probe["ok"]:
            variants["torch.compile"]["train step"] = compiled.train_step
    # Same network, same numbers: the forward outputs and the first training loss of both backends.
    from flowmap_jax.spec.layout import nhwc_to_nchw

    out_j = nhwc_to_nchw(np.asarray(jcase.forward()))
    out_t = eager.forward().numpy()
    forward_rel = float(np.max(np.abs(out_j - out_t)) / max(np.max(np.abs(out_t)), 1e-12))
    loss_j, loss_t = float(jcase.train_step()), float(eager.train_step())
    log(f"[{name}] parity: forward max|jax - torch| / max|torch| = {forward_rel:.2e}; first losses "
        f"jax {loss_j:.6g}, torch {loss_t:.6g}")
    flops = jcase.flops()
    log(f"[{name}] timing: {repeats} rounds after {warmup} warm-up call(s)")
    timings = time_round_robin(variants, repeats, warmup, log=log)
    if probe is not None and not probe["ok"]:
        timings["torch.compile"]["train step"] = {"error": probe["error"]}
    return {"config": name, "unet": spec["unet"], "unet_source": spec["unet_source"], "batch": spec["batch"],
            "sample_hw": list(spec["hw"]), "context_len": spec["context_len"], "unet_parameters": int(n_params),
            "forward_rel_diff": forward_rel, "first_loss": {"jax": loss_j, "torch": loss_t},
            "loss_rel_diff": abs(loss_j - loss_t) / max(abs(loss_t), 1e-12), "flops": flops,
            "timings": timings, "jax_device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads()}


def probe_compiled_train_step(name: str, batch: int | None, timeout: float = 1200.0) -> dict:
    """{"ok": bool, "error": str, "first_s": float}: torch.compile of the train step, tried in a child
    process (same CPUs, same environment)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe-train-compile", name]
    if batch:
        cmd += ["--batch", str(batch)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"compiling took over {timeout:.0f}s (child process stopped)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"child process failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _probe_main(name: str, batch: int | None) -> None:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = case_spec(name, batch)
    case = TorchCase(spec, make_torch_unet(spec), make_inputs(spec), compile_mode="default")
    start = time.perf_counter()
    try:
        case.train_step()
        first = time.perf_counter() - start
        case.train_step()
        result = {"ok": True, "first_s": first}
    except Exception as error:  # noqa: BLE001 - the failure is the result
        text = str(error).splitlines()[0][:200] if str(error) else ""
        result = {"ok": False, "error": f"{type(error).__name__}: {text}"}
    print(json.dumps(result))


def threads_setup(threads: int | None) -> int:
    """Restricts this process to `threads` CPUs (before jax starts) and returns the count both backends use."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads:
        if threads > len(cpus):
            raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs are available to this process")
        os.sched_setaffinity(0, cpus[:threads])
    return len(os.sched_getaffinity(0))


def plot_ratios(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    width = 0.8 / max(len(results), 1)
    for i, result in enumerate(results):
        timings = result["timings"]
        for j, variant in enumerate(v for v in ("torch eager", "torch.compile") if v in timings):
            values = [ratio(timings[variant].get(op, {}).get("median_s"), timings["jax"].get(op, {}).get("median_s"))
                      or 0.0 for op in OPS]
            xs = [k + (i - (len(results) - 1) / 2) * width + (j - 0.5) * width / 2 for k in range(len(OPS))]
            ax.bar(xs, values, width / 2, label=f"{result['config']}: {variant}",
                   hatch="//" if variant == "torch.compile" else None)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(OPS)), OPS)
    ax.set_ylabel("torch time / JAX time")
    ax.set_title("fp32 CPU: > 1 means JAX is faster", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="digits,mid", help="comma-separated, from " + ", ".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after warm-up (median)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per op (the first compiles)")
    parser.add_argument("--batch", type=int, default=None, help="override every config's batch")
    parser.add_argument("--threads", type=int, default=None, help="CPUs for both backends (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--json", default=str(RESULTS / "backend_speed_cpu.json"))
    parser.add_argument("--png", default=str(RESULTS / "backend_speed_cpu.png"))
    parser.add_argument("--_probe-train-compile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._probe_train_compile:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        _probe_main(args._probe_train_compile, args.batch)
        return
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        case_spec(n)
    threads = threads_setup(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # OpenMP threads (torch) that spin-wait between parallel regions starve everyone on a loaded machine
    # (measured here: a digits forward took 2-8 s instead of 0.33 s with 2 spinning threads at load 6).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax
    import torch

    torch.set_num_threads(threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    started = time.perf_counter()
    header = (f"fp32 CPU ({platform.processor() or platform.machine()}), threads: JAX/XLA {threads} (affinity), "
              f"torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}, OMP_WAIT_POLICY="
              f"{os.environ.get('OMP_WAIT_POLICY')}); jax {jax.__version__}, "
              f"torch {torch.__version__}; load average at start {load_before[0]:.2f}")
    log(header)
    results = []
    for name in names:
        results.append(run_config(name, args.repeats, args.warmup, not args.no_compile, args.batch, log))
    load_after = os.getloadavg()
    summary = {"header": header, "threads": threads, "load_avg_start": load_before, "load_avg_end": load_after,
               "seconds": time.perf_counter() - started, "repeats": args.repeats, "warmup": args.warmup,
               "results": results}
    print(header + f"; load average at end {load_after[0]:.2f}\n")
    for r in results:
        print(f"**{r['config']}** (UNet {r['unet']['block_out_channels']}, {r['unet_parameters'] / 1e6:.1f}M "
              f"parameters, {'x'.join(map(str, r['sample_hw']))}x{r['unet']['in_channels']}, batch {r['batch']}, "
              f"context {r['context_len']} x {r['unet']['cross_attention_dim']}); median of {args.repeats}; "
              f"forward rel. diff {r['forward_rel_diff']:.1e}, loss rel. diff {r['loss_rel_diff']:.1e}\n")
        print(markdown_table(r))
        print("\n" + first_call_line(r) + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.png:
        plot_ratios(results, Path(args.png))
    log(f"done in {summary['seconds']:.0f}s")


if __name__ == "__main__":
    main()
