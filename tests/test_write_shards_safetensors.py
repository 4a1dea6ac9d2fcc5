"""The encoders (`flowmap_jax.data.encoders`, used by the shard writer, the image-folder dataset and the sampling
CLIs) load the VAE and the text encoder from safetensors only (`use_safetensors=True`): a folder with only
pickle weights (.bin) is a clear DataError naming the flag and the folder, never unpickled; the same models
saved as safetensors load and encode. Tiny random models, saved locally (no hub)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from flowmap_jax.data import encoders
from flowmap_jax.data.data_error import DataError


def _vae():
    return diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                                   layers_per_block=1)


def test_vae_from_pickle_weights_is_refused_and_safetensors_load(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    _vae().save_pretrained(tmp_path / "bin" / "vae", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "bin" / "vae")) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(DataError, match=f"--vae {tmp_path / 'bin' / 'vae'}: cannot load AutoencoderKL from "
                                        "safetensors weights"):
        encoders.encode_with_vae(images, str(tmp_path / "bin"))  # diffusers alone would load the pickle
    _vae().save_pretrained(tmp_path / "st" / "vae")
    assert encoders.encode_with_vae(images, str(tmp_path / "st")).shape == (2, 16, 16, 4)


def test_text_encoder_from_pickle_weights_is_refused_and_safetensors_load(tmp_path):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"),
                                           merges_file=str(tmp_path / "merges.txt"), model_max_length=8)
    config = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=len(vocab), max_position_embeddings=8, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1)
    model = transformers.CLIPTextModel(config)
    index = {"tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"]}
    for name in ("bin", "st"):
        tokenizer.save_pretrained(tmp_path / name / "tokenizer")
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    config.save_pretrained(tmp_path / "bin" / "text_encoder")
    torch.save(model.state_dict(), tmp_path / "bin" / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(DataError, match=f"--pipeline {tmp_path / 'bin' / 'text_encoder'}: cannot load "
                                        "CLIPTextModel from safetensors weights"):
        encoders.PromptEncoder.from_pretrained(str(tmp_path / "bin"), "cpu")  # transformers alone: loads the pickle
    model.save_pretrained(tmp_path / "st" / "text_encoder")
    assert not (tmp_path / "st" / "text_encoder" / "pytorch_model.bin").exists()
    prompts = encoders.PromptEncoder.from_pretrained(str(tmp_path / "st"), "cpu")
    states, empty = prompts.encode(["a b", "b"]), prompts.unconditional()
    assert states["encoder_hidden_states"].shape == (2, 8, 8) and empty["encoder_hidden_states"].shape == (1, 8, 8)
    with torch.no_grad():  # the model's last hidden state, as SD 1.x pipelines encode prompts
        ids = tokenizer(["a b", "b"], padding="max_length", max_length=8, return_tensors="pt").input_ids
        np.testing.assert_array_equal(states["encoder_hidden_states"], model(ids)[0].numpy())
