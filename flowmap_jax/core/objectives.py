"""Flow-map objectives in JAX (mirrored by `torch_ref.objectives`): one function each, one registry.

    loss_fn = make_objective(name, flow_map, options)        # options: its options class, ObjectiveOptions or a dict
    loss, metrics = loss_fn(params, teacher, batch, rng)     # pure; jit/grad/vmap it freely

batch: {"x0": (B, ...) data (Flax images (B, H, W, C)), "cond": dict of (B, ...) UNet keyword arguments or
None}, optionally "step" (() or (B,), for the tangent warm-up) and, to make a loss deterministic (parity
tests, debugging), "noise" (x0's shape), "t_source", "t_target", "t_mid" ((B,) teacher units) and
"guidance_scale" ((B,)), each replacing what would otherwise be drawn from `rng`: a jax PRNG key, or a (B,)
batch of keys, one per example, with which each example's draws are those it would get alone
(`example_keys.draw`; the trainer passes `fold_in(step_key, example_id)`, so a loss does not depend on the
device split while the network runs on the whole batch).
x_s = alpha_s x0 + sigma_s noise is the noised data at the source time.

Objectives (X the flow map, v the guided teacher velocity, sg the stop-gradient). Derivatives are taken
with respect to the angle theta_t = arctan(sigma_t / alpha_t) in [0, pi/2] (`schedules.angle`; alpha =
cos theta, sigma = sin theta for VP schedules, TrigFlow's time): unit-free, so loss weights do not depend on
the teacher's units (0..999 or [0, 1]), and the PF-ODE velocity dx/dtheta is bounded at both ends, where
dx/dt is not (DDPM's sigma grows like sqrt(t + 1) at the clean end; in t units the residuals near t = 0
swamp the rest and training stalls). d/dtheta = (dt/dtheta) d/dt, with dt/dtheta = 1 / `schedules.dtheta_dt`.
- `pairs`: |X(x_s, s, t) - sg(Phi(x_s, s, t))|^2, Phi the teacher's PF-ODE solution from s to t
  (`teacher_steps` steps of `teacher_solver`, `samplers.teacher_solve`).
- `lagrangian` (LMD/LSD): r = dX/dtheta_t (x_s, s, t) - v(sg(X), t) dt/dtheta.
- `eulerian` (EMD/ESD, Align Your Flow): r = d/dtheta_s X(x_s, s, t) along the teacher's ODE
  = (dX/ds + dX/dx . v(x_s, s)) ds/dtheta.
- `progressive` (PSD/shortcut): |X(x_s, s, t) - sg(X(X(x_s, s, u), u, t))|^2 with u uniform between s and t,
  plus `progressive_anchor_weight` |v_X(x_s, s) - sg(v(x_s, s))|^2 ds/dtheta, v_X the map's velocity at t = s
  (d/dt X(x_s, s, t) at t = s, i.e. the velocity of F(x_s, s, s)).
Residual forms of the JVP objectives (`residual_form`; each objective's default: stopgrad for eulerian, direct
for lagrangian, measured in `spec.objective_options.JvpOptions`): "stopgrad" minimises |X - sg(X - r')|^2 with r' the (normalised)
residual signed so that X moves towards its better-anchored neighbour (eulerian: r' = sign(s - t) r, the
sCM/AYF target X(x_{s-ds}, s - ds, t); lagrangian: r' = -sign(s - t) r, the target Phi(X(x_s, s, t + dt),
t + dt -> t)); its value is |r'|^2 and it needs no backward pass through the JVP. "direct" minimises |r|^2
through the JVP. The JVP objectives scale X and r of each jump by 1 / max(1, |c_x(s, t)|)
(`jump_scale_normalization`). Every objective may divide each example's squared error (or residual) by
max(|c_F(s, t)|, floor)^p (`output_scale_power`), which moves the loss from X's units towards the output F's;
the default is p = 2 with tangent normalisation for eulerian (its stop-gradient step on F is otherwise
sin(d) r, which vanishes near the diagonal where r carries the teacher's velocity), p = 0 for the others.
Each objective's options are its own dataclass (`spec.objective_options.OBJECTIVE_OPTIONS`: `SharedOptions`,
which every objective has, and its subclasses `PairsOptions`, `JvpOptions` (lagrangian), `EulerianOptions`,
`ProgressiveOptions`): tangent normalisation, tangent warm-up, adaptive weight, finite-difference JVP,
guidance-scale sampling and embedding, each objective's own defaults. Times at which an objective evaluates the
teacher (lagrangian: t; pairs, eulerian and progressive: s) are clipped into [max(t_eval_min, t_clean +
1e-3 time_unit), t_noise] (and the finite-difference stencil into the schedule), batch-given times included.

Losses are per-example means over non-batch axes, then means over the batch. Metrics: "loss" and
"residual_rms" (root mean square of the residual or error, after the jump-scale normalisation and before
tangent normalisation or adaptive weighting).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp

from flowmap_jax.core import example_keys, samplers, schedules, time_pairs
from flowmap_jax.core.flow_map import (  # noqa: F401 (re-export)
    finite_difference_jvp,
    guidance_input_cond,
    guidance_scale_embedding,
)
from flowmap_jax.core.schedules import expand_time
from flowmap_jax.spec.objective_options import (
    EulerianOptions,
    JvpOptions,
    PairsOptions,
    ProgressiveOptions,
    SharedOptions,
    check_objective_names,
    objective_options,
)

__all__ = ["OBJECTIVES", "register_objective", "make_objective", "pairs", "lagrangian", "eulerian", "progressive",
           "finite_difference_jvp", "combine_objectives"]

OBJECTIVES: dict[str, Callable] = {}


def register_objective(name: str):
    """Decorator: adds `fn(flow_map, options, params, teacher, batch, rng) -> (loss, metrics)` as `name`, one of
    `spec.objective_options.OBJECTIVE_OPTIONS` (`options` an instance of its options class there)."""
    def register(fn):
        OBJECTIVES[name] = fn
        return fn
    return register


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

def _sg(x):
    return jax.lax.stop_gradient(x)


def _per_example_mean(x):
    return jnp.mean(jnp.reshape(x, (x.shape[0], -1)), axis=1)


def _eval_range(schedule, options: SharedOptions, fd: bool):
    """[lo, hi] (floats) where an objective may evaluate the teacher and, with fd, centre a difference
    stencil t +- fd_eps dt/dtheta (kept inside the schedule with a factor-2 margin)."""
    lo = max(schedule.t_eval_min, schedule.t_clean + 1e-3 * schedule.time_unit)
    hi = schedule.t_noise
    if fd:
        with jax.ensure_compile_time_eval():
            rates = schedules.dtheta_dt(schedule, jnp.asarray([lo, hi], jnp.float32))
            lo_margin, hi_margin = (2.0 * options.fd_eps / float(r) for r in rates)
        lo, hi = lo + lo_margin, hi - hi_margin
    return lo, hi


def _warmup(options: JvpOptions, batch, batch_size):
    """The factor on the network's JVP term: 1, or tangent_warmup_max * min(step / steps, 1)."""
    if options.tangent_warmup_steps <= 0:
        return jnp.ones((batch_size,), jnp.float32)
    if "step" not in batch:
        raise ValueError("tangent_warmup_steps > 0 needs batch['step'] (the optimiser step)")
    step = jnp.broadcast_to(jnp.asarray(batch["step"], jnp.float32), (batch_size,))
    return options.tangent_warmup_max * jnp.minimum(step / options.tangent_warmup_steps, 1.0)


def _student_map(flow_map, options: SharedOptions, batch, batch_size):
    """The flow map the loss trains: during the head warm-up (`head_warmup_steps` > 0) its coefficients are
    blended with the teacher's DDIM step, weight max(0, 1 - step / head_warmup_steps) (see
    `flowmap_jax.core.flow_map`, "Head mismatch")."""
    if options.head_warmup_steps <= 0:
        return flow_map
    if "step" not in batch:
        raise ValueError("head_warmup_steps > 0 needs batch['step'] (the optimiser step)")
    step = jnp.broadcast_to(jnp.asarray(batch["step"], jnp.float32), (batch_size,))
    return flow_map.with_teacher_blend(jnp.maximum(0.0, 1.0 - step / options.head_warmup_steps))


def _check_batch(batch):
    if "x0" not in batch:
        raise ValueError(f"batch needs 'x0' (the data, (B, ...)); got keys {sorted(batch)}")
    x0 = batch["x0"]
    if jnp.ndim(x0) < 1:
        raise ValueError(f"batch['x0'] must have a batch axis, got shape {jnp.shape(x0)}")
    b = x0.shape[0]
    for key in ("t_source", "t_target", "t_mid", "guidance_scale"):
        if key in batch and jnp.shape(batch[key]) != (b,):
            raise ValueError(f"batch[{key!r}] must have shape ({b},) (the batch of x0), got {jnp.shape(batch[key])}")
    if "path_index" in batch and (jnp.ndim(batch["path_index"]) != 2 or jnp.shape(batch["path_index"])[0] != b):
        raise ValueError(f"batch['path_index'] must have shape ({b}, path_targets), got {jnp.shape(batch['path_index'])}")
    if "noise" in batch and jnp.shape(batch["noise"]) != x0.shape:
        raise ValueError(f"batch['noise'] shape {jnp.shape(batch['noise'])} differs from x0 shape {x0.shape}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch.get("cond")):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != b:
            raise ValueError(f"batch['cond']{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}: its first "
                             f"axis must be the batch of x0 ({b})")
    return b


def _mid_times(rng, s, t):
    """`time_pairs.sample_mid_times` from one key or, per example, from a key batch (as `example_keys.draw`)."""
    if example_keys.is_key_batch(rng):
        return jax.vmap(lambda key, s_i, t_i: time_pairs.sample_mid_times(key, s_i[None], t_i[None])[0])(rng, s, t)
    return time_pairs.sample_mid_times(rng, s, t)


def _prepare(flow_map, options: SharedOptions, batch, rng, source_range=None, target_range=None):
    """Draws (or takes from batch) the times, noise and guidance scale; returns a dict of the pieces. rng: one
    key, or a (B,) batch of keys, one per example (`draw`)."""
    schedule = flow_map.schedule
    b = _check_batch(batch)
    x0 = batch["x0"]
    k_times, k_noise, k_mid, k_w = example_keys.split(rng, 4)
    s, t = example_keys.draw(k_times, b, lambda key, n: time_pairs.sample_time_pairs(
        key, n, schedule, options.time_pairs, source_range, target_range))
    s = jnp.asarray(batch.get("t_source", s), jnp.float32)
    t = jnp.asarray(batch.get("t_target", t), jnp.float32)
    if source_range is not None:  # given times too: the objective cannot evaluate outside
        s = jnp.clip(s, *source_range)
    if target_range is not None:
        t = jnp.clip(t, *target_range)
    noise = batch["noise"] if "noise" in batch else example_keys.draw(
        k_noise, b, lambda key, n: jax.random.normal(key, (n,) + x0.shape[1:], x0.dtype))
    x_s = schedules.add_noise(schedule, x0, noise, s)
    cond = batch.get("cond")
    w = None
    if "guidance_scale" in batch:
        w = jnp.asarray(batch["guidance_scale"], jnp.float32)
    elif options.guidance_scale_range is not None:
        lo, hi = options.guidance_scale_range
        w = lo + (hi - lo) * example_keys.draw(k_w, b, lambda key, n: jax.random.uniform(key, (n,)))
    student_cond = cond
    if options.guidance_embedding_dim is not None:
        if w is None:
            raise ValueError("guidance_embedding_dim needs guidance_scale_range or batch['guidance_scale']")
        student_cond = guidance_input_cond(cond, w, options.guidance_embedding_dim)
    return dict(b=b, x_s=x_s, s=s, t=t, cond=cond, student_cond=student_cond, w=w, k_mid=k_mid)


def _finish(per_example, options: SharedOptions, raw_residual):
    if options.adaptive_weight:
        per_example = per_example / _sg((per_example + options.adaptive_weight_c) ** options.adaptive_weight_p)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "residual_rms": jnp.sqrt(jnp.mean(jnp.square(_sg(raw_residual))))}


def _jump_weight(c_x, options: JvpOptions):
    """(B,) per-example scale 1 / max(1, |c_x(s, t)|) (or ones with jump_scale_normalization off)."""
    if not options.jump_scale_normalization:
        return jnp.ones_like(c_x)
    return _sg(1.0 / jnp.maximum(jnp.abs(c_x), 1.0))


def _output_scale_weight(flow_map, s, t, options: SharedOptions):
    """(B,) per-example factor 1 / max(|c_F(s, t)|, floor)^power on a squared error in X or a JVP residual
    (`output_scale_power`; the scalar 1.0 when the power is 0), c_F the map's own output coefficient."""
    power = options.output_scale_power
    if power == 0:
        return 1.0
    _, c_f = flow_map.own_coefficients(s, t)
    return _sg(jnp.maximum(jnp.abs(c_f), options.output_scale_floor) ** -power)


def _jvp_loss(x_map, residual, direction, options: JvpOptions, weight, output_scale):
    """Loss of a JVP objective from X (B, ...), its residual r (B, ...) and the jump weight (B,);
    direction (B,) signs r for the stop-gradient form."""
    x_map = expand_time(weight, x_map) * x_map
    residual = expand_time(weight, residual) * residual
    r = residual
    if options.tangent_normalization:
        norm = jnp.sqrt(jnp.sum(jnp.reshape(jnp.square(r), (r.shape[0], -1)), axis=1))
        r = r / expand_time(_sg(norm) + options.tangent_norm_c, r)
    if options.residual_form == "stopgrad":
        r = expand_time(direction, r) * _sg(r)
        per_example = _per_example_mean(jnp.square(x_map - _sg(x_map - r)))
    else:
        per_example = _per_example_mean(jnp.square(r))
    return _finish(output_scale * per_example, options, residual)


# --------------------------------------------------------------------------------------------------
# The objectives.

@register_objective("pairs")
def pairs(flow_map, options: PairsOptions, params, teacher, batch, rng):
    """|X(x_s, s, t) - sg(teacher PF-ODE solution from s to t)|^2, plus `path_targets` points of the same
    solution (see the module docstring)."""
    source_range = _eval_range(flow_map.schedule, options, False)
    p = _prepare(flow_map, options, batch, rng, source_range=source_range)
    fmap = _student_map(flow_map, options, batch, p["b"])
    b, extra = p["b"], options.path_targets
    solved = samplers.teacher_solve(teacher, p["x_s"], p["s"], p["t"], options.teacher_steps, options.teacher_solver,
                                    p["cond"], p["w"], spacing=options.teacher_spacing, path=bool(extra),
                                    source_min=source_range[0])  # sources clipped: no clean-end branch
    if extra:  # the pair's own target first, then J points of its path: (B, 1 + J) times and targets
        target, mid_times, mid_states = solved
        index = batch["path_index"] if "path_index" in batch else example_keys.draw(
            p["k_mid"], b, lambda key, n: jax.random.randint(key, (n, extra), 0, mid_times.shape[0]))  # (B, J)
        rows = jnp.arange(b)[:, None]
        times = jnp.concatenate([p["t"][:, None], mid_times.T[rows, index]], axis=1)
        targets = jnp.concatenate([target[:, None], jnp.moveaxis(mid_states, 0, 1)[rows, index]], axis=1)
    else:
        times, targets = p["t"][:, None], solved[:, None]

    def repeat(v):  # example-major: (B (1 + J), ...)
        return jnp.repeat(v, extra + 1, axis=0) if extra else v

    s_all, t_all = repeat(p["s"]), times.reshape(-1)
    x_map = fmap(params, repeat(p["x_s"]), s_all, t_all, jax.tree.map(repeat, p["student_cond"]))
    err = x_map - _sg(targets.reshape(x_map.shape))
    per_target = _output_scale_weight(flow_map, s_all, t_all, options) * _per_example_mean(jnp.square(err))
    return _finish(jnp.mean(per_target.reshape(b, extra + 1), axis=1), options, err)


@register_objective("lagrangian")
def lagrangian(flow_map, options: JvpOptions, params, teacher, batch, rng):
    """r = dX/dtheta_t (x_s, s, t) - v(sg(X), t) dt/dtheta (see the module docstring)."""
    fd = options.jvp == "finite_difference"
    p = _prepare(flow_map, options, batch, rng, target_range=_eval_range(flow_map.schedule, options, fd))
    fmap = _student_map(flow_map, options, batch, p["b"])
    x_s, s, t = p["x_s"], p["s"], p["t"]
    dt = 1.0 / schedules.dtheta_dt(flow_map.schedule, t)  # d/dtheta = (dt/dtheta) d/dt
    x_map, d_map, _ = fmap.jvp(params, x_s, s, t, p["student_cond"], (None, None, dt),
                               network_tangent_scale=_warmup(options, batch, p["b"]), method=options.jvp,
                               fd_eps=options.fd_eps)
    v = teacher.velocity(_sg(x_map), t, p["cond"], p["w"]) * expand_time(dt, x_s)
    residual = d_map - _sg(v)
    c_x, _ = fmap.coefficients(s, t)
    return _jvp_loss(x_map, residual, -jnp.sign(s - t), options, _jump_weight(c_x, options),
                     _output_scale_weight(flow_map, s, t, options))


@register_objective("eulerian")
def eulerian(flow_map, options: EulerianOptions, params, teacher, batch, rng):
    """r = d/dtheta_s X(x_s, s, t) along the teacher's ODE (see the module docstring)."""
    fd = options.jvp == "finite_difference"
    p = _prepare(flow_map, options, batch, rng, source_range=_eval_range(flow_map.schedule, options, fd))
    fmap = _student_map(flow_map, options, batch, p["b"])
    x_s, s, t = p["x_s"], p["s"], p["t"]
    ds = 1.0 / schedules.dtheta_dt(flow_map.schedule, s)  # d/dtheta = (ds/dtheta) d/ds
    v = _sg(teacher.velocity(x_s, s, p["cond"], p["w"])) * expand_time(ds, x_s)
    x_map, residual, _ = fmap.jvp(params, x_s, s, t, p["student_cond"], (v, ds, None),
                                  network_tangent_scale=_warmup(options, batch, p["b"]), method=options.jvp,
                                  fd_eps=options.fd_eps)
    c_x, _ = fmap.coefficients(s, t)
    return _jvp_loss(x_map, residual, jnp.sign(s - t), options, _jump_weight(c_x, options),
                     _output_scale_weight(flow_map, s, t, options))


@register_objective("progressive")
def progressive(flow_map, options: ProgressiveOptions, params, teacher, batch, rng):
    """Semigroup X(x, s, t) = sg(X(X(x, s, u), u, t)) plus the velocity anchor (see the module docstring)."""
    schedule = flow_map.schedule
    p = _prepare(flow_map, options, batch, rng, source_range=_eval_range(schedule, options, False))
    fmap = _student_map(flow_map, options, batch, p["b"])
    x_s, s, t, cond = p["x_s"], p["s"], p["t"], p["student_cond"]
    ds = expand_time(1.0 / schedules.dtheta_dt(schedule, s), x_s)
    u = batch["t_mid"] if "t_mid" in batch else _mid_times(p["k_mid"], s, t)
    x_u = fmap(params, x_s, s, u, cond)
    target = _sg(fmap(params, x_u, u, t, cond))
    err = fmap(params, x_s, s, t, cond) - target
    # Anchor: the map's velocity at t = s (network told t = s) against the teacher's, both per unit angle.
    anchor = fmap.velocity(params, x_s, s, cond) - _sg(teacher.velocity(x_s, s, p["cond"], p["w"]) * ds)
    scale = _output_scale_weight(flow_map, s, t, options)
    per_example = (scale * _per_example_mean(jnp.square(err))
                   + options.progressive_anchor_weight * _per_example_mean(jnp.square(anchor)))
    return _finish(per_example, options, err)


check_objective_names(OBJECTIVES, __name__)


# --------------------------------------------------------------------------------------------------
# Mixing objectives.

def combine_objectives(named_losses: Sequence[tuple[str, float, Callable]]) -> Callable:
    """Weighted sum of objectives, each with its own rng stream (`fold_in(rng, index)`): the one way to build
    a mixed loss. named_losses: (name, weight, loss_fn) with loss_fn `(params, teacher, batch, rng) ->
    (loss, metrics)` (e.g. `make_objective(name, flow_map, options)`); returns a loss_fn of the same form.

    Metrics: "loss" (the weighted sum) and "<name>/<metric>" for each objective's own metrics
    (at least "<name>/loss", the unweighted value).
    """
    named_losses = list(named_losses)
    if not named_losses:
        raise ValueError("combine_objectives: no objectives given")

    def loss_fn(params, teacher, batch, rng):
        total = 0.0
        metrics = {}
        for index, (name, weight, fn) in enumerate(named_losses):
            loss, own = fn(params, teacher, batch, example_keys.fold_in(rng, index))
            total = total + weight * loss
            metrics[f"{name}/loss"] = loss
            for key, value in (own or {}).items():
                if key != "loss":
                    metrics[f"{name}/{key}"] = value
        metrics["loss"] = total
        return total, metrics

    return loss_fn
