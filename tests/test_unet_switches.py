"""The Flax UNet's switches (remat, bf16 compute) and input checks; forward-mode AD through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig, dummy_inputs, init_unet_params

CONFIG = UNetConfig.from_dict(dict(
    block_out_channels=[16, 32], norm_num_groups=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16, attention_head_dim=4,
    in_channels=3, out_channels=3, layers_per_block=1, class_embed_type="timestep",
))


@pytest.fixture(scope="module")
def setup():
    params = init_unet_params(CONFIG, jax.random.key(0))
    # Flax initialises biases/norms to constants; perturb so every parameter matters.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32), params)
    inputs = dict(
        sample=jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32),
        timesteps=jnp.array([10.0, 600.0]),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32),
        class_labels=jnp.array([0.0, 300.0]),
    )
    return params, inputs


def _loss(model, params, inputs):
    return jnp.mean(model.apply({"params": params}, **inputs) ** 2)


def test_remat_gives_the_same_output_and_gradient(setup):
    params, inputs = setup
    plain, remat = FlaxUNet2DConditionModel(CONFIG), FlaxUNet2DConditionModel(CONFIG, remat=True)
    g_plain = jax.jit(jax.grad(lambda p: _loss(plain, p, inputs)))(params)
    g_remat = jax.jit(jax.grad(lambda p: _loss(remat, p, inputs)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_fp32_parameters_and_stays_close(setup):
    params, inputs = setup
    fp32 = jax.jit(FlaxUNet2DConditionModel(CONFIG).apply)({"params": params}, **inputs)
    bf16_model = FlaxUNet2DConditionModel(CONFIG, dtype=jnp.bfloat16)
    bf16 = jax.jit(bf16_model.apply)({"params": params}, **inputs)
    assert bf16.dtype == jnp.float32  # output follows the input sample's dtype
    rel = float(jnp.max(jnp.abs(bf16 - fp32)) / jnp.max(jnp.abs(fp32)))
    assert 0 < rel < 5e-2, rel
    fresh = jax.eval_shape(lambda: bf16_model.init(jax.random.key(0), **dummy_inputs(CONFIG)))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(fresh)} == {jnp.dtype(jnp.float32)}


def test_forward_mode_derivative_in_the_target_time_matches_finite_differences(setup):
    """jax.jvp through class_labels (the flow map's t) works with the default attention."""
    params, inputs = setup
    model = FlaxUNet2DConditionModel(CONFIG)

    def f(t):
        return model.apply({"params": params}, **dict(inputs, class_labels=t))

    t0 = inputs["class_labels"]
    _, tangent = jax.jit(lambda t: jax.jvp(f, (t,), (jnp.ones_like(t),)))(t0)
    eps = 0.02  # t is in timestep units; the sinusoid has periods down to 2*pi units
    fd = (jax.jit(f)(t0 + eps) - jax.jit(f)(t0 - eps)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, rtol=1e-2, atol=2e-3)
    assert float(jnp.max(jnp.abs(tangent))) > 1e-5


def test_bad_inputs_name_the_problem(setup):
    params, inputs = setup
    model = FlaxUNet2DConditionModel(CONFIG)
    with pytest.raises(ValueError, match=r"sample must be \(B, H, W, 3\).*\(2, 3, 8, 8\)"):
        model.apply({"params": params}, **dict(inputs, sample=jnp.zeros((2, 3, 8, 8))))
    with pytest.raises(ValueError, match="class_labels should be provided"):
        model.apply({"params": params}, **dict(inputs, class_labels=None))
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or have shape \(2,\)"):
        model.apply({"params": params}, **dict(inputs, timesteps=jnp.zeros((3,))))
    with pytest.raises(ValueError, match="encoder_hidden_states .* is required"):
        model.apply({"params": params}, **dict(inputs, encoder_hidden_states=None))


RICH_CONFIG = UNetConfig.from_dict(dict(  # every optional input: class labels, timestep_cond, SDXL's text_time
    block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=8, attention_head_dim=2,
    in_channels=2, out_channels=2, layers_per_block=1, class_embed_type="timestep", time_cond_proj_dim=6,
    addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=10 + 6 * 4,
    use_linear_projection=True,
))


def test_dummy_inputs_cover_every_parameter():
    """init on `dummy_inputs` creates as many tensors as diffusers' UNet has, and each of them reaches the
    output: with random values in the dummy inputs' shapes and perturbed parameters, every parameter's
    gradient is nonzero somewhere (8x8 and 3 tokens: with one token an attention's keys get no gradient)."""
    config = RICH_CONFIG
    import torch
    from diffusers import UNet2DConditionModel

    model = FlaxUNet2DConditionModel(config)
    dummy = dummy_inputs(config, batch=2, height=8, seq_len=3)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy))["params"]
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**config.to_dict()).state_dict()
    assert len(jax.tree_util.tree_leaves(abstract)) == len(reference)
    rng = np.random.default_rng(1)  # random parameters (no init compile): none zero, none constant
    params = jax.tree_util.tree_map(lambda p: (0.3 * rng.standard_normal(p.shape)).astype(np.float32), abstract)

    def randomise(path, leaf):
        if jax.tree_util.keystr(path).endswith(("['timesteps']", "['class_labels']")):
            return jnp.asarray(rng.uniform(0, 999, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)

    inputs = jax.tree_util.tree_map_with_path(randomise, dummy)
    probe = rng.standard_normal(jax.eval_shape(lambda: model.apply({"params": params}, **inputs)).shape)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, **inputs) * probe)))(params)
    dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g) != 0)]
    assert not dead, dead
