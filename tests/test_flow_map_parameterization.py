"""The flow map's own parameterisation against closed forms written here in float64 numpy (not through
`FlowMap`): the coefficients of "angle" and "linear", their bounds, the exact Gaussian flow map written in
each form and sampled in one jump from the noise end (alpha = 0 included: VP cosine at T, rectified flow at
T), both backends, and format-1 ("teacher_step") exports."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowmap_jax.core import flow_map as jf
from flowmap_jax.core import samplers as js
from flowmap_jax.spec.schedule import ScheduleConfig
from torch_ref import flow_map as tf
from torch_ref import samplers as ts

SCHEDULES = {
    "ddpm_linear": ScheduleConfig.ddpm(),
    "sd": ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012),
    "cosine": ScheduleConfig.vp_cosine(),  # alpha = 0 at T
    "rectified": ScheduleConfig.rectified_flow(1000.0),
}
MEAN, VAR = 0.7, 0.3  # Gaussian data N(MEAN, VAR) per coordinate


def _alpha_sigma64(schedule, t):
    """float64 (alpha, sigma), written from the schedule's definition (docs/DESIGN.md, "Time")."""
    t = np.asarray(t, np.float64)
    if schedule.kind == "ddpm":
        log_ac = np.concatenate([[0.0], np.log(np.cumprod(1.0 - schedule.betas))])  # entry k is t = k - 1
        log_alpha = 0.5 * np.interp(t + 1.0, np.arange(log_ac.size), log_ac)
        return np.exp(log_alpha), np.sqrt(-np.expm1(2 * log_alpha))
    if schedule.kind == "vp_cosine":
        return np.maximum(np.cos(np.pi / 2 * t / schedule.time_scale), 0.0), np.sin(np.pi / 2 * t / schedule.time_scale)
    tau = t / schedule.time_scale
    return 1.0 - tau, tau


def _coefficients64(schedule, s, t):
    if schedule.kind == "rectified_flow":
        return np.ones_like(s), (t - s) / schedule.time_scale
    a_s, s_s = _alpha_sigma64(schedule, s)
    a_t, s_t = _alpha_sigma64(schedule, t)
    delta = np.arctan2(s_s, a_s) - np.arctan2(s_t, a_t)
    return np.cos(delta), -np.sin(delta)


def _exact64(schedule, x, s, t):
    """The exact PF-ODE flow map of N(MEAN, VAR): x_t = alpha_t MEAN + std_t z, z preserved."""
    a_s, s_s = _alpha_sigma64(schedule, s)
    a_t, s_t = _alpha_sigma64(schedule, t)
    z = (x - a_s[:, None] * MEAN) / np.sqrt(a_s ** 2 * VAR + s_s ** 2)[:, None]
    return a_t[:, None] * MEAN + np.sqrt(a_t ** 2 * VAR + s_t ** 2)[:, None] * z


def _exact_output64(schedule, x, s, t):
    """F that makes the map exact: X = c_x x + c_F F with the numpy coefficients (c_F != 0)."""
    c_x, c_f = _coefficients64(schedule, s, t)
    return (_exact64(schedule, x, s, t) - c_x[:, None] * x) / c_f[:, None]


def _pairs(schedule, n=64, seed=0):
    rng = np.random.default_rng(seed)
    lo, hi = schedule.t_clean, schedule.t_noise
    s, t = rng.uniform(lo, hi, n), rng.uniform(lo, hi, n)
    s[:4], t[:4] = hi, lo  # the one-jump sampler's jump, noise end to clean
    t[4:8] = s[4:8]  # identity jumps
    return s, t


@pytest.mark.parametrize("name", SCHEDULES)
def test_coefficients_match_the_closed_form_and_stay_bounded(name):
    """c_x, c_F of both backends against float64 cos/sin of the angle difference (or the rectified
    flow's 1, t - s): measured max error ~5e-7 (float32 angles); bounded by 1 everywhere."""
    schedule = SCHEDULES[name]
    s, t = _pairs(schedule, 512)
    want_x, want_f = _coefficients64(schedule, s, t)
    fmap_j = jf.FlowMap(lambda *a: None, schedule, "epsilon")
    fmap_t = tf.FlowMap(torch.nn.Identity(), schedule, "epsilon")
    assert fmap_j.parameterization == fmap_t.parameterization == ("linear" if name == "rectified" else "angle")
    got_j = [np.asarray(c, np.float64) for c in fmap_j.coefficients(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))]
    got_t = [c.double().numpy() for c in fmap_t.coefficients(torch.tensor(s, dtype=torch.float32),
                                                               torch.tensor(t, dtype=torch.float32))]
    for got in (got_j, got_t):
        np.testing.assert_allclose(got[0], want_x, atol=5e-6)
        np.testing.assert_allclose(got[1], want_f, atol=5e-6)
        assert np.all(np.abs(got[0]) <= 1.0 + 1e-6) and np.all(np.abs(got[1]) <= 1.0 + 1e-6)
        np.testing.assert_array_equal(got[0][4:8], 1.0)  # X(x, s, s) = x exactly
        np.testing.assert_array_equal(got[1][4:8], 0.0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_exact_gaussian_map_in_one_jump_both_backends(name):
    """A network that outputs the exact map's F (numpy, float64) makes X the exact flow map: one jump
    from the noise end to clean data (alpha = 0 at the start for the cosine and rectified schedules, which
    an epsilon-form map cannot take) gives N(MEAN, VAR) samples, in JAX and PyTorch; inversion (clean ->
    noise) too. Measured max error vs the float64 map ~2e-6."""
    schedule = SCHEDULES[name]
    s, t = _pairs(schedule, 64)
    keep = s != t
    s, t = s[keep], t[keep]
    x = np.random.default_rng(1).normal(size=(s.size, 6))
    f = _exact_output64(schedule, x, s, t)

    fmap_j = jf.FlowMap(lambda p, xx, ss, tt, c: jnp.asarray(f, jnp.float32), schedule, "epsilon")
    got_j = np.asarray(fmap_j(None, jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)))

    class Exact(torch.nn.Module):
        def forward(self, xx, ss, tt, cond=None):
            return torch.tensor(f, dtype=torch.float32)

    fmap_t = tf.FlowMap(Exact(), schedule, "epsilon")
    got_t = fmap_t(None, torch.tensor(x, dtype=torch.float32), torch.tensor(s, dtype=torch.float32),
                   torch.tensor(t, dtype=torch.float32)).numpy()
    want = _exact64(schedule, x, s, t)
    scale = np.maximum(1.0, np.abs(want))
    assert np.max(np.abs(got_j - want) / scale) < 2e-5
    assert np.max(np.abs(got_t - want) / scale) < 2e-5


@pytest.mark.parametrize("name", ["cosine", "rectified", "sd"])
def test_one_jump_sampler_draws_the_data_distribution(name):
    """`flow_map_sample` with one jump of the exact map, from pure noise at the noise end (alpha = 0 for
    cosine and rectified flow), in both backends: the samples' mean and variance are the data's to Monte
    Carlo error (4096 samples x 8 coordinates: 5 standard errors)."""
    schedule = SCHEDULES[name]
    n, d = 4096, 8
    a_T, s_T = _alpha_sigma64(schedule, np.array([schedule.t_noise]))
    x_T = a_T * MEAN + np.sqrt(a_T ** 2 * VAR + s_T ** 2) * np.random.default_rng(2).normal(size=(n, d))
    s, t = np.full(n, schedule.t_noise), np.full(n, schedule.t_clean)
    f = _exact_output64(schedule, x_T, s, t)
    grid = np.array([schedule.t_noise, schedule.t_clean])
    out_j = np.asarray(js.flow_map_sample(jf.FlowMap(lambda *a: jnp.asarray(f, jnp.float32), schedule, "epsilon"),
                                          None, jnp.asarray(x_T, jnp.float32), grid))

    class Exact(torch.nn.Module):
        def forward(self, xx, ss, tt, cond=None):
            return torch.tensor(f, dtype=torch.float32)

    out_t = ts.flow_map_sample(tf.FlowMap(Exact(), schedule, "epsilon"), None, torch.tensor(x_T, dtype=torch.float32),
                               grid).numpy()
    for out in (out_j, out_t):
        assert abs(out.mean() - MEAN) < 5 * np.sqrt(VAR / out.size)
        assert abs(out.var() / VAR - 1) < 5 * np.sqrt(2 / out.size)


def test_parameterization_names_are_checked():
    """A parameterisation that does not fit the schedule is refused, naming both."""
    with pytest.raises(ValueError, match="'angle' needs a VP schedule"):
        jf.FlowMap(lambda *a: None, SCHEDULES["rectified"], "flow", parameterization="angle")
    with pytest.raises(ValueError, match="'linear' is for rectified flow"):
        tf.FlowMap(torch.nn.Identity(), SCHEDULES["sd"], "epsilon", parameterization="linear")
    with pytest.raises(ValueError, match="unknown flow-map parameterization 'trig'"):
        jf.FlowMap(lambda *a: None, SCHEDULES["sd"], "epsilon", parameterization="trig")


def test_teacher_blend_interpolates_the_coefficients():
    """teacher_blend b: coefficients (1 - b) own + b teacher's DDIM step (epsilon: alpha_t / alpha_s and
    sigma_t - sigma_s alpha_t / alpha_s, written here in numpy)."""
    schedule = SCHEDULES["sd"]
    s, t = np.array([999.0, 500.0, 10.0]), np.array([-1.0, 200.0, 300.0])
    a_s, s_s = _alpha_sigma64(schedule, s)
    a_t, s_t = _alpha_sigma64(schedule, t)
    teacher = (a_t / a_s, s_t - s_s * a_t / a_s)
    own = _coefficients64(schedule, s, t)
    for b in (0.0, 0.25, 1.0):
        got = jf.FlowMap(lambda *a: None, schedule, "epsilon").with_teacher_blend(b).coefficients(
            jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
        for k in range(2):
            np.testing.assert_allclose(np.asarray(got[k]), (1 - b) * own[k] + b * teacher[k], rtol=2e-5, atol=2e-6)
