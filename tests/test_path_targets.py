"""`pairs` with `path_targets`: the teacher's solution path (`samplers.teacher_solve(..., path=True)`) and the
extra targets the objective takes from it. Independent references: the Gaussian closed-form flow, separate
solves to each interior time, and torch_ref."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowmap_jax.core import flow_map as jf
from flowmap_jax.core import objectives as jo
from flowmap_jax.core import samplers, schedules
from flowmap_jax.core import teacher as jt
from flowmap_jax.spec.objective_options import objective_options
from flowmap_jax.spec.schedule import ScheduleConfig
from tests import flow_map_helpers as H
from torch_ref import samplers as ts
from torch_ref import teacher as tt

SD = ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012)
MEAN = np.linspace(-1.0, 1.5, 8).reshape(2, 2, 2).astype(np.float32)
VAR = np.linspace(0.05, 2.0, 8).reshape(2, 2, 2).astype(np.float32)


def _gaussian_teacher():
    params = {"mean": jnp.asarray(MEAN), "var": jnp.asarray(VAR)}
    return jt.Teacher.create(jt.gaussian_teacher_fn(SD, "epsilon"), params, SD, "epsilon")


def _inputs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    x0 = MEAN + np.sqrt(VAR) * rng.standard_normal((n,) + MEAN.shape).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    s = np.array([999.0, 800.0, 500.0, 120.0, 300.0, 40.0], np.float32)[:n]
    t = np.array([-1.0, 400.0, 100.0, 700.0, 300.0, 10.0], np.float32)[:n]  # towards noise, and s = t
    x_s = np.asarray(schedules.add_noise(SD, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(s)))
    return x0, noise, s, t, x_s


def test_path_states_follow_the_exact_flow_and_match_separate_solves():
    """Each interior state of a 48-step log-SNR DPM-Solver++(2M) solve is the Gaussian's exact flow at its
    time (measured: max 6.1e-4 relative to the data scale), and equals a separate k-step solve to that time
    (measured: 2.9e-6; the same grid points, rounded apart). Where s = t every state is x_s exactly. The
    final state is what `teacher_solve` returns without `path`."""
    teacher = _gaussian_teacher()
    _, _, s, t, x_s = _inputs()
    x_s, s, t = jnp.asarray(x_s), jnp.asarray(s), jnp.asarray(t)
    n = 48
    final, times, states = samplers.teacher_solve(teacher, x_s, s, t, n, path=True)
    assert times.shape == (n - 1, 6) and states.shape == (n - 1,) + x_s.shape
    np.testing.assert_array_equal(np.asarray(final), np.asarray(samplers.teacher_solve(teacher, x_s, s, t, n)))
    exact = jnp.stack([jt.gaussian_exact_flow(SD, MEAN, VAR, x_s, s, times[k]) for k in range(n - 1)])
    moving = np.asarray(s != t)
    scale = float(np.max(np.abs(np.asarray(exact))))
    assert float(jnp.max(jnp.abs(states - exact)[:, moving])) / scale < 6e-3
    np.testing.assert_array_equal(np.asarray(states[:, ~moving]), np.broadcast_to(np.asarray(x_s)[~moving],
                                                                                  states[:, ~moving].shape))
    for k in (1, 7, 30):
        alone = samplers.teacher_solve(teacher, x_s, s, times[k - 1], k)
        assert float(jnp.max(jnp.abs(alone - states[k - 1])[moving])) / scale < 3e-5, k


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddim", "heun"])
def test_path_torch_matches_jax(solver):
    """torch_ref's path equals JAX's (times and states). Measured: 1.2e-6 relative."""
    teacher_j = _gaussian_teacher()
    teacher_t = tt.Teacher.create(tt.gaussian_teacher_fn(torch.from_numpy(MEAN), torch.from_numpy(VAR), SD,
                                                         "epsilon"), SD, "epsilon")
    _, _, s, t, x_s = _inputs(seed=1)
    _, times_j, states_j = samplers.teacher_solve(teacher_j, jnp.asarray(x_s), jnp.asarray(s), jnp.asarray(t), 5,
                                                  solver, path=True)
    with torch.no_grad():
        # the Gaussian teacher is elementwise in MEAN's layout: the same array in both backends, no transpose
        _, times_t, states_t = ts.teacher_solve(teacher_t, torch.from_numpy(x_s), torch.from_numpy(s),
                                                torch.from_numpy(t), 5, solver, path=True)
    np.testing.assert_allclose(np.asarray(times_j), times_t.numpy(), rtol=1e-5, atol=1e-3)
    assert H.max_scaled_err(np.asarray(states_j), states_t.numpy()) < 1e-5


def test_pairs_with_path_targets_is_the_mean_over_its_targets():
    """The loss with `path_targets` J at given path indices equals the mean, per example, of the 1 + J squared
    errors (each with its own output-scale weight), the targets taken here by separate solves to the chosen
    interior times, then the mean over the batch. Measured: relative difference 3e-7."""
    teacher = _gaussian_teacher()
    net = H.jax_affine(SD.time_unit)
    params = H.init_affine_params(jax.random.key(2), 8)
    fmap = jf.FlowMap(net, SD, "epsilon")
    x0, noise, s, t, x_s = _inputs(seed=2)
    steps, extra = 6, 2
    index = np.random.default_rng(3).integers(0, steps - 1, (6, extra))
    options = {"teacher_steps": steps, "path_targets": extra, "output_scale_power": 2.0}
    batch = {"x0": jnp.asarray(x0), "noise": jnp.asarray(noise), "cond": None, "t_source": jnp.asarray(s),
             "t_target": jnp.asarray(t), "path_index": jnp.asarray(index)}
    loss, _ = jo.make_objective("pairs", fmap, options)(params, teacher, batch, jax.random.key(0))

    resolved = objective_options("pairs", options)
    x_s, s, t = jnp.asarray(x_s), jnp.asarray(s), jnp.asarray(t)
    times = samplers.solve_grid(SD, s, t, steps, "logsnr")
    per_example = []
    for i in range(6):
        errors = []
        targets_t = [t[i]] + [times[1 + k, i] for k in index[i]]
        for j, t_j in enumerate(targets_t):
            k = steps if j == 0 else 1 + int(index[i][j - 1])
            target = samplers.teacher_solve(teacher, x_s[i:i + 1], s[i], t_j, k)
            err = fmap(params, x_s[i:i + 1], s[i], t_j) - target
            _, c_f = fmap.own_coefficients(s[i], t_j)
            weight = jnp.maximum(jnp.abs(c_f), resolved.output_scale_floor) ** -2.0
            errors.append(float(weight * jnp.mean(jnp.square(err))))
        per_example.append(np.mean(errors))
    assert float(loss) == pytest.approx(float(np.mean(per_example)), rel=1e-4)


def test_path_targets_option_is_checked():
    with pytest.raises(ValueError, match="path_targets must be an integer >= 0"):
        objective_options("pairs", {"path_targets": -1})
    with pytest.raises(ValueError, match="path_targets needs teacher_steps >= 2"):
        objective_options("pairs", {"path_targets": 1, "teacher_steps": 1})
    with pytest.raises(ValueError, match=r"path_index'\] must have shape \(6, path_targets\)"):
        fmap = jf.FlowMap(H.jax_affine(SD.time_unit), SD, "epsilon")
        batch = {"x0": jnp.zeros((6,) + MEAN.shape), "cond": None, "path_index": jnp.zeros((6,), jnp.int32)}
        jo.make_objective("pairs", fmap, {"teacher_steps": 3, "path_targets": 1})(
            H.init_affine_params(jax.random.key(0), 8), _gaussian_teacher(), batch, jax.random.key(0))
