"""Stable Diffusion end to end on the tiny pipelines (tests/sd_pipelines.py), through the command lines:
captioned images -> `write_shards --pipeline` -> `train --preset sd15|sdxl` (overrides: size, steps and the mesh
of one CPU device) -> `conversion export --pipeline` -> `FlowMapPipeline` prompts to PIL images.

Slow: the presets compute in bf16 with remat and the eulerian (JVP) objective; compiling that train step
took 327 s for the tiny SD 1.x UNet on this project's loaded 2-core CPU (2 min of CPU time).
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


def _whole_path(tmp_path, pipeline, preset, *extra):
    from conversion.__main__ import main as conversion_main
    from flowmap_jax import datasets, train, write_shards
    from torch_ref.pipeline import FlowMapPipeline

    images = write_captioned_images(tmp_path / "images", [f"a photo of thing {i}" for i in range(6)])
    shards = tmp_path / "shards"
    assert write_shards.main(["--out", str(shards), "--source", "folder", "--images", str(images), "--pipeline",
                              str(pipeline), "--image-size", str(IMAGE_SIZE), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    assert train.main(["--preset", preset, "--teacher.path", str(pipeline), "--data.path", str(shards),
                       "--run.dir", str(run), *SIZE_AND_STEPS, *extra]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == preset and config["objective"]["names"] == ["eulerian"]
    assert (run / "samples" / "step_000002.png").is_file()
    out = tmp_path / "pipeline"
    assert conversion_main(["export", str(run), str(out), "--pipeline"]) == 0
    pipe = FlowMapPipeline.from_pretrained(out)
    images = pipe(["a photo of the cat", "two dogs"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    assert np.asarray(images[0]).std() > 0
    return datasets.ShardsDataset(str(shards)), pipe


@pytest.mark.slow
def test_sd15_captions_to_images(tmp_path, sd15_pipeline):
    data, pipe = _whole_path(tmp_path, sd15_pipeline, "sd15")
    assert data.cond_names == ["encoder_hidden_states"]
    assert pipe.config.flow_map["guidance"]["scale"] == 7.5


@pytest.mark.slow
def test_sdxl_captions_to_images(tmp_path, sdxl_pipeline):
    data, pipe = _whole_path(tmp_path, sdxl_pipeline, "sdxl", "--mesh.fsdp", "1")
    assert data.cond_names == ["added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids",
                               "encoder_hidden_states"]
    assert pipe.text_encoder_2 is not None
