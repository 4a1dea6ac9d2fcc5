"""Image-to-image with an exported flow map: `FlowMapImg2ImgPipeline`, a `FlowMapPipeline` that starts from an image.

    from torch_ref.pipeline_img2img import FlowMapImg2ImgPipeline
    pipe = FlowMapImg2ImgPipeline.from_pretrained("runs/sd15/pipeline")   # the same folder as FlowMapPipeline
    pipe = FlowMapImg2ImgPipeline(**text_to_image_pipe.components)       # or its components
    images = pipe("a watercolour", image=pil_image, strength=0.6, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0)).images

The image (PIL, a list of PIL, numpy (B, H, W, 3) or (H, W, 3) in [0, 1], or a torch (B, 3, H, W) in [-1, 1],
as diffusers' `VaeImageProcessor.preprocess` takes them) is encoded by the VAE as diffusers'
`StableDiffusionImg2ImgPipeline.prepare_latents` does: a sample of the posterior drawn with `generator` (one per
row for a list), times `scaling_factor` (minus `shift_factor` first, where the VAE has one), then repeated to
the rows (prompts x num_images_per_prompt); then the starting noise is drawn from the same `generator`
(or given as `latents=`, (rows, C, h, w)), and the start is x_s = alpha_s x0 + sigma_s eps at
s = `flowmap_jax.spec.img2img.start_time(schedule, strength)` (strength 1: pure noise, text-to-image).
`num_inference_steps` N (default 4) jumps go from s to the clean end on `spec.img2img.img2img_grid`; the rest
(prompts, guidance, eta, callbacks, decoding) is `FlowMapPipeline.__call__` on that grid from that start.
SDXL: the size ids default to the image's (height, width). The image's height and width must be multiples of
the VAE's factor (8); it is not resized.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    retrieve_latents,
)
from diffusers.utils.torch_utils import randn_tensor

from flowmap_jax.spec.img2img import check_strength, img2img_grid, noised_start
from torch_ref.pipeline import FlowMapPipeline

__all__ = ["FlowMapImg2ImgPipeline"]


class FlowMapImg2ImgPipeline(FlowMapPipeline):
    """Few-step image-to-image with a distilled flow map (see the module docstring); the components and config
    of `FlowMapPipeline`, loaded from the same folder."""

    def encode_image(self, image: torch.Tensor, rows: int, generator=None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (rows, C, H/f, W/f) float32 latents as the UNet sees them: diffusers'
        img2img encoding (a posterior sample from `generator`, scaled), repeated to `rows` (B must divide it)."""
        image = image.to(device=self._execution_device, dtype=self.vae.dtype)
        if isinstance(generator, list):
            if len(generator) != rows:
                raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {rows}")
            if image.shape[0] < rows and rows % image.shape[0] == 0:
                image = torch.cat([image] * (rows // image.shape[0]))
            if image.shape[0] != rows:
                raise ValueError(f"image has {image.shape[0]} examples for a batch of {rows}")
            latents = torch.cat([retrieve_latents(self.vae.encode(image[i:i + 1]), generator=generator[i])
                                 for i in range(rows)])
        else:
            latents = retrieve_latents(self.vae.encode(image), generator=generator)
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        latents = ((latents - shift) * float(self.vae.config.scaling_factor)).float()
        if rows % latents.shape[0]:
            raise ValueError(f"image has {latents.shape[0]} examples for a batch of {rows} (it must divide it)")
        return torch.cat([latents] * (rows // latents.shape[0]))

    def prepare_image_latents(self, image_latents: torch.Tensor, strength: float, generator=None,
                              latents=None) -> torch.Tensor:
        """The start x_s (rows, C, h, w) float32 (`spec.img2img.noised_start`) from the encoded image and noise
        drawn from `generator` after the encoding (diffusers' order), or `latents` (the noise) given."""
        schedule = self.loaded_flow_map().config.schedule
        shape = tuple(image_latents.shape)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=image_latents.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents (the starting noise) have shape {tuple(latents.shape)}, expected {shape}")
        else:
            noise = latents.to(device=image_latents.device, dtype=torch.float32)
        # contiguous: the VAE's output may be channels-last strided, and the UNet's convolutions round by layout
        return noised_start(schedule, strength, image_latents, noise).contiguous()

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, strength: float = 0.6, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt=None, num_images_per_prompt: int = 1,
                 generator=None, latents=None, output_type: str = "pil", return_dict: bool = True, **kwargs):
        """Images for `prompt` (or `prompt_embeds=`) starting from `image` (module docstring): `strength` in
        (0, 1], N = `num_inference_steps` jumps (default 4) from the start time to the clean end. The other
        keyword arguments are `FlowMapPipeline.__call__`'s (not timesteps, height, width: the grid comes from
        strength, the size from the image). Returns ImagePipelineOutput(images) or (images,)."""
        strength = check_strength(strength)
        if image is None:
            raise ValueError("image is required (PIL, numpy or a torch tensor)")
        for name in ("timesteps", "height", "width"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is not an img2img argument: the grid comes from strength and "
                                 f"num_inference_steps, the size from the image")
            kwargs.pop(name, None)
        steps = 4 if num_inference_steps is None else int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        loaded = self.loaded_flow_map()
        grid = img2img_grid(loaded.config.schedule, strength, steps)
        pixels = self.image_processor.preprocess(image)
        height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"image height and width must be multiples of {self.vae_scale_factor}, got "
                             f"{height}x{width}")
        if prompt is not None:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        elif kwargs.get("prompt_embeds") is not None:
            batch = int(kwargs["prompt_embeds"].shape[0])
        else:
            raise ValueError("prompt is required (a string or a list of strings), or prompt_embeds")
        rows = batch * int(num_images_per_prompt)
        start = self.prepare_image_latents(self.encode_image(pixels, rows, generator), strength, generator, latents)
        return super().__call__(prompt, timesteps=grid, guidance_scale=guidance_scale,
                                negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                height=height, width=width, generator=generator, latents=start,
                                output_type=output_type, return_dict=return_dict, **kwargs)
