"""Flow map, prediction types and teacher (guidance, pytree), both backends; the target-time hook on a
live diffusers UNet; bad inputs. fp32 CPU."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowmap_jax.core import flow_map as jf
from flowmap_jax.core import predictions as jp
from flowmap_jax.core import teacher as jt
from flowmap_jax.spec.prediction_types import PREDICTION_TYPES
from flowmap_jax.spec.schedule import ScheduleConfig
from tests import flow_map_helpers as H
from torch_ref import flow_map as tf
from torch_ref import predictions as tp
from torch_ref import teacher as tt

SCHEDULES = {"ddpm": ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012), "cosine": ScheduleConfig.vp_cosine(t_max=0.99),
             "rf": ScheduleConfig.rectified_flow(1000.0)}
SHAPE = (3, 3, 2)  # (H, W, C)


def _inputs(schedule, batch=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch,) + SHAPE).astype(np.float32)
    lo, hi = schedule.t_clean, schedule.t_noise
    s = rng.uniform(lo + 0.05 * (hi - lo), hi, size=batch).astype(np.float32)
    t = rng.uniform(lo, hi, size=batch).astype(np.float32)
    return x, s, t


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_identity_jump_is_exact(kind, prediction_type):
    """X(x, s, s) = x bit for bit, any network output, both backends."""
    schedule = SCHEDULES[kind]
    x, s, _ = _inputs(schedule)
    module = H.TorchMLP(SHAPE, unit=schedule.time_unit, seed=3)
    jax_map = jf.FlowMap(H.jax_mlp(schedule.time_unit), schedule, prediction_type)
    out = jax_map(H.mlp_params_to_jax(module), jnp.asarray(x), jnp.asarray(s), jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(out), x)
    torch_map = tf.FlowMap(module, schedule, prediction_type)
    with torch.no_grad():
        out = torch_map(None, H.nchw(x), torch.from_numpy(s), torch.from_numpy(s))
    np.testing.assert_array_equal(out.numpy(), H.nchw(x).numpy())


@pytest.mark.parametrize("kind, parameterization, blend", [
    ("ddpm", "angle", 0.0), ("ddpm", "angle", 0.3), ("ddpm", "teacher_step", 0.0), ("ddpm", "anchored", 0.0),
    ("cosine", "angle", 0.0), ("cosine", "anchored", 0.2),
    ("rf", "linear", 0.0), ("rf", "linear", 0.6)])
def test_velocity_is_the_time_derivative_of_the_map(kind, parameterization, blend):
    """`FlowMap.velocity` (one network pass) against d/dtheta_t X(x_s, s, t) at t = s taken two other ways: the
    full forward-mode JVP through the network (`FlowMap.jvp`), and a central difference of X itself in the
    angle (jumps to s +- h). Both backends. Measured (max error / max |v|): JVP <= 1.9e-7, difference <= 3.9e-4
    (its O(h^2))."""
    schedule = SCHEDULES[kind]
    x, s, _ = _inputs(schedule, seed=4)
    module = H.TorchMLP(SHAPE, unit=schedule.time_unit, seed=5)
    params = H.mlp_params_to_jax(module)
    fmap = jf.FlowMap(H.jax_mlp(schedule.time_unit), schedule, "epsilon" if kind == "ddpm" else
                      ("v_prediction" if kind == "cosine" else "flow"), parameterization).with_teacher_blend(blend)
    x, s = jnp.asarray(x), jnp.clip(jnp.asarray(s), None, schedule.t_noise - 0.02 * schedule.time_unit)
    v = fmap.velocity(params, x, s)
    dt = 1.0 / jf.schedules.dtheta_dt(schedule, s)
    v_jvp = fmap.jvp(params, x, s, s, None, (None, None, dt))[1]
    h = 1e-3 * schedule.time_unit
    d_theta = jf.schedules.angle(schedule, s + h) - jf.schedules.angle(schedule, s - h)
    v_diff = (fmap(params, x, s, s + h) - fmap(params, x, s, s - h)) / d_theta[:, None, None, None]
    scale = float(jnp.max(jnp.abs(v)))
    assert float(jnp.max(jnp.abs(v - v_jvp))) / scale < 2e-6
    assert float(jnp.max(jnp.abs(v - v_diff))) / scale < 4e-3
    torch_map = tf.FlowMap(module, schedule, fmap.prediction_type, parameterization).with_teacher_blend(blend)
    with torch.no_grad():
        v_t = torch_map.velocity(None, H.nchw(np.asarray(x)), torch.from_numpy(np.asarray(s)))
    assert H.max_scaled_err(H.nchw(np.asarray(v)).numpy(), v_t.numpy()) < 1e-5


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_conversions_round_trip(prediction_type):
    """from_x0_eps then to_x0_eps gives back (x0, eps); the velocity is alpha' x0 + sigma' eps; both backends."""
    rng = np.random.default_rng(1)
    x0, eps = (rng.normal(size=(4,) + SHAPE).astype(np.float32) for _ in range(2))
    for schedule in SCHEDULES.values():
        t = np.array([0.1, 0.4, 0.7, 0.95], np.float32) * schedule.t_noise
        from flowmap_jax.core import schedules as js
        alpha, sigma = js.alpha_sigma(schedule, t)
        x_t = np.asarray(js.add_noise(schedule, jnp.asarray(x0), jnp.asarray(eps), t))
        pred = jp.from_x0_eps(jnp.asarray(x0), jnp.asarray(eps), alpha, sigma, prediction_type)
        x0_hat, eps_hat = jp.to_x0_eps(pred, jnp.asarray(x_t), alpha, sigma, prediction_type)
        np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
        np.testing.assert_allclose(eps_hat, eps, atol=2e-4)
        a_t, s_t = torch.from_numpy(np.asarray(alpha)), torch.from_numpy(np.asarray(sigma))
        pred_t = tp.from_x0_eps(torch.from_numpy(x0), torch.from_numpy(eps), a_t, s_t, prediction_type)
        np.testing.assert_allclose(pred_t.numpy(), pred, rtol=1e-5, atol=1e-6)
        back = tp.to_x0_eps(pred_t, torch.from_numpy(x_t), a_t, s_t, prediction_type)
        np.testing.assert_allclose(back[0].numpy(), x0_hat, rtol=1e-5, atol=1e-5)


def test_prediction_type_meanings():
    """The definitions, on numbers: v = alpha eps - sigma x0, flow u = eps - x0."""
    x0, eps, alpha, sigma = jnp.ones((1, 1)), 2 * jnp.ones((1, 1)), 0.6, 0.8
    assert float(jp.from_x0_eps(x0, eps, alpha, sigma, "v_prediction")[0, 0]) == pytest.approx(0.6 * 2 - 0.8)
    assert float(jp.from_x0_eps(x0, eps, alpha, sigma, "flow")[0, 0]) == pytest.approx(1.0)
    # Rectified flow with the flow prediction: X = x_s + (t - s) u (in [0, 1] time).
    c_x, c_pred = jp.jump_coefficients(1 - 0.7, 0.7, 1 - 0.2, 0.2, "flow")
    assert float(c_x) == pytest.approx(1.0) and float(c_pred) == pytest.approx(0.2 - 0.7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_initialised_flow_map_is_ddim_step(prediction_type):
    """A network that returns the teacher's prediction (whatever t) makes the head warm-up's starting map
    (teacher_blend = 1) the teacher's DDIM step, and that step is diffusers' DDIMScheduler.step (the torch
    twin). For a v-prediction teacher the bounded "angle" map itself (blend 0) is that DDIM step too: v is
    what the angle form reads F as. For an epsilon teacher it is not (the head mismatch)."""
    from diffusers import DDIMScheduler

    schedule = SCHEDULES["ddpm"]
    module = H.TorchMLP(SHAPE, unit=1000.0, seed=5)
    teacher = tt.Teacher.create(lambda x, t, c: module(x, t, t, c), schedule, prediction_type)
    fmap = tf.FlowMap(_TeacherAsNet(module), schedule, prediction_type)
    x, _, _ = _inputs(schedule)
    x = H.nchw(x)
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True)
    reference.set_timesteps(10)  # leading: step 100, prev = t - 100
    with torch.no_grad():
        for s in (901, 501, 101, 1):
            t = s - 100
            step = reference.step(module(x, torch.tensor([float(s)] * 5), torch.tensor([float(s)] * 5)), s, x).prev_sample
            ours = fmap.with_teacher_blend(1.0)(None, x, float(s), float(max(t, -1)))
            assert H.max_scaled_err(ours.numpy(), step.numpy()) < 1e-5
            own = fmap(None, x, float(s), float(max(t, -1)))
            if prediction_type == "v_prediction":
                assert H.max_scaled_err(own.numpy(), step.numpy()) < 1e-5
            elif s == 901:  # epsilon read as v: wrong where eps and v differ, at high noise
                assert H.max_scaled_err(own.numpy(), step.numpy()) > 1e-2
            np.testing.assert_allclose(teacher.ddim_step(x, float(s), float(max(t, -1))).numpy(), ours.numpy(),
                                       rtol=1e-6, atol=1e-6)


def test_anchored_map_is_the_ddim_step_at_low_noise_and_the_angle_map_at_high_noise():
    """"anchored" from a network that returns the teacher's epsilon prediction (whatever t): where alpha_s >= 0.6
    the map is diffusers' DDIMScheduler.step, exactly as the teacher's own; where alpha_s <= 0.3 it is the
    "angle" map; in between the blend weight is (alpha_s - 0.3) / 0.3, checked from the coefficients written out
    here (alpha_t / alpha_s, sigma_t - alpha_t sigma_s / alpha_s; cos d, -sin d). X(x, s, s) = x bit for bit.
    JAX = torch."""
    from diffusers import DDIMScheduler

    schedule = SCHEDULES["ddpm"]
    module = H.TorchMLP(SHAPE, unit=1000.0, seed=5)
    fmap = tf.FlowMap(_TeacherAsNet(module), schedule, "epsilon", "anchored")
    angle = tf.FlowMap(_TeacherAsNet(module), schedule, "epsilon", "angle")
    x, _, _ = _inputs(schedule)
    x = H.nchw(x)
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True)
    reference.set_timesteps(10)
    alphas = reference.alphas_cumprod.sqrt()
    with torch.no_grad():
        for s in (901, 501, 101, 1):
            t = s - 100
            alpha_s = float(alphas[s])
            ours = fmap(None, x, float(s), float(max(t, -1)))
            step = reference.step(module(x, torch.tensor([float(s)] * 5), torch.tensor([float(s)] * 5)), s, x).prev_sample
            if alpha_s >= 0.6:
                assert H.max_scaled_err(ours.numpy(), step.numpy()) < 1e-5, s
            elif alpha_s <= 0.3:
                assert H.max_scaled_err(ours.numpy(), angle(None, x, float(s), float(max(t, -1))).numpy()) < 1e-6, s
            np.testing.assert_array_equal(fmap(None, x, float(s), float(s)).numpy(), x.numpy())
    s, t = 620.0, 30.0  # alpha_s = 0.42 on SD's schedule: inside the blend
    alpha_s = float(tf.schedules.alpha_sigma(schedule, torch.tensor([s]))[0])
    sigma_s = math.sqrt(1 - alpha_s ** 2)
    a_t = float(tf.schedules.alpha_sigma(schedule, torch.tensor([t]))[0])
    s_t = math.sqrt(1 - a_t ** 2)
    b = (alpha_s - 0.3) / 0.3
    assert 0.2 < b < 0.8
    d = math.atan2(sigma_s, alpha_s) - math.atan2(s_t, a_t)
    expected = ((1 - b) * math.cos(d) + b * a_t / alpha_s, -(1 - b) * math.sin(d) + b * (s_t - a_t * sigma_s / alpha_s))
    for got in (fmap.coefficients(torch.tensor([s]), torch.tensor([t])),
                jf.FlowMap(H.jax_mlp(1000.0), schedule, "epsilon", "anchored").coefficients(jnp.asarray([s]),
                                                                                             jnp.asarray([t]))):
        np.testing.assert_allclose([float(got[0][0]), float(got[1][0])], expected, rtol=2e-5)


class _TeacherAsNet(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, t_source, t_target, cond=None):
        return self.module(x, t_source, t_source, cond)


def _mlp_teachers(schedule, guidance, w=2.5, batch=4):
    """The same MLP teacher in both backends, with context conditioning."""
    strong, weak = H.TorchMLP(SHAPE, unit=1000.0, context_dim=2, seed=7), H.TorchMLP(SHAPE, unit=1000.0, context_dim=2, seed=8)
    net = H.jax_mlp(1000.0, context_dim=2)
    apply = lambda p, x, t, c: net(p, x, t, t, c)  # noqa: E731
    uncond = np.zeros((1, 2), np.float32)
    kwargs_j, kwargs_t = {}, {}
    if guidance == "cfg":
        kwargs_j, kwargs_t = {"uncond": {"context": jnp.asarray(uncond)}}, {"uncond": {"context": torch.from_numpy(uncond)}}
    elif guidance == "autoguidance":
        kwargs_j = {"weak_params": H.mlp_params_to_jax(weak)}
        kwargs_t = {"weak_model": lambda x, t, c: weak(x, t, t, c)}
    teacher_j = jt.Teacher.create(apply, H.mlp_params_to_jax(strong), schedule, "epsilon", guidance_scale=w, **kwargs_j)
    teacher_t = tt.Teacher.create(lambda x, t, c: strong(x, t, t, c), schedule, "epsilon", guidance_scale=w, **kwargs_t)
    return teacher_j, teacher_t, strong, weak


@pytest.mark.parametrize("guidance", ["none", "cfg", "autoguidance"])
def test_teacher_guidance(guidance):
    """Guided prediction = base + w (cond - base), computed by hand from the raw networks; JAX = torch."""
    schedule = SCHEDULES["ddpm"]
    teacher_j, teacher_t, strong, weak = _mlp_teachers(schedule, guidance)
    x, _, t = _inputs(schedule, batch=4)
    ctx = np.random.default_rng(2).normal(size=(4, 2)).astype(np.float32)
    tt_ = torch.from_numpy(t)
    with torch.no_grad():
        x_t = H.nchw(x)
        p_cond = strong(x_t, tt_, tt_, {"context": torch.from_numpy(ctx)})
        if guidance == "cfg":
            p_base = strong(x_t, tt_, tt_, {"context": torch.zeros(4, 2)})
        elif guidance == "autoguidance":
            p_base = weak(x_t, tt_, tt_, {"context": torch.from_numpy(ctx)})
        expected = p_cond if guidance == "none" else p_base + 2.5 * (p_cond - p_base)
        got_t = teacher_t.prediction(x_t, tt_, {"context": torch.from_numpy(ctx)})
        np.testing.assert_allclose(got_t.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        v_t = teacher_t.velocity(x_t, tt_, {"context": torch.from_numpy(ctx)})
    got_j = teacher_j.prediction(jnp.asarray(x), jnp.asarray(t), {"context": jnp.asarray(ctx)})
    assert H.max_scaled_err(H.nchw(got_j).numpy(), expected.numpy()) < 1e-5
    v_j = teacher_j.velocity(jnp.asarray(x), jnp.asarray(t), {"context": jnp.asarray(ctx)})
    assert H.max_scaled_err(H.nchw(v_j).numpy(), v_t.numpy()) < 1e-5
    # Per-example guidance scales broadcast over the batch.
    w = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    per_example = teacher_j.prediction(jnp.asarray(x), jnp.asarray(t), {"context": jnp.asarray(ctx)}, guidance_scale=w)
    single = teacher_j.prediction(jnp.asarray(x[2:3]), jnp.asarray(t[2:3]), {"context": jnp.asarray(ctx[2:3])},
                                  guidance_scale=3.0)
    np.testing.assert_allclose(per_example[2:3], single, rtol=1e-5, atol=1e-6)


def test_teacher_is_a_pytree_argument():
    """Teacher params travel as jit arguments: new params, same compiled function, different result."""
    schedule = SCHEDULES["ddpm"]
    teacher_j, _, _, _ = _mlp_teachers(schedule, "cfg")
    leaves = jax.tree.leaves(teacher_j)
    assert any(leaf is teacher_j.params["l1"]["w"] for leaf in leaves)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def velocity(teacher, x, cond):
        return teacher.velocity(x, 500.0, cond)

    x = jnp.ones((2,) + SHAPE)
    cond = {"context": jnp.ones((2, 2))}
    first = velocity(teacher_j, x, cond)
    other = teacher_j.replace(params=jax.tree.map(lambda p: p * 1.1, teacher_j.params), guidance_scale=jnp.float32(4.0))
    second = velocity(other, x, cond)  # would raise if it retraced
    assert not np.allclose(first, second)
    # The parameters are inputs of the compiled program, not constants inside it.
    jaxpr = jax.make_jaxpr(lambda tch, x: tch.velocity(x, 500.0, cond))(teacher_j, x)
    assert len(jaxpr.jaxpr.invars) == len(jax.tree.leaves(teacher_j)) + 1
    for const in jaxpr.consts:  # the schedule's table and the closed-over cond, never a parameter
        assert not any(np.shape(const) == np.shape(p) and np.allclose(const, p) for p in jax.tree.leaves(teacher_j.params))


def _diffusers_lcm_guidance_embedding():
    """diffusers' own `LatentConsistencyModelPipeline.get_guidance_scale_embedding`, taken from its source
    file (importing the pipeline needs `transformers`, which the reference environment does not have)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("diffusers")
    path = spec.submodule_search_locations[0] + "/pipelines/latent_consistency_models/pipeline_latent_consistency_text2img.py"
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_guidance_scale_embedding":
            node.returns = None
            for arg in node.args.args + node.args.kwonlyargs:
                arg.annotation = None
            namespace = {"torch": torch}
            exec(compile(ast.Module([node], []), path, "exec"), namespace)  # noqa: S102
            return namespace["get_guidance_scale_embedding"]
    raise AssertionError("get_guidance_scale_embedding not found in diffusers")


def test_guidance_scale_embedding_matches_lcm():
    reference = _diffusers_lcm_guidance_embedding()
    w = np.array([0.0, 1.5, 7.0], np.float32)
    for dim in (16, 7):
        ref = reference(None, torch.from_numpy(w), dim).numpy()
        np.testing.assert_allclose(tf.guidance_scale_embedding(torch.from_numpy(w), dim).numpy(), ref, rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(jf.guidance_scale_embedding(w, dim), ref, rtol=1e-5, atol=2e-5)


TINY_UNET = dict(block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8, attention_head_dim=2,
                 in_channels=4, out_channels=4, layers_per_block=1, sample_size=8)


def test_target_time_hook_torch_reproduces_teacher():
    """diffusers teacher + hook (class_embed_type='timestep', linear_2 zero): the flow map at the start of
    training (the head warm-up's teacher_blend = 1) is the teacher's DDIM step for every (s, t); gradients reach linear_2 (only the last layer is zero)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    teacher_unet = UNet2DConditionModel(**TINY_UNET).eval()
    teacher_unet.set_default_attn_processor()
    config, state = tf.add_target_time_hook(dict(teacher_unet.config), teacher_unet.state_dict(), 0)
    assert config["class_embed_type"] == "timestep"
    student = UNet2DConditionModel.from_config(config).eval()
    student.load_state_dict(state)  # strict: every key present
    student.set_default_attn_processor()
    assert torch.count_nonzero(student.class_embedding.linear_2.weight) == 0
    assert torch.count_nonzero(student.class_embedding.linear_1.weight) > 0
    schedule = SCHEDULES["ddpm"]
    teacher = tt.Teacher.create(tt.unet_teacher_fn(teacher_unet), schedule, "epsilon")
    # The head warm-up's start (teacher_blend = 1): the map training begins from.
    fmap = tf.FlowMap(tf.unet_network(student), schedule, "epsilon").with_teacher_blend(1.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8, generator=gen)}
    s, t = torch.tensor([900.0, 400.0]), torch.tensor([-1.0, 650.0])
    with torch.no_grad():
        np.testing.assert_allclose(fmap(None, x, s, t, cond).numpy(), teacher.ddim_step(x, s, t, cond).numpy(),
                                   rtol=0, atol=1e-6)
    loss = fmap(None, x, s, t, cond).square().mean()
    loss.backward()
    assert student.class_embedding.linear_2.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        tf.unet_network(teacher_unet)
    with pytest.raises(ValueError, match="num_class_embeds=10"):
        tf.add_target_time_hook(dict(TINY_UNET, num_class_embeds=10), teacher_unet.state_dict(), 0)


def test_bad_inputs_name_the_value():
    schedule = SCHEDULES["ddpm"]
    module = H.TorchMLP(SHAPE, unit=1000.0)
    jax_map = jf.FlowMap(H.jax_mlp(1000.0), schedule, "epsilon")
    params = H.mlp_params_to_jax(module)
    torch_map = tf.FlowMap(module, schedule, "epsilon")
    x = np.zeros((4,) + SHAPE, np.float32)
    for fmap, p, xx, arr in ((jax_map, params, jnp.asarray(x), jnp.asarray), (torch_map, None, H.nchw(x), torch.tensor)):
        with pytest.raises(ValueError, match=r"t_target=1200\.0 is outside"):
            fmap(p, xx, 500.0, 1200.0)
        with pytest.raises(ValueError, match=r"t_source=-3\.0 is outside"):
            fmap(p, xx, arr([1.0, 2.0, -3.0, 4.0]), 0.0)
        with pytest.raises(ValueError, match=r"t_source must be a scalar or have shape \(4,\).*\(3,\)"):
            fmap(p, xx, arr([1.0, 2.0, 3.0]), 0.0)
    for fm in (jf.FlowMap, tf.FlowMap):
        with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
            fm(module, schedule, "noise")
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        jt.Teacher.create(H.jax_mlp(1000.0), params, schedule, "x0")
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        tt.Teacher.create(module, schedule, "x0")
    teacher_j, teacher_t, _, _ = _mlp_teachers(schedule, "cfg")
    with pytest.raises(ValueError, match=r"cond\['context'\] has shape \(3, 2\).*batch \(4\)"):
        teacher_j.prediction(jnp.asarray(x), 10.0, {"context": jnp.zeros((3, 2))})
    with pytest.raises(ValueError, match=r"cond\['context'\] has shape \(3, 2\).*batch \(4\)"):
        teacher_t.prediction(H.nchw(x), 10.0, {"context": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="classifier-free guidance needs a cond"):
        teacher_j.prediction(jnp.asarray(x), 10.0)
    bad_net = lambda p, x, s, t, c: x[:, :1]  # noqa: E731
    with pytest.raises(ValueError, match="the network returned shape"):
        jf.FlowMap(bad_net, schedule, "epsilon")(None, jnp.asarray(x), 5.0, 1.0)
