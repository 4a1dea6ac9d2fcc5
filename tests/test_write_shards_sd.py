"""Captioned images -> shards through the tiny SD 1.x / SDXL pipelines, checked against diffusers' own
pipelines (VAE encode, `encode_prompt`) running live; streaming, errors and atomic replacement."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flowmap_jax.data import datasets
from flowmap_jax import write_shards
from tests.sd_pipelines import IMAGE_SIZE, write_captioned_images

CAPTIONS = ["a photo of the cat", "two dogs and a ball!", "", "A RED CAR, 1999", "the end of it", "gi gi git",
            "x"]


def _vae_latents(pipe, folder, names, size=IMAGE_SIZE):
    """Reference latents: PIL centre crop + bicubic resize, diffusers' AutoencoderKL posterior mean * scale."""
    from PIL import Image

    out = []
    for name in names:
        with Image.open(folder / name) as image:
            image = image.convert("RGB")
            w, h = image.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            array = np.asarray(image.crop(box).resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1
        with torch.no_grad():
            mean = pipe.vae.encode(torch.from_numpy(array).permute(2, 0, 1)[None]).latent_dist.mean
        out.append((mean * pipe.vae.config.scaling_factor)[0].permute(1, 2, 0).numpy())
    return np.stack(out)


def _write(tmp_path, images, pipeline, *extra):
    out = tmp_path / "shards"
    assert write_shards.main(["--out", str(out), "--source", "folder", "--images", str(images), "--pipeline",
                              str(pipeline), "--image-size", str(IMAGE_SIZE), "--dtype", "float32",
                              "--device", "cpu", *extra]) == 0
    return out


def test_sd15_captions_to_shards_match_the_pipeline(tmp_path, sd15_pipeline):
    from diffusers import StableDiffusionPipeline

    images = write_captioned_images(tmp_path / "images", CAPTIONS)
    # 7 images, batches of 3, shards of 4: batches straddle shard boundaries.
    out = _write(tmp_path, images, sd15_pipeline, "--batch-size", "3", "--shard-size", "4")
    index = json.loads((out / "index.json").read_text())
    assert [s["num_examples"] for s in index["shards"]] == [4, 3]
    assert index["cond"] == {"encoder_hidden_states": [77, 16]} and index["sample_shape"] == [8, 8, 4]

    pipe = StableDiffusionPipeline.from_pretrained(sd15_pipeline, use_safetensors=True)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(CAPTIONS, "cpu", 1, True)
    data = datasets.ShardsDataset(str(out))
    got = data.get(np.arange(len(CAPTIONS)))
    # Same modules and inputs, float32 on one CPU. Measured max differences: embeddings 0; latents 1.8e-7
    # (batches of 3 against 1 at a time), hence atol 2e-6.
    np.testing.assert_allclose(got["cond"]["encoder_hidden_states"], embeds.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(data.uncond["encoder_hidden_states"], negative[:1].numpy(), rtol=0, atol=1e-6)
    names = [f"image_{i:04d}.png" for i in range(len(CAPTIONS))]
    np.testing.assert_allclose(got["x0"], _vae_latents(pipe, images, names), rtol=0, atol=2e-6)

    # The shard files are plain safetensors: the library's own reader agrees with the memory maps.
    from safetensors.numpy import load_file

    first = load_file(str(out / "shard-00000.safetensors"))
    np.testing.assert_array_equal(first["x0"], got["x0"][:4])


def test_sdxl_shards_carry_text_embeds_and_time_ids(tmp_path, sdxl_pipeline):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    images = write_captioned_images(tmp_path / "images", CAPTIONS[:3], metadata=False)  # .txt captions
    # A landscape image: original (32, 48), centre crop at left 8 of the resized (32, 48) image.
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (32, 48, 3), np.uint8)).save(images / "wide.png")
    (images / "wide.txt").write_text("a wide one\n")
    out = _write(tmp_path, images, sdxl_pipeline, "--batch-size", "2")
    data = datasets.ShardsDataset(str(out))
    got = data.get(np.arange(4))
    captions = CAPTIONS[:3] + ["a wide one"]

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline, use_safetensors=True)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(captions, device="cpu",
                                                                       do_classifier_free_guidance=True)
    # measured max difference 0 for both (the same modules on the same tokens)
    np.testing.assert_allclose(got["cond"]["encoder_hidden_states"], embeds.numpy(), rtol=0, atol=1e-6)
    added = got["cond"]["added_cond_kwargs"]
    np.testing.assert_allclose(added["text_embeds"], pooled.numpy(), rtol=0, atol=1e-6)
    # The pipeline's own time ids for a 32x32 target from a 32x48 original cropped at (0, 8).
    time_ids = pipe._get_add_time_ids((32, 48), (0, 8), (32, 32), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    np.testing.assert_array_equal(added["time_ids"][3], time_ids[0].numpy())
    np.testing.assert_array_equal(added["time_ids"][0], [32, 32, 0, 0, 32, 32])
    # Unconditional branch: zeros (force_zeros_for_empty_prompt), no time_ids (each example keeps its own).
    assert set(data.uncond) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(data.uncond["added_cond_kwargs"]) == {"text_embeds"}
    np.testing.assert_array_equal(data.uncond["encoder_hidden_states"], negative[:1].numpy())
    np.testing.assert_array_equal(data.uncond["added_cond_kwargs"]["text_embeds"], negative_pooled[:1].numpy())
    assert not negative.any()
    names = ["image_0000.png", "image_0001.png", "image_0002.png", "wide.png"]
    np.testing.assert_allclose(got["x0"], _vae_latents(pipe, images, names), rtol=0, atol=2e-6)


def test_folder_errors_name_the_file(tmp_path, sd15_pipeline, capsys):
    def run(images):
        code = write_shards.main(["--out", str(tmp_path / "out"), "--source", "folder", "--images", str(images),
                                  "--pipeline", str(sd15_pipeline), "--image-size", "32", "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()  # model-loading progress bars may come first
        return code, err[-1] if err else ""

    (tmp_path / "empty").mkdir()
    code, err = run(tmp_path / "empty")
    assert code == 2 and err.startswith("error: ") and "no images" in err and "empty" in err

    images = write_captioned_images(tmp_path / "a", CAPTIONS[:2], metadata=False)
    (images / "image_0001.txt").unlink()
    code, err = run(images)
    assert code == 2 and "image_0001.png: no caption" in err

    images = write_captioned_images(tmp_path / "b", CAPTIONS[:2])
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "image_0000.png", "text": "x"}) + "\n")
    code, err = run(images)
    assert code == 2 and "image_0001.png: no caption" in err

    images = write_captioned_images(tmp_path / "c", CAPTIONS[:2])
    with open(images / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    code, err = run(images)
    assert code == 2 and "'gone.png' is not an image" in err

    images = write_captioned_images(tmp_path / "d", CAPTIONS[:2], metadata=False)
    (images / "image_0001.png").write_bytes(b"not a png")
    code, err = run(images)
    assert code == 2 and "image_0001.png: not a readable image" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_failed_rewrite_keeps_the_previous_shards(tmp_path, sd15_pipeline):
    images = write_captioned_images(tmp_path / "images", CAPTIONS[:3])
    out = _write(tmp_path, images, sd15_pipeline)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (images / "image_0002.png").write_bytes(b"broken")
    assert write_shards.main(["--out", str(out), "--source", "folder", "--images", str(images), "--pipeline",
                              str(sd15_pipeline), "--image-size", "32", "--device", "cpu", "--batch-size", "1",
                              "--shard-size", "1"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert write_shards.main(["--out", str(tmp_path / "other"), "--source", "npz", "--input",
                              str(tmp_path / "nope.npz")]) == 2
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
