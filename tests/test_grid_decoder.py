"""Sample grids of a latent teacher decoded through its pipeline's VAE (`flowmap_jax.training.grid_decoder`): which VAE,
the decode against diffusers' own AutoencoderKL, the fallbacks with their one-line notes, and the grid's tile
size. The trainer's grid of a whole tiny-pipeline run is checked in tests/test_sd_e2e.py."""

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flowmap_jax.training import train_cli
from flowmap_jax.training.grid_decoder import GridDecoder, grid_decoder
from flowmap_jax.spec.image_grid import save_grid
from tests.sd_pipelines import IMAGE_SIZE, LATENT_CHANNELS, LATENT_SIZE


def _config(teacher, *extra):
    return train_cli.parse_args(["--preset", "sd15", "--teacher.path", str(teacher), "--data.path", "unused", *extra])


def _sections(config):
    """The sections `grid_decoder` reads: (teacher, data)."""
    return config.teacher, config.data


def test_a_pipeline_teacher_decodes_through_its_vae(sd15_pipeline):
    from diffusers import AutoencoderKL

    decode, note = grid_decoder(*_sections(_config(sd15_pipeline)), LATENT_CHANNELS)
    assert isinstance(decode, GridDecoder) and note is None
    assert (decode.folder, decode.subfolder) == (str(sd15_pipeline), "vae")
    latents = np.random.default_rng(0).standard_normal((3, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)).astype(
        np.float32)
    images = decode(latents)
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32
    vae = AutoencoderKL.from_pretrained(sd15_pipeline, subfolder="vae").eval()
    with torch.no_grad():  # diffusers' pipelines: vae.decode(latents / scaling_factor)
        ref = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2) / vae.config.scaling_factor).sample
    # the same torch modules in another batch split: measured max |diff| 1.4e-6 (images about [-1, 1])
    np.testing.assert_allclose(images, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)


def test_fallbacks_keep_the_latent_view_with_a_note(tmp_path, sd15_pipeline):
    teacher = tmp_path / "no_vae"
    for name in ("unet", "scheduler"):
        shutil.copytree(sd15_pipeline / name, teacher / name)
    decode, note = grid_decoder(*_sections(_config(teacher)), LATENT_CHANNELS)
    assert decode is None and "has no vae/" in note and str(teacher) in note and "\n" not in note
    assert grid_decoder(*_sections(_config(teacher)), 1) == (None, None)  # pixels: nothing to decode
    # an image-folder run's own --data.vae decodes when the teacher folder has none
    config = _config(teacher, "--data.source", "folder", "--data.vae", str(sd15_pipeline))
    decode, note = grid_decoder(*_sections(config), LATENT_CHANNELS)
    assert (decode.folder, decode.subfolder, note) == (str(sd15_pipeline), "vae", None)


def test_grid_tiles_have_the_decoded_size(tmp_path):
    from PIL import Image

    def grid_size(images):
        path = save_grid(str(tmp_path / "g.png"), [("1 jump", images), ("teacher 2", images)], pad=2)
        return Image.open(path).size

    latents = np.zeros((4, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS), np.float32)
    decoded = np.zeros((4, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    # height: 2 rows of (H * 3 + 2) + 2 (images under 64 px shown 3x), 512 px images shown 1x
    assert grid_size(latents)[1] == 2 * (LATENT_SIZE * 3 + 2) + 2
    assert grid_size(decoded)[1] == 2 * (IMAGE_SIZE * 3 + 2) + 2
    assert grid_size(np.zeros((1, 512, 512, 3), np.float32))[1] == 2 * (512 + 2) + 2
