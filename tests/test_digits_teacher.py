"""The shipped digits teacher: a stock diffusers folder, small, and its DDIM-50 CFG samples are digits."""

import json
import os

import numpy as np
import pytest

from flowmap_jax.digits import TEACHER_DIR

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STANDARD_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D"}


@pytest.fixture(scope="module")
def info():
    with open(os.path.join(TEACHER_DIR, "teacher_info.json")) as f:
        return json.load(f)


def test_teacher_folder_is_stock_diffusers(info):
    from safetensors.numpy import load_file

    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(TEACHER_DIR, "unet"))
    config = unet.config
    used = set(config.down_block_types) | set(config.up_block_types) | {config.mid_block_type}
    assert used <= STANDARD_BLOCKS, used
    assert config.class_embed_type is None and config.addition_embed_type is None
    assert config.time_cond_proj_dim is None and config.encoder_hid_dim is None
    assert (config.in_channels, config.out_channels, config.sample_size) == (1, 1, 16)
    table = load_file(os.path.join(TEACHER_DIR, "label_embeddings.safetensors"))
    assert set(table) == {"weight"}
    assert table["weight"].shape == (11, config.cross_attention_dim) and table["weight"].dtype == np.float32
    scheduler = diffusers.DDPMScheduler.from_pretrained(os.path.join(TEACHER_DIR, "scheduler"))
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.num_train_timesteps == 1000
    assert info["null_label"] == 10 and info["recommended_guidance_scale"] >= 1.0
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(TEACHER_DIR) for name in names)
    assert size < 10e6, size


@pytest.mark.parametrize("num_samples", [40, pytest.param(200, marks=pytest.mark.slow)])
def test_teacher_ddim50_cfg_samples_have_their_label(info, num_samples):
    """DDIM 50 steps at the recommended CFG scale, labels cycling 0..9: the classifier reads the
    samples as their label far above chance (0.1); the shipped teacher scores 100% on 500 samples.
    40 samples by default (~15 s of one CPU core; 163 MFLOP per sample per network call, 100 calls)."""
    from flowmap_jax.digits.quality import label_accuracy
    from flowmap_jax.spec.layout import nchw_to_nhwc
    from torch_ref.train_digits_teacher import load_teacher, sample_ddim

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fastest on a small shared CPU
    try:
        unet, table, scheduler = load_teacher(TEACHER_DIR)
        labels = torch.arange(num_samples) % 10
        samples = sample_ddim(unet, table, scheduler.config, labels, info["recommended_guidance_scale"], 50,
                              generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    samples = nchw_to_nhwc(samples.numpy())
    assert np.all(np.isfinite(samples)) and np.abs(samples).max() < 3.0
    assert label_accuracy(samples, labels.numpy()) >= 0.85
