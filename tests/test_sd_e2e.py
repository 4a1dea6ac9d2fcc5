"""Stable Diffusion end to end on the tiny pipelines (tests/sd_pipelines.py), through the command lines:
captioned images -> `write_shards --pipeline` -> `train --preset sd15|sdxl` -> `conversion export --pipeline` ->
`FlowMapPipeline` prompts to PIL images; the run's sample grid is decoded through the pipeline's VAE.

Two versions of each path:
- fast (the default suite, CI): the preset with overrides for size and steps plus `FAST`: float32 without remat,
  the `pairs` objective with one DDIM teacher step, 1 training step, 1-jump grid rows, no quality table. What it
  skips and why: the presets' bf16 compute, remat and 8-step teacher targets (and the eulerian JVP objective,
  the presets' objective until this session), whose train step alone took 327 s to compile for the tiny
  SD 1.x UNet on this project's loaded 2-core CPU (those parts have their own
  tests: tests/test_objectives.py, tests/test_train_step.py, benchmarks/sd15_step_plan.py). The rest of the
  preset is kept and checked (preset name, shards, guidance scale, optimiser, text conditioning). sd15 also
  distils guidance as an input (w in [2, 12]) and samples FlowMapPipeline at two w; sdxl keeps it baked in.
  Even so, compiling the train step is most of the time (64 s for sd15 under load average 6 here).
- slow (`pytest -m slow`): the presets as they are (bf16, remat, pairs with 8-step targets) with the same size
  overrides.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.sd_pipelines import (
    IMAGE_SIZE,
    LATENT_CHANNELS,
    LATENT_SIZE,
    write_captioned_images,
)

SIZE_AND_STEPS = ["--data.sample_shape", f"{LATENT_SIZE},{LATENT_SIZE},{LATENT_CHANNELS}", "--data.batch_size", "4",
                  "--mesh.data", "1",
                  "--data.image_size", str(IMAGE_SIZE), "--run.steps", "2", "--run.checkpoint_every", "2",
                  "--sample.teacher_steps", "2", "--sample.jumps", "1,2", "--optim.warmup_steps", "1",
                  "--run.progress_bar", "false", "--run.compilation_cache", ""]
FAST_OPTIONS = {"teacher_steps": 1, "teacher_solver": "ddim"}
FAST = ["--model.dtype", "float32", "--model.remat", "false", "--run.quality_samples", "0", "--run.steps", "1",
        "--run.checkpoint_every", "1", "--sample.jumps", "1", "--sample.grid_columns", "2", "--objective.names", "pairs"]
GUIDANCE_INPUT = {"guidance_scale_range": [2.0, 12.0], "guidance_embedding_dim": 8}


def _whole_path(tmp_path, pipeline, preset, *extra, fast=False):
    """Captions -> shards -> train -> export --pipeline -> FlowMapPipeline images; returns (shards dataset,
    pipeline, the run's config.json)."""
    from PIL import Image

    from conversion.__main__ import main as conversion_main
    from flowmap_jax.data import datasets
    from flowmap_jax import train, write_shards
    from torch_ref.pipeline import FlowMapPipeline

    images = write_captioned_images(tmp_path / "images", [f"a photo of thing {i}" for i in range(6)])
    shards = tmp_path / "shards"
    assert write_shards.main(["--out", str(shards), "--source", "folder", "--images", str(images), "--pipeline",
                              str(pipeline), "--image-size", str(IMAGE_SIZE), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert train.main(["--preset", preset, "--teacher.path", str(pipeline), "--data.path", str(shards),
                       "--run.dir", str(run), *SIZE_AND_STEPS, *(FAST if fast else ()), *extra]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == preset
    assert config["objective"]["names"] == ["pairs"]
    assert config["objective"]["options"].get("teacher_steps") == (1 if fast else 8)
    # The grid is decoded through the pipeline's VAE: RGB, tiles of the image size (shown 3x below 64 px), one row
    # per --sample.jumps and the teacher's, not of the 8x8 latents.
    steps, jumps = config["run"]["steps"], config["sample"]["jumps"]
    grid = Image.open(run / "samples" / f"step_{steps:06d}.png")
    assert grid.mode == "RGB" and grid.size[1] == (len(jumps) + 1) * (IMAGE_SIZE * 3 + 2) + 2
    out = tmp_path / "pipeline"
    assert conversion_main(["export", str(run), str(out), "--pipeline"]) == 0
    pipe = FlowMapPipeline.from_pretrained(out)
    images = pipe(["a photo of the cat", "two dogs"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2 and images[0].mode == "RGB"
    assert np.asarray(images[0]).std() > 0
    return datasets.ShardsDataset(str(shards)), pipe, config


def test_sd15_captions_to_images_fast(tmp_path, sd15_pipeline):
    """sd15 with guidance distilled as an input: the export takes guidance_scale in [2, 12] (7.5 the default)."""
    options = json.dumps(dict(FAST_OPTIONS, **GUIDANCE_INPUT))
    data, pipe, config = _whole_path(tmp_path, sd15_pipeline, "sd15", "--objective.options", options, fast=True)
    assert data.cond_names == ["encoder_hidden_states"]
    assert config["teacher"]["guidance_scale"] == 7.5 and config["optim"]["lr"] == 1e-5
    assert config["data"]["source"] == "shards" and config["model"] == dict(config["model"], dtype="float32",
                                                                            remat=False)
    guidance = pipe.config.flow_map["guidance"]
    assert guidance == dict(guidance, teacher_guidance="cfg", scale=7.5, embedded=True, scale_range=[2.0, 12.0])
    assert pipe.unet.config.time_cond_proj_dim == 8
    for w in (3.0, 7.5):
        images = pipe("a photo of the cat", num_inference_steps=1, guidance_scale=w, output_type="np").images
        assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match=r"guidance scale 20.0 .* outside \[2.0, 12.0\]"):
        pipe("a photo of the cat", num_inference_steps=1, guidance_scale=20.0)


def test_sdxl_captions_to_images_fast(tmp_path, sdxl_pipeline):
    data, pipe, config = _whole_path(tmp_path, sdxl_pipeline, "sdxl", "--mesh.fsdp", "1", "--objective.options",
                                     json.dumps(FAST_OPTIONS), fast=True)
    assert data.cond_names == ["added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids",
                               "encoder_hidden_states"]
    assert pipe.text_encoder_2 is not None
    assert config["teacher"]["guidance_scale"] == 5.0 and pipe.config.flow_map["guidance"]["scale"] == 5.0
    assert not pipe.config.flow_map["guidance"]["embedded"]


@pytest.mark.slow
def test_sd15_captions_to_images(tmp_path, sd15_pipeline):
    data, pipe, _ = _whole_path(tmp_path, sd15_pipeline, "sd15")
    assert data.cond_names == ["encoder_hidden_states"]
    assert pipe.config.flow_map["guidance"]["scale"] == 7.5


@pytest.mark.slow
def test_sdxl_captions_to_images(tmp_path, sdxl_pipeline):
    data, pipe, _ = _whole_path(tmp_path, sdxl_pipeline, "sdxl", "--mesh.fsdp", "1")
    assert data.cond_names == ["added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids",
                               "encoder_hidden_states"]
    assert pipe.text_encoder_2 is not None


def test_sd15_lora_captions_to_images_fast(tmp_path, sd15_pipeline):
    """LoRA on the tiny SD 1.5 pipeline: captions -> shards -> `train --preset sd15 --model.lora_rank 4` (FAST) ->
    `export` (the LoRA folder) -> a stock-folder FlowMapPipeline with `load_flow_map` (diffusers + peft) -> images;
    the JAX and torch samplers with `--model BASE --lora FOLDER` give the same latents (fp32; 5e-6 relative, ~10x
    the measured 3.6e-7)."""
    from conversion.__main__ import main as conversion_main
    from flowmap_jax import sample as jax_sample
    from flowmap_jax import train, write_shards
    from torch_ref import sample as torch_sample
    from torch_ref.pipeline import FlowMapPipeline

    images = write_captioned_images(tmp_path / "images", [f"a photo of thing {i}" for i in range(6)])
    shards = tmp_path / "shards"
    assert write_shards.main(["--out", str(shards), "--source", "folder", "--images", str(images), "--pipeline",
                              str(sd15_pipeline), "--image-size", str(IMAGE_SIZE), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert train.main(["--preset", "sd15", "--teacher.path", str(sd15_pipeline), "--data.path", str(shards),
                       "--run.dir", str(run), *SIZE_AND_STEPS, *FAST, "--objective.options", json.dumps(FAST_OPTIONS),
                       "--model.lora_rank", "4", "--model.lora_alpha", "8", "--optim.lr", "1e-2"]) == 0
    assert sorted(p.name for p in (run / "export").iterdir()) == ["flowmap.json", "flowmap_inputs.safetensors",
                                                                  "pytorch_lora_weights.safetensors"]
    out = tmp_path / "lora"
    assert conversion_main(["export", str(run), str(out), "--lora"]) == 0
    pipe = FlowMapPipeline.from_pretrained(sd15_pipeline)
    pipe.load_flow_map(out)
    result = pipe(["a photo of the cat", "two dogs"], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert result.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(result).all() and result.std() > 0
    args = ["--model", str(sd15_pipeline), "--lora", str(out), "--prompt", "a cat", "--batch", "2", "--steps", "2",
            "--device", "cpu"]
    assert jax_sample.main([*args, "--out", str(tmp_path / "jax")]) == 0
    assert torch_sample.main([*args, "--out", str(tmp_path / "torch")]) == 0
    a, b = np.load(tmp_path / "jax" / "samples.npy"), np.load(tmp_path / "torch" / "samples.npy")
    assert np.abs(a - b).max() <= 5e-6 * np.abs(b).max()
