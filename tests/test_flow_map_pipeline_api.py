"""FlowMapPipeline (torch_ref/pipeline.py) as diffusers users expect it (issue 27): the save_pretrained round trip
(every loader of the project reads the saved folder, twice over, a LoRA flow map saved merged), diffusers' call
arguments (prompt embeddings from `encode_prompt` against stock diffusers' `encode_prompt`, clip_skip,
callback_on_step_end, interrupt, eta, guidance_rescale, cross_attention_kwargs with the LoRA loader mixin, SDXL's
size ids against stock StableDiffusionXLPipeline's) on the tiny SD 1.x and SDXL pipelines (tests/sd_pipelines.py)."""

import json
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.sd_pipelines import IMAGE_SIZE, LATENT_SIZE

PROMPTS = ["a photo of the cat", "two dogs"]


def _latents(seed=0, batch=2):
    return torch.randn((batch, 4, LATENT_SIZE, LATENT_SIZE), generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pipe(folder):
    from torch_ref.pipeline import FlowMapPipeline

    pipe = FlowMapPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory, sd15_pipeline):
    pytest.importorskip("peft")
    from tests.test_lora_torch import write_lora_folder

    return write_lora_folder(sd15_pipeline, tmp_path_factory.mktemp("lora") / "lora")[0]


# --------------------------------------------------------------------------------------------------
# save_pretrained


def _check_saved_folder(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "FlowMapPipeline"]
    assert (folder / "pipeline.py").is_file() and (folder / "unet" / "flowmap.json").is_file()
    assert json.loads((folder / "unet" / "flowmap.json").read_text()) == index["flow_map"]
    return index


def test_save_pretrained_round_trip_twice(tmp_path, sd15_flow_pipeline):
    """save, load, save, load: FlowMapPipeline.from_pretrained, DiffusionPipeline.from_pretrained(trust_remote_code)
    and both sampling CLIs read the saved folder; images equal the original pipeline's (same seed)."""
    from diffusers import DiffusionPipeline

    from flowmap_jax.sample import main as jax_main
    from flowmap_jax.spec.layout import nhwc_to_nchw
    from torch_ref.sample import main as torch_main

    kwargs = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "np"}
    original = _pipe(sd15_flow_pipeline)
    ref = original(PROMPTS, generator=_gen(4), **kwargs).images
    original.save_pretrained(tmp_path / "once")
    _check_saved_folder(tmp_path / "once")
    once = _pipe(tmp_path / "once")
    np.testing.assert_array_equal(once(PROMPTS, generator=_gen(4), **kwargs).images, ref)  # measured: identical
    once.save_pretrained(tmp_path / "twice")
    index = _check_saved_folder(tmp_path / "twice")
    assert index["flow_map"] == original.config.flow_map
    twice = DiffusionPipeline.from_pretrained(tmp_path / "twice", trust_remote_code=True)
    assert type(twice).__name__ == "FlowMapPipeline" and type(twice).__module__ == "torch_ref.pipeline"
    twice.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(twice(PROMPTS, generator=_gen(4), **kwargs).images, ref)

    flags = ["--model", str(tmp_path / "twice"), "--prompt", "a photo of the cat", "--batch", "1", "--steps", "2",
             "--seed", "3"]
    assert torch_main([*flags, "--out", str(tmp_path / "torch")]) == 0
    assert jax_main([*flags, "--out", str(tmp_path / "jax")]) == 0
    noise = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(np.load(tmp_path / "torch" / "noise.npy"))))
    want = original("a photo of the cat", num_inference_steps=2, latents=noise, output_type="latent").images
    want = want.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "torch" / "samples.npy"), want, rtol=0, atol=1e-6)  # the same torch computation
    jax_latents = np.load(tmp_path / "jax" / "samples.npy")
    assert np.abs(jax_latents - want).max() / np.abs(want).max() < 1e-4  # fp32 CPU; issue 12's bound


def test_a_lora_flow_map_is_saved_merged(tmp_path, sd15_pipeline, lora_folder):
    """A pipeline built by load_flow_map (peft adapters on the UNet) saves a full flow-map pipeline folder: unet/
    the merged UNet, flowmap.json naming its own weights; loading it needs no base and gives the same images."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from flowmap_jax.spec.export_format import read_export

    pipe = _pipe(sd15_pipeline)
    with pytest.raises(ValueError, match="no flow map"):
        pipe.save_pretrained(tmp_path / "nothing")
    pipe.load_flow_map(lora_folder)
    kwargs = {"num_inference_steps": 2, "output_type": "np"}
    ref = pipe(PROMPTS, generator=_gen(1), **kwargs).images
    pipe.save_pretrained(tmp_path / "merged")
    assert any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())  # the pipeline keeps its adapters
    index = _check_saved_folder(tmp_path / "merged")
    assert index["flow_map"]["network"]["weights"] == "diffusion_pytorch_model.safetensors"
    assert index["flow_map"]["lora"]["merged"] is True
    assert read_export(tmp_path / "merged" / "unet").config.parameterization == "angle"
    loaded = _pipe(tmp_path / "merged")
    assert not any(isinstance(m, BaseTunerLayer) for m in loaded.unet.modules())
    got = loaded(PROMPTS, generator=_gen(1), **kwargs).images
    # W + B A merged against peft's separate branch: measured max |diff| 1.7e-6 (images in [0, 1])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    loaded.save_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(_pipe(tmp_path / "again")(PROMPTS, generator=_gen(1), **kwargs).images, got)


# --------------------------------------------------------------------------------------------------
# encode_prompt, prompt embeddings, clip_skip


def test_encode_prompt_equals_stock_sd15(sd15_flow_pipeline, sd15_pipeline):
    from diffusers import StableDiffusionPipeline

    pipe = _pipe(sd15_flow_pipeline)
    stock = StableDiffusionPipeline.from_pretrained(sd15_pipeline)
    if not hasattr(stock.text_encoder, "text_model"):  # transformers 5: where diffusers 0.42's clip_skip looks
        object.__setattr__(stock.text_encoder, "text_model", types.SimpleNamespace(
            final_layer_norm=stock.text_encoder.final_layer_norm))
    for clip_skip in (None, 1):
        ours = pipe.encode_prompt(PROMPTS, num_images_per_prompt=2, negative_prompt=["blurry", "dark"],
                                  clip_skip=clip_skip)
        ref = stock.encode_prompt(PROMPTS, "cpu", 2, True, ["blurry", "dark"], clip_skip=clip_skip)
        assert ours[0].shape == (4, 77, 16) and ours[2] is None and ours[3] is None
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
        torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)
    # The training encoding (PromptEncoder) is encode_prompt's without clip_skip; clip_skip changes it.
    shards = pipe.prompt_encoder().encode(PROMPTS)["encoder_hidden_states"]
    plain = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[0]
    skipped = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clip_skip=1)[0]
    np.testing.assert_array_equal(plain.detach().numpy(), shards)
    assert (skipped - plain).abs().max() > 1e-2


def test_encode_prompt_equals_stock_sdxl(sdxl_flow_pipeline, sdxl_pipeline):
    from diffusers import StableDiffusionXLPipeline

    pipe = _pipe(sdxl_flow_pipeline)
    stock = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline)
    for kwargs in ({}, {"negative_prompt": ["x", "a dog"], "prompt_2": ["red", "blue"], "clip_skip": 1}):
        ours = pipe.encode_prompt(PROMPTS, **kwargs)
        ref = stock.encode_prompt(PROMPTS, **kwargs)
        assert len(ours) == 4 and ours[2].ndim == 2
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    zeros = pipe.encode_prompt(PROMPTS)  # force_zeros_for_empty_prompt: the negatives are zeros, as diffusers
    assert not zeros[1].any() and not zeros[3].any()


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_prompt_embeds_give_the_same_images_as_prompts(which, request):
    pipe = _pipe(request.getfixturevalue(f"{which}_flow_pipeline"))
    latents = _latents(5)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 2.5, "latents": latents, "output_type": "np"}
    ref = pipe(PROMPTS, negative_prompt=["blurry", "dark"], **kwargs).images
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, negative_prompt=["blurry", "dark"])
    got = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
               negative_pooled_prompt_embeds=negative_pooled, **kwargs).images
    np.testing.assert_array_equal(got, ref)  # the same tensors into the same jumps: measured identical
    skipped = pipe(PROMPTS, clip_skip=1, negative_prompt=["blurry", "dark"], **kwargs).images
    embeds_1, *_ = pipe.encode_prompt(PROMPTS, negative_prompt=["blurry", "dark"], clip_skip=1)
    via_embeds = pipe(prompt_embeds=embeds_1, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=negative_pooled, **kwargs).images  # clip_skip: hidden states only
    np.testing.assert_array_equal(skipped, via_embeds)
    assert np.abs(skipped - ref).max() > 1e-4
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPTS, prompt_embeds=embeds)


# --------------------------------------------------------------------------------------------------
# callbacks, interrupt, progress bar


def test_callback_on_step_end_sees_every_jump_and_interrupt(sd15_flow_pipeline, capsys):
    pipe = _pipe(sd15_flow_pipeline)
    latents = _latents(6)
    seen = []

    def record(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, t, kwargs["latents"].clone(), kwargs["prompt_embeds"].shape))
        return {}

    out = pipe(PROMPTS, num_inference_steps=3, latents=latents, output_type="latent", callback_on_step_end=record,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    grid = pipe.time_grid(pipe.loaded_flow_map().config.schedule, 3)
    assert [s[0] for s in seen] == [0, 1, 2] and [s[1] for s in seen] == list(grid[:-1])
    assert seen[0][3] == (2, 77, 16) and pipe.num_timesteps == 3
    torch.testing.assert_close(seen[-1][2], out, rtol=0, atol=0)
    # A returned dict replaces the latents.
    zero = pipe(PROMPTS, num_inference_steps=2, latents=latents, output_type="latent",
                callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros_like(k["latents"])}).images
    assert not zero.any()

    def stop(p, i, t, kwargs):
        p._interrupt = True
        return kwargs

    first = pipe(PROMPTS, num_inference_steps=3, latents=latents, output_type="latent",
                 callback_on_step_end=stop).images
    torch.testing.assert_close(first, seen[0][2], rtol=0, atol=0)  # jumps after the first skipped
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPTS, num_inference_steps=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["x"])
    capsys.readouterr()
    pipe.set_progress_bar_config(disable=False)
    pipe(PROMPTS, num_inference_steps=2, output_type="latent")
    assert "2/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPTS, num_inference_steps=2, output_type="latent")
    assert "2/2" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# eta, guidance_rescale, cross_attention_kwargs (+ the LoRA mixin)


def test_eta_is_the_samplers_gamma(sd15_flow_pipeline):
    from diffusers.utils.torch_utils import randn_tensor

    from torch_ref.sample import sample

    pipe = _pipe(sd15_flow_pipeline)
    latents = _latents(7)
    plain = pipe(PROMPTS, num_inference_steps=3, latents=latents, output_type="latent").images
    zero = pipe(PROMPTS, num_inference_steps=3, latents=latents, eta=0.0, generator=_gen(5), output_type="latent")
    torch.testing.assert_close(zero.images, plain, rtol=0, atol=0)
    got = pipe(PROMPTS, num_inference_steps=3, latents=latents, eta=0.6, generator=_gen(5), output_type="latent").images
    gen = _gen(5)
    noise = [randn_tensor(tuple(latents.shape), generator=gen) for _ in range(2)]  # one per jump but the last
    loaded = pipe.loaded_flow_map()
    want = sample(loaded, latents, pipe.time_grid(loaded.config.schedule, 3), pipe.prompt_encoder().encode(PROMPTS),
                  gamma=0.6, renoise=noise)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the same formula and noise
    assert (got - plain).abs().max() > 0.1
    with pytest.raises(ValueError, match="eta"):
        pipe(PROMPTS, num_inference_steps=2, eta=1.5)


def test_guidance_rescale_rescales_the_guided_jump(sd15_flow_pipeline):
    pipe = _pipe(sd15_flow_pipeline)
    latents = _latents(8)
    w, r = 3.0, 0.7
    got = pipe(PROMPTS, num_inference_steps=1, latents=latents, guidance_scale=w, guidance_rescale=r,
               output_type="latent").images
    loaded = pipe.loaded_flow_map()
    enc = pipe.prompt_encoder()
    with torch.no_grad():
        x_c = loaded.flow_map(None, latents, 999.0, -1.0, loaded.cond(2, **enc.encode(PROMPTS)))
        x_u = loaded.flow_map(None, latents, 999.0, -1.0, loaded.cond(2, **enc.encode(["", ""])))
    guided = x_u + w * (x_c - x_u)
    std = lambda v: v.std(dim=(1, 2, 3), keepdim=True)
    want = r * guided * std(x_c) / std(guided) + (1 - r) * guided
    # one batched (cond, uncond) call against two calls, std's reductions: measured max |diff| 5.3e-5 (|X| up to 51)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    plain = pipe(PROMPTS, num_inference_steps=1, latents=latents, guidance_scale=w, output_type="latent").images
    assert (got - plain).abs().max() > 0.1  # measured 0.31


def test_cross_attention_kwargs_carry_the_lora_scale(sd15_flow_pipeline, lora_folder):
    """`load_lora_weights` (diffusers' LoRA loader mixin) puts a LoRA on the flow map's UNet; the scale in
    cross_attention_kwargs reaches it (scale 0: the flow map without it)."""
    pipe = _pipe(sd15_flow_pipeline)
    latents = _latents(9)
    kwargs = {"num_inference_steps": 2, "latents": latents, "output_type": "latent"}
    ref = pipe(PROMPTS, **kwargs).images
    pipe.load_lora_weights(str(lora_folder))
    full = pipe(PROMPTS, **kwargs).images
    off = pipe(PROMPTS, cross_attention_kwargs={"scale": 0.0}, **kwargs).images
    half = pipe(PROMPTS, cross_attention_kwargs={"scale": 0.5}, **kwargs).images
    assert (full - ref).abs().max() > 1e-2
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe(PROMPTS, cross_attention_kwargs={"scale": 1.0}, **kwargs).images, full,
                               rtol=0, atol=0)
    assert (half - full).abs().max() > 1e-3 and (half - ref).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# SDXL size ids


def _time_ids_seen(unet):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    return seen, unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_sdxl_size_ids_reach_the_unet_as_in_diffusers(sdxl_flow_pipeline, sdxl_pipeline):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = _pipe(sdxl_flow_pipeline)
    latents = _latents(10)
    seen, handle = _time_ids_seen(pipe.unet)
    pipe(PROMPTS, num_inference_steps=1, latents=latents, output_type="latent")
    handle.remove()
    np.testing.assert_array_equal(seen[0].numpy(), [[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]] * 2)
    sizes = {"original_size": (64, 48), "crops_coords_top_left": (4, 8), "target_size": (40, 24),
             "negative_original_size": (16, 16), "negative_crops_coords_top_left": (1, 2),
             "negative_target_size": (24, 8)}
    seen, handle = _time_ids_seen(pipe.unet)
    pipe(PROMPTS, num_inference_steps=1, latents=latents, guidance_scale=2.0, output_type="latent", **sizes)
    handle.remove()
    ours = seen[0]
    np.testing.assert_array_equal(ours.numpy(), [[64, 48, 4, 8, 40, 24]] * 2 + [[16, 16, 1, 2, 24, 8]] * 2)
    # One prompt against diffusers: with more, diffusers repeats its (negative, conditional) pair of id rows
    # per prompt while its batch is (all negatives, all conditionals), so its negative sizes land on wrong rows.
    seen, handle = _time_ids_seen(pipe.unet)
    pipe(PROMPTS[:1], num_inference_steps=1, latents=latents[:1], guidance_scale=2.0, output_type="latent", **sizes)
    handle.remove()
    ours = seen[0]
    stock = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    seen, handle = _time_ids_seen(stock.unet)
    stock(PROMPTS[:1], num_inference_steps=1, latents=latents[:1], guidance_scale=2.0, height=IMAGE_SIZE,
          width=IMAGE_SIZE, output_type="latent", **sizes)
    handle.remove()
    ref = seen[0]  # diffusers stacks (negative, conditional); ours (conditional, negative)
    assert ref.shape == (2, 6)
    torch.testing.assert_close(torch.cat([ref[1:], ref[:1]]), ours, rtol=0, atol=0)
