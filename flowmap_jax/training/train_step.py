"""One training step: per-device loss and gradient, explicit `pmean`, AdamW, EMA. Compiled once.

The step is the pmap programming model written with `jax.shard_map` (DESIGN.md, "Parallelism and
scale"): the function inside sees one device's slice of the batch, computes the loss and its
gradient, and averages the gradient across devices with an explicit `jax.lax.pmean`. `check_vma` is
off so that automatic differentiation inserts no collectives of its own: every cross-device
reduction is the one written here.

FSDP: parameters whose PartitionSpec names the `fsdp` axis arrive as shards, are all-gathered just
before the loss, and their gradient comes back reduce-scattered (the transpose of the all-gather
sums over the fsdp group), then is averaged over the data axis and divided by the fsdp size: the
mean over every device, as for the replicated parameters. The optimiser update runs outside the
shard_map on the sharded arrays (XLA keeps them sharded; the global-norm clip is a true global norm).

Randomness is per example: example i of the global batch uses `fold_in(fold_in(rng, step),
example_id[i])`, from which the objective draws that example's times and noise exactly as if it were alone,
while the network runs once on the device's whole batch (`per_example_loss`). So the result does not depend on
how the batch is split over devices or processes (8 devices and 1 device with the same global batch give the
same parameters up to float reassociation), and every kernel sees the real per-device batch: at SD sizes the
attention takes its blocked path, where a per-example `vmap` chose the unblocked one for a batch of 1.
With `microbatches` > 1 (`--optim.microbatch_size`) the device's batch runs in that many sequential pieces whose
gradients are averaged before the one update: the same randomness per example, the activations of one piece.

Shapes: batch leaves are (B, ...) with B the global batch (divisible by the device count); "x0" is
(B, H, W, C) float32, "cond" a dict of (B, ...) arrays or None, "example_id" (B,) int32. The step
adds "step" (B,) int32, the optimiser step (the objectives' tangent warm-up reads it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from flowmap_jax.training import sharding as sh

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
"""`loss_fn(params, teacher, batch, rng) -> (loss scalar, metrics dict of scalars)` (flowmap_jax.core.objectives)."""


@flax.struct.dataclass
class TrainState:
    """Everything the step changes. All leaves are jax arrays (checkpointed as they are).

    step: () int32, optimiser steps taken. params / ema_params: the flow-map network's parameter
    pytree (float32). opt_state: optax state, sharded like params.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


# --------------------------------------------------------------------------------------------------
# Optimiser.

def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant"):
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant, or cosine to 0 at `total_steps`."""
    warmup_steps = max(int(warmup_steps), 0)
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: constant or cosine")
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay on matrices and kernels only, not on biases and norm scales) after
    global-norm clipping. `optim` is a `config.OptimConfig`."""
    schedule = learning_rate_schedule(optim.lr, optim.warmup_steps, total_steps, optim.schedule)
    decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) > 1, params)
    parts = []
    if optim.grad_clip and optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def ema_decay_at(step, decay: float):
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)): early steps are not dominated by
    the initial parameters (TensorFlow's ExponentialMovingAverage with num_updates)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# --------------------------------------------------------------------------------------------------
# Objectives.

def per_example_loss(loss_fn: LossFn) -> Callable:
    """(params, teacher, batch, rng) -> (mean loss, metrics): `loss_fn` on the device's whole batch, each example
    with its own key `fold_in(rng, batch["example_id"][i])` (a (B,) key batch; the objectives draw each example's
    times and noise from its key as if it were alone). One network call sees the whole batch, so every kernel
    (the attention's blocked path above all) is chosen for the real per-device batch, not for a batch of 1."""

    def mean_loss(params, teacher, batch, rng):
        keys = jax.vmap(lambda example_id: jax.random.fold_in(rng, example_id))(batch["example_id"])
        inputs = {k: v for k, v in batch.items() if k != "example_id"}
        return loss_fn(params, teacher, inputs, keys)

    return mean_loss


# --------------------------------------------------------------------------------------------------
# State and step.

def init_state(params, optimizer: optax.GradientTransformation, mesh, specs) -> TrainState:
    """A TrainState with parameters and optimiser state placed on `mesh` with `specs` (a pytree of
    PartitionSpecs matching params; see `sharding.param_specs`). EMA starts equal to params."""
    shardings = state_shardings(params, optimizer, mesh, specs)

    @jax.jit
    def build(params):
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=optimizer.init(params))

    return jax.jit(build, out_shardings=shardings)(params)


def state_shardings(params, optimizer, mesh, specs) -> TrainState:
    """NamedShardings of every TrainState leaf: params, EMA and the optimiser's per-parameter moments
    follow `specs`; scalars (step, counts) are replicated."""
    abstract = jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, ema_params=p, opt_state=optimizer.init(p)),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), params))
    param_shardings = sh.named(mesh, specs)
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract.opt_state, param_shardings,
        transform_non_params=lambda _: sh.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=sh.replicated(mesh), params=param_shardings, ema_params=param_shardings,
                      opt_state=opt_shardings)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh, specs, *,
                    ema_decay: float, state_sharding: TrainState, donate: bool = True, teacher_specs=None,
                    microbatches: int = 1):
    """The jitted step `(state, teacher, batch, rng) -> (state, metrics)`.

    loss_fn: `(params, teacher, batch, rng) -> (loss, metrics)` for a batch (use `objectives.combine_objectives`
    for several objectives). specs: PartitionSpecs of params (`sharding.param_specs`). teacher: any
    pytree (its parameters are jit arguments, never constants), replicated on every device, or, with
    `teacher_specs` (PartitionSpecs of its leaves, `sharding.param_specs(teacher, ...)`), split over the fsdp axis
    like the student and all-gathered inside the step just before the loss. batch:
    dict of (B, ...) arrays sharded with `sharding.batch_sharding(mesh)`, with "example_id".
    rng: the run's base key (typed key); the step folds in `state.step`. state_sharding: from
    `state_shardings`; the new state keeps exactly these shardings, so the step compiles once.
    metrics: replicated float32 scalars: "loss", objective metrics, "grad_norm", "lr" is not included
    (the schedule is known on the host).
    microbatches: each device's batch runs as this many equal microbatches one after another (`jax.lax.scan`),
    their gradients and metrics averaged before the single optimiser update: gradient accumulation inside the
    step, the same update up to float reassociation (each example keeps its own key), with the activation
    memory of one microbatch. The per-device batch must be divisible by it (ValueError at the first call).
    Metrics are the mean of the microbatches' (exact for means, such as "loss"; an RMS metric becomes the
    mean of the microbatches' RMS).
    """
    microbatches = int(microbatches)
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    fsdp_size = mesh.shape[sh.FSDP_AXIS]
    batch_loss = per_example_loss(loss_fn)

    teacher_in_spec = P() if teacher_specs is None else teacher_specs

    def gather(shards, shard_specs):
        def one(x, spec):
            for axis, name in enumerate(spec):
                if name == sh.FSDP_AXIS:
                    return jax.lax.all_gather(x, sh.FSDP_AXIS, axis=axis, tiled=True)
            return x
        return jax.tree.map(one, shards, shard_specs)

    def per_device(param_shards, teacher, batch, step_rng):
        if teacher_specs is not None:
            teacher = gather(teacher, teacher_specs)  # frozen: no gradient flows back through this all-gather

        def local_loss(shards, part):
            return batch_loss(gather(shards, specs), teacher, part, step_rng)

        grad_fn = jax.value_and_grad(local_loss, has_aux=True)
        if microbatches == 1:
            (loss, metrics), grads = grad_fn(param_shards, batch)
        else:
            loss, metrics, grads = _accumulate(grad_fn, param_shards, _split_microbatches(batch, microbatches))

        def average(g, spec):
            if sh.FSDP_AXIS in tuple(spec):  # reduce-scattered (summed) over fsdp already
                return jax.lax.pmean(g, sh.DATA_AXIS) / fsdp_size
            return jax.lax.pmean(g, sh.BATCH_AXES)

        grads = jax.tree.map(average, grads, specs)
        metrics = jax.lax.pmean(dict(metrics, loss=loss), sh.BATCH_AXES)
        return grads, metrics

    per_device = jax.shard_map(per_device, mesh=mesh, in_specs=(specs, teacher_in_spec, sh.BATCH_SPEC, P()),
                               out_specs=(specs, P()), check_vma=False)

    def step(state: TrainState, teacher, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        batch = dict(batch, step=jnp.full(batch["example_id"].shape, state.step, jnp.int32))
        grads, metrics = per_device(state.params, teacher, batch, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
        return TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else (),
                   out_shardings=(state_sharding, sh.replicated(mesh)))


def microbatch_count(per_device_batch: int, microbatch_size: int) -> int:
    """How many microbatches `--optim.microbatch_size` (the most examples a device runs in one pass) makes of a
    per-device batch: one where the batch is no larger (or the size is 0), else batch / size. ValueError when
    the size does not divide a larger per-device batch, naming both."""
    if microbatch_size < 0:
        raise ValueError(f"--optim.microbatch_size must be >= 0, got {microbatch_size}")
    if microbatch_size == 0 or per_device_batch <= microbatch_size:
        return 1
    if per_device_batch % microbatch_size:
        raise ValueError(f"--optim.microbatch_size {microbatch_size} does not divide the per-device batch "
                         f"{per_device_batch}")
    return per_device_batch // microbatch_size


def _split_microbatches(batch, microbatches: int):
    """Every (b, ...) leaf of one device's batch as (microbatches, b / microbatches, ...)."""
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the per-device batch size: {sorted(sizes)}")
    (size,) = sizes
    if size % microbatches:
        raise ValueError(f"the per-device batch {size} is not divisible by microbatches={microbatches} "
                         f"(--optim.microbatch_size)")
    return jax.tree.map(lambda x: x.reshape((microbatches, size // microbatches) + x.shape[1:]), batch)


def _accumulate(grad_fn, param_shards, parts):
    """(loss, metrics, grads): `grad_fn(param_shards, part) -> ((loss, metrics), grads)` over the leading axis of
    `parts` with `jax.lax.scan` (one microbatch's activations live at a time), summed in float32, then averaged."""
    first = jax.tree.map(lambda x: x[0], parts)
    shapes = jax.eval_shape(grad_fn, param_shards, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)

    def body(total, part):
        out = grad_fn(param_shards, part)
        return jax.tree.map(lambda a, b: a + b.astype(a.dtype), total, out), None

    total, _ = jax.lax.scan(body, zeros, parts)
    count = jax.tree.leaves(parts)[0].shape[0]
    ((loss, metrics), grads) = jax.tree.map(lambda x: x / count, total)
    grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, shapes[1])
    return loss, metrics, grads


def check_batch(batch, mesh) -> None:
    """Raise ValueError if the global batch cannot be split evenly over the mesh's devices."""
    n = sh.num_batch_shards(mesh)
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the batch size: {sorted(sizes)}")
    (size,) = sizes
    if size % n:
        raise ValueError(f"global batch size {size} is not divisible by the {n} devices of the mesh")


def replace(state: TrainState, **changes) -> TrainState:
    return dataclasses.replace(state, **changes)
