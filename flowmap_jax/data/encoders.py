"""Stable Diffusion's VAE and text encoder(s), in PyTorch: images -> latents -> images, prompts -> conditioning.

Used where the JAX side needs what only a pipeline's torch components compute: writing shards
(`flowmap_jax.write_shards`), decoding sample grids, and the prompt-to-image pipeline. torch, diffusers and
transformers are imported lazily (the `[torch]` extra; a missing one is a `DataError`); nothing here imports jax.
Weights load from safetensors only (`use_safetensors=True`, never a pickle): a folder with only `.bin` weights,
or one that cannot be loaded, is a `DataError` naming the flag (--vae, --pipeline, --model) and the folder.

- `LatentCodec.from_pretrained(folder, subfolder="vae")`: diffusers `AutoencoderKL`. `encode(images)`:
  (B, H, W, 3) float32 RGB in [-1, 1] -> (B, H/f, W/f, C) float32 latents = (posterior mean - shift_factor) *
  scaling_factor (what the UNet sees; the mean, not a sample, so shards are deterministic); `decode`
  inverts that scaling and returns (B, H, W, 3) float32 in [-1, 1] (unclipped). Channels last on both
  sides (the Flax layout); the flip to PyTorch's (B, C, H, W) is `flowmap_jax.spec.layout`.
- `PromptEncoder.from_pretrained(folder)`: the tokenizer(s) and text encoder(s) named in the pipeline's
  `model_index.json`, encoding prompts exactly as diffusers' pipelines do:
  SD 1.x/2.x (one encoder): {"encoder_hidden_states": (B, 77, D)} = the last hidden state;
  SDXL (`text_encoder_2` present): {"encoder_hidden_states": (B, 77, D1 + D2)} = the penultimate hidden states
  of both encoders concatenated, and {"text_embeds": (B, P)} = the second encoder's projected pooled output.
  `unconditional()` is the conditioning of classifier-free guidance's other branch: the empty prompt "", or
  zeros where the pipeline says `force_zeros_for_empty_prompt` (SDXL), as diffusers' pipelines do with no
  negative prompt.
- `encode_with_vae(images, vae, subfolder)`: `LatentCodec.encode` in one call (the image-folder dataset).
- `prompt_conditioning(folder, prompts, image_hw)`, `decode_latents(folder, latents)` and
  `encode_images(folder, images)` (--init-image): what the sampling CLIs
  (`flowmap_jax.cli.sample_cli`, which imports no torch) use for a FlowMapPipeline folder.
- `sdxl_time_ids(original_size, crop_top_left, target_size)`: SDXL's (6,) micro-conditioning
  [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (pixels; diffusers' `_get_add_time_ids` order).

Conditioning is returned as float32 numpy; its dict keys are the UNet's keyword arguments, SDXL's added
conditioning under "added_cond_kwargs" ({"text_embeds", "time_ids"}) as the UNet takes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from flowmap_jax.data.data_error import DataError
from flowmap_jax.spec.layout import nchw_to_nhwc, nhwc_to_nchw

__all__ = [
    "LatentCodec",
    "PromptEncoder",
    "decode_latents",
    "encode_images",
    "encode_with_vae",
    "pick_device",
    "pipeline_file",
    "prompt_conditioning",
    "read_model_index",
    "sdxl_time_ids",
]


def _torch():
    try:
        import torch
    except ImportError as error:
        raise DataError(f"the Stable Diffusion VAE and text encoders need the [torch] extra: {error}") from None
    return torch


def _load_error(cls_name: str, folder, subfolder: str | None, flag: str, error: Exception) -> DataError:
    """DataError naming the flag and folder of a component that cannot be loaded from safetensors weights."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    where = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
    return DataError(f"{flag} {where}: cannot load {cls_name} from safetensors weights ({first})")


def pick_device(name: str = "auto"):
    """torch.device: "auto" = the first CUDA device if torch sees one, else the CPU."""
    torch = _torch()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pipeline_file(folder, name: str) -> str | None:
    """Local path of file `name` (e.g. "unet/config.json") of a pipeline folder, or of a hub id through the hub
    cache; None if it does not exist."""
    folder = os.fspath(folder)
    if os.path.isdir(folder):
        path = os.path.join(folder, name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download

        subfolder, filename = os.path.split(name)
        return hf_hub_download(folder, filename, subfolder=subfolder or None)
    except Exception:  # noqa: BLE001 - offline, unknown repo or file
        return None


def read_model_index(folder, flag: str = "--pipeline") -> dict:
    """The pipeline's model_index.json (component name -> [library, class]); DataError if absent."""
    path = pipeline_file(folder, "model_index.json")
    if path is None:
        raise DataError(f"{flag} {folder} is not a diffusers pipeline folder (no model_index.json)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON: {error}") from None


def sdxl_time_ids(original_size, crop_top_left, target_size) -> np.ndarray:
    """SDXL micro-conditioning (6,) float32: original (h, w), crop (top, left), target (h, w), in pixels."""
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError(f"time ids need (h, w), (top, left), (h, w); got {original_size}, {crop_top_left}, "
                         f"{target_size}")
    return np.asarray(values, np.float32)


@dataclasses.dataclass
class LatentCodec:
    """A diffusers AutoencoderKL (eval, float32) with its scaling; images and latents channels last."""

    vae: Any
    device: Any
    scaling_factor: float
    shift_factor: float
    batch_size: int = 16

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = "vae", device: str = "auto", batch_size: int = 16,
                        flag: str = "--vae") -> LatentCodec:
        """The AutoencoderKL in `folder`/`subfolder` (safetensors weights only); `flag` names the folder in errors."""
        _torch()
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:
            raise DataError(f"encoding with a VAE needs the [torch] extra (torch, diffusers): {error}") from None

        try:
            vae = AutoencoderKL.from_pretrained(os.fspath(folder), subfolder=subfolder or None, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise _load_error("AutoencoderKL", folder, subfolder, flag, error) from None
        device = pick_device(device)
        vae = vae.to(device).eval().requires_grad_(False)
        config = vae.config
        return cls(vae=vae, device=device, scaling_factor=float(config.scaling_factor),
                   shift_factor=float(getattr(config, "shift_factor", None) or 0.0), batch_size=batch_size)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) RGB in [-1, 1] -> (B, H/f, W/f, C) float32 latents, (mean - shift) * scale."""
        torch = _torch()
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) RGB in [-1, 1], got shape {images.shape}")
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(images[start:start + self.batch_size])))
                mean = self.vae.encode(chunk.to(self.device)).latent_dist.mean
                out.append(nchw_to_nhwc(((mean - self.shift_factor) * self.scaling_factor).float().cpu().numpy()))
        return np.ascontiguousarray(np.concatenate(out))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, h, w, C) latents as the UNet sees them -> (B, h * f, w * f, 3) float32 RGB, about [-1, 1]."""
        torch = _torch()
        latents = np.asarray(latents, np.float32)
        out = []
        with torch.no_grad():
            for start in range(0, len(latents), self.batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(latents[start:start + self.batch_size])))
                chunk = chunk.to(self.device) / self.scaling_factor + self.shift_factor
                out.append(nchw_to_nhwc(self.vae.decode(chunk).sample.float().cpu().numpy()))
        return np.ascontiguousarray(np.concatenate(out))


def encode_with_vae(images: np.ndarray, vae: str, subfolder: str = "vae", batch_size: int = 16) -> np.ndarray:
    """RGB images (N, H, W, 3) in [-1, 1] -> latents (N, H/f, W/f, C) float32 (`LatentCodec.encode`), with
    diffusers' AutoencoderKL in PyTorch (the first CUDA device, else the CPU); errors name --vae."""
    return LatentCodec.from_pretrained(vae, subfolder, batch_size=batch_size).encode(images)


def _component_class(index: dict, name: str, folder):
    """The transformers class model_index.json names for component `name` (only transformers classes)."""
    entry = index.get(name)
    if not entry or entry[0] is None:
        return None
    library, class_name = entry
    if library != "transformers":
        raise DataError(f"{folder}/model_index.json: {name} is {library}.{class_name}; only transformers "
                           "tokenizers and text encoders are supported")
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise DataError(f"{folder}/model_index.json: transformers has no class {class_name} (for {name})")
    return cls


@dataclasses.dataclass
class PromptEncoder:
    """Tokenizer(s) and text encoder(s) of an SD / SDXL pipeline (see the module docstring).

    tokenizers, text_encoders: lists of one (SD 1.x/2.x) or two (SDXL) transformers objects;
    penultimate: SDXL's convention (penultimate hidden states, concatenated); pooled: True where the UNet
    takes added text embeddings (addition_embed_type "text_time"); zeros_for_empty_prompt: the pipeline's
    force_zeros_for_empty_prompt.
    """

    tokenizers: list
    text_encoders: list
    device: Any
    penultimate: bool
    pooled: bool
    zeros_for_empty_prompt: bool
    batch_size: int = 32

    @classmethod
    def from_pretrained(cls, folder, device: str = "auto", batch_size: int = 32, flag: str = "--pipeline"
                        ) -> PromptEncoder:
        """The tokenizer(s) and text encoder(s) model_index.json names (safetensors weights only); `flag` names
        the folder in errors."""
        _torch()
        folder = os.fspath(folder)
        index = read_model_index(folder, flag)
        names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
        tokenizers, encoders = [], []
        device = pick_device(device)
        for tok_name, enc_name in names:
            tok_cls, enc_cls = _component_class(index, tok_name, folder), _component_class(index, enc_name, folder)
            if tok_cls is None or enc_cls is None:
                continue
            try:
                tokenizers.append(tok_cls.from_pretrained(folder, subfolder=tok_name))
            except (OSError, ValueError) as error:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise DataError(f"{flag} {os.path.join(folder, tok_name)}: cannot load {tok_cls.__name__} "
                                f"({first})") from None
            try:
                encoder = enc_cls.from_pretrained(folder, subfolder=enc_name, use_safetensors=True)
            except (OSError, ValueError) as error:
                raise _load_error(enc_cls.__name__, folder, enc_name, flag, error) from None
            encoders.append(encoder.to(device).eval().requires_grad_(False))
        if not encoders:
            raise DataError(f"{folder}/model_index.json names no tokenizer and text encoder")
        unet_config = pipeline_file(folder, "unet/config.json")
        pooled = False
        if unet_config is not None:
            with open(unet_config) as f:
                pooled = json.load(f).get("addition_embed_type") == "text_time"
        return cls(tokenizers=tokenizers, text_encoders=encoders, device=device,
                   penultimate="text_encoder_2" in index and index["text_encoder_2"][0] is not None,
                   pooled=pooled, zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
                   batch_size=batch_size)

    def _encode_batch(self, prompts: list[str]) -> dict:
        torch = _torch()
        hidden, pooled = [], None
        with torch.no_grad():
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt")
                ids = tokens.input_ids.to(self.device)
                if self.penultimate:
                    out = encoder(ids, output_hidden_states=True)
                    if out[0].ndim == 2:  # a CLIPTextModelWithProjection: its text_embeds
                        pooled = out[0]
                    hidden.append(out.hidden_states[-2])
                else:
                    use_mask = getattr(encoder.config, "use_attention_mask", False)
                    mask = tokens.attention_mask.to(self.device) if use_mask else None
                    out = encoder(ids, attention_mask=mask)
                    hidden.append(out[0])
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float().cpu().numpy()}
        if self.pooled:
            if pooled is None:
                raise DataError("the UNet takes text_embeds (addition_embed_type 'text_time') but no text encoder "
                                   "gives a projected pooled output (CLIPTextModelWithProjection)")
            cond["added_cond_kwargs"] = {"text_embeds": pooled.float().cpu().numpy()}
        return cond

    def encode(self, prompts: list[str]) -> dict:
        """prompts -> {"encoder_hidden_states": (B, L, D)[, "added_cond_kwargs": {"text_embeds": (B, P)}]}."""
        prompts = [str(p) for p in prompts]
        parts = [self._encode_batch(prompts[i:i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]
        return _concat_trees(parts)

    def unconditional(self) -> dict:
        """The other branch of classifier-free guidance, batch 1: the empty prompt, or zeros of the same
        shapes where the pipeline sets force_zeros_for_empty_prompt (as diffusers does with no negative prompt)."""
        cond = self.encode([""])
        if self.zeros_for_empty_prompt:
            cond = _map_tree(np.zeros_like, cond)
        return cond


def _map_tree(fn, tree):
    return {k: _map_tree(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _concat_trees(trees: list[dict]) -> dict:
    first = trees[0]
    return {k: _concat_trees([t[k] for t in trees]) if isinstance(v, dict) else np.concatenate([t[k] for t in trees])
            for k, v in first.items()}


def prompt_conditioning(folder, prompts: list[str], image_hw, flag: str = "--model") -> dict:
    """Prompts (B,) -> UNet conditioning through a pipeline folder's text encoder(s) (`PromptEncoder`), float32
    numpy; SDXL's time ids for an uncropped image of `image_hw` = (H, W) pixels, (B, 6)."""
    cond = PromptEncoder.from_pretrained(folder, flag=flag).encode(prompts)
    if "added_cond_kwargs" in cond:
        ids = sdxl_time_ids(image_hw, (0, 0), image_hw)
        cond["added_cond_kwargs"]["time_ids"] = np.tile(ids[None], (len(prompts), 1))
    return cond


def decode_latents(folder, latents: np.ndarray, flag: str = "--model") -> np.ndarray:
    """(B, h, w, C) latents as the UNet sees them -> (B, H, W, 3) float32 RGB about [-1, 1], through the
    pipeline folder's vae/ (`LatentCodec.decode`)."""
    return LatentCodec.from_pretrained(folder, "vae", flag=flag).decode(latents)


def encode_images(folder, images: np.ndarray, flag: str = "--model") -> np.ndarray:
    """(B, H, W, 3) RGB in [-1, 1] -> (B, H/f, W/f, C) float32 latents as the UNet sees them, through the
    pipeline folder's vae/ (`LatentCodec.encode`: the posterior mean, scaled)."""
    return LatentCodec.from_pretrained(folder, "vae", flag=flag).encode(images)
