"""Checks that do not lean on the other backend (issue 29): each one compares a backend with a closed form,
with diffusers, or with the same quantity computed a second way here, so a mistake written the same way in
JAX and PyTorch fails it (the JAX-vs-PyTorch parity tests cannot see that).

- the progressive objective's target is a constant for the gradient (both backends): its gradient equals
  that of |X(x, s, t) - target|^2 with the target computed here under stop-gradient / no_grad;
- the `pairs` objective's regression target, read out of the objective itself (a map whose output is a
  free parameter P = 0, so the loss gradient is -2 target / N), equals the configured solver's solution and
  the exact Gaussian flow (both backends);
- the eulerian residual against a finite difference of X along the exact Gaussian flow (both backends);
- the torch sampler's gamma re-noising keeps the exact Gaussian law (the JAX twin's check is in
  test_independent_references.py);
- sampling at guidance scale w feeds the network diffusers' LCM embedding of w - 1 (both backends);
- `schedules.dtheta_dt` against a finite difference of `schedules.angle`, every schedule kind, both backends;
- the torch time-pair sampler's bidirectional swap probability (one half);
- the resume configuration check: MAY_CHANGE as an exact set, each entry with its reason, and a resume that
  changes an objective option exits 2;
- the export's checkpoint reader refuses arrays that keep their sum of squares (negated) or their sum and
  weighted sum (a perturbation orthogonal to both), naming the state folder.
"""

from __future__ import annotations

import functools
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowmap_jax.core import objectives as jo
from flowmap_jax.core import samplers as js
from flowmap_jax.core import schedules
from flowmap_jax.core import teacher as jt
from flowmap_jax.core.flow_map import FlowMap
from flowmap_jax.spec.schedule import ScheduleConfig, schedule_kinds
from flowmap_jax.spec.time_pairs import TimePairConfig
from tests import flow_map_helpers as H
from torch_ref import flow_map as tf
from torch_ref import objectives as to
from torch_ref import samplers as ts_samplers
from torch_ref import schedules as ts
from torch_ref import teacher as tt
from torch_ref import time_pairs as tp_torch

SD = ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012)
MEAN = np.linspace(-1.0, 1.5, 8).reshape(2, 2, 2).astype(np.float32)
VAR = np.linspace(0.05, 2.0, 8).reshape(2, 2, 2).astype(np.float32)
SHAPE = MEAN.shape  # (H, W, C) = (2, 2, 2)
B = 6


def _jax_teacher(schedule=SD):
    return jt.Teacher.create(jt.gaussian_teacher_fn(schedule, "epsilon"),
                             {"mean": jnp.asarray(MEAN), "var": jnp.asarray(VAR)}, schedule, "epsilon")


def _torch_teacher(schedule=SD):
    model = tt.gaussian_teacher_fn(*_mean_nchw(), schedule, "epsilon")  # the torch images are (B, C, H, W)
    return tt.Teacher.create(model, schedule, "epsilon")


def _batch(seed=0, n=B):
    """A deterministic batch (NHWC numpy): x0 from the Gaussian, noise, and times inside the evaluation range."""
    rng = np.random.default_rng(seed)
    x0 = (MEAN + np.sqrt(VAR) * rng.standard_normal((n,) + SHAPE)).astype(np.float32)
    noise = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    s = np.linspace(850.0, 120.0, n).astype(np.float32)
    t = (s * np.linspace(0.1, 0.7, n)).astype(np.float32)
    u = (0.5 * (s + t)).astype(np.float32)
    return {"x0": x0, "noise": noise, "t_source": s, "t_target": t, "t_mid": u}


def _jax(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()} | {"cond": None}


def _torch(batch):
    """NHWC numpy -> torch NCHW for images, (B,) tensors for times."""
    out = {k: torch.from_numpy(v) for k, v in batch.items()}
    for key in ("x0", "noise"):
        out[key] = out[key].permute(0, 3, 1, 2).contiguous()
    return out | {"cond": None}


def _mean_nchw():
    return torch.from_numpy(MEAN).permute(2, 0, 1), torch.from_numpy(VAR).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------
# progressive: the semigroup target is a constant for the gradient.

PROGRESSIVE_PLAIN = {"progressive_anchor_weight": 0.0, "adaptive_weight": False, "output_scale_power": 0.0}


def test_progressive_target_is_a_constant_for_the_gradient_jax():
    """grad of the objective (anchor off, no weighting) = grad of mean |X(x_s, s, t) - T|^2 with
    T = X(X(x_s, s, u), u, t) computed here and passed in as data."""
    module = H.TorchMLP(SHAPE, unit=SD.time_unit, seed=3)
    params = H.mlp_params_to_jax(module)
    fmap = FlowMap(H.jax_mlp(SD.time_unit), SD, "epsilon")
    batch = _jax(_batch())
    loss_fn = jo.make_objective("progressive", fmap, PROGRESSIVE_PLAIN)
    grads = jax.grad(lambda p: loss_fn(p, _jax_teacher(), batch, jax.random.key(0))[0])(params)

    s, t, u = batch["t_source"], batch["t_target"], batch["t_mid"]
    a_s, sig_s = (v[:, None, None, None] for v in schedules.alpha_sigma(SD, s))
    x_s = a_s * batch["x0"] + sig_s * batch["noise"]
    target = fmap(params, fmap(params, x_s, s, u, None), u, t, None)  # plain data below: no path to params
    target = jnp.asarray(np.asarray(target))
    ref = jax.grad(lambda p: jnp.mean(jnp.square(fmap(p, x_s, s, t, None) - target)))(params)
    worst = max(float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
                for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)))
    # Measured: 0 (the same float32 operations; the bound leaves room for XLA reassociating them). Differentiating
    # through the target too changes the gradient by O(1).
    assert worst < 1e-6, worst


def test_progressive_target_is_a_constant_for_the_gradient_torch():
    """The torch objective's gradient against the same loss with the target computed under no_grad."""
    module = H.TorchMLP(SHAPE, unit=SD.time_unit, seed=3)
    fmap = tf.FlowMap(module, SD, "epsilon")
    batch = _torch(_batch())
    loss, _ = to.make_objective("progressive", fmap, PROGRESSIVE_PLAIN)(None, _torch_teacher(), batch, 0)
    grads = torch.autograd.grad(loss, list(module.parameters()))

    s, t, u = batch["t_source"], batch["t_target"], batch["t_mid"]
    a_s, sig_s = (v[:, None, None, None] for v in ts.alpha_sigma(SD, s))
    x_s = a_s * batch["x0"] + sig_s * batch["noise"]
    with torch.no_grad():
        target = fmap(None, fmap(None, x_s, s, u, None), u, t, None)
    ref_loss = (fmap(None, x_s, s, t, None) - target).square().mean()
    ref = torch.autograd.grad(ref_loss, list(module.parameters()))
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-6 * float(ref_loss)
    worst = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref))
    # Measured: 0 (the same operations). Differentiating through the target changes it by O(1).
    assert worst < 1e-5, worst


# ------------------------------------------------------------------------------------------------
# pairs: the regression target, read out of the objective.

class _FreeOutputMap:
    """A duck-typed flow map whose X is the parameter array itself: at P = 0 the pairs loss
    mean |P - target|^2 has gradient -2 target / N (N = number of entries), so -N/2 grad is the target."""

    schedule = SD

    def __call__(self, params, x, t_source, t_target, cond=None):
        return params


PAIRS_OPTIONS = {"teacher_steps": 6, "teacher_solver": "dpmpp_2m", "output_scale_power": 0.0, "adaptive_weight": False}


def test_pairs_objective_target_is_the_configured_solve_and_near_the_exact_flow_jax():
    batch = _jax(_batch(1))
    loss_fn = jo.make_objective("pairs", _FreeOutputMap(), PAIRS_OPTIONS)
    teacher = _jax_teacher()
    zero = jnp.zeros_like(batch["x0"])
    grad = jax.grad(lambda p: loss_fn(p, teacher, batch, jax.random.key(0))[0])(zero)
    target = np.asarray(-0.5 * grad.size * grad, np.float64)

    s, t = batch["t_source"], batch["t_target"]
    a_s, sig_s = (v[:, None, None, None] for v in schedules.alpha_sigma(SD, s))
    x_s = a_s * batch["x0"] + sig_s * batch["noise"]
    solved = np.asarray(js.teacher_solve(teacher, x_s, s, t, 6, "dpmpp_2m"), np.float64)
    exact = np.asarray(jt.gaussian_exact_flow(SD, jnp.asarray(MEAN), jnp.asarray(VAR), x_s, s, t), np.float64)
    to_solved = np.max(np.abs(target - solved)) / np.max(np.abs(solved))
    to_exact = np.sqrt(np.mean((target - exact) ** 2) / np.mean(exact ** 2))
    print(f"pairs target (JAX): vs solver {to_solved:.2e}, vs exact {to_exact:.2e}")
    # Measured: 3.8e-8 against the solver (float32), 2.9e-3 against the exact flow (6 DPM-Solver++ steps).
    assert to_solved < 5e-7, to_solved
    assert to_exact < 3e-2, to_exact


def test_pairs_objective_target_is_the_configured_solve_and_near_the_exact_flow_torch():
    batch = _torch(_batch(1))
    loss_fn = to.make_objective("pairs", _FreeOutputMap(), PAIRS_OPTIONS)
    teacher = _torch_teacher()
    zero = torch.zeros_like(batch["x0"], requires_grad=True)
    loss, _ = loss_fn(zero, teacher, batch, 0)
    (grad,) = torch.autograd.grad(loss, [zero])
    target = (-0.5 * grad.numel() * grad).double().numpy()

    s, t = batch["t_source"], batch["t_target"]
    a_s, sig_s = (v[:, None, None, None] for v in ts.alpha_sigma(SD, s))
    x_s = a_s * batch["x0"] + sig_s * batch["noise"]
    with torch.no_grad():
        solved = ts_samplers.teacher_solve(teacher, x_s, s, t, 6, "dpmpp_2m").double().numpy()
        exact = tt.gaussian_exact_flow(SD, *_mean_nchw(), x_s, s, t).double().numpy()
    to_solved = np.max(np.abs(target - solved)) / np.max(np.abs(solved))
    to_exact = np.sqrt(np.mean((target - exact) ** 2) / np.mean(exact ** 2))
    print(f"pairs target (torch): vs solver {to_solved:.2e}, vs exact {to_exact:.2e}")
    # Measured: as in JAX (3.8e-8, 2.9e-3).
    assert to_solved < 5e-7, to_solved
    assert to_exact < 3e-2, to_exact


# ------------------------------------------------------------------------------------------------
# eulerian: the residual against a finite difference along the exact flow.

EULERIAN_PLAIN = {"residual_form": "direct", "tangent_normalization": False, "output_scale_power": 0.0,
                  "jump_scale_normalization": False, "adaptive_weight": False}
FD_H = 1.0  # teacher units (DDPM: 0..999)


def _fd_residual(x_map, x_s, s, t, exact_flow, angle):
    """d/dtheta_s X(x(s), s, t) along the teacher's ODE, by a central difference: x(s +- h) the exact Gaussian
    flow from x_s, theta's difference from `angle`. Returns per-example RMS, (B,) float64."""
    up, down = s + FD_H, s - FD_H
    diff = x_map(exact_flow(x_s, s, up), up, t) - x_map(exact_flow(x_s, s, down), down, t)
    d_theta = np.asarray(angle(up), np.float64) - np.asarray(angle(down), np.float64)
    r = np.asarray(diff, np.float64) / d_theta[:, None, None, None]
    return np.sqrt(np.mean(r.reshape(r.shape[0], -1) ** 2, axis=1))


def test_eulerian_residual_is_the_derivative_along_the_flow_jax():
    """Per example (vmapped batch of one), the objective's residual RMS equals the central difference of X
    along the exact Gaussian flow per unit angle, for an untrained map (the residual O(1), not ~0)."""
    module = H.TorchMLP(SHAPE, unit=SD.time_unit, seed=5)
    params = H.mlp_params_to_jax(module)
    fmap = FlowMap(H.jax_mlp(SD.time_unit), SD, "epsilon")
    batch = _jax(_batch(2))
    del batch["t_mid"]
    loss_fn = jo.make_objective("eulerian", fmap, EULERIAN_PLAIN)
    teacher = _jax_teacher()

    def one(example):
        example = jax.tree.map(lambda v: v[None], example)
        return loss_fn(params, teacher, dict(example, cond=None), jax.random.key(0))[1]["residual_rms"]

    rms = np.asarray(jax.vmap(one)({k: v for k, v in batch.items() if k != "cond"}), np.float64)
    s, t = batch["t_source"], batch["t_target"]
    a_s, sig_s = (v[:, None, None, None] for v in schedules.alpha_sigma(SD, s))
    x_s = a_s * batch["x0"] + sig_s * batch["noise"]
    mean, var = jnp.asarray(MEAN), jnp.asarray(VAR)
    ref = _fd_residual(lambda x, a, b: fmap(params, x, a, b, None), x_s, s, t,
                       lambda x, a, b: jt.gaussian_exact_flow(SD, mean, var, x, a, b),
                       lambda v: schedules.angle(SD, v))
    err = np.max(np.abs(rms - ref) / ref)
    print(f"eulerian residual (JAX) vs finite difference: {err:.2e}; rms {ref}")
    # Measured: 5.7e-5 (float32 central difference, h = 1), the residual RMS 0.5 to 1.4. A sign or factor
    # error in either term is O(1).
    assert np.all(ref > 0.05), ref
    assert err < 6e-4, err


def test_eulerian_residual_is_the_derivative_along_the_flow_torch():
    module = H.TorchMLP(SHAPE, unit=SD.time_unit, seed=5)
    fmap = tf.FlowMap(module, SD, "epsilon")
    batch = _torch(_batch(2))
    del batch["t_mid"]
    loss_fn = to.make_objective("eulerian", fmap, EULERIAN_PLAIN)
    teacher = _torch_teacher()
    rms = []
    for i in range(B):
        example = {k: (v[i:i + 1] if v is not None else None) for k, v in batch.items()}
        rms.append(float(loss_fn(None, teacher, example, 0)[1]["residual_rms"]))
    rms = np.asarray(rms)
    s, t = batch["t_source"], batch["t_target"]
    a_s, sig_s = (v[:, None, None, None] for v in ts.alpha_sigma(SD, s))
    x_s = a_s * batch["x0"] + sig_s * batch["noise"]
    with torch.no_grad():
        ref = _fd_residual(lambda x, a, b: fmap(None, x, a, b, None).numpy(), x_s, s, t,
                           lambda x, a, b: tt.gaussian_exact_flow(SD, *_mean_nchw(), x, a, b),
                           lambda v: ts.angle(SD, v).numpy())
    err = np.max(np.abs(rms - ref) / ref)
    print(f"eulerian residual (torch) vs finite difference: {err:.2e}")
    # Measured: 5.7e-5, as in JAX.
    assert np.all(ref > 0.05), ref
    assert err < 6e-4, err


# ------------------------------------------------------------------------------------------------
# torch: gamma re-noising keeps the exact law.

def _exact_vp_map(x, s, t):
    """The exact PF-ODE map of N(MEAN, VAR) data on TrigFlow's schedule (alpha = cos(pi t / 2)), float64."""
    a_s, s_s = np.cos(np.pi * s / 2), np.sin(np.pi * s / 2)
    a_t, s_t = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
    return a_t * MEAN + np.sqrt(a_t ** 2 * VAR + s_t ** 2) * (x - a_s * MEAN) / np.sqrt(a_s ** 2 * VAR + s_s ** 2)


class _TorchExactVPMap:
    """Duck-typed torch flow map (schedule + __call__) whose jumps are `_exact_vp_map` in numpy."""

    schedule = ScheduleConfig.vp_cosine()

    def __call__(self, params, x, t_source, t_target, cond=None):
        s, t = float(t_source), float(t_target)
        return torch.from_numpy(_exact_vp_map(x.double().numpy(), s, t).astype(np.float32))


@pytest.mark.parametrize("gamma", [0.3, 0.8])
def test_torch_gamma_renoising_keeps_the_exact_law(gamma):
    """With an exact map, torch's gamma sampling keeps every marginal exact: samples N(MEAN, VAR), and their
    covariance with the starting noise shrinks at each re-noising by sqrt(a_n^2 v + (1 - gamma^2) s_n^2) /
    sqrt(a_n^2 v + s_n^2) (computed here)."""
    n = 20000
    grid = [1.0, 0.75, 0.45, 0.2, 0.0]
    noise = np.random.default_rng(4).standard_normal((n,) + SHAPE).astype(np.float32)
    out = ts_samplers.flow_map_sample(_TorchExactVPMap(), None, torch.from_numpy(noise), grid, gamma=gamma, rng=5)
    out = out.double().numpy()
    mean, var = out.mean(0), out.var(0)
    assert np.all(np.abs(mean - MEAN) < 5 * np.sqrt(VAR / n)), (mean, MEAN)
    assert np.all(np.abs(var - VAR) < 5 * VAR * np.sqrt(2 / (n - 1))), (var, VAR)
    factor = np.ones_like(VAR, dtype=np.float64)
    for t_n in grid[1:-1]:
        a_n, s_n = np.cos(np.pi * t_n / 2), np.sin(np.pi * t_n / 2)
        factor *= np.sqrt(a_n ** 2 * VAR + (1 - gamma ** 2) * s_n ** 2) / np.sqrt(a_n ** 2 * VAR + s_n ** 2)
    cov = np.mean((out - mean) * (noise - noise.mean(0)), axis=0)
    expected = np.sqrt(VAR) * factor
    assert np.all(np.abs(cov - expected) < 5 * np.sqrt(VAR / n) + 1e-3), (cov, expected)
    assert np.all(expected < np.sqrt(VAR) - 0.02)


# ------------------------------------------------------------------------------------------------
# Guidance as an input: sampling at w feeds diffusers' LCM embedding of w - 1.

GUIDANCE_DIM = 32


def _diffusers_embedding(w, batch):
    from diffusers import LatentConsistencyModelPipeline

    scale = torch.tensor(w - 1.0).repeat(batch)  # as LatentConsistencyModelPipeline.__call__ does
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, scale, embedding_dim=GUIDANCE_DIM,
                                                                       dtype=torch.float32).numpy()


def _guided_export_config():
    from flowmap_jax.spec.export_format import FlowMapConfig

    return FlowMapConfig(schedule=SD, prediction_type="epsilon", guidance="cfg", guidance_scale=7.5,
                         guidance_embedding_dim=GUIDANCE_DIM, guidance_scale_range=(2.0, 12.0))


class _Capture:
    """A flow map that records the timestep_cond of each call and returns x unchanged."""

    schedule = SD

    def __init__(self):
        self.seen = []

    def __call__(self, params, x, t_source, t_target, cond=None):
        self.seen.append(np.asarray(cond["timestep_cond"]))
        return x


@pytest.mark.parametrize("w", [3.0, 7.5, 10.25])
def test_jax_sampling_at_w_feeds_diffusers_embedding_of_w_minus_1(w):
    from flowmap_jax import sample as jax_sample

    capture = _Capture()
    loaded = jax_sample.LoadedFlowMap(flow_map=capture, params=None,
                                      export=types.SimpleNamespace(config=_guided_export_config()),
                                      device=jax.devices("cpu")[0], jump=None)
    noise = np.zeros((3,) + SHAPE, np.float32)
    jax_sample.sample(loaded, noise, [999.0, 500.0, 0.0], guidance_scale=w)
    ref = _diffusers_embedding(w, 3)
    assert len(capture.seen) == 2
    err = max(float(np.max(np.abs(seen - ref))) for seen in capture.seen)
    print(f"guidance embedding (JAX) at w = {w}: {err:.2e}")
    # Measured: <= 1.2e-4: sin/cos of float32 arguments 1000 (w - 1) f up to ~9e3, whose spacing is 1e-3
    # (the frequencies rounded differently from torch's). Embedding w instead of w - 1 moves them by O(1).
    assert err < 1.5e-3, err


@pytest.mark.parametrize("w", [3.0, 7.5, 10.25])
def test_torch_sampling_at_w_feeds_diffusers_embedding_of_w_minus_1(w):
    from torch_ref import sample as torch_sample
    from torch_ref.export_loading import TorchFlowMapExport

    capture = _Capture()
    owner = types.SimpleNamespace(config=_guided_export_config(), device=torch.device("cpu"), label_table=None,
                                  folder="in-memory")
    loaded = types.SimpleNamespace(flow_map=capture, device=torch.device("cpu"),
                                   cond=functools.partial(TorchFlowMapExport.cond, owner))
    noise = np.zeros((3,) + SHAPE, np.float32)
    torch_sample.sample(loaded, noise, [999.0, 500.0, 0.0], guidance_scale=w)
    ref = _diffusers_embedding(w, 3)
    assert len(capture.seen) == 2
    err = max(float(np.max(np.abs(seen - ref))) for seen in capture.seen)
    print(f"guidance embedding (torch) at w = {w}: {err:.2e}")
    # Measured: 0 (the same float32 operations as diffusers).
    assert err < 1e-6, err


# ------------------------------------------------------------------------------------------------
# schedules.dtheta_dt against a finite difference of schedules.angle.

SCHEDULES = {
    "ddpm": [ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012), ScheduleConfig.ddpm("linear", 1e-4, 0.02),
             ScheduleConfig.ddpm("squaredcos_cap_v2")],
    "vp_cosine": [ScheduleConfig.vp_cosine()],
    "rectified_flow": [ScheduleConfig.rectified_flow(), ScheduleConfig.rectified_flow(1.0)],
}


def test_every_schedule_kind_has_a_dtheta_dt_case():
    assert set(SCHEDULES) == set(schedule_kinds())


def _fd_points(schedule):
    """Times strictly inside the schedule; for DDPM half-integers with a stencil inside one table interval
    (log alpha is interpolated linearly between integers, so its derivative jumps there)."""
    lo, hi, unit = schedule.t_clean, schedule.t_noise, schedule.time_unit
    if schedule.kind == "ddpm":
        return np.arange(2.5, hi - 1, 37.0), 0.25
    return lo + (hi - lo) * np.linspace(0.02, 0.98, 25), 1e-3 * unit


@pytest.mark.parametrize("case", [(kind, i) for kind, items in SCHEDULES.items() for i in range(len(items))],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_dtheta_dt_is_the_derivative_of_the_angle_both_backends(case):
    schedule = SCHEDULES[case[0]][case[1]]
    t, h = _fd_points(schedule)
    for name, angle, rate in (
            ("jax", lambda v: np.asarray(schedules.angle(schedule, jnp.asarray(v, jnp.float32)), np.float64),
             lambda v: np.asarray(schedules.dtheta_dt(schedule, jnp.asarray(v, jnp.float32)), np.float64)),
            ("torch", lambda v: ts.angle(schedule, torch.as_tensor(v, dtype=torch.float32)).double().numpy(),
             lambda v: ts.dtheta_dt(schedule, torch.as_tensor(v, dtype=torch.float32)).double().numpy())):
        fd = (angle(t + h) - angle(t - h)) / (2 * h)
        err = float(np.max(np.abs(rate(t) - fd) / np.abs(fd)))
        print(f"dtheta_dt {case} {name}: {err:.2e}")
        # Measured: <= 1.4e-3 (DDPM linear; float32 angles differenced over 2h = 0.5 teacher units), 5e-5 for
        # the continuous kinds. A wrong sign of either term is O(1).
        assert err < 1.5e-2, (name, err)


# ------------------------------------------------------------------------------------------------
# torch's time-pair sampler swaps about half of the pairs when bidirectional.

def test_torch_time_pairs_bidirectional_swaps_half():
    n = 20000
    from flowmap_jax.core import time_pairs as tp_jax

    s, t = tp_torch.sample_time_pairs(1, n, SD, TimePairConfig(bidirectional=True), source_range=(0.0, 999.0))
    s, t = s.numpy(), t.numpy()
    swapped = np.mean(s < t)
    # Binomial sd 0.0035 at n = 20000; a pair with s == t (both clean ends) counts as not swapped.
    assert abs(swapped - 0.5) < 0.02, swapped
    assert s.min() >= 0.0
    s1, t1 = tp_torch.sample_time_pairs(1, n, SD, TimePairConfig(bidirectional=False))
    assert np.all(s1.numpy() >= t1.numpy())
    del tp_jax


# ------------------------------------------------------------------------------------------------
# The resume configuration check.

MAY_CHANGE_REASONS = {
    "preset": "informational: the fields the preset set are compared themselves",
    "run.dir": "where the run is: the folder itself",
    "run.steps": "how long: a resume may extend or shorten the run",
    "run.resume": "which checkpoint to resume from",
    "run.log_every": "how often to log",
    "run.sample_every": "how often to draw sample grids",
    "run.checkpoint_every": "how often to save",
    "run.keep_checkpoints": "how many checkpoints to keep",
    "run.async_checkpoints": "how checkpoints are written, not what",
    "run.progress_bar": "what the terminal shows",
    "run.export": "whether an export is written at the end",
    "run.quality_samples": "evaluation only",
    "run.compilation_cache": "a compile-time cache: the same functions",
    "run.allow_config_change": "the switch that accepts changes",
    "model.remat": "memory only: the same function",
    "mesh.data": "checkpoints restore onto any mesh; the global batch is fixed",
    "mesh.fsdp": "checkpoints restore onto any mesh",
    "mesh.fsdp_min_size": "how parameters are sharded, not their values",
    "distributed.coordinator_address": "where the processes meet",
    "distributed.num_processes": "how many processes run it",
    "distributed.process_id": "which process this is",
    "distributed.auto": "how the processes find each other",
    "sample.jumps": "evaluation only",
    "sample.teacher_steps": "evaluation only",
    "sample.grid_columns": "evaluation only",
    "sample.spacing": "evaluation only",
}


def test_may_change_is_exactly_the_listed_fields_each_with_a_reason():
    from flowmap_jax.training import run_config_check

    assert set(run_config_check.MAY_CHANGE) == set(MAY_CHANGE_REASONS), (
        sorted(set(run_config_check.MAY_CHANGE) ^ set(MAY_CHANGE_REASONS)))
    assert all(reason for reason in MAY_CHANGE_REASONS.values())


@pytest.mark.parametrize("options, field", [
    ({"teacher_steps": 5}, "objective.options.teacher_steps"),
    ({"time_pairs": {"length_power": 2.0}}, "objective.options.time_pairs.length_power"),
])
def test_resume_that_changes_an_objective_option_exits_2(tmp_path, capsys, options, field):
    """Through `train.main` (the trainer's entry point): config.json of a first start and a checkpoint step
    folder; a start with one objective option changed is refused (exit 2) before anything is built, naming
    the field. The same options again pass the check (they reach the stand-in build)."""
    from flowmap_jax import train
    from flowmap_jax.cli import cli_exit
    from flowmap_jax.training import train_cli
    from tests import train_support

    run_dir = tmp_path / "run"
    flags = ["--run.dir", str(run_dir), "--run.steps", "4", "--run.quality_samples", "0", "--run.export", "false"]
    config = train_cli.parse_args(train_support.STANDIN_FLAGS + flags)
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def never_built(config, mesh):
        raise AssertionError("the configuration check must refuse the resume before the parts are built")

    code = train.main(train_support.STANDIN_FLAGS + flags + ["--objective.options", json.dumps(options)],
                      build=never_built)
    err = capsys.readouterr().err
    assert code == cli_exit.USAGE == 2, err[-2000:]
    assert "was started with another configuration" in err and field in err, err[-2000:]
    assert "Traceback" not in err
    assert os.path.isdir(run_dir / "checkpoints" / "2")


# ------------------------------------------------------------------------------------------------
# The export's checkpoint reader: corruptions that keep one of the sums.

def _orthogonal_bump(x):
    """A perturbation of x (numpy) with the same sum and position-weighted sum and a sum of squares about
    doubled: a direction orthogonal to ones and to the position weights, scaled to |x|."""
    from flowmap_jax.training import run_record

    weights = np.asarray(run_record._position_weights(x.shape), np.float64).ravel()
    v = np.random.default_rng(0).standard_normal(x.size)
    basis = np.stack([np.ones(x.size), weights])
    q, _ = np.linalg.qr(basis.T)
    v = v - q @ (q.T @ v)
    v *= np.linalg.norm(x) / np.linalg.norm(v)
    return (x.astype(np.float64) + v.reshape(x.shape)).astype(np.float32)


@pytest.mark.parametrize("damage", ["negated", "orthogonal_bump"])
def test_export_reader_refuses_arrays_that_keep_one_of_the_sums(tmp_path, damage):
    """Step 3's state replaced by that of a checkpoint whose kernels are negated (same sum of squares) or bumped
    orthogonally to ones and the position weights (same sum and weighted sum): read_checkpoint_params (the
    export's reader) refuses step 3 naming its state folder, and falls back to step 2."""
    import shutil

    from flowmap_jax.training import checkpointing
    from flowmap_jax.training import sharding as sh
    from tests.test_run_record import _save

    def corrupt(x):
        x = np.asarray(x)
        if x.ndim < 2:  # biases (zeros) and scalars: left alone
            return x
        return -x if damage == "negated" else _orthogonal_bump(x)

    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save(tmp_path / "run", mesh, {2: lambda x: x + 0.5, 3: lambda x: x})
    _save(tmp_path / "other", mesh, {3: corrupt})
    shutil.rmtree(tmp_path / "run" / "3" / "state")
    shutil.copytree(tmp_path / "other" / "3" / "state", tmp_path / "run" / "3" / "state")
    state_dir = str(tmp_path / "run" / "3" / "state")
    with pytest.raises(checkpointing.CheckpointError, match="do not match the fingerprint") as caught:
        checkpointing.read_checkpoint_params(tmp_path / "run", "ema", step=3)
    assert state_dir in str(caught.value), str(caught.value)
    said = []
    assert checkpointing.read_checkpoint_params(tmp_path / "run", "ema", say=said.append).step == 2
    assert "checkpoint at step 3 is unusable" in said[0]


# ------------------------------------------------------------------------------------------------
# torch's Heun against the exact Gaussian flow (its own order, not the JAX twin's numbers).

def test_torch_heun_converges_at_second_order_to_the_exact_flow():
    """torch `teacher_sample(..., "heun")` from t = 999 to 50 on the Gaussian teacher: the error against the
    exact flow (torch_ref.teacher.gaussian_exact_flow, a closed form) quarters as the steps double."""
    teacher = _torch_teacher()
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((8, 2, 2, 2)).astype(np.float32))
    with torch.no_grad():
        exact = tt.gaussian_exact_flow(SD, *_mean_nchw(), x.double(), torch.full((8,), 999.0, dtype=torch.float64),
                                       torch.full((8,), 50.0, dtype=torch.float64)).numpy()
        errors = []
        for n in (32, 64):
            out = ts_samplers.teacher_sample(teacher, x, np.linspace(999.0, 50.0, n + 1), "heun").double().numpy()
            errors.append(float(np.sqrt(np.mean((out - exact) ** 2))))
    order = math.log2(errors[0] / errors[1])
    print(f"torch heun errors {errors}, order {order:.2f}")
    # Measured: see the printout; second order means ~2 (weight 1 on the corrector makes it first order).
    assert 1.7 < order < 2.6, errors
