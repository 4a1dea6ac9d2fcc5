"""The tiny SD 1.x / SDXL pipeline folders of tests/sd_pipelines.py load with diffusers' own pipelines and run."""

import json
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.sd_pipelines import IMAGE_SIZE, SD15_SCHEDULER, SDXL_SCHEDULER


def _call(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of the cat", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_sd15_folder_loads_and_samples(sd15_pipeline):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    index = json.loads((sd15_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert sorted((sd15_pipeline / "tokenizer").iterdir()) == sorted(
        sd15_pipeline / "tokenizer" / n for n in
        ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"))
    pipe = StableDiffusionPipeline.from_pretrained(sd15_pipeline, use_safetensors=True)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    for key, value in SD15_SCHEDULER.items():
        if key != "_class_name":
            assert pipe.scheduler.config[key] == value, key
    images = _call(pipe)
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()
    assert pipe.vae_scale_factor * 8 == IMAGE_SIZE  # latents 8x8


def test_sdxl_folder_loads_and_samples(sdxl_pipeline):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline, use_safetensors=True)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.unet.config.addition_embed_type == "text_time"
    for key, value in SDXL_SCHEDULER.items():
        if key != "_class_name":
            assert pipe.scheduler.config[key] == value, key
    images = _call(pipe, negative_prompt="blurry")
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


def test_tokenizer_covers_ascii_prompts(sd15_pipeline):
    """Every printable ASCII prompt tokenizes without unknown tokens and decodes back (lower case, CLIP's
    whitespace clean-up aside)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd15_pipeline / "tokenizer")
    text = "the Quick brown fox, and 42 dogs! " + string.punctuation + " the end"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.convert_tokens_to_ids("the</w>") in ids  # a merge applied
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    padded = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77
