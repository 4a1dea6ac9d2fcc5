"""A LoRA flow map (`flowmap_jax.spec.lora_format`) in PyTorch: `torch_ref.lora_loading` against the JAX loader
and against diffusers' own fused LoRA, `FlowMapPipeline.load_flow_map` on a stock SD folder, the same folder
through stock `StableDiffusionPipeline.load_lora_weights`, bad folders, and `python -m torch_ref.sample --lora`.

The LoRA: rank 4, alpha 8 (so alpha / r = 2 is folded into lora_B), random non-zero adapters and flow-map inputs,
exported by `flowmap_jax.training.lora_export_writer` onto the tiny SD 1.x pipeline (tests/sd_pipelines.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.sd_pipelines import IMAGE_SIZE, LATENT_SIZE, write_sd15_pipeline

RANK, ALPHA = 4, 8.0
BATCH = 2


def write_lora_folder(base, out, rank=RANK, alpha=ALPHA, seed=0, guidance_dim=None):
    """A LoRA flow-map folder on the diffusers pipeline `base` (random adapters and inputs; with guidance_dim,
    CFG distilled with the scale as an input, time_embedding.cond_proj among the inputs); returns
    (folder, base Flax params, trainable tree, scale)."""
    import jax

    from flowmap_jax.core import flow_map, lora
    from flowmap_jax.data.teacher_folder import load_schedule
    from flowmap_jax.spec.export_format import FlowMapConfig
    from flowmap_jax.training.lora_export_writer import export_lora_flow_map
    from flowmap_jax.unet.diffusers_io import load_diffusers_unet

    cfg, base_params = load_diffusers_unet(base, "unet")
    student_cfg, student = flow_map.add_target_time_hook(cfg, base_params, jax.random.key(seed))
    if guidance_dim is not None:
        _, student = flow_map.add_guidance_input(student_cfg, student, guidance_dim)
    settings = lora.LoraSettings.create(rank, alpha)
    trainable = lora.init_trainable(student, base_params, settings, jax.random.key(seed + 1))
    rng = np.random.default_rng(seed)
    trainable = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32),
                             trainable)
    schedule, prediction_type = load_schedule(str(base), "scheduler")
    guidance = {} if guidance_dim is None else {"guidance": "cfg", "guidance_scale": 3.0,
                                                "guidance_embedding_dim": guidance_dim, "guidance_scale_range": (1.0, 6.0)}
    config = FlowMapConfig(schedule=schedule, prediction_type=prediction_type, parameterization="angle", **guidance)
    folder = export_lora_flow_map(trainable, settings, cfg, config, out, {"test": "lora"},
                                  base_fingerprint=lora.base_fingerprint(base_params))
    return folder, base_params, trainable, settings.scale


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory, sd15_pipeline):
    return write_lora_folder(sd15_pipeline, tmp_path_factory.mktemp("lora") / "lora")[0]


@pytest.fixture(scope="module")
def guided_lora_folder(tmp_path_factory, sd15_pipeline):
    return write_lora_folder(sd15_pipeline, tmp_path_factory.mktemp("lora") / "guided", seed=5, guidance_dim=8)[0]


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32)
    text = rng.standard_normal((BATCH, 7, 16)).astype(np.float32)
    s = np.array([999.0, 640.0], np.float32)  # integer times: alphas_cumprod read directly
    t = np.array([300.0, -1.0], np.float32)
    return x, text, s, t


def _torch_x_t(loaded, x, text, s, t, guidance_scale=None):
    with torch.no_grad():
        cond = loaded.cond(BATCH, encoder_hidden_states=text, guidance_scale=guidance_scale)
        return loaded.flow_map(None, torch.from_numpy(x), torch.from_numpy(s), torch.from_numpy(t), cond).numpy()


def _num_lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in unet.modules())


@pytest.mark.parametrize("guided", [False, True], ids=["baked", "guidance_input"])
def test_torch_equals_jax_and_diffusers_fused_lora(request, sd15_pipeline, guided):
    """x_t = X(x_s, s, t) of the LoRA flow map: torch_ref (peft layers, and fused) against the JAX loader's merged
    params through the Flax port, and against an independent reference: diffusers' own UNet with the base's
    weights, the inputs file and `load_lora_adapter` + `fuse_lora`, called as the flow map's network. With a
    guidance input too (its cond_proj in the inputs file; w = 2.5 fed as timestep_cond)."""
    import jax.numpy as jnp
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from flowmap_jax.core.export_loading import jax_flow_map
    from flowmap_jax.core.lora_loading import load_lora_flow_map as jax_load
    from flowmap_jax.spec.layout import nchw_to_nhwc, nhwc_to_nchw
    from torch_ref.flow_map import guidance_scale_embedding
    from torch_ref.lora_loading import load_lora_flow_map

    lora_folder = request.getfixturevalue("guided_lora_folder" if guided else "lora_folder")
    w = 2.5 if guided else None
    x, text, s, t = _inputs()
    loaded = load_lora_flow_map(sd15_pipeline, lora_folder)
    assert (loaded.unet.config.time_cond_proj_dim == 8) is guided
    adapters = len(load_file(str(lora_folder / "pytorch_lora_weights.safetensors"))) // 2
    assert _num_lora_layers(loaded.unet) == adapters == json.loads(
        (lora_folder / "flowmap.json").read_text())["lora"]["num_adapted_modules"]
    ours = _torch_x_t(loaded, x, text, s, t, w)
    fused = load_lora_flow_map(sd15_pipeline / "unet", lora_folder, subfolder=None, fuse=True)
    assert _num_lora_layers(fused.unet) == 0
    ours_fused = _torch_x_t(fused, x, text, s, t, w)
    extra = {}
    if guided:
        extra["timestep_cond"] = guidance_scale_embedding(torch.full((BATCH,), w - 1.0), 8)

    exported = jax_load(sd15_pipeline, lora_folder)
    jax_map = jax_flow_map(exported)
    jax_cond = {"encoder_hidden_states": jnp.asarray(text), **{k: jnp.asarray(v.numpy()) for k, v in extra.items()}}
    jax_x_t = nhwc_to_nchw(np.asarray(jax_map(exported.params, jnp.asarray(nchw_to_nhwc(x)), s, t, jax_cond)))

    # Independent reference: a stock UNet of the recorded flow-map config, the base's weights and the inputs
    # file, diffusers' LoRA loader and fuse, alphas_cumprod from diffusers' scheduler, the angle jump written here.
    unet = UNet2DConditionModel.from_config(json.loads((lora_folder / "flowmap.json").read_text())["lora"]["unet_config"])
    base = UNet2DConditionModel.from_pretrained(sd15_pipeline, subfolder="unet").state_dict()
    unet.load_state_dict({**base, **load_file(str(lora_folder / "flowmap_inputs.safetensors"))}, strict=True)
    unet.load_lora_adapter(load_file(str(lora_folder / "pytorch_lora_weights.safetensors")), prefix="unet")
    unet.fuse_lora()
    with torch.no_grad():
        out = unet(torch.from_numpy(x), torch.from_numpy(s), class_labels=torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(text), **extra).sample.double().numpy()
    from diffusers import DDIMScheduler

    bar = DDIMScheduler.from_pretrained(sd15_pipeline, subfolder="scheduler").alphas_cumprod.double().numpy()
    alpha = {float(v): (1.0 if v < 0 else float(np.sqrt(bar[int(v)]))) for v in (*s, *t)}
    a_s, a_t = (np.array([alpha[float(v)] for v in times])[:, None, None, None] for times in (s, t))
    delta = np.arccos(a_s) - np.arccos(a_t)  # theta = arctan(sigma / alpha) = arccos(alpha) on a VP schedule
    ref = np.cos(delta) * x - np.sin(delta) * out  # the "angle" jump, the network's output read as v

    scale = float(np.abs(ref).max())
    errors = {"torch-jax": float(np.abs(ours - jax_x_t).max()) / scale,
              "torch-ref": float(np.abs(ours - ref).max()) / scale,
              "fused-ref": float(np.abs(ours_fused - ref).max()) / scale,
              "jax-ref": float(np.abs(jax_x_t - ref).max()) / scale}
    print("max |diff| / max |x_t|:", errors, "max |x_t|", scale)
    assert np.all(np.isfinite(ours)) and ours.shape == x.shape
    assert float(np.abs(ours - x).max()) > 1e-2  # a jump, not the identity
    if guided:  # the scale is an input that matters
        assert float(np.abs(_torch_x_t(loaded, x, text, s, t, 5.0) - ours).max()) > 1e-3
    # measured (CPU, fp32): torch-jax 4.4e-7, torch-ref 4.6e-7, fused-ref 3.5e-7, jax-ref 4.6e-7 (max |x_t| 2.3)
    assert max(errors.values()) <= 5e-6, errors


def test_stock_sd_folder_loads_into_flow_map_pipeline_and_samples(sd15_pipeline, lora_folder):
    from torch_ref.pipeline import FlowMapPipeline

    pipe = FlowMapPipeline.from_pretrained(sd15_pipeline)
    assert pipe.config.flow_map is None
    with pytest.raises(ValueError, match=r"call pipe\.load_flow_map\(LORA_FOLDER\) first"):
        pipe("a cat", num_inference_steps=1)
    pipe.load_flow_map(lora_folder)
    assert pipe.config.flow_map["network"]["kind"] == "lora" and pipe.unet.config.class_embed_type == "timestep"
    with pytest.raises(ValueError, match="already has a flow map"):
        pipe.load_flow_map(lora_folder)
    images = pipe(["a photo of the cat", "two dogs"], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.all(np.isfinite(images))
    assert 0.0 <= images.min() and images.max() <= 1.0
    # The pipeline's jumps are the loader's flow map.
    from torch_ref.lora_loading import load_lora_flow_map

    latents = torch.randn((1, 4, LATENT_SIZE, LATENT_SIZE), generator=torch.Generator().manual_seed(1))
    got = pipe("a cat", num_inference_steps=1, latents=latents, output_type="latent").images
    loaded = load_lora_flow_map(sd15_pipeline, lora_folder)
    text = pipe.prompt_encoder().encode(["a cat"])["encoder_hidden_states"]
    with torch.no_grad():
        want = loaded.flow_map(None, latents, 999.0, -1.0, loaded.cond(1, encoder_hidden_states=text))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lora_file_opens_in_stock_stable_diffusion_pipeline(sd15_pipeline, lora_folder):
    """The promise to SD users: the adapters file goes through `load_lora_weights` as any LoRA (the flow map's
    own inputs are not in it; a stock UNet without the target-time hook simply ignores them)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15_pipeline)
    pipe.load_lora_weights(str(lora_folder))
    assert _num_lora_layers(pipe.unet) == json.loads(
        (lora_folder / "flowmap.json").read_text())["lora"]["num_adapted_modules"]


def _copy(folder, tmp_path, name="bad"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def test_bad_folders_name_the_file_or_key(tmp_path, sd15_pipeline, lora_folder):
    from safetensors.torch import load_file, save_file

    from flowmap_jax.spec.export_format import ExportFormatError
    from torch_ref.lora_loading import load_lora_flow_map

    missing = _copy(lora_folder, tmp_path, "missing")
    (missing / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"^no pytorch_lora_weights\.safetensors in .*missing"):
        load_lora_flow_map(sd15_pipeline, missing)

    other_rank = _copy(lora_folder, tmp_path, "rank")
    meta = json.loads((other_rank / "flowmap.json").read_text())
    meta["lora"]["rank"] = RANK + 1
    (other_rank / "flowmap.json").write_text(json.dumps(meta))
    with pytest.raises(ExportFormatError, match=r"pytorch_lora_weights\.safetensors: the adapters have rank 4 but "
                                                r".*flowmap\.json says lora\.rank = 5$"):
        load_lora_flow_map(sd15_pipeline, other_rank)

    inputs = _copy(lora_folder, tmp_path, "inputs")
    state = load_file(str(inputs / "flowmap_inputs.safetensors"))
    state["class_embedding.linear_1.weight"] = state["class_embedding.linear_1.weight"][:, :-1].contiguous()
    save_file(state, str(inputs / "flowmap_inputs.safetensors"))
    with pytest.raises(ExportFormatError, match=r"flowmap_inputs\.safetensors: key 'class_embedding\.linear_1\.weight' "
                                                r"has shape"):
        load_lora_flow_map(sd15_pipeline, inputs)
    del state["class_embedding.linear_1.weight"]
    save_file(state, str(inputs / "flowmap_inputs.safetensors"))
    with pytest.raises(ExportFormatError, match=r"flowmap_inputs\.safetensors: missing key "
                                                r"'class_embedding\.linear_1\.weight'$"):
        load_lora_flow_map(sd15_pipeline, inputs)

    stray = _copy(lora_folder, tmp_path, "stray")
    state = load_file(str(stray / "pytorch_lora_weights.safetensors"))
    key = min(state)
    state[key.replace("down_blocks.0", "down_blocks.7")] = state.pop(key)
    save_file(state, str(stray / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ExportFormatError, match=r"pytorch_lora_weights\.safetensors: key 'unet\.down_blocks\.7\..*' "
                                                r"names no Linear or Conv2d module of the base UNet"):
        load_lora_flow_map(sd15_pipeline, stray)

    with pytest.raises(FileNotFoundError, match=r"^no base UNet folder at .*nowhere"):
        load_lora_flow_map(tmp_path / "nowhere", lora_folder)


def test_a_base_of_another_architecture_is_refused(tmp_path, sd15_pipeline, lora_folder):
    from diffusers import UNet2DConditionModel

    from flowmap_jax.spec.export_format import ExportFormatError
    from torch_ref.lora_loading import load_lora_flow_map
    from torch_ref.pipeline import FlowMapPipeline

    config = dict(UNet2DConditionModel.load_config(sd15_pipeline / "unet"))
    config["cross_attention_dim"] = 24
    other = tmp_path / "other_unet"
    UNet2DConditionModel.from_config(config).save_pretrained(other)
    with pytest.raises(ExportFormatError, match=r"other_unet/config\.json: key 'cross_attention_dim' is 24 but the "
                                                r"LoRA in .*flowmap\.json was trained on a base with "
                                                r"cross_attention_dim=16"):
        load_lora_flow_map(other, lora_folder)
    pipe = FlowMapPipeline.from_pretrained(sd15_pipeline)
    pipe.unet = UNet2DConditionModel.from_pretrained(other)
    with pytest.raises(ExportFormatError, match=r"the base UNet's config: key 'cross_attention_dim' is 24"):
        pipe.load_flow_map(lora_folder)


def test_torch_sample_cli_with_lora(tmp_path, sd15_pipeline, lora_folder):
    from torch_ref.sample import main

    out = tmp_path / "samples"
    code = main(["--model", str(sd15_pipeline), "--lora", str(lora_folder), "--prompt", "a cat", "--batch", "2",
                 "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    samples = np.load(out / "samples.npy")
    assert samples.shape == (2, LATENT_SIZE, LATENT_SIZE, 4) and np.all(np.isfinite(samples))
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png", "0001.png"]
    info = json.loads((out / "sample_info.json").read_text())
    assert info["lora"] == str(lora_folder) and info["model"] == str(sd15_pipeline)
    # A UNet folder as the base, conditioning from a file: the same flow map.
    cond = tmp_path / "cond.npy"
    np.save(cond, np.random.default_rng(0).standard_normal((1, 7, 16)).astype(np.float32))
    code = main(["--model", str(sd15_pipeline / "unet"), "--lora", str(lora_folder), "--cond", str(cond),
                 "--batch", "2", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "unet_base")])
    assert code == 0 and np.all(np.isfinite(np.load(tmp_path / "unet_base" / "samples.npy")))
    # A bad LoRA folder is a usage error (exit 2).
    assert main(["--model", str(sd15_pipeline), "--lora", str(tmp_path / "none"), "--prompt", "x",
                 "--out", str(tmp_path / "x")]) == 2


def test_a_second_tiny_pipeline_of_the_same_architecture_takes_the_lora(tmp_path, lora_folder):
    """Another base of the recorded architecture (a "fine-tune": other weights) loads the same LoRA."""
    from torch_ref.lora_loading import load_lora_flow_map

    other = write_sd15_pipeline(tmp_path / "other", seed=3)
    x, text, s, t = _inputs(1)
    assert np.all(np.isfinite(_torch_x_t(load_lora_flow_map(other, lora_folder), x, text, s, t)))


def test_jax_sample_cli_with_lora_equals_torch(tmp_path, sd15_pipeline, lora_folder):
    """`python -m flowmap_jax.sample --model BASE --lora FOLDER` and the torch twin: same noise, same latents (fp32;
    the same tolerance as the loaders' parity above)."""
    from flowmap_jax.sample import main as jax_main
    from torch_ref.sample import main as torch_main

    args = ["--model", str(sd15_pipeline), "--lora", str(lora_folder), "--prompt", "a cat", "--batch", "2",
            "--steps", "2", "--device", "cpu", "--seed", "3"]
    assert jax_main([*args, "--out", str(tmp_path / "jax")]) == 0
    assert torch_main([*args, "--out", str(tmp_path / "torch")]) == 0
    a, b = np.load(tmp_path / "jax" / "samples.npy"), np.load(tmp_path / "torch" / "samples.npy")
    assert a.shape == b.shape == (2, LATENT_SIZE, LATENT_SIZE, 4)
    assert np.abs(a - b).max() <= 5e-6 * np.abs(b).max()  # relative, as the parity test above
