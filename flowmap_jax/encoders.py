"""PyTorch encoders that turn data into what a latent teacher sees: a diffusers VAE for images and a CLIP
text encoder for captions (the `[torch]` extra; `transformers` for captions). Used once, before training:
by `python -m flowmap_jax.write_shards` and by the image-folder dataset of a latent teacher.

Arrays in and out are numpy, channels last (NHWC); latents are the posterior mean times the VAE's
`scaling_factor` (what the UNet sees). A missing torch/diffusers/transformers is a `DataError`. Weights are
loaded from safetensors only (`use_safetensors=True`, never a pickle); a folder with only `.bin` weights is a
`DataError` naming the flag and the folder.
"""

from __future__ import annotations

import os

import numpy as np

from flowmap_jax.data_error import DataError
from flowmap_jax.spec.layout import nchw_to_nhwc, nhwc_to_nchw

__all__ = ["encode_captions", "encode_with_vae"]


def _from_pretrained(cls, path: str, subfolder: str | None, flag: str):
    """`cls.from_pretrained` with safetensors weights only (never a pickle), in eval mode; DataError
    naming the flag and folder if it cannot be loaded (e.g. the folder has only .bin weights)."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, use_safetensors=True).eval()
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = os.path.join(path, subfolder) if subfolder else path
        raise DataError(f"{flag} {where}: cannot load {cls.__name__} from safetensors weights ({first})") from None


def encode_with_vae(images: np.ndarray, vae: str, subfolder: str = "vae", batch_size: int = 16) -> np.ndarray:
    """RGB images (N, H, W, 3) in [-1, 1] -> latents (N, H/8, W/8, 4) float32 = posterior mean *
    scaling_factor, with diffusers' AutoencoderKL in PyTorch (CPU or the first CUDA device)."""
    try:
        import torch
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise DataError(f"encoding with a VAE needs the [torch] extra (torch, diffusers): {error}") from None

    model = _from_pretrained(AutoencoderKL, vae, subfolder or None, "--vae")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    scale = float(model.config.scaling_factor)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(nhwc_to_nchw(images[start:start + batch_size]).astype(np.float32)).to(device)
            latents = model.encode(chunk).latent_dist.mean * scale
            out.append(nchw_to_nhwc(latents.cpu().numpy()))
    return np.concatenate(out).astype(np.float32)


def encode_captions(captions: list[str], text_encoder: str, subfolder: str = "text_encoder",
                    tokenizer_subfolder: str = "tokenizer", batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (encoder_hidden_states (N, 77, D), the empty prompt's (1, 77, D)) with a CLIP text
    encoder (needs `transformers`), as Stable Diffusion pipelines encode prompts."""
    try:
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as error:
        raise DataError(f"encoding captions needs torch and transformers: {error}") from None
    tokenizer = CLIPTokenizer.from_pretrained(text_encoder, subfolder=tokenizer_subfolder)
    model = _from_pretrained(CLIPTextModel, text_encoder, subfolder, "--text-encoder")

    def encode(texts):
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        with torch.no_grad():
            return model(tokens.input_ids)[0].numpy().astype(np.float32)

    states = np.concatenate([encode(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)])
    return states, encode([""])
