"""Prompts to images with an exported flow map: `FlowMapPipeline`, a `diffusers.DiffusionPipeline`.

    from torch_ref.pipeline import FlowMapPipeline
    pipe = FlowMapPipeline.from_pretrained("runs/sd15/pipeline")        # `python -m conversion export RUN OUT --pipeline`
    images = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images

    from diffusers import DiffusionPipeline                               # the same, through diffusers' loader:
    pipe = DiffusionPipeline.from_pretrained("runs/sd15/pipeline", trust_remote_code=True)

    pipe = FlowMapPipeline.from_pretrained("path/to/sd15")             # a stock StableDiffusionPipeline folder
    pipe.load_flow_map("runs/sd15/lora")                                # `python -m conversion export RUN OUT --lora`
    pipe.save_pretrained("out/sd15_flow_map")                           # a full FlowMapPipeline folder again

A stock folder's extra components (safety_checker, feature_extractor, image_encoder) are left out, as diffusers
does for components a pipeline class does not take; until `load_flow_map` it has no flow map (config flow_map
None) and calling it is a ValueError that says so.

The folder (`conversion.pipeline_export`, names in `flowmap_jax.spec.pipeline_folder`): `unet/` the flow map (a flow-map export: stock UNet2DConditionModel
with the target-time hook, plus flowmap.json), the teacher pipeline's `vae/`, `text_encoder/`, `tokenizer/`
(SDXL also `text_encoder_2/`, `tokenizer_2/`), `scheduler/` (the teacher's, for reference: the time grid comes
from flowmap.json), and `model_index.json` with `_class_name: ["pipeline", "FlowMapPipeline"]` and the flow
map's flowmap.json under the config key `flow_map`. diffusers resolves a class that is not its own only
through a module file in the folder: `pipeline.py` there imports this class (and, where flowmap-jax is not
installed, raises an ImportError that says `pip install "flowmap-jax[torch]"`; no JAX is needed), so
`DiffusionPipeline.from_pretrained` loads it, offline, given `trust_remote_code=True` (diffusers' consent to run
a folder's module file; without it diffusers refuses with that advice). `FlowMapPipeline.from_pretrained` needs
no such flag when `pipeline.py` is exactly one this project writes or wrote (`PIPELINE_MODULE_SOURCES`; anything
else is left to diffusers' check).

Saving: `save_pretrained(DIR)` is diffusers' save plus what makes DIR such a folder again (`torch_ref.pipeline_saving`):
the class name, pipeline.py and unet/flowmap.json; every loader (`FlowMapPipeline.from_pretrained`,
`DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`, `python -m torch_ref.sample --model DIR`,
`python -m flowmap_jax.sample --model DIR`) reads it. A LoRA flow map (`load_flow_map`) is saved merged: unet/ is
the flow-map UNet with the adapters fused into its weights and flowmap.json says so (a full flow-map pipeline
folder; the LoRA files themselves are the `--lora` export). So is a LoRA added with `load_lora_weights`.

Sampling: N jumps of the flow map built from the UNet and flowmap.json (`torch_ref.export_loading.flow_map_from_unet`,
the same map `torch_ref.sample.sample` jumps with), one jump at a time (`torch_ref.pipeline_jumps`), so the
pipeline follows the export's parameterisation. Times: `num_inference_steps=N` is
`flowmap_jax.spec.time_grid.time_grid(schedule, N)` (uniform in teacher time from the noise end to the clean
end); `timesteps=[...]` gives the N source times from noise to data (diffusers' convention), the clean end
appended unless already last. Latents (B, C, h, w)
start as standard normal noise (`generator`, or `latents=`; `prepare_latents`), are decoded by the VAE after
division by `scaling_factor` (plus `shift_factor`, if any).

Guidance: a map distilled with guidance baked in reproduces its teacher at that scale (`guidance_scale` must
be None or that scale); a map with guidance as an input takes `guidance_scale` (fed as `timestep_cond`); a
map of an unguided teacher applies classifier-free guidance here, on the jumps, with `negative_prompt`
(default: the empty prompt, or zeros where the pipeline sets force_zeros_for_empty_prompt):
X = X(uncond) + w (X(cond) - X(uncond)), exact for any map affine in the network output at fixed x, s, t.
A negative prompt for a distilled-guidance map is an error (its unconditional branch is inside the weights).

diffusers' call arguments (SD / SDXL / LCM pipelines):
- `prompt_embeds`, `negative_prompt_embeds`, `pooled_prompt_embeds`, `negative_pooled_prompt_embeds`: instead of
  the prompts; `encode_prompt` makes them (diffusers' own `StableDiffusionPipeline.encode_prompt`, or
  `StableDiffusionXLPipeline.encode_prompt` where there is a text_encoder_2), with `prompt_2`, `negative_prompt_2`
  and `clip_skip` (layers skipped from the end of CLIP, as diffusers counts them).
- `cross_attention_kwargs`: passed to the UNet on every jump; its "scale" is the LoRA scale (text encoders
  too). It scales every peft adapter on the UNet, a `load_flow_map(fuse=False)` flow map's own included.
- `eta` in [0, 1]: stochastic re-noising after every jump but the last, the samplers' `gamma`
  (`torch_ref.pipeline_jumps`); its noise comes from `generator`, drawn after the initial latents.
- `guidance_rescale`: only with the pipeline's CFG (an unguided map): diffusers' `rescale_noise_cfg` applied to
  the combined jump destination X against X(cond) (per-example std over (C, h, w)).
- SDXL: `original_size`, `crops_coords_top_left`, `target_size` (default (height, width), (0, 0), (height, width))
  and their `negative_` forms (used for the unconditional rows when both negative sizes are given, as diffusers).
- `callback_on_step_end(pipe, i, t, callback_kwargs)` after every jump i (t its source timestep), with the
  tensors named in `callback_on_step_end_tensor_inputs` (`_callback_tensor_inputs`; prompt_embeds is the
  conditional rows only, the negatives separate); a returned dict may replace latents and the conditioning.
  A `diffusers.callbacks.PipelineCallback` works as in diffusers. `pipe.interrupt` (set `pipe._interrupt =
  True` in a callback) skips the remaining jumps. Progress: `self.progress_bar`, `set_progress_bar_config`.
Image-to-image: `torch_ref.pipeline_img2img.FlowMapImg2ImgPipeline`, this class started from a VAE-encoded image
noised to the time `strength` picks (`flowmap_jax.spec.img2img`); it loads from the same folder
(`FlowMapImg2ImgPipeline.from_pretrained(DIR)`: `from_pretrained` of a subclass returns the subclass) or takes
`pipe.components` (which include the config: flow_map, force_zeros_for_empty_prompt).
Loader mixins: diffusers' `StableDiffusionXLLoraLoaderMixin` (`load_lora_weights` on unet, text_encoder and
text_encoder_2 where present; it takes SD 1.x LoRA files too, a missing text_encoder_2 is skipped) and
`TextualInversionLoaderMixin` (`load_textual_inversion`).
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import (
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from flowmap_jax.spec.pipeline_folder import (
    PIPELINE_MODULE_FILE,
    PIPELINE_MODULE_SOURCES,
)
from flowmap_jax.spec.sampling_inputs import resolve_guidance
from flowmap_jax.spec.schedule import check_time_values
from flowmap_jax.spec.time_grid import check_direction, time_grid
from torch_ref import pipeline_jumps

__all__ = ["FlowMapPipeline"]


def _prompt_list(value, batch: int, name: str):
    """None, a string or a list -> None or a list of `batch` strings (one entry is repeated)."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for {batch} prompts")
    return values


class FlowMapPipeline(DiffusionPipeline, StableDiffusionXLLoraLoaderMixin, TextualInversionLoaderMixin):
    """Few-step text-to-image sampling with a distilled flow map (see the module docstring).

    Components: unet (the flow map, UNet2DConditionModel with class_embed_type "timestep"), vae
    (AutoencoderKL), text_encoder + tokenizer, optional text_encoder_2 + tokenizer_2 (SDXL) and scheduler
    (the teacher's, unused by sampling). Config: flow_map (flowmap.json as a dict; None for a stock SD folder
    until `load_flow_map` puts a LoRA flow map on its UNet), force_zeros_for_empty_prompt.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components: typing.ClassVar[list[str]] = ["text_encoder_2", "tokenizer_2", "scheduler"]
    _callback_tensor_inputs: typing.ClassVar[list[str]] = [
        "latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "negative_pooled_prompt_embeds",
        "add_time_ids", "negative_add_time_ids"]

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler=None, text_encoder_2=None, tokenizer_2=None,
                 flow_map: dict | None = None, force_zeros_for_empty_prompt: bool = False):
        super().__init__()
        if flow_map is not None and not isinstance(flow_map, dict):
            raise TypeError(f"FlowMapPipeline: flow_map must be flowmap.json as a dict (the config key 'flow_map' of "
                            f"model_index.json) or None, got {type(flow_map).__name__}")
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(flow_map=flow_map, force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._interrupt = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; `trust_remote_code` is implied only for a folder whose pipeline.py is exactly one
        this project writes or wrote."""
        module = Path(os.fspath(pretrained_model_name_or_path)) / PIPELINE_MODULE_FILE
        if module.is_file() and module.read_text() in PIPELINE_MODULE_SOURCES:
            kwargs.setdefault("trust_remote_code", True)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if cls is not FlowMapPipeline and type(pipe) is FlowMapPipeline:  # the folder names FlowMapPipeline
            folder = getattr(pipe, "_flow_map_folder", None)
            pipe = cls(**pipe.components)
            if folder is not None:
                pipe._flow_map_folder = folder
        return pipe

    @property
    def components(self) -> dict:
        """diffusers' components plus the config (flow_map, force_zeros_for_empty_prompt), so that
        `FlowMapPipeline(**pipe.components)` and `FlowMapImg2ImgPipeline(**pipe.components)` keep the flow map."""
        return {**super().components, "flow_map": self.config.flow_map,
                "force_zeros_for_empty_prompt": self.config.force_zeros_for_empty_prompt}

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant=None, max_shard_size=None,
                        push_to_hub: bool = False, **kwargs):
        """diffusers' save, then the FlowMapPipeline folder's own files (`torch_ref.pipeline_saving`): a folder every
        loader of this project reads. A UNet with peft adapters (a LoRA flow map, `load_lora_weights`) is saved
        with them merged (this pipeline keeps its adapters). ValueError for a pipeline without a flow map or with
        push_to_hub (save, then upload the folder) or safe_serialization=False (the export format is safetensors)."""
        from torch_ref import pipeline_saving

        if self.config.flow_map is None:
            raise ValueError("save_pretrained: this FlowMapPipeline has no flow map (a stock pipeline folder): call "
                             "pipe.load_flow_map(LORA_FOLDER) first")
        if push_to_hub:
            raise ValueError("save_pretrained: push_to_hub is not supported; save the folder, then upload it")
        if not safe_serialization:
            raise ValueError("save_pretrained: safe_serialization=False is not supported (a flow-map export's "
                             "weights are safetensors)")
        unet = self.unet
        fused = pipeline_saving.has_lora_layers(unet)
        if fused:
            self.register_modules(unet=pipeline_saving.fused_unet_copy(unet))
        try:
            super().save_pretrained(save_directory, safe_serialization=True, variant=variant,
                                    max_shard_size=max_shard_size, push_to_hub=False, **kwargs)
        finally:
            if fused:
                self.register_modules(unet=unet)
        metadata = pipeline_saving.full_export_metadata(self.config.flow_map)
        pipeline_saving.finish_pipeline_folder(save_directory, metadata, getattr(self, "_flow_map_folder", None))

    # ----------------------------------------------------------------------------------------------
    # Pieces.

    def load_flow_map(self, folder, fuse: bool = False) -> None:
        """Puts the LoRA flow map at `folder` (`python -m conversion export RUN OUT --lora`) on this pipeline's
        UNet, the base (a stock SD pipeline folder loaded with `from_pretrained`): `unet` becomes the flow-map
        UNet (`torch_ref.lora_loading.lora_flow_map_unet`: the base's weights plus the target-time hook, the
        adapters loaded by diffusers/peft, merged when `fuse`), on the same device and in the same dtype, and
        the config key `flow_map` becomes the folder's flowmap.json. ExportFormatError for a base of another
        architecture or a bad folder (naming the file and the key); FileNotFoundError for a missing file;
        ValueError when this pipeline already has a flow map."""
        from flowmap_jax.spec.lora_format import read_lora_export
        from torch_ref.lora_loading import lora_flow_map_unet

        if self.config.flow_map is not None:
            raise ValueError("this FlowMapPipeline already has a flow map; load_flow_map puts a LoRA flow map on a "
                             "base: load the base pipeline folder again (FlowMapPipeline.from_pretrained(BASE))")
        info = read_lora_export(folder)
        unet = lora_flow_map_unet(self.unet, info, fuse=fuse)
        self.register_modules(unet=unet)
        self.register_to_config(flow_map=info.metadata)
        self._flow_map_folder = info.folder

    def loaded_flow_map(self):
        """The `torch_ref.export_loading.TorchFlowMapExport` of this pipeline's UNet and flowmap.json."""
        from torch_ref.export_loading import flow_map_from_unet

        if self.config.flow_map is None:
            raise ValueError("this FlowMapPipeline has no flow map (a stock pipeline folder): call "
                             "pipe.load_flow_map(LORA_FOLDER) first (a LoRA flow map, `python -m conversion export "
                             "RUN OUT --lora`), or load a FlowMapPipeline folder (`--pipeline`)")
        return flow_map_from_unet(self.unet, dict(self.unet.config), self.config.flow_map,
                                  getattr(self, "_flow_map_folder", None))

    def prompt_encoder(self):
        """`flowmap_jax.data.encoders.PromptEncoder` over this pipeline's tokenizer(s) and text encoder(s): the
        same encoding as the shards the flow map was trained on (and as `encode_prompt` without clip_skip)."""
        from flowmap_jax.data.encoders import PromptEncoder

        tokenizers = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        return PromptEncoder(tokenizers=tokenizers, text_encoders=encoders, device=self._execution_device,
                             penultimate=self.text_encoder_2 is not None,
                             pooled=self.unet.config.get("addition_embed_type") == "text_time",
                             zeros_for_empty_prompt=bool(self.config.force_zeros_for_empty_prompt))

    def encode_prompt(self, prompt=None, prompt_2=None, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, negative_prompt=None, negative_prompt_2=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, lora_scale=None, clip_skip=None):
        """(prompt_embeds (B, L, D), negative_prompt_embeds (B, L, D) or None, pooled_prompt_embeds (B, P) or None,
        negative_pooled_prompt_embeds (B, P) or None), B = prompts x num_images_per_prompt, in the text encoder's
        dtype: diffusers' `StableDiffusionXLPipeline.encode_prompt` where there is a text_encoder_2 (SDXL's
        arguments and results), else `StableDiffusionPipeline.encode_prompt` (pooled None; the negatives zeros
        where force_zeros_for_empty_prompt and no negative is given). The negatives only with
        do_classifier_free_guidance."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import (
            USE_PEFT_BACKEND,
            scale_lora_layers,
            unscale_lora_layers,
        )

        device = device or self._execution_device
        if self.text_encoder_2 is not None:
            return StableDiffusionXLPipeline.encode_prompt(
                self, prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                negative_pooled_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip)
        if prompt_2 is not None or negative_prompt_2 is not None:
            raise ValueError("prompt_2 / negative_prompt_2 need a second text encoder (SDXL); this pipeline has one")
        scaled = lora_scale is not None and USE_PEFT_BACKEND and self.text_encoder is not None
        if scaled:  # diffusers' SD encode_prompt scales only for its own LoRA mixin
            self._lora_scale = lora_scale
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            if clip_skip is not None and prompt_embeds is None:
                prompt_embeds = self._clip_skip_embeds(prompt, device, int(clip_skip))
            embeds, negative = StableDiffusionPipeline.encode_prompt(
                self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)
        if (do_classifier_free_guidance and negative_prompt is None and negative_prompt_embeds is None
                and self.config.force_zeros_for_empty_prompt):
            negative = torch.zeros_like(negative)
        return embeds, negative, None, None

    def _clip_skip_embeds(self, prompt, device, clip_skip: int) -> torch.Tensor:
        """(B, L, D) SD 1.x prompt embeddings with `clip_skip` as diffusers' `StableDiffusionPipeline.encode_prompt`
        means it: the hidden states `clip_skip` layers before the last, through CLIP's final layer norm. Done
        here because diffusers 0.42 looks the norm up as `text_encoder.text_model.final_layer_norm`, which
        transformers 5's CLIPTextModel no longer has (its modules sit on the model itself)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = self.maybe_convert_prompt(prompts, self.tokenizer)  # textual inversion tokens
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        out = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        model = getattr(self.text_encoder, "text_model", self.text_encoder)
        return model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def prepare_latents(self, batch_size: int, num_channels_latents: int, height: int, width: int, dtype, device,
                        generator=None, latents=None) -> torch.Tensor:
        """(batch_size, num_channels_latents, height / f, width / f) starting noise (f the VAE's scale factor):
        standard normal from `generator` (one, or a list of batch_size), or `latents` checked and moved."""
        shape = (int(batch_size), int(num_channels_latents), int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {batch_size}")
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device=device, dtype=dtype)

    def time_grid(self, schedule, num_inference_steps=None, timesteps=None) -> np.ndarray:
        """(N + 1,) float64 teacher times from noise to data (see the module docstring)."""
        if timesteps is not None:
            grid = [float(t) for t in timesteps]
            if not grid or grid[-1] != schedule.t_clean:
                grid.append(float(schedule.t_clean))
            grid = np.asarray(grid, np.float64)
            if grid.shape[0] < 2:
                raise ValueError(f"timesteps={list(timesteps)} gives no jump")
            check_time_values(schedule, grid, "timesteps")
            check_direction(grid)  # noise to data, the CLIs' rule
            return grid
        if num_inference_steps is None or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        return time_grid(schedule, int(num_inference_steps))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents as the UNet sees them -> (B, 3, H, W) images about [-1, 1]."""
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        latents = latents.to(self.vae.dtype) / float(self.vae.config.scaling_factor) + shift
        return self.vae.decode(latents).sample.float()

    # diffusers' pipeline properties, set by each call.
    @property
    def guidance_scale(self):
        return getattr(self, "_guidance_scale", None)

    @property
    def guidance_rescale(self):
        return getattr(self, "_guidance_rescale", 0.0)

    @property
    def clip_skip(self):
        return getattr(self, "_clip_skip", None)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True when this call applies classifier-free guidance on the jumps (an unguided map)."""
        return getattr(self, "_do_cfg", False)

    @property
    def cross_attention_kwargs(self):
        return getattr(self, "_cross_attention_kwargs", None)

    @property
    def num_timesteps(self):
        return getattr(self, "_num_timesteps", None)

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    # ----------------------------------------------------------------------------------------------

    def _default_size(self, config) -> tuple[int, int]:
        if config.sample_shape is not None:
            return config.sample_shape[0] * self.vae_scale_factor, config.sample_shape[1] * self.vae_scale_factor
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @staticmethod
    def _time_ids(original_size, crops_coords_top_left, target_size, rows: int, device) -> torch.Tensor:
        """SDXL's micro-conditioning (rows, 6) float32: original (h, w), crop (top, left), target (h, w)."""
        values = [*original_size, *crops_coords_top_left, *target_size]
        if len(values) != 6:
            raise ValueError(f"SDXL size ids need (h, w), (top, left), (h, w); got original_size={original_size}, "
                             f"crops_coords_top_left={crops_coords_top_left}, target_size={target_size}")
        return torch.tensor([values], dtype=torch.float32, device=device).repeat(rows, 1)

    @torch.no_grad()
    def __call__(self, prompt=None, num_inference_steps: int | None = None, timesteps=None,
                 guidance_scale: float | None = None, negative_prompt=None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True, *, prompt_2=None, negative_prompt_2=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, eta: float = 0.0, guidance_rescale: float = 0.0,
                 cross_attention_kwargs: dict | None = None, clip_skip: int | None = None,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """Images for `prompt` (str or list) or `prompt_embeds` in N flow-map jumps (the arguments: module
        docstring). Default N: 4 when neither num_inference_steps nor timesteps is given. output_type "pil",
        "np" ((B, H, W, 3) in [0, 1]), "pt" or "latent" ((B, C, h, w) as the UNet sees them). Returns
        ImagePipelineOutput(images) or (images,)."""
        loaded = self.loaded_flow_map()  # first: a stock folder without a flow map says so
        config = loaded.config
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not in {self._callback_tensor_inputs}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt is required (a string or a list of strings), or prompt_embeds")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("prompt is required (a string or a list of strings)")
            batch = len(prompts)
        else:
            prompts, batch = None, int(prompt_embeds.shape[0])
        per_prompt = int(num_images_per_prompt)
        rows = batch * per_prompt
        device = self._execution_device
        if num_inference_steps is None and timesteps is None:
            num_inference_steps = 4
        grid = self.time_grid(config.schedule, num_inference_steps, timesteps)

        # Guidance: the pipeline's CFG on the jumps (unguided map), or the map's own.
        negatives_given = any(v is not None for v in (negative_prompt, negative_prompt_2, negative_prompt_embeds,
                                                       negative_pooled_prompt_embeds))
        if config.guidance == "none":
            w = 1.0 if guidance_scale is None else float(guidance_scale)
            do_cfg = w != 1.0 or negatives_given
            embed_scale = None
        else:
            if negatives_given:
                raise ValueError(f"this flow map distilled {config.guidance} guidance (its unconditional branch is in "
                                 "its weights); negative_prompt cannot be applied")
            if guidance_rescale:
                raise ValueError(f"guidance_rescale applies to the pipeline's own classifier-free guidance; this flow "
                                 f"map distilled {config.guidance} guidance")
            w, do_cfg = None, False
            embed_scale = resolve_guidance(config, guidance_scale)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self._guidance_scale, self._guidance_rescale, self._clip_skip = w, float(guidance_rescale), clip_skip
        self._cross_attention_kwargs, self._do_cfg, self._interrupt = cross_attention_kwargs, do_cfg, False

        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds, add_text_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompts, _prompt_list(prompt_2, batch, "prompt_2"), device, per_prompt, do_cfg,
            _prompt_list(negative_prompt, batch, "negative_prompt"),
            _prompt_list(negative_prompt_2, batch, "negative_prompt_2"), prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip)
        takes_pooled = self.unet.config.get("addition_embed_type") == "text_time"
        if takes_pooled and add_text_embeds is None:
            raise ValueError("the UNet takes pooled text embeddings (SDXL): pass pooled_prompt_embeds with "
                             "prompt_embeds")
        if takes_pooled and do_cfg and negative_pooled_prompt_embeds is None:
            raise ValueError("pass negative_pooled_prompt_embeds with negative_prompt_embeds (SDXL)")

        default_h, default_w = self._default_size(config)
        height, width = height or default_h, width or default_w
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        add_time_ids = negative_add_time_ids = None
        if takes_pooled:
            add_time_ids = self._time_ids(original_size or (height, width), crops_coords_top_left,
                                          target_size or (height, width), rows, device)
            negative_add_time_ids = add_time_ids
            if negative_original_size is not None and negative_target_size is not None:
                negative_add_time_ids = self._time_ids(negative_original_size, negative_crops_coords_top_left,
                                                       negative_target_size, rows, device)

        latents = self.prepare_latents(rows, int(self.unet.config.in_channels), height, width, torch.float32, device,
                                       generator, latents)

        def conditioning(embeds, text_embeds, time_ids):
            added = None if not takes_pooled else {"text_embeds": text_embeds, "time_ids": time_ids}
            cond = loaded.cond(rows, encoder_hidden_states=embeds, added_cond_kwargs=added,
                               guidance_scale=embed_scale) or {}
            if cross_attention_kwargs is not None:
                cond["cross_attention_kwargs"] = cross_attention_kwargs
            return cond

        flow_map = loaded.flow_map
        n = grid.shape[0] - 1
        self._num_timesteps = n
        x = latents
        with self.progress_bar(total=n) as progress_bar:
            for i in range(n):
                if self.interrupt:
                    continue
                t_cur, t_next = float(grid[i]), float(grid[i + 1])
                cond = conditioning(prompt_embeds, add_text_embeds, add_time_ids)
                if do_cfg:
                    uncond = conditioning(negative_prompt_embeds, negative_pooled_prompt_embeds, negative_add_time_ids)

                    def jump(x_s, s, t, cond=cond, uncond=uncond):
                        return pipeline_jumps.guided_jump(flow_map, x_s, s, t, cond, uncond, w, guidance_rescale)
                else:
                    def jump(x_s, s, t, cond=cond):
                        return pipeline_jumps.plain_jump(flow_map, x_s, s, t, cond)
                if eta > 0 and i < n - 1:
                    noise = randn_tensor(tuple(x.shape), generator=generator, device=device, dtype=x.dtype)
                    x = pipeline_jumps.renoised_jump(jump, config.schedule, x, t_cur, t_next, eta, noise)
                else:
                    x = jump(x, t_cur, t_next)
                if callback_on_step_end is not None:
                    names = {"latents": x, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds,
                             "add_text_embeds": add_text_embeds,
                             "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
                             "add_time_ids": add_time_ids, "negative_add_time_ids": negative_add_time_ids}
                    wanted = {k: names[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t_cur, wanted) or {}
                    x = outputs.pop("latents", x)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    add_text_embeds = outputs.pop("add_text_embeds", add_text_embeds)
                    negative_pooled_prompt_embeds = outputs.pop("negative_pooled_prompt_embeds",
                                                                negative_pooled_prompt_embeds)
                    add_time_ids = outputs.pop("add_time_ids", add_time_ids)
                    negative_add_time_ids = outputs.pop("negative_add_time_ids", negative_add_time_ids)
                progress_bar.update()

        if output_type == "latent":
            images = x
        else:
            images = self.image_processor.postprocess(self.decode_latents(x), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
