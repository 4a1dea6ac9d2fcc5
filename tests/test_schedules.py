"""Schedules and the time convention, both backends, against diffusers' schedulers running live and
against closed forms (fp32 CPU). See flowmap_jax/spec/schedule.py for the convention under test."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from flowmap_jax.core import schedules as js
from flowmap_jax.spec.objective_options import ObjectiveOptions
from flowmap_jax.spec.schedule import (
    ScheduleConfig,
    load_scheduler,
    prediction_type_from_diffusers,
)
from flowmap_jax.spec.time_grid import time_grid
from flowmap_jax.spec.time_pairs import TimePairConfig
from torch_ref import schedules as ts

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DDPM_CASES = {"linear": {}, "scaled_linear": SD, "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2")}
ALL = [ScheduleConfig.ddpm(), ScheduleConfig.ddpm(**SD), ScheduleConfig.ddpm("squaredcos_cap_v2"),
       ScheduleConfig.vp_cosine(), ScheduleConfig.vp_cosine(time_scale=1000.0, cosine_s=0.008, t_max=994.6),
       ScheduleConfig.rectified_flow(), ScheduleConfig.rectified_flow(1000.0)]


def _schedule_id(schedule):
    """kind-field-field...: each class has its own fields."""
    return "-".join([schedule.kind] + [str(v) for k, v in dataclasses.asdict(schedule).items() if k != "trained_betas"])


@pytest.mark.parametrize("case", sorted(DDPM_CASES))
def test_ddpm_alphas_match_diffusers(case):
    """alpha_t^2 = diffusers' alphas_cumprod[t] at every integer t, in both backends; t = -1 is clean."""
    reference = DDIMScheduler(**DDPM_CASES[case])
    schedule = ScheduleConfig.from_diffusers(dict(reference.config))
    ac = reference.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(schedule.alphas_cumprod, ac, rtol=2e-5)
    t = np.arange(-1, 1000, dtype=np.float32)
    for alpha, sigma in (js.alpha_sigma(schedule, jnp.asarray(t)), ts.alpha_sigma(schedule, torch.from_numpy(t))):
        alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
        assert alpha[0] == 1.0 and sigma[0] == 0.0
        np.testing.assert_allclose(alpha[1:] ** 2, ac, rtol=3e-5)
        # sigma^2 = 1 - alphas_cumprod, to float32 accuracy of the (small) difference.
        np.testing.assert_allclose(sigma[1:] ** 2, 1.0 - ac, rtol=3e-4, atol=1e-7)


def test_ddpm_log_alpha_piecewise_linear():
    schedule = ScheduleConfig.ddpm(**SD)
    t = jnp.asarray([-0.75, -0.5, 10.25, 500.5, 998.9])
    alpha, _ = js.alpha_sigma(schedule, t)
    table = schedule.log_alpha_table
    lo = np.floor(np.asarray(t)).astype(int)
    frac = np.asarray(t) - lo
    expected = table[lo + 1] + frac * (table[lo + 2] - table[lo + 1])
    np.testing.assert_allclose(np.log(np.asarray(alpha)), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: _schedule_id(s))
def test_derivatives_match_autodiff_and_torch(schedule):
    """Explicit d alpha/dt, d sigma/dt = jax.jvp of alpha_sigma = torch; alpha^2 + sigma^2 = 1 for VP."""
    lo, hi = schedule.t_clean, schedule.t_noise
    t = np.linspace(lo + 0.013 * (hi - lo), hi - 0.011 * (hi - lo), 37).astype(np.float32)
    d_alpha, d_sigma = js.alpha_sigma_derivatives(schedule, jnp.asarray(t))
    _, (ja, jsig) = jax.jvp(lambda x: js.alpha_sigma(schedule, x), (jnp.asarray(t),), (jnp.ones_like(jnp.asarray(t)),))
    np.testing.assert_allclose(d_alpha, ja, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(d_sigma, jsig, rtol=1e-4, atol=1e-9)
    ta, tsig = ts.alpha_sigma_derivatives(schedule, torch.from_numpy(t))
    np.testing.assert_allclose(ta.numpy(), d_alpha, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(tsig.numpy(), d_sigma, rtol=1e-5, atol=1e-9)
    alpha, sigma = js.alpha_sigma(schedule, jnp.asarray(t))
    t_alpha, t_sigma = ts.alpha_sigma(schedule, torch.from_numpy(t))
    np.testing.assert_allclose(t_alpha.numpy(), alpha, rtol=1e-5)
    np.testing.assert_allclose(t_sigma.numpy(), sigma, rtol=1e-5)
    if schedule.kind != "rectified_flow":
        np.testing.assert_allclose(np.asarray(alpha) ** 2 + np.asarray(sigma) ** 2, 1.0, atol=2e-6)
    if schedule.kind == "ddpm":  # piecewise linear log(alpha): the slope of t's segment, in numpy float64
        table = schedule.log_alpha_table
        k = np.floor(t.astype(np.float64)).astype(int) + 1
        slope = table[k + 1] - table[k]
        alpha64 = np.exp(table[k] + (t - k + 1) * slope)
        np.testing.assert_allclose(d_alpha, alpha64 * slope, rtol=1e-4)
        np.testing.assert_allclose(d_sigma, -alpha64 ** 2 * slope / np.sqrt(1 - alpha64 ** 2), rtol=2e-3)
    else:  # central differences of the closed forms
        h = 1e-3 * (hi - lo)
        a_p, s_p = js.alpha_sigma(schedule, jnp.asarray(t + h))
        a_m, s_m = js.alpha_sigma(schedule, jnp.asarray(t - h))
        for plus, minus, exact in ((a_p, a_m, d_alpha), (s_p, s_m, d_sigma)):
            fd = (np.asarray(plus, np.float64) - np.asarray(minus, np.float64)) / (2 * h)
            np.testing.assert_allclose(fd, exact, atol=2e-3 * np.max(np.abs(np.asarray(exact))))


def test_continuous_closed_forms():
    t = np.linspace(0.0, 1.0, 11).astype(np.float32)
    a, s = js.alpha_sigma(ScheduleConfig.vp_cosine(), jnp.asarray(t))
    np.testing.assert_allclose(a, np.cos(np.pi * t / 2), atol=1e-6)
    np.testing.assert_allclose(s, np.sin(np.pi * t / 2), atol=1e-6)
    a, s = ts.alpha_sigma(ScheduleConfig.rectified_flow(1000.0), torch.from_numpy(1000 * t))
    np.testing.assert_allclose(a.numpy(), 1 - t, atol=1e-6)
    np.testing.assert_allclose(s.numpy(), t, atol=1e-6)
    # iDDPM cosine with s = 0.008: alpha^2 = cos^2((tau+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2).
    sched = ScheduleConfig.vp_cosine(cosine_s=0.008, t_max=0.9946)
    a, _ = js.alpha_sigma(sched, jnp.asarray(t[:-1]))
    f = lambda x: np.cos((x + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.asarray(a) ** 2, f(t[:-1]) / f(0.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: _schedule_id(s))
def test_time_from_rho_inverts(schedule):
    lo, hi = schedule.t_clean, schedule.t_noise
    t = np.linspace(lo, hi, 23).astype(np.float32)
    a, s = js.alpha_sigma(schedule, jnp.asarray(t))
    back = js.time_from_rho(schedule, s / a)
    np.testing.assert_allclose(back, t, atol=2e-4 * (hi - lo))
    a_t, s_t = ts.alpha_sigma(schedule, torch.from_numpy(t))
    np.testing.assert_allclose(ts.time_from_rho(schedule, s_t / a_t).numpy(), t, atol=2e-4 * (hi - lo))


def test_from_diffusers_configs(tmp_path):
    """Configs as diffusers writes them: DDIM/DDPM/DPM-Solver, FlowMatch, json file and folder."""
    ddim = DDIMScheduler(**SD, prediction_type="v_prediction", steps_offset=1, clip_sample=False)
    ddim.save_config(tmp_path)
    schedule, prediction_type = load_scheduler(tmp_path)
    assert prediction_type == "v_prediction"
    assert schedule == ScheduleConfig.ddpm(**SD)
    assert ScheduleConfig.from_json_file(tmp_path / "scheduler_config.json") == schedule
    assert hash(schedule) == hash(ScheduleConfig.ddpm(**SD))  # static jit argument
    for cls in (DDPMScheduler, DPMSolverMultistepScheduler):
        config = dict(cls(beta_schedule="squaredcos_cap_v2").config)
        assert ScheduleConfig.from_diffusers(config).beta_schedule == "squaredcos_cap_v2"
        assert prediction_type_from_diffusers(config) == "epsilon"
    flow = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert ScheduleConfig.from_diffusers(flow) == ScheduleConfig.rectified_flow(1000.0)
    assert prediction_type_from_diffusers(flow) == "flow"
    betas = DDPMScheduler(**SD).betas.numpy()
    trained = ScheduleConfig.from_diffusers({"trained_betas": betas.tolist(), "num_train_timesteps": 1000})
    np.testing.assert_allclose(trained.alphas_cumprod, DDPMScheduler(**SD).alphas_cumprod.numpy(), rtol=2e-5)


@pytest.mark.parametrize("config, match", [
    ({"beta_schedule": "sigmoid"}, "'beta_schedule'='sigmoid'"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"prediction_type": "velocity"}, "'prediction_type'='velocity'"),
    ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}, "trained_betas has 2 entries"),
])
def test_bad_scheduler_configs(config, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig.from_diffusers(config)


def test_bad_schedule_values():
    with pytest.raises(ValueError, match="unknown schedule kind 'vp'"):
        ScheduleConfig.from_dict({"kind": "vp"})
    with pytest.raises(ValueError, match="unsupported beta_schedule 'cosine'"):
        ScheduleConfig.ddpm("cosine")
    with pytest.raises(ValueError, match="t_max"):
        ScheduleConfig.vp_cosine(t_max=2.0)
    schedule = ScheduleConfig.ddpm()
    for check in (js.check_times, ts.check_times):
        with pytest.raises(ValueError, match=r"t_source=1000\.0 is outside .*\[-1\.0, 999\.0\]"):
            check(schedule, np.array([3.0, 1000.0]), "t_source")
        with pytest.raises(ValueError, match=r"t=-1\.5"):
            check(schedule, -1.5)
        with pytest.raises(ValueError, match=r"t=nan"):
            check(schedule, float("nan"))
        check(schedule, np.array([-1.0, 999.0]))


def test_time_grid_and_options():
    schedule = ScheduleConfig.ddpm()
    np.testing.assert_array_equal(time_grid(schedule, 4), [999, 749, 499, 249, -1])
    np.testing.assert_array_equal(time_grid(ScheduleConfig.rectified_flow(), 2), [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        time_grid(schedule, 0)
    with pytest.raises(ValueError, match="time_grid end=1500"):
        time_grid(schedule, 2, t_start=1500)
    with pytest.raises(ValueError, match=r"unknown objective option\(s\) \['tangent_norm'\]"):
        ObjectiveOptions.create({"tangent_norm": True})
    assert ObjectiveOptions.create(json.loads('{"time_pairs": {"p_clean": 0.5}}')).time_pairs == TimePairConfig(p_clean=0.5)
    with pytest.raises(ValueError, match="unknown teacher_solver 'rk4'"):
        ObjectiveOptions(teacher_solver="rk4")
    assert math.isclose(schedule.time_unit, 1000.0)


def test_time_grid_logsnr_spacing():
    """Interior times uniform in log(sigma / alpha), computed here from diffusers' own alphas_cumprod."""
    from diffusers import DDPMScheduler

    for betas in ({"beta_schedule": "linear"},
                  {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}):
        abar = DDPMScheduler(num_train_timesteps=1000, **betas).alphas_cumprod.double().numpy()
        log_rho = 0.5 * np.log((1 - abar) / abar)  # at t = 0 .. 999
        schedule = ScheduleConfig.ddpm(**betas)
        for n in (2, 4, 8):
            grid = time_grid(schedule, n, spacing="logsnr")
            assert grid[0] == 999 and grid[-1] == -1 and np.all(np.diff(grid) < 0)
            inner = np.interp(grid[1:-1], np.arange(1000), log_rho)
            expected = np.linspace(log_rho[-1], log_rho[0], n + 1)[1:-1]
            np.testing.assert_allclose(inner, expected, atol=5e-3)  # interpolation: log alpha vs log rho
        up = time_grid(schedule, 3, t_start=-1, t_end=999, spacing="logsnr")  # towards noise: the same times
        np.testing.assert_allclose(up[::-1], time_grid(schedule, 3, spacing="logsnr"))
    np.testing.assert_array_equal(time_grid(ScheduleConfig.ddpm(), 1, spacing="logsnr"), [999, -1])
    cosine = time_grid(ScheduleConfig.vp_cosine(t_max=0.99), 2, spacing="logsnr")
    assert 0.0 < cosine[1] < 0.99 and cosine[-1] == 0.0
    with pytest.raises(ValueError, match="needs a finite"):
        time_grid(ScheduleConfig.rectified_flow(), 2, spacing="logsnr")
    with pytest.raises(ValueError, match="unknown grid spacing 'karras'"):
        time_grid(ScheduleConfig.ddpm(), 2, spacing="karras")


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: _schedule_id(s))
def test_numpy_alpha_sigma_matches_the_backends_and_diffusers(schedule):
    """spec.schedule.alpha_sigma (float64 numpy, used for time grids without jax) against the JAX and torch
    float32 twins at random times, and against diffusers' alphas_cumprod at the integer DDPM steps."""
    from flowmap_jax.spec.schedule import alpha_sigma as np_alpha_sigma

    t = np.random.default_rng(0).uniform(schedule.t_clean, schedule.t_noise, 257)
    alpha, sigma = np_alpha_sigma(schedule, t)
    assert alpha.dtype == np.float64 and alpha.shape == t.shape
    for backend in (js.alpha_sigma(schedule, t), ts.alpha_sigma(schedule, torch.as_tensor(t, dtype=torch.float32))):
        # float32 twins: measured max |difference| 2.5e-6 over these schedules and times
        np.testing.assert_allclose(np.asarray(backend[0], np.float64), alpha, atol=1e-5)
        np.testing.assert_allclose(np.asarray(backend[1], np.float64), sigma, atol=1e-5)
    if schedule.kind == "ddpm":
        reference = DDPMScheduler(beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start,
                                  beta_end=schedule.beta_end)
        abar = reference.alphas_cumprod.double().numpy()
        steps = np.arange(schedule.num_train_timesteps)
        # diffusers accumulates its cumprod in float32: measured max relative difference 1.3e-5 (cosine, t = 999)
        np.testing.assert_allclose(np_alpha_sigma(schedule, steps)[0] ** 2, abar, rtol=1e-4)
        np.testing.assert_array_equal(np_alpha_sigma(schedule, -1.0), (1.0, 0.0))


def test_logsnr_grid_refuses_vp_cosine_up_to_alpha_zero():
    """VP cosine without t_max reaches alpha = cos(pi/2) ~ 6e-17 in float64, not 0, so log(sigma / alpha) looked
    finite and the log-SNR grid put most steps within 1e-4 of T (10 steps: 7 in [999.89, 1000]; Heun then had
    a relative RMS error of 2.5 on the mixture data at 10 steps, 0.35 at 25). As documented, that spacing is
    refused there (use "uniform" or give t_max)."""
    with pytest.raises(ValueError, match="grid spacing 'logsnr' needs a finite.*use spacing 'uniform'"):
        time_grid(ScheduleConfig.vp_cosine(time_scale=1000.0), 10, spacing="logsnr")
    assert time_grid(ScheduleConfig.vp_cosine(t_max=0.99), 10, spacing="logsnr")[0] == 0.99  # alpha > 0: kept
