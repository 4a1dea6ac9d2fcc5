"""Tiny Stable Diffusion pipelines (SD 1.x and SDXL), written locally with nothing downloaded.

`write_sd15_pipeline(folder)` and `write_sdxl_pipeline(folder)` write complete diffusers pipeline folders
(`model_index.json`, `unet/`, `vae/`, `text_encoder/` [and `text_encoder_2/`], `tokenizer/` [and
`tokenizer_2/`], `scheduler/`) with seeded random weights, through the pipelines' own `save_pretrained`, so
`StableDiffusionPipeline.from_pretrained` / `StableDiffusionXLPipeline.from_pretrained` and every loader that
reads a real SD folder read them the same way. Sizes (tiny, seconds on a CPU):

- images 32x32 RGB; the VAE (3 blocks, 2 downsamplings) gives latents 8x8x4 (`vae_scale_factor` 4);
- SD 1.x: UNet cross_attention_dim 16 = the CLIP text encoder's hidden size;
- SDXL: two text encoders (hidden 8 and 16; the second a `CLIPTextModelWithProjection`, projection 16),
  cross_attention_dim 24 = 8 + 16 (their penultimate hidden states concatenated), UNet
  addition_embed_type "text_time" with addition_time_embed_dim 4 and
  projection_class_embeddings_input_dim 16 + 6 * 4 = 40 (pooled text embedding + 6 time ids);
- the tokenizers are real `CLIPTokenizer`s from a vocab.json and merges.txt written here: CLIP's 256
  byte-level symbols, each also with the end-of-word mark `</w>`, a few merges, and the special tokens
  `<|startoftext|>` and `<|endoftext|>`, so any ASCII prompt tokenizes (max length 77, as SD's);
- schedulers: SD 1.5's PNDM config and SDXL's Euler config (scaled_linear betas 0.00085..0.012,
  steps_offset 1, epsilon prediction).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 32
LATENT_SIZE = 8
LATENT_CHANNELS = 4
SD15_TEXT_DIM = 16
SDXL_TEXT_DIMS = (8, 16)
SDXL_PROJECTION_DIM = 16
SDXL_TIME_EMBED_DIM = 4
MAX_LENGTH = 77
SDXL_PAD_TOKEN_2 = "!"  # SDXL's second tokenizer pads with "!"

SD15_SCHEDULER = {  # stable-diffusion-v1-5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
SDXL_SCHEDULER = {  # stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>", "i n", "d i", "g i", "gi t</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(folder, pad_token: str = "<|endoftext|>"):
    """Writes a CLIP tokenizer folder as SD ships one (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json; vocab: 256 byte symbols, the same with `</w>`, `MERGES`, then
    `<|startoftext|>` and `<|endoftext|>`) and returns `CLIPTokenizer.from_pretrained(folder)`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        dict(special, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH, do_lower_case=True,
             errors="replace", add_prefix_space=False), indent=2))
    return CLIPTokenizer.from_pretrained(str(folder))


def _replace_tokenizers(folder: Path, pad_tokens: dict[str, str]) -> None:
    """Rewrites the saved tokenizer sub-folders in SD's own file layout (vocab.json + merges.txt)."""
    import shutil

    for name, pad_token in pad_tokens.items():
        shutil.rmtree(folder / name)
        write_clip_tokenizer(folder / name, pad_token)


def _text_config(tokenizer, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=MAX_LENGTH,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu", **extra)


def _vae(scaling_factor: float, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         sample_size=IMAGE_SIZE, scaling_factor=scaling_factor, **extra)


def _perturb(*modules, seed: int):
    """Adds small seeded noise to every parameter (zero-initialised layers would hide mapping errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))


def sd15_components(seed: int = 0) -> dict:
    """The components of a tiny SD 1.x pipeline (keyword arguments of `StableDiffusionPipeline`)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(tmp)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=SD15_TEXT_DIM)
    vae = _vae(0.18215)
    text_encoder = CLIPTextModel(_text_config(tokenizer, SD15_TEXT_DIM))
    _perturb(unet, vae, text_encoder, seed=seed + 1)
    scheduler = PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"})
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
            "requires_safety_checker": False}


def sdxl_components(seed: int = 0) -> dict:
    """The components of a tiny SDXL pipeline (keyword arguments of `StableDiffusionXLPipeline`)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(Path(tmp) / "a")
        tokenizer_2 = write_clip_tokenizer(Path(tmp) / "b", pad_token=SDXL_PAD_TOKEN_2)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=sum(SDXL_TEXT_DIMS), addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_PROJECTION_DIM + 6 * SDXL_TIME_EMBED_DIM)
    vae = _vae(0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(_text_config(tokenizer, SDXL_TEXT_DIMS[0]))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, SDXL_TEXT_DIMS[1],
                                                              projection_dim=SDXL_PROJECTION_DIM))
    _perturb(unet, vae, text_encoder, text_encoder_2, seed=seed + 1)
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"})
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "text_encoder_2": text_encoder_2.eval(), "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
            "scheduler": scheduler, "force_zeros_for_empty_prompt": True}


def write_sd15_pipeline(folder, seed: int = 0) -> Path:
    """A tiny SD 1.x pipeline folder at `folder` (safetensors weights); returns the folder."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**sd15_components(seed)).save_pretrained(str(folder), safe_serialization=True)
    _replace_tokenizers(Path(folder), {"tokenizer": "<|endoftext|>"})
    return Path(folder)


def write_sdxl_pipeline(folder, seed: int = 0) -> Path:
    """A tiny SDXL pipeline folder at `folder` (safetensors weights); returns the folder."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**sdxl_components(seed)).save_pretrained(str(folder), safe_serialization=True)
    _replace_tokenizers(Path(folder), {"tokenizer": "<|endoftext|>", "tokenizer_2": SDXL_PAD_TOKEN_2})
    return Path(folder)


def write_captioned_images(folder, captions: list[str], size: int = IMAGE_SIZE, seed: int = 0,
                           metadata: bool = True) -> Path:
    """An image folder in the Hugging Face imagefolder convention: `image_0000.png`, ... (random smooth RGB
    images of `size`), with `metadata.jsonl` ({"file_name", "text"} per line) when `metadata`, else a
    `<image>.txt` caption beside each image. Returns the folder."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, caption in enumerate(captions):
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        name = f"image_{i:04d}.png"
        image.save(folder / name)
        if metadata:
            lines.append(json.dumps({"file_name": name, "text": caption}))
        else:
            (folder / f"image_{i:04d}.txt").write_text(caption + "\n")
    if metadata:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def export_untrained_flow_map(pipeline, out, guidance: str = "none", guidance_scale: float = 1.0,
                              parameterization: str = "teacher_step") -> Path:
    """A flow-map export (`conversion.export.export_flow_map`) of `pipeline`'s UNet with the zero-initialised
    target-time hook, untrained. With parameterization "teacher_step" (the default here) each jump is the
    teacher's DDIM step; "auto" ("angle" on these VP schedules) reads the epsilon UNet's output as the map's
    own v-like F, so the jumps are not the teacher's. Returns the folder."""
    import jax

    from conversion import load_diffusers_unet
    from conversion.export import export_flow_map
    from flowmap_jax.core.flow_map import add_target_time_hook
    from flowmap_jax.spec.export_format import FlowMapConfig
    from flowmap_jax.spec.schedule import load_scheduler, read_scheduler_config

    unet_config, params = load_diffusers_unet(str(pipeline), subfolder="unet")
    config, params = add_target_time_hook(unet_config, params, jax.random.key(0))
    scheduler_config = read_scheduler_config(Path(pipeline) / "scheduler")
    schedule, prediction_type = load_scheduler(scheduler_config)
    flow_map_config = FlowMapConfig(schedule=schedule, prediction_type=prediction_type,
                                    scheduler_config=scheduler_config, parameterization=parameterization,
                                    guidance=guidance,
                                    guidance_scale=guidance_scale, sample_shape=(LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS))
    params = jax.tree.map(np.asarray, params)
    return export_flow_map(params, config, flow_map_config, out, {"teacher": {"path": str(pipeline)}})
