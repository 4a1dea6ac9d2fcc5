"""Parity of the Flax UNet port with diffusers' UNet2DConditionModel running live (fp32, CPU).

Criterion (issue 2): max|flax - torch| <= 1e-4 * max(1, max|torch|), at small widths with random seeded
weights (every tensor perturbed), batch 2, non-square latents, several sequence lengths, int/float,
scalar/per-batch timesteps. Each distinct (config, shape) costs one XLA compile, so the shapes are
chosen to cover the cases with few compiles.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig  # noqa: E402
from tests.unet_helpers import convert, make_torch_unet, rel_error, run_both  # noqa: E402

# ~10x the error measured (fp32 CPU, rel_error): forward 1.1e-6 (diffusers_tiny) to 2.3e-6 (sd2), other shapes
# and timestep forms <= 2.2e-6, chunked attention 1.9e-6. Issue 2's criterion was 1e-4; at 1e-4 a transformer
# GroupNorm eps of 1e-5 instead of 1e-6 (1.8e-5) and a tanh-approximate GELU passed.
TOL = 2.5e-5

SD1 = dict(  # SD 1.x layout at small width
    block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=48, attention_head_dim=8,
    layers_per_block=2, in_channels=4, out_channels=4, sample_size=16,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD2 = dict(SD1, use_linear_projection=True, attention_head_dim=[2, 4, 8, 8], cross_attention_dim=64,
           upcast_attention=True, layers_per_block=1)
SDXL = dict(  # SDXL layout at small width: text_time added embedding, per-block transformer depth
    block_out_channels=[32, 64, 64], norm_num_groups=8, cross_attention_dim=32, attention_head_dim=[2, 4, 8],
    layers_per_block=2, in_channels=4, out_channels=4, sample_size=16, use_linear_projection=True,
    transformer_layers_per_block=[1, 2, 3], addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)
DIFFUSERS_TINY = dict(  # the config of diffusers' own UNet2DConditionModel tests
    block_out_channels=[4, 8], norm_num_groups=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8, attention_head_dim=2,
    out_channels=4, in_channels=4, layers_per_block=1, sample_size=16,
)
DIFFUSERS_TINY_2 = dict(DIFFUSERS_TINY, block_out_channels=[32, 64], norm_num_groups=32,
                        attention_head_dim=[8, 16], cross_attention_dim=32, layers_per_block=2)
FLOW_MAP_HOOKS = dict(SD1, class_embed_type="timestep", time_cond_proj_dim=16)
MISC_A = dict(  # rarer switches, each implemented rather than ignored
    DIFFUSERS_TINY_2, resnet_time_scale_shift="scale_shift", time_embedding_act_fn="silu", timestep_post_act="silu",
    conv_in_kernel=5, conv_out_kernel=1, encoder_hid_dim=20, class_embed_type="timestep",
    class_embeddings_concat=True, act_fn="gelu", downsample_padding=0, mid_block_scale_factor=1.4,
    flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=96, center_input_sample=True,
)
MISC_B = dict(DIFFUSERS_TINY_2, only_cross_attention=True, mid_block_type=None, act_fn="mish",
              num_class_embeds=5, transformer_layers_per_block=[[1, 2], [2, 1]],
              reverse_transformer_layers_per_block=[[1, 2, 1], [2, 1, 1]])
MISC_C = dict(DIFFUSERS_TINY_2, class_embed_type="projection", projection_class_embeddings_input_dim=12,
              only_cross_attention=[True, False])

CONFIGS = {
    "sd1": SD1, "sd2": SD2, "sdxl": SDXL, "diffusers_tiny": DIFFUSERS_TINY, "diffusers_tiny_2": DIFFUSERS_TINY_2,
    "flow_map_hooks": FLOW_MAP_HOOKS, "misc_a": MISC_A, "misc_b": MISC_B, "misc_c": MISC_C,
}


def make_inputs(config, rng, batch=2, height=16, width=24, seq_len=7):
    """NCHW sample and the keyword inputs `config` needs, random."""
    x = rng.standard_normal((batch, config["in_channels"], height, width)).astype(np.float32)
    ctx_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    kwargs = {"context": rng.standard_normal((batch, seq_len, ctx_dim)).astype(np.float32)}
    if config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = rng.uniform(0, 999, batch).astype(np.float32)
    elif config.get("class_embed_type") == "projection":
        kwargs["class_labels"] = rng.standard_normal((batch, config["projection_class_embeddings_input_dim"])).astype(np.float32)
    elif config.get("num_class_embeds"):
        kwargs["class_labels"] = rng.integers(0, config["num_class_embeds"], batch)
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = rng.standard_normal((batch, config["time_cond_proj_dim"])).astype(np.float32)
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((batch, 16)).astype(np.float32),
            "time_ids": np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (batch, 1)),
        }
    return x, kwargs


_PAIRS = {}


def model_pair(name):
    """(diffusers UNet, Flax UNet, converted params) for CONFIGS[name], built once per session."""
    if name not in _PAIRS:
        unet = make_torch_unet(CONFIGS[name])
        config = dict(unet.config)
        _PAIRS[name] = (unet, FlaxUNet2DConditionModel(UNetConfig.from_dict(config)), convert(unet, config))
    return _PAIRS[name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_diffusers(name):
    """Batch 2, non-square 16x24 latents, 7 context tokens, per-batch float timesteps."""
    unet, flax_model, params = model_pair(name)
    x, kwargs = make_inputs(CONFIGS[name], np.random.default_rng(0))
    ref, out = run_both(unet, flax_model, params, x, np.array([3.5, 871.25], np.float32), **kwargs)
    assert out.shape == ref.shape
    assert rel_error(ref, out) <= TOL, f"{name}: rel error {rel_error(ref, out):.2e}"


@pytest.mark.parametrize("timesteps", [999, 0.5, np.array([1, 500], np.int64)], ids=["int", "float", "int_per_batch"])
def test_timestep_forms(timesteps):
    unet, flax_model, params = model_pair("diffusers_tiny")
    x, kwargs = make_inputs(DIFFUSERS_TINY, np.random.default_rng(1), height=16, width=16, seq_len=4)
    ref, out = run_both(unet, flax_model, params, x, timesteps, **kwargs)
    assert rel_error(ref, out) <= TOL


@pytest.mark.parametrize("height,width,seq_len", [(24, 8, 1), (18, 13, 2)], ids=["tall_seq1", "not_divisible"])
def test_other_shapes(height, width, seq_len):
    """Other aspect ratios and sequence lengths; 18x13 makes diffusers forward explicit upsample sizes."""
    unet, flax_model, params = model_pair("diffusers_tiny_2")
    x, kwargs = make_inputs(DIFFUSERS_TINY_2, np.random.default_rng(2), height=height, width=width, seq_len=seq_len)
    ref, out = run_both(unet, flax_model, params, x, np.array([250.0, 10.0], np.float32), **kwargs)
    assert rel_error(ref, out) <= TOL


def test_flow_map_hooks_change_the_output():
    """class_labels and timestep_cond reach the output (so parity is not vacuous for them)."""
    unet, flax_model, params = model_pair("flow_map_hooks")
    x, kwargs = make_inputs(FLOW_MAP_HOOKS, np.random.default_rng(0))
    t = np.array([3.5, 871.25], np.float32)
    _, base = run_both(unet, flax_model, params, x, t, **kwargs)
    _, other_t = run_both(unet, flax_model, params, x, t, **dict(kwargs, class_labels=kwargs["class_labels"] + 100))
    _, other_w = run_both(unet, flax_model, params, x, t, **dict(kwargs, timestep_cond=kwargs["timestep_cond"] * 2))
    assert np.abs(base - other_t).max() > 1e-3
    assert np.abs(base - other_w).max() > 1e-3


def test_zero_linear_2_reproduces_the_teacher():
    """The target-time hook with class_embedding.linear_2 = 0 leaves the teacher's output unchanged."""
    teacher, flax_teacher, teacher_params = model_pair("diffusers_tiny_2")
    student = make_torch_unet(dict(DIFFUSERS_TINY_2, class_embed_type="timestep"))
    state = dict(teacher.state_dict())
    for k, v in student.state_dict().items():
        if k.startswith("class_embedding."):
            state[k] = torch.zeros_like(v) if "linear_2" in k else v
    student.load_state_dict(state)
    flax_student = FlaxUNet2DConditionModel(UNetConfig.from_dict(dict(student.config)))
    x, kwargs = make_inputs(DIFFUSERS_TINY_2, np.random.default_rng(4))
    t = np.array([3.5, 871.25], np.float32)
    t_ref, t_out = run_both(teacher, flax_teacher, teacher_params, x, t, **kwargs)
    s_ref, s_out = run_both(student, flax_student, convert(student, dict(student.config)), x, t,
                            class_labels=np.array([10.0, 300.0], np.float32), **kwargs)
    np.testing.assert_array_equal(s_ref, t_ref)  # diffusers itself
    np.testing.assert_allclose(s_out, t_out, rtol=0, atol=1e-6)  # the port (XLA may fuse differently)


@pytest.mark.parametrize("shape, groups, eps", [((2, 5, 7, 64), 32, 1e-5), ((3, 4, 4, 96), 32, 1e-6),
                                                ((2, 6, 6, 30), 3, 1e-5)])
def test_group_norm_matches_torch(shape, groups, eps):
    """The port's GroupNorm (per-channel sums, then group sums) against torch.nn.GroupNorm, with an offset
    mean that a one-pass variance would get wrong, and the gradient of a random projection."""
    import jax
    import jax.numpy as jnp

    from flowmap_jax.unet.resnet import GroupNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32)
    scale, bias = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    probe = rng.standard_normal(shape).astype(np.float32)
    norm = torch.nn.GroupNorm(groups, shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(scale))
        norm.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    out_t = norm(xt)
    (out_t * torch.from_numpy(probe.transpose(0, 3, 1, 2).copy())).sum().backward()
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    module = GroupNorm(groups, eps)
    out_j = module.apply(params, jnp.asarray(x))
    grad_j = jax.grad(lambda v: jnp.sum(module.apply(params, v) * probe))(jnp.asarray(x))
    assert rel_error(np.asarray(out_j), out_t.detach().numpy().transpose(0, 2, 3, 1)) < 1e-5
    assert rel_error(np.asarray(grad_j), xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-4


def test_chunked_attention_matches_diffusers(monkeypatch):
    """The UNet with its attention in query blocks (ragged ones included: 5 rows of 384 at 16x24, 20 of 96
    at 8x12) against diffusers: the blocks change nothing but memory and speed."""
    from flowmap_jax.unet import attention_kernels

    monkeypatch.setattr(attention_kernels, "block_elements", lambda backend=None: 2 * 8 * 384 * 5)
    unet, _, params = model_pair("sd1")
    chunked = FlaxUNet2DConditionModel(UNetConfig.from_dict(dict(unet.config)), attention_implementation="chunked")
    x, kwargs = make_inputs(SD1, np.random.default_rng(5))
    ref, out = run_both(unet, chunked, params, x, np.array([3.5, 871.25], np.float32), **kwargs)
    assert rel_error(ref, out) <= TOL, f"rel error {rel_error(ref, out):.2e}"
