"""One schedule class per kind (`flowmap_jax.spec.schedule`): the registry and its errors, the serialized
form (unchanged since format version 1), each class against diffusers' schedulers, the diffusers mapping
both ways, and that nothing in the package branches on a kind's name. A toy kind registered here runs
through both backends untouched: adding a kind is its class, one import line, and its tests."""

import ast
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from flowmap_jax.core import schedules as js
from flowmap_jax.spec import schedule as spec_schedule
from flowmap_jax.spec.export_format import schedule_from_json, schedule_to_json
from flowmap_jax.spec.parameterization import PARAMETERIZATIONS, resolve_parameterization
from flowmap_jax.spec.schedule import (
    NUMPY_OPS,
    SCHEDULE_KINDS,
    ArrayOps,
    DDPMSchedule,
    RectifiedFlowSchedule,
    ScheduleConfig,
    VPCosineSchedule,
    register_schedule,
    schedule_class,
    schedule_fields,
)
from flowmap_jax.spec.schedule.base import _REGISTRY
from flowmap_jax.spec.time_grid import time_grid
from torch_ref import schedules as ts

ROOT = Path(__file__).resolve().parents[1]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# flowmap.json "schedule" objects exactly as the flat ScheduleConfig (format versions 1-2) wrote them.
LEGACY = [
    ({"kind": "ddpm", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
      "beta_schedule": "scaled_linear", "trained_betas": None, "time_scale": 1.0, "cosine_s": 0.0, "t_max": None},
     DDPMSchedule(**SD)),
    ({"kind": "vp_cosine", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
      "beta_schedule": "linear", "trained_betas": None, "time_scale": 1000.0, "cosine_s": 0.008, "t_max": 994.6},
     VPCosineSchedule(time_scale=1000.0, cosine_s=0.008, t_max=994.6)),
    ({"kind": "rectified_flow", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
      "beta_schedule": "linear", "trained_betas": None, "time_scale": 1000.0, "cosine_s": 0.0, "t_max": None},
     RectifiedFlowSchedule(time_scale=1000.0)),
]


def test_one_class_per_kind_and_the_named_constructors():
    assert set(SCHEDULE_KINDS) == {"ddpm", "vp_cosine", "rectified_flow"}
    for kind, cls in (("ddpm", DDPMSchedule), ("vp_cosine", VPCosineSchedule), ("rectified_flow", RectifiedFlowSchedule)):
        assert schedule_class(kind) is cls and cls.kind == kind and issubclass(cls, ScheduleConfig)
    assert type(ScheduleConfig.ddpm(**SD)) is DDPMSchedule and ScheduleConfig.ddpm(**SD) == DDPMSchedule(**SD)
    assert ScheduleConfig.vp_cosine(1000.0, 0.008, 994.6) == VPCosineSchedule(1000.0, 0.008, 994.6)
    assert ScheduleConfig.rectified_flow(1000.0) == RectifiedFlowSchedule(1000.0)
    assert ScheduleConfig.rectified_flow(1.0) != ScheduleConfig.vp_cosine(1.0)  # same field values, other class
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScheduleConfig.ddpm().kind = "vp_cosine"
    with pytest.raises(TypeError):
        ScheduleConfig()  # the base: build a kind
    # each class owns its fields only
    assert [f.name for f in dataclasses.fields(RectifiedFlowSchedule)] == ["time_scale"]
    assert not hasattr(RectifiedFlowSchedule(), "beta_schedule") and not hasattr(DDPMSchedule(), "time_scale")


@pytest.mark.parametrize("make", [
    lambda: schedule_class("vp"),
    lambda: ScheduleConfig.from_dict({"kind": "vp"}),
    lambda: schedule_from_json({"kind": "vp"}, "flowmap.json: schedule"),
])
def test_an_unknown_kind_fails_naming_the_known_ones(make):
    with pytest.raises(ValueError, match="unknown schedule kind 'vp'") as info:
        make()
    for kind in SCHEDULE_KINDS:
        assert repr(kind) in str(info.value)


def test_registering_a_kind_twice_or_without_a_name_fails():
    with pytest.raises(ValueError, match="'ddpm' is already registered"):
        register_schedule(type("Again", (DDPMSchedule,), {"kind": "ddpm"}))
    with pytest.raises(TypeError, match="kind"):
        register_schedule(type("Nameless", (DDPMSchedule,), {}))
    assert _REGISTRY["ddpm"] is DDPMSchedule


@pytest.mark.parametrize("legacy, schedule", LEGACY, ids=lambda v: getattr(v, "kind", ""))
def test_the_serialized_form_is_unchanged(legacy, schedule):
    """to_dict writes the flat layout (same keys, order and values); existing flowmap.json objects load."""
    assert schedule.to_dict() == legacy and list(schedule.to_dict()) == list(legacy)
    assert list(schedule_fields()) == list(legacy)
    assert ScheduleConfig.from_dict(legacy) == schedule
    assert schedule_from_json(json.loads(json.dumps(legacy)), "s") == schedule
    assert schedule_to_json(schedule) == legacy
    partial = {"kind": legacy["kind"], **dataclasses.asdict(schedule)}  # only the kind's own fields: fine too
    assert ScheduleConfig.from_dict(partial) == schedule


def test_trained_betas_round_trip():
    betas = DDPMScheduler(**SD).betas.double().numpy().tolist()
    schedule = ScheduleConfig.ddpm(trained_betas=betas)
    data = json.loads(json.dumps(schedule_to_json(schedule)))
    assert data["trained_betas"] == betas and schedule_from_json(data, "s") == schedule


def test_a_field_of_another_kind_fails_naming_it():
    """Keys a kind does not own may only hold their serialized default."""
    legacy = dict(LEGACY[2][0], beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match=r"beta_schedule='scaled_linear' does not apply to a rectified_flow"):
        ScheduleConfig.from_dict(legacy)
    with pytest.raises(ValueError, match="unknown schedule field 'sigma_max'"):
        ScheduleConfig.from_dict({"kind": "ddpm", "sigma_max": 80.0})
    with pytest.raises(ValueError, match="no 'kind'"):
        ScheduleConfig.from_dict({"time_scale": 1.0})


@pytest.mark.parametrize("config", [{}, SD, {"beta_schedule": "squaredcos_cap_v2"}])
def test_ddpm_schedule_matches_diffusers(config):
    """DDPMSchedule: alpha_t^2 = diffusers' alphas_cumprod at integer t (numpy float64, JAX, torch)."""
    schedule = DDPMSchedule(**config)
    reference = DDPMScheduler(**config)
    ac = reference.alphas_cumprod.double().numpy()
    t = np.arange(1000, dtype=np.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(alpha ** 2, ac, rtol=1e-4)  # diffusers' float32 cumprod: measured 1.3e-5
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-12)
    for backend in (js.alpha_sigma(schedule, t), ts.alpha_sigma(schedule, torch.as_tensor(t))):
        np.testing.assert_allclose(np.asarray(backend[0], np.float64) ** 2, ac, rtol=1e-4)
    np.testing.assert_allclose(schedule.betas, reference.betas.double().numpy(), rtol=1e-5)


def test_vp_cosine_schedule_matches_diffusers_squaredcos():
    """VPCosineSchedule with s = 0.008 and T = N is iDDPM's cosine that diffusers discretises as
    squaredcos_cap_v2: alpha^2 at t = k + 1 equals alphas_cumprod[k] (except the last step, whose beta
    diffusers clips to 0.999)."""
    schedule = VPCosineSchedule(time_scale=1000.0, cosine_s=0.008)
    ac = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double().numpy()
    t = np.arange(1, 1000, dtype=np.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(alpha ** 2, ac[:-1], rtol=2e-6)  # measured 5.6e-7
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-12)
    for backend in (js.alpha_sigma(schedule, t), ts.alpha_sigma(schedule, torch.as_tensor(t))):
        np.testing.assert_allclose(np.asarray(backend[0], np.float64) ** 2, ac[:-1], rtol=2e-5, atol=1e-6)


def test_rectified_flow_schedule_matches_diffusers_flow_match():
    """RectifiedFlowSchedule(T = N): at FlowMatchEulerDiscreteScheduler's timesteps, alpha = 1 - sigma and
    sigma = the scheduler's sigma, and add-noise equals its scale_noise."""
    reference = FlowMatchEulerDiscreteScheduler()
    reference.set_timesteps(10)
    schedule = ScheduleConfig.from_diffusers(dict(reference.config))
    assert schedule == RectifiedFlowSchedule(1000.0)
    t = reference.timesteps.double().numpy()
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(sigma, reference.sigmas[:-1].double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(alpha, 1.0 - sigma, rtol=1e-12)
    x0, noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    for i in (0, 3, 9):
        timestep = reference.timesteps[i:i + 1]
        expected = reference.scale_noise(x0[None], timestep, noise[None])[0]
        got = ts.add_noise(schedule, x0[None], noise[None], timestep.float())[0]
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", [DDPMSchedule(), DDPMSchedule(**SD), DDPMSchedule(beta_schedule="squaredcos_cap_v2"),
                                      DDPMSchedule(trained_betas=tuple(np.linspace(1e-4, 0.02, 1000))),
                                      RectifiedFlowSchedule(1000.0)], ids=lambda s: s.kind)
def test_the_diffusers_mapping_round_trips(schedule):
    """to_diffusers gives a config diffusers' schedulers load, and from_diffusers reads it back equal."""
    config = schedule.to_diffusers()
    assert ScheduleConfig.from_diffusers(config) == schedule
    if isinstance(schedule, DDPMSchedule):
        live = DDIMScheduler.from_config(config)
        assert ScheduleConfig.from_diffusers(dict(live.config)) == schedule
        np.testing.assert_allclose(schedule.alphas_cumprod, live.alphas_cumprod.double().numpy(), rtol=1e-4)
    else:
        live = FlowMatchEulerDiscreteScheduler.from_config(config)
        assert ScheduleConfig.from_diffusers(dict(live.config)) == schedule
        assert spec_schedule.prediction_type_from_diffusers(config) == "flow"


def test_schedules_without_a_diffusers_scheduler_say_so():
    with pytest.raises(ValueError, match="diffusers has no scheduler with a vp_cosine schedule"):
        VPCosineSchedule().to_diffusers()
    with pytest.raises(ValueError, match="whole num_train_timesteps"):
        RectifiedFlowSchedule(2.5).to_diffusers()


@pytest.mark.parametrize("cls", [DDPMSchedule, VPCosineSchedule, RectifiedFlowSchedule], ids=lambda c: c.kind)
def test_each_class_names_its_parameterisations(cls):
    """"auto" resolves to the class's default; only the forms it allows pass, others fail naming both."""
    schedule = cls()
    assert resolve_parameterization(schedule, "auto") == cls.default_parameterization
    assert set(cls.parameterizations) <= set(PARAMETERIZATIONS)
    for name in PARAMETERIZATIONS:
        if name in cls.parameterizations:
            assert resolve_parameterization(schedule, name) == name
        else:
            with pytest.raises(ValueError, match=f"parameterization '{name}'.*a {cls.kind} schedule uses "
                                                 f"'{cls.default_parameterization}'"):
                resolve_parameterization(schedule, name)
    assert cls.default_parameterization == ("angle" if cls.variance_preserving else "linear")


def test_every_backend_implements_every_array_op():
    ops_methods = {n for n, v in vars(ArrayOps).items() if callable(v) and not n.startswith("_")}
    assert len(ops_methods) >= 15
    for ops in (NUMPY_OPS, js._OPS, ts._OPS):
        missing = sorted(n for n in ops_methods if getattr(type(ops), n) is getattr(ArrayOps, n))
        assert not missing, f"{type(ops).__name__} lacks {missing}"


# --------------------------------------------------------------------------------------------------
# No string switch on a kind left in the package.

SCANNED = ("flowmap_jax", "torch_ref", "conversion", "benchmarks")


def _kind_switches(tree: ast.AST, in_schedule_classes: bool = False) -> list[int]:
    """Lines of comparisons that involve a schedule kind's name ("ddpm" == ..., ... in ("vp_cosine", ...))
    or a schedule's `.kind` (schedule.kind == ...; also self.kind / cls.kind in the schedule classes), and
    lookups keyed by `schedule.kind`."""
    kinds = set(SCHEDULE_KINDS)

    def names_a_kind(node):
        if isinstance(node, ast.Constant):
            return node.value in kinds
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_a_kind(e) for e in node.elts)
        return False

    def is_schedule_kind(node):
        if not (isinstance(node, ast.Attribute) and node.attr == "kind"):
            return False
        owner = ast.unparse(node.value)
        return "sched" in owner.lower() or (in_schedule_classes and owner in ("self", "cls"))

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(names_a_kind(o) or is_schedule_kind(o) for o in operands):
                lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and is_schedule_kind(node.slice):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and is_schedule_kind(node.args[0])):
            lines.append(node.lineno)
    return sorted(lines)


def test_nothing_branches_on_a_schedule_kind():
    """Behaviour lives in the schedule classes: no `kind ==`, `kind !=`, `kind in (...)` nor `{...}[kind]` in
    the package, the reference, conversion or the benchmarks (the registry maps a name to its class with a
    dict lookup of the serialized name, in `spec.schedule.base.schedule_class`)."""
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for line in _kind_switches(tree, "spec/schedule" in path.as_posix()):
                found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, "string switches on a schedule kind: " + ", ".join(found)


def test_the_kind_switch_finder_finds_switches():
    source = '''
if schedule.kind == "ddpm": pass
x = "linear" if self.kind != "rectified_flow" else "angle"
y = kind in ("vp_cosine", "other")
z = TABLE[schedule.kind]
w = TABLE.get(sched.kind)
ok = run["kind"] == "teacher"
ok2 = flag.kind == "bool"
'''
    assert _kind_switches(ast.parse(source), in_schedule_classes=True) == [2, 3, 4, 5, 6]
    assert _kind_switches(ast.parse("ok = self.kind == 'tuple'")) == []  # another class's kind


# --------------------------------------------------------------------------------------------------
# A new kind: its class only. The backends, time grids and parameterisation take it untouched.

@pytest.fixture
def vp_sqrt():
    """A toy VP kind: alpha_t = sqrt(1 - t/T), sigma_t = sqrt(t/T), registered for one test."""

    @dataclasses.dataclass(frozen=True)
    class VPSqrtSchedule(ScheduleConfig):
        time_scale: float = 1.0
        kind = "test_vp_sqrt"
        variance_preserving = True
        parameterizations = ("angle", "teacher_step")
        default_parameterization = "angle"

        t_clean = property(lambda self: 0.0)
        t_noise = property(lambda self: 0.999 * self.time_scale)  # alpha > 0: a finite log-SNR
        time_unit = property(lambda self: self.time_scale)
        logsnr_t_min = property(lambda self: 1e-3 * self.time_scale)

        def alpha_sigma(self, t, ops=NUMPY_OPS):
            tau = ops.asarray(t) / self.time_scale
            return ops.sqrt(1.0 - tau), ops.sqrt(tau)

        def alpha_sigma_derivatives(self, t, ops=NUMPY_OPS):
            alpha, sigma = self.alpha_sigma(t, ops)
            return -0.5 / (self.time_scale * alpha), 0.5 / (self.time_scale * sigma)

        def time_from_rho(self, rho, ops=NUMPY_OPS):
            rho = ops.asarray(rho)
            return ops.clip(rho * rho / (1.0 + rho * rho) * self.time_scale, self.t_clean, self.t_noise)

    register_schedule(VPSqrtSchedule)
    try:
        yield VPSqrtSchedule
    finally:
        del _REGISTRY["test_vp_sqrt"]


def test_a_new_kind_needs_no_backend_change(vp_sqrt):
    schedule = ScheduleConfig.from_dict({"kind": "test_vp_sqrt", "time_scale": 10.0})
    assert isinstance(schedule, vp_sqrt) and schedule.to_dict()["kind"] == "test_vp_sqrt"
    assert ScheduleConfig.from_dict(schedule.to_dict()) == schedule
    t = np.linspace(0.05, 9.9, 17).astype(np.float32)
    a64, s64 = schedule.alpha_sigma(t.astype(np.float64))
    for alpha, sigma in (js.alpha_sigma(schedule, jnp.asarray(t)), ts.alpha_sigma(schedule, torch.from_numpy(t))):
        np.testing.assert_allclose(np.asarray(alpha), a64, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(sigma), s64, rtol=1e-6)
    # the JAX derivatives agree with autodiff, the angle is arcsin(sqrt(tau)), d theta/dt its derivative
    _, (d_alpha, d_sigma) = jax.jvp(lambda x: js.alpha_sigma(schedule, x), (jnp.asarray(t),), (jnp.ones_like(t),))
    explicit = js.alpha_sigma_derivatives(schedule, jnp.asarray(t))
    np.testing.assert_allclose(explicit[0], d_alpha, rtol=1e-5)
    np.testing.assert_allclose(explicit[1], d_sigma, rtol=1e-5)
    np.testing.assert_allclose(js.angle(schedule, t), np.arcsin(np.sqrt(t / 10.0)), rtol=1e-5)
    expected = 1.0 / (2.0 * 10.0 * np.sqrt(t / 10.0 * (1.0 - t / 10.0)))
    np.testing.assert_allclose(ts.dtheta_dt(schedule, torch.from_numpy(t)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(js.time_from_rho(schedule, s64 / a64), t, rtol=1e-4)
    grid = time_grid(schedule, 4, spacing="logsnr")
    assert grid[0] == schedule.t_noise and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
    assert resolve_parameterization(schedule, "auto") == "angle"
    with pytest.raises(ValueError, match="a test_vp_sqrt schedule uses 'angle'"):
        resolve_parameterization(schedule, "linear")
    assert math.isclose(schedule.time_unit, 10.0)
