"""Prompts to images with an exported flow map: `FlowMapPipeline`, a `diffusers.DiffusionPipeline`.

    from torch_ref.pipeline import FlowMapPipeline
    pipe = FlowMapPipeline.from_pretrained("runs/sd15/pipeline")        # `python -m conversion export RUN OUT --pipeline`
    images = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images

    from diffusers import DiffusionPipeline                               # the same, through diffusers' loader:
    pipe = DiffusionPipeline.from_pretrained("runs/sd15/pipeline", trust_remote_code=True)

    pipe = FlowMapPipeline.from_pretrained("path/to/sd15")             # a stock StableDiffusionPipeline folder
    pipe.load_flow_map("runs/sd15/lora")                                # `python -m conversion export RUN OUT --lora`

A stock folder's extra components (safety_checker, feature_extractor, image_encoder) are left out, as diffusers
does for components a pipeline class does not take; until `load_flow_map` it has no flow map (config flow_map
None) and calling it is a ValueError that says so.

The folder (`conversion.pipeline_export`, names in `flowmap_jax.spec.pipeline_folder`): `unet/` the flow map (a flow-map export: stock UNet2DConditionModel
with the target-time hook, plus flowmap.json), the teacher pipeline's `vae/`, `text_encoder/`, `tokenizer/`
(SDXL also `text_encoder_2/`, `tokenizer_2/`), `scheduler/` (the teacher's, for reference: the time grid comes
from flowmap.json), and `model_index.json` with `_class_name: ["pipeline", "FlowMapPipeline"]` and the flow
map's flowmap.json under the config key `flow_map`. diffusers resolves a class that is not its own only
through a module file in the folder: `pipeline.py` there is one import line (`from torch_ref.pipeline import
FlowMapPipeline`), so `DiffusionPipeline.from_pretrained` loads it, offline, given `trust_remote_code=True`
(diffusers' consent to run a folder's module file; without it diffusers refuses with that advice).
`FlowMapPipeline.from_pretrained` needs no such flag when `pipeline.py` is exactly the line this project
writes (anything else is left to diffusers' check).

Sampling: `torch_ref.sample.sample` (N jumps of `torch_ref.samplers.flow_map_sample`) on the flow map that
`torch_ref.export_loading.flow_map_from_unet` builds from the UNet and flowmap.json, so the pipeline follows
the export's parameterisation. Times: `num_inference_steps=N` is `flowmap_jax.spec.time_grid.time_grid(schedule, N)`
(uniform in teacher time from the noise end to the clean end); `timesteps=[...]` gives the N source times
from noise to data (diffusers' convention), the clean end appended unless already last. Latents (B, C, h, w)
start as standard normal noise (`generator`, or `latents=`), are decoded by the VAE after division by
`scaling_factor` (plus `shift_factor`, if any).

Guidance: a map distilled with guidance baked in reproduces its teacher at that scale (`guidance_scale` must
be None or that scale); a map with guidance as an input takes `guidance_scale` (fed as `timestep_cond`); a
map of an unguided teacher applies classifier-free guidance here, on the jumps, with `negative_prompt`
(default: the empty prompt, or zeros where the pipeline sets force_zeros_for_empty_prompt):
X = X(uncond) + w (X(cond) - X(uncond)), exact for any map affine in the network output at fixed x, s, t.
A negative prompt for a distilled-guidance map is an error (its unconditional branch is inside the weights).
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from flowmap_jax.spec.pipeline_folder import (
    PIPELINE_MODULE_FILE,
    PIPELINE_MODULE_SOURCE,
)
from flowmap_jax.spec.sampling_inputs import resolve_guidance
from flowmap_jax.spec.schedule import check_time_values
from flowmap_jax.spec.time_grid import check_direction, time_grid

__all__ = ["FlowMapPipeline"]

class _GuidedFlowMap:
    """Classifier-free guidance on the jumps of a flow map: X_u + w (X_c - X_u), one batched call."""

    def __init__(self, flow_map, uncond: dict, scale: float):
        self.flow_map, self.uncond, self.scale = flow_map, uncond, float(scale)
        self.schedule = flow_map.schedule

    def __call__(self, params, x, t_source, t_target, cond=None):
        batch = x.shape[0]
        both = _concat(cond, self.uncond)
        out = self.flow_map(params, torch.cat([x, x]), t_source, t_target, both)
        x_cond, x_uncond = out[:batch], out[batch:]
        return x_uncond + self.scale * (x_cond - x_uncond)


def _concat(a, b):
    if isinstance(a, dict):
        return {k: _concat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def _to_torch(tree, device):
    if isinstance(tree, dict):
        return {k: _to_torch(v, device) for k, v in tree.items()}
    return torch.as_tensor(np.asarray(tree), dtype=torch.float32, device=device)


class FlowMapPipeline(DiffusionPipeline):
    """Few-step text-to-image sampling with a distilled flow map (see the module docstring).

    Components: unet (the flow map, UNet2DConditionModel with class_embed_type "timestep"), vae
    (AutoencoderKL), text_encoder + tokenizer, optional text_encoder_2 + tokenizer_2 (SDXL) and scheduler
    (the teacher's, unused by sampling). Config: flow_map (flowmap.json as a dict; None for a stock SD folder
    until `load_flow_map` puts a LoRA flow map on its UNet), force_zeros_for_empty_prompt.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components: typing.ClassVar[list[str]] = ["text_encoder_2", "tokenizer_2", "scheduler"]

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; `trust_remote_code` is implied only for a folder whose pipeline.py is exactly the
        import line this project writes."""
        module = Path(os.fspath(pretrained_model_name_or_path)) / PIPELINE_MODULE_FILE
        if module.is_file() and module.read_text() == PIPELINE_MODULE_SOURCE:
            kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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
        same encoding as the shards the flow map was trained on."""
        from flowmap_jax.data.encoders import PromptEncoder

        tokenizers = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        return PromptEncoder(tokenizers=tokenizers, text_encoders=encoders, device=self._execution_device,
                             penultimate=self.text_encoder_2 is not None,
                             pooled=self.unet.config.get("addition_embed_type") == "text_time",
                             zeros_for_empty_prompt=bool(self.config.force_zeros_for_empty_prompt))

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

    def _sdxl_added(self, cond: dict, height: int, width: int) -> dict:
        if "added_cond_kwargs" in cond:
            from flowmap_jax.data.encoders import sdxl_time_ids

            rows = cond["encoder_hidden_states"].shape[0]
            ids = sdxl_time_ids((height, width), (0, 0), (height, width))
            cond["added_cond_kwargs"]["time_ids"] = np.tile(ids[None], (rows, 1))
        return cond

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents as the UNet sees them -> (B, 3, H, W) images about [-1, 1]."""
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        latents = latents.to(self.vae.dtype) / float(self.vae.config.scaling_factor) + shift
        return self.vae.decode(latents).sample.float()

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt=None, num_inference_steps: int | None = None, timesteps=None,
                 guidance_scale: float | None = None, negative_prompt=None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True):
        """Images for `prompt` (str or list) in N flow-map jumps. Default N: 4 when neither
        num_inference_steps nor timesteps is given. output_type "pil", "np" ((B, H, W, 3) in [0, 1]), "pt" or
        "latent" ((B, C, h, w) as the UNet sees them). Returns ImagePipelineOutput(images) or (images,)."""
        from torch_ref.sample import sample

        loaded = self.loaded_flow_map()  # first: a stock folder without a flow map says so
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts:
            raise ValueError("prompt is required (a string or a list of strings)")
        prompts = [p for p in prompts for _ in range(int(num_images_per_prompt))]
        config = loaded.config
        device = self._execution_device
        if num_inference_steps is None and timesteps is None:
            num_inference_steps = 4
        grid = self.time_grid(config.schedule, num_inference_steps, timesteps)

        channels = int(self.unet.config.in_channels)
        if config.sample_shape is not None:
            default_h, default_w = config.sample_shape[0], config.sample_shape[1]
        else:
            size = self.unet.config.sample_size
            default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
        height = height or default_h * self.vae_scale_factor
        width = width or default_w * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        shape = (len(prompts), channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")

        encoder = self.prompt_encoder()
        cond = self._sdxl_added(encoder.encode(prompts), height, width)
        guided_map = None
        if config.guidance == "none":
            w = 1.0 if guidance_scale is None else float(guidance_scale)
            if w != 1.0 or negative_prompt is not None:
                if negative_prompt is None:
                    uncond = encoder.unconditional()
                    uncond = {k: ({kk: np.repeat(vv, len(prompts), 0) for kk, vv in v.items()} if isinstance(v, dict)
                                  else np.repeat(v, len(prompts), 0)) for k, v in uncond.items()}
                else:
                    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
                    if len(negatives) not in (1, len(prompts) // int(num_images_per_prompt)):
                        raise ValueError(f"negative_prompt has {len(negatives)} entries for "
                                         f"{len(prompts) // int(num_images_per_prompt)} prompts")
                    negatives = np.resize(np.asarray(negatives, object), len(prompts) // int(num_images_per_prompt))
                    uncond = encoder.encode([n for n in negatives for _ in range(int(num_images_per_prompt))])
                uncond = self._sdxl_added(uncond, height, width)
                guided_map = _GuidedFlowMap(loaded.flow_map, _to_torch(uncond, device), w)
            embed_scale = None
        else:
            if negative_prompt is not None:
                raise ValueError(f"this flow map distilled {config.guidance} guidance (its unconditional branch is in "
                                 "its weights); negative_prompt cannot be applied")
            embed_scale = resolve_guidance(config, guidance_scale)

        if guided_map is not None:
            from torch_ref import samplers

            kwargs = loaded.cond(len(prompts), encoder_hidden_states=cond["encoder_hidden_states"],
                                 added_cond_kwargs=cond.get("added_cond_kwargs"))
            out = samplers.flow_map_sample(guided_map, None, latents.to(device, torch.float32), grid, kwargs)
        else:
            out = sample(loaded, latents.to(device, torch.float32), grid, cond, guidance_scale=embed_scale)

        if output_type == "latent":
            images = out
        else:
            images = self.image_processor.postprocess(self.decode_latents(out), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
