"""Flow-map objectives in PyTorch, mirroring `flowmap_jax.core.objectives` (same registry, names, options,
formulas; see its docstring). Differences of backend only:

- `params`: None (the network's own parameters) or a dict name -> tensor used through
  `torch.func.functional_call`; differentiate with `torch.autograd.grad` on those tensors or with
  `torch.func.grad`.
- `rng`: a torch.Generator or an int seed (draws differ from JAX's; pass batch["noise"], ["t_source"],
  ["t_target"], ["t_mid"], ["guidance_scale"] to make both backends see the same inputs).
- Forward mode is `torch.func.jvp`; the stop-gradient is `.detach()`; the teacher runs under no_grad.
Images are (B, C, H, W).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from flowmap_jax.spec.objective_options import (
    EulerianOptions,
    JvpOptions,
    PairsOptions,
    ProgressiveOptions,
    SharedOptions,
    check_objective_names,
    objective_options,
)
from torch_ref import samplers, schedules, time_pairs
from torch_ref.flow_map import (  # noqa: F401 (re-export)
    finite_difference_jvp,
    guidance_input_cond,
    guidance_scale_embedding,
)
from torch_ref.schedules import expand_time
from torch_ref.teacher import _leaves

__all__ = ["OBJECTIVES", "register_objective", "make_objective", "pairs", "lagrangian", "eulerian", "progressive",
           "finite_difference_jvp"]

OBJECTIVES: dict[str, Callable] = {}


# Copied from flowmap_jax.core.objectives.register_objective
def register_objective(name: str):
    """Decorator: adds `fn(flow_map, options, params, teacher, batch, rng) -> (loss, metrics)` as `name`, one of
    `spec.objective_options.OBJECTIVE_OPTIONS` (`options` an instance of its options class there)."""
    def register(fn):
        OBJECTIVES[name] = fn
        return fn
    return register


# Copied from flowmap_jax.core.objectives.make_objective
def make_objective(name: str, flow_map, options=None):
    """`loss_fn(params, teacher, batch, rng) -> (loss, metrics)` for the objective `name` (see OBJECTIVES).
    options: None (the objective's defaults), an instance of its options class, an `ObjectiveOptions` (a run's
    settings) or a dict of option names (`spec.objective_options.objective_options`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: expected one of {tuple(OBJECTIVES)}")
    options = objective_options(name, options)

    def loss_fn(params, teacher, batch, rng):
        return OBJECTIVES[name](flow_map, options, params, teacher, batch, rng)

    functools.update_wrapper(loss_fn, OBJECTIVES[name])
    return loss_fn


# --------------------------------------------------------------------------------------------------
# Shared pieces.

def _per_example_mean(x):
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _eval_range(schedule, options: SharedOptions, fd: bool):
    lo = max(schedule.t_eval_min, schedule.t_clean + 1e-3 * schedule.time_unit)
    hi = schedule.t_noise
    if fd:
        rates = schedules.dtheta_dt(schedule, torch.tensor([lo, hi], dtype=torch.float32))
        lo_margin, hi_margin = (2.0 * options.fd_eps / float(r) for r in rates)
        lo, hi = lo + lo_margin, hi - hi_margin
    return lo, hi


def _warmup(options: JvpOptions, batch, batch_size, device):
    if options.tangent_warmup_steps <= 0:
        return torch.ones(batch_size, device=device)
    if "step" not in batch:
        raise ValueError("tangent_warmup_steps > 0 needs batch['step'] (the optimiser step)")
    step = torch.as_tensor(batch["step"], dtype=torch.float32, device=device).expand(batch_size)
    return options.tangent_warmup_max * torch.clamp(step / options.tangent_warmup_steps, max=1.0)


def _student_map(flow_map, options: SharedOptions, batch, batch_size, device):
    """The map the loss trains, blended with the teacher's DDIM step during the head warm-up."""
    if options.head_warmup_steps <= 0:
        return flow_map
    if "step" not in batch:
        raise ValueError("head_warmup_steps > 0 needs batch['step'] (the optimiser step)")
    step = torch.as_tensor(batch["step"], dtype=torch.float32, device=device).expand(batch_size)
    return flow_map.with_teacher_blend(torch.clamp(1.0 - step / options.head_warmup_steps, min=0.0))


def _check_batch(batch):
    if "x0" not in batch:
        raise ValueError(f"batch needs 'x0' (the data, (B, ...)); got keys {sorted(batch)}")
    x0 = batch["x0"]
    if x0.ndim < 1:
        raise ValueError(f"batch['x0'] must have a batch axis, got shape {tuple(x0.shape)}")
    b = x0.shape[0]
    for key in ("t_source", "t_target", "t_mid", "guidance_scale"):
        if key in batch and tuple(torch.as_tensor(batch[key]).shape) != (b,):
            raise ValueError(f"batch[{key!r}] must have shape ({b},) (the batch of x0), got "
                             f"{tuple(torch.as_tensor(batch[key]).shape)}")
    index_shape = tuple(torch.as_tensor(batch["path_index"]).shape) if "path_index" in batch else None
    if index_shape is not None and (len(index_shape) != 2 or index_shape[0] != b):
        raise ValueError(f"batch['path_index'] must have shape ({b}, path_targets), got {index_shape}")
    if "noise" in batch and batch["noise"].shape != x0.shape:
        raise ValueError(f"batch['noise'] shape {tuple(batch['noise'].shape)} differs from x0 shape {tuple(x0.shape)}")
    for path, leaf in _leaves(batch.get("cond")):
        if leaf.ndim == 0 or leaf.shape[0] != b:
            raise ValueError(f"batch['cond']{path} has shape {tuple(leaf.shape)}: its first axis must be the batch "
                             f"of x0 ({b})")
    return b


def _prepare(flow_map, options: SharedOptions, batch, rng, source_range=None, target_range=None):
    schedule = flow_map.schedule
    b = _check_batch(batch)
    x0 = batch["x0"]
    device = x0.device
    rng = time_pairs.as_generator(rng)
    s, t = time_pairs.sample_time_pairs(rng, b, schedule, options.time_pairs, source_range, target_range)
    s = torch.as_tensor(batch["t_source"], dtype=torch.float32, device=device) if "t_source" in batch else s.to(device)
    t = torch.as_tensor(batch["t_target"], dtype=torch.float32, device=device) if "t_target" in batch else t.to(device)
    if source_range is not None:
        s = torch.clamp(s, *source_range)
    if target_range is not None:
        t = torch.clamp(t, *target_range)
    noise = batch["noise"] if "noise" in batch else torch.randn(x0.shape, generator=rng, dtype=x0.dtype).to(device)
    x_s = schedules.add_noise(schedule, x0, noise, s)
    cond = batch.get("cond")
    w = None
    if "guidance_scale" in batch:
        w = torch.as_tensor(batch["guidance_scale"], dtype=torch.float32, device=device)
    elif options.guidance_scale_range is not None:
        lo, hi = options.guidance_scale_range
        w = lo + (hi - lo) * torch.rand(b, generator=rng).to(device)
    student_cond = cond
    if options.guidance_embedding_dim is not None:
        if w is None:
            raise ValueError("guidance_embedding_dim needs guidance_scale_range or batch['guidance_scale']")
        student_cond = guidance_input_cond(cond, w, options.guidance_embedding_dim)
    return dict(b=b, x_s=x_s, s=s, t=t, cond=cond, student_cond=student_cond, w=w, rng=rng, device=device)


def _finish(per_example, options: SharedOptions, raw_residual):
    if options.adaptive_weight:
        per_example = per_example / ((per_example + options.adaptive_weight_c) ** options.adaptive_weight_p).detach()
    loss = per_example.mean()
    return loss, {"loss": loss.detach(), "residual_rms": raw_residual.detach().square().mean().sqrt()}


def _jump_weight(c_x, options: JvpOptions):
    if not options.jump_scale_normalization:
        return torch.ones_like(c_x)
    return (1.0 / torch.clamp(c_x.abs(), min=1.0)).detach()


def _output_scale_weight(flow_map, s, t, options: SharedOptions):
    """(B,) per-example factor 1 / max(|c_F(s, t)|, floor)^power on a squared error in X or a JVP residual
    (`output_scale_power`; 1.0 when the power is 0)."""
    power = options.output_scale_power
    if power == 0:
        return 1.0
    _, c_f = flow_map.own_coefficients(s, t)
    return (torch.clamp(c_f.abs(), min=options.output_scale_floor) ** -power).detach()


def _jvp_loss(x_map, residual, direction, options: JvpOptions, weight, output_scale):
    x_map = expand_time(weight, x_map) * x_map
    residual = expand_time(weight, residual) * residual
    r = residual
    if options.tangent_normalization:
        norm = r.reshape(r.shape[0], -1).square().sum(dim=1).sqrt()
        r = r / expand_time(norm.detach() + options.tangent_norm_c, r)
    if options.residual_form == "stopgrad":
        r = expand_time(direction, r) * r.detach()
        per_example = _per_example_mean((x_map - (x_map - r).detach()).square())
    else:
        per_example = _per_example_mean(r.square())
    return _finish(output_scale * per_example, options, residual)


# --------------------------------------------------------------------------------------------------
# The objectives.

@register_objective("pairs")
def pairs(flow_map, options: PairsOptions, params, teacher, batch, rng):
    """|X(x_s, s, t) - sg(teacher PF-ODE solution from s to t)|^2, plus `path_targets` points of the same
    solution."""
    source_range = _eval_range(flow_map.schedule, options, False)
    p = _prepare(flow_map, options, batch, rng, source_range=source_range)
    fmap = _student_map(flow_map, options, batch, p["b"], p["device"])
    b, extra = p["b"], options.path_targets
    with torch.no_grad():
        solved = samplers.teacher_solve(teacher, p["x_s"], p["s"], p["t"], options.teacher_steps,
                                        options.teacher_solver, p["cond"], p["w"],
                                        spacing=options.teacher_spacing, path=bool(extra),
                                        source_min=source_range[0])  # sources clipped: no clean-end branch
    if extra:  # the pair's own target first, then J points of its path: (B, 1 + J) times and targets
        target, mid_times, mid_states = solved
        if "path_index" in batch:
            index = torch.as_tensor(batch["path_index"], dtype=torch.long, device=p["device"])
        else:
            index = torch.randint(0, mid_times.shape[0], (b, extra), generator=p["rng"]).to(p["device"])
        rows = torch.arange(b, device=p["device"])[:, None]
        times = torch.cat([p["t"][:, None], mid_times.T[rows, index]], dim=1)
        targets = torch.cat([target[:, None], mid_states.movedim(0, 1)[rows, index]], dim=1)
    else:
        times, targets = p["t"][:, None], solved[:, None]

    def repeat(v):  # example-major: (B (1 + J), ...), through nested dicts of tensors
        if isinstance(v, dict):
            return {k: repeat(item) for k, item in v.items()}
        return torch.repeat_interleave(v, extra + 1, dim=0) if extra and v is not None else v

    s_all, t_all = repeat(p["s"]), times.reshape(-1)
    x_map = fmap(params, repeat(p["x_s"]), s_all, t_all, repeat(p["student_cond"]))
    err = x_map - targets.reshape(x_map.shape).detach()
    per_target = _output_scale_weight(flow_map, s_all, t_all, options) * _per_example_mean(err.square())
    return _finish(per_target.reshape(b, extra + 1).mean(dim=1), options, err)


@register_objective("lagrangian")
def lagrangian(flow_map, options: JvpOptions, params, teacher, batch, rng):
    """r = dX/dtheta_t (x_s, s, t) - v(sg(X), t) dt/dtheta."""
    fd = options.jvp == "finite_difference"
    p = _prepare(flow_map, options, batch, rng, target_range=_eval_range(flow_map.schedule, options, fd))
    fmap = _student_map(flow_map, options, batch, p["b"], p["device"])
    x_s, s, t = p["x_s"], p["s"], p["t"]
    dt = 1.0 / schedules.dtheta_dt(flow_map.schedule, t)  # d/dtheta = (dt/dtheta) d/dt
    x_map, d_map, _ = fmap.jvp(params, x_s, s, t, p["student_cond"], (None, None, dt),
                               network_tangent_scale=_warmup(options, batch, p["b"], p["device"]),
                               method=options.jvp, fd_eps=options.fd_eps)
    with torch.no_grad():
        v = teacher.velocity(x_map.detach(), t, p["cond"], p["w"]) * expand_time(dt, x_s)
    residual = d_map - v
    c_x, _ = fmap.coefficients(s, t)
    return _jvp_loss(x_map, residual, -torch.sign(s - t), options, _jump_weight(c_x, options),
                     _output_scale_weight(flow_map, s, t, options))


@register_objective("eulerian")
def eulerian(flow_map, options: EulerianOptions, params, teacher, batch, rng):
    """r = d/dtheta_s X(x_s, s, t) along the teacher's ODE."""
    fd = options.jvp == "finite_difference"
    p = _prepare(flow_map, options, batch, rng, source_range=_eval_range(flow_map.schedule, options, fd))
    fmap = _student_map(flow_map, options, batch, p["b"], p["device"])
    x_s, s, t = p["x_s"], p["s"], p["t"]
    ds = 1.0 / schedules.dtheta_dt(flow_map.schedule, s)  # d/dtheta = (ds/dtheta) d/ds
    with torch.no_grad():
        v = teacher.velocity(x_s, s, p["cond"], p["w"]) * expand_time(ds, x_s)
    x_map, residual, _ = fmap.jvp(params, x_s, s, t, p["student_cond"], (v, ds, None),
                                  network_tangent_scale=_warmup(options, batch, p["b"], p["device"]),
                                  method=options.jvp, fd_eps=options.fd_eps)
    c_x, _ = fmap.coefficients(s, t)
    return _jvp_loss(x_map, residual, torch.sign(s - t), options, _jump_weight(c_x, options),
                     _output_scale_weight(flow_map, s, t, options))


@register_objective("progressive")
def progressive(flow_map, options: ProgressiveOptions, params, teacher, batch, rng):
    """Semigroup X(x, s, t) = sg(X(X(x, s, u), u, t)) plus the velocity anchor."""
    schedule = flow_map.schedule
    p = _prepare(flow_map, options, batch, rng, source_range=_eval_range(schedule, options, False))
    fmap = _student_map(flow_map, options, batch, p["b"], p["device"])
    x_s, s, t, cond = p["x_s"], p["s"], p["t"], p["student_cond"]
    ds = expand_time(1.0 / schedules.dtheta_dt(schedule, s), x_s)
    if "t_mid" in batch:
        u = torch.as_tensor(batch["t_mid"], dtype=torch.float32, device=p["device"])
    else:
        u = time_pairs.sample_mid_times(p["rng"], s, t)
    x_u = fmap(params, x_s, s, u, cond)
    target = fmap(params, x_u, u, t, cond).detach()
    err = fmap(params, x_s, s, t, cond) - target
    with torch.no_grad():
        v_teacher = teacher.velocity(x_s, s, p["cond"], p["w"]) * ds
    anchor = fmap.velocity(params, x_s, s, cond) - v_teacher
    scale = _output_scale_weight(flow_map, s, t, options)
    per_example = (scale * _per_example_mean(err.square())
                   + options.progressive_anchor_weight * _per_example_mean(anchor.square()))
    return _finish(per_example, options, err)


check_objective_names(OBJECTIVES, __name__)
