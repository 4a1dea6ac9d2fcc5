"""Image-to-image with a flow map: `flowmap_jax.spec.img2img` (strength -> start time and grid, the noised
start), `torch_ref.pipeline_img2img.FlowMapImg2ImgPipeline` and the sampling CLIs' --init-image, on the tiny
SD 1.x and SDXL pipelines. The untrained "teacher_step" flow map of the fixtures jumps as its teacher's DDIM
step, so the pipeline is checked end to end against diffusers' own img2img pipelines with DDIM on the
"trailing" grid (VAE encoding, generator order, add_noise, time ids, guidance); the noised start against the
teacher scheduler's `add_noise`; the CLIs' encoding against the VAE called directly; JAX against PyTorch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.sd_pipelines import IMAGE_SIZE, LATENT_SIZE

# Fixtures sd15_flow_pipeline, sdxl_flow_pipeline, sd15_pipeline, sdxl_pipeline: tests/conftest.py.


def _image(seed=0, batch=1):
    """(batch, H, W, 3) float32 in [0, 1] on the uint8 grid (what a PNG holds)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32) / 255.0


def _schedule(folder):
    from flowmap_jax.spec.export_format import read_export

    return read_export(folder / "unet").config.schedule


def test_strength_rule_and_errors(sd15_flow_pipeline):
    from flowmap_jax.spec.img2img import img2img_grid, start_time
    from flowmap_jax.spec.time_grid import time_grid

    schedule = _schedule(sd15_flow_pipeline)  # DDPM, 1000 steps: t_noise 999, t_clean -1
    assert start_time(schedule, 0.6) == pytest.approx(599.0, abs=1e-9)
    assert start_time(schedule, 1.0) == schedule.t_noise
    np.testing.assert_allclose(img2img_grid(schedule, 0.75, 3), [749, 499, 249, -1], atol=1e-9)
    np.testing.assert_array_equal(img2img_grid(schedule, 1.0, 4), time_grid(schedule, 4))
    for bad in (0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match=r"^strength must ") as err:
            start_time(schedule, bad)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("strength", [0.6, 0.25, 1.0])
def test_noised_start_equals_the_teacher_schedulers_add_noise(sd15_flow_pipeline, strength):
    from diffusers import DDPMScheduler

    from flowmap_jax.spec.img2img import noised_start, start_time

    schedule = _schedule(sd15_flow_pipeline)
    scheduler = DDPMScheduler.from_pretrained(sd15_flow_pipeline, subfolder="scheduler")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((2, 4, LATENT_SIZE, LATENT_SIZE), generator=g)
    eps = torch.randn((2, 4, LATENT_SIZE, LATENT_SIZE), generator=g)
    ours = noised_start(schedule, strength, x0, eps)
    if strength == 1.0:  # pure noise (diffusers' inpainting convention at strength 1)
        assert torch.equal(ours, eps)
        return
    t = start_time(schedule, strength)
    assert t == round(t)  # an integer DDPM timestep: the times coincide
    ref = scheduler.add_noise(x0, eps, torch.tensor([round(t)]))
    # float64 coefficients vs diffusers' float32 alphas_cumprod: measured max |diff| 5.4e-7 (0.6), 1.3e-6 (0.25)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    ours_np = noised_start(schedule, strength, x0.numpy(), eps.numpy())
    assert ours_np.dtype == np.float32
    np.testing.assert_allclose(ours_np, ref.numpy(), rtol=0, atol=1e-5)


def _ddim_img2img(pipeline_cls, folder, image, **kwargs):
    from diffusers import DDIMScheduler

    pipe = pipeline_cls.from_pretrained(folder, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe(image=image, output_type="np", **kwargs).images


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_img2img_equals_diffusers_img2img_with_ddim(which, request):
    """diffusers with N steps and strength s runs int(N s) DDIM steps from timestep (trailing grid) ~ s of the
    range: ours with those jumps from start_time(s), the same generator (VAE posterior sample, then noise)."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    from torch_ref.pipeline import FlowMapPipeline
    from torch_ref.pipeline_img2img import FlowMapImg2ImgPipeline

    folder = request.getfixturevalue(f"{which}_flow_pipeline")
    teacher = request.getfixturevalue(f"{which}_pipeline")
    ref_cls = StableDiffusionImg2ImgPipeline if which == "sd15" else StableDiffusionXLImg2ImgPipeline
    pipe = FlowMapImg2ImgPipeline.from_pretrained(folder)
    assert type(pipe) is FlowMapImg2ImgPipeline
    again = FlowMapImg2ImgPipeline(**FlowMapPipeline.from_pretrained(folder).components)
    pipe.set_progress_bar_config(disable=True)
    image = _image(0, 2)
    prompts = ["a photo of the cat", "two dogs"]
    cases = [({"strength": 0.5, "guidance_scale": 1.0}, 1, 2), ({"strength": 0.75, "guidance_scale": 2.0}, 3, 4)]
    for kwargs, ours_steps, ref_steps in cases:
        ours = pipe(prompts, image=image, num_inference_steps=ours_steps, output_type="np",
                    generator=torch.Generator().manual_seed(5), **kwargs).images
        _, ref = _ddim_img2img(ref_cls, teacher, image, prompt=prompts, num_inference_steps=ref_steps,
                               generator=torch.Generator().manual_seed(5), **kwargs)
        # measured max |diff| (images in [0, 1]): sd15 9.5e-7, sdxl 7.2e-7
        np.testing.assert_allclose(ours, ref, rtol=0, atol=6e-6, err_msg=f"{which} {kwargs}")
    same = again(prompts, image=image, num_inference_steps=1, strength=0.5, output_type="np",
                 generator=torch.Generator().manual_seed(5)).images
    np.testing.assert_array_equal(same, pipe(prompts, image=image, num_inference_steps=1, strength=0.5,
                                             output_type="np", generator=torch.Generator().manual_seed(5)).images)


def test_start_equals_diffusers_prepare_latents(sd15_flow_pipeline, sd15_pipeline):
    """The VAE encoding (posterior sample from the generator, scaled) and the noised start against diffusers'
    `StableDiffusionImg2ImgPipeline.prepare_latents` with the teacher's DDPM scheduler, one image for 3 rows."""
    from diffusers import DDPMScheduler, StableDiffusionImg2ImgPipeline

    from torch_ref.pipeline_img2img import FlowMapImg2ImgPipeline

    pipe = FlowMapImg2ImgPipeline.from_pretrained(sd15_flow_pipeline)
    ref_pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd15_pipeline, use_safetensors=True)
    ref_pipe.scheduler = DDPMScheduler.from_config(ref_pipe.scheduler.config)
    pixels = pipe.image_processor.preprocess(_image(2, 1))
    g = torch.Generator().manual_seed(7)  # diffusers' order: the posterior sample, then the noise
    ours = pipe.prepare_image_latents(pipe.encode_image(pixels, 3, g), 0.6, g)
    encoded = pipe.encode_image(pixels, 3, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ref = ref_pipe.prepare_latents(pixels, torch.tensor([599]), 3, 1, torch.float32, "cpu", g)
    torch.testing.assert_close(ours, ref, rtol=0, atol=3e-6)  # measured max |diff| 2.4e-7 (float64 coefficients)
    direct = ref_pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(encoded, torch.cat([direct] * 3) * ref_pipe.vae.config.scaling_factor, rtol=0, atol=0)


def test_strength_one_is_text_to_image_from_the_same_noise(sd15_flow_pipeline):
    from torch_ref.pipeline import FlowMapPipeline
    from torch_ref.pipeline_img2img import FlowMapImg2ImgPipeline

    text = FlowMapPipeline.from_pretrained(sd15_flow_pipeline)
    pipe = FlowMapImg2ImgPipeline(**text.components)
    noise = torch.randn((2, 4, LATENT_SIZE, LATENT_SIZE), generator=torch.Generator().manual_seed(3))
    ours = pipe(["a cat", "a dog"], image=_image(1, 2), strength=1.0, num_inference_steps=2, latents=noise,
                guidance_scale=2.0, output_type="latent").images
    ref = text(["a cat", "a dog"], num_inference_steps=2, latents=noise, guidance_scale=2.0,
               output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"^strength must lie in \(0, 1\]") as err:
            pipe("a cat", image=_image(), strength=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="^timesteps is not an img2img argument"):
        pipe("a cat", image=_image(), timesteps=[999, 499])


def test_sample_clis_take_an_init_image(tmp_path, sd15_flow_pipeline, capsys):
    """--init-image PNG --strength 0.5: noise.npy is the VAE mean (called directly) noised by the teacher
    scheduler's add_noise with the seed's noise; torch's latents equal FlowMapPipeline's jump from there; JAX
    equals torch."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from PIL import Image

    from flowmap_jax.sample import main as jax_main
    from flowmap_jax.spec.layout import nchw_to_nhwc, nhwc_to_nchw
    from flowmap_jax.spec.sampling_inputs import initial_noise
    from torch_ref.pipeline import FlowMapPipeline
    from torch_ref.sample import main as torch_main

    pixels = np.round(_image(4)[0] * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    flags = ["--model", str(sd15_flow_pipeline), "--prompt", "a photo of the cat", "--batch", "2", "--steps", "1",
             "--seed", "3", "--init-image", str(tmp_path / "init.png"), "--strength", "0.5"]
    assert torch_main([*flags, "--out", str(tmp_path / "torch")]) == 0
    assert jax_main([*flags, "--out", str(tmp_path / "jax")]) == 0
    start = np.load(tmp_path / "torch" / "noise.npy")
    np.testing.assert_array_equal(start, np.load(tmp_path / "jax" / "noise.npy"))

    vae = AutoencoderKL.from_pretrained(sd15_flow_pipeline, subfolder="vae")
    image = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        x0 = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    eps, _ = initial_noise(3, 2, (LATENT_SIZE, LATENT_SIZE, 4), 0)
    scheduler = DDPMScheduler.from_pretrained(sd15_flow_pipeline, subfolder="scheduler")
    ref_start = scheduler.add_noise(torch.cat([x0, x0]), torch.from_numpy(nhwc_to_nchw(eps)), torch.tensor([499]))
    # float64 coefficients vs diffusers' float32 ones: measured max |diff| 7.2e-7
    np.testing.assert_allclose(start, nchw_to_nhwc(ref_start.numpy()), rtol=0, atol=1e-5)

    torch_latents = np.load(tmp_path / "torch" / "samples.npy")
    jax_latents = np.load(tmp_path / "jax" / "samples.npy")
    pipe = FlowMapPipeline.from_pretrained(sd15_flow_pipeline)
    ref = pipe(["a photo of the cat"] * 2, timesteps=[499.0, -1.0],
               latents=torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(start))), output_type="latent").images
    np.testing.assert_allclose(torch_latents, nchw_to_nhwc(ref.numpy()), rtol=0, atol=1e-6)  # measured 0
    # JAX against PyTorch, fp32 CPU: measured max |diff| / max |ref| 3.6e-7; about 10x that is the bound.
    rel = np.abs(jax_latents - torch_latents).max() / np.abs(torch_latents).max()
    assert rel < 4e-6, rel

    capsys.readouterr()
    assert torch_main([*flags[:-1], "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--strength must lie in (0, 1]" in err and "\n" not in err
    assert torch_main([*flags[:-4], "--strength", "0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--strength needs --init-image" in capsys.readouterr().err
    assert jax_main([*flags, "--timesteps", "999,-1", "--out", str(tmp_path / "bad")]) == 2
    assert "cannot be combined with --init-image" in capsys.readouterr().err
