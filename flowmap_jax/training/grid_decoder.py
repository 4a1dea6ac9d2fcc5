"""Sample grids of a latent teacher as images: the VAE decoder of the teacher's pipeline, run in PyTorch beside
the training run (`flowmap_jax.data.encoders.LatentCodec`, diffusers' AutoencoderKL; not a Flax port).

    decoder, note = grid_decoder(config.teacher, config.data, channels)     # in `assembly.build`
    images = decoder(latents)                          # (n, h, w, C) latents -> (n, h * f, w * f, 3) in [-1, 1]

Which VAE: the teacher folder's `vae/` when the teacher is a pipeline folder (`--teacher.path` with its UNet in
`--teacher.subfolder`, a local folder or a hub id read through the hub cache), else the folder source's
`--data.vae` (`--data.vae_subfolder`), the VAE that made the training latents. A teacher whose UNet takes 1 or 3
channels works in pixels: nothing to decode. A latent teacher without a VAE, or one that cannot be loaded (no
torch, no safetensors weights), keeps the latent view (`spec.image_grid`: the first three channels, each
rescaled) and `note` says why in one line, which the trainer prints as a warning.

The VAE loads once, on the first grid, on the CPU (float32), so it takes no accelerator memory from the run;
only process 0 decodes (it alone writes grids). Cost of a grid (rows = len(--sample.jumps) + 1, the teacher's;
columns = --sample.grid_columns), from `python benchmarks/grid_decode_cost.py` on this project's 2-core CPU (load
average ~4.7, so timings are pessimistic; two runs): the tiny test pipeline's grid, 12 latents of 8x8x4 ->
32 px, decodes in 0.6-0.8 s, its VAE load included. SD 1.5's decoder costs 2.51 TFLOP per 512 px image (torch's
FLOP counter, a multiply-add = 2); measured at 128 px (3.7-3.9 s, ~40 GFLOP/s) and scaled by FLOPs, 60-63 s per
512 px image here, so the sd15 preset's 16-image grid (jumps 1, 2, 4 and the teacher, 4 columns) is ~40 TFLOP:
~16 min on this CPU,
about 40 s at 1 TFLOP/s (a many-core host CPU), once per --run.sample_every (1000) steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

__all__ = ["GridDecoder", "find_grid_vae", "grid_decoder"]


def find_grid_vae(teacher, data) -> tuple[str, str] | None:
    """(folder, subfolder) of the VAE that decodes the run's latents, or None: the teacher pipeline's `vae/`,
    else the folder source's --data.vae. `teacher`, `data`: the run's `config.TeacherConfig`, `config.DataConfig`."""
    from flowmap_jax.data.encoders import pipeline_file
    from flowmap_jax.data.teacher_folder import resolve_teacher_path

    path = resolve_teacher_path(teacher.path)
    if teacher.subfolder and pipeline_file(path, "vae/config.json") is not None:
        return path, "vae"
    if data.source == "folder" and data.vae:
        return data.vae, data.vae_subfolder
    return None


class GridDecoder:
    """`decoder(latents (n, h, w, C) float32) -> (n, h * f, w * f, 3) float32 RGB about [-1, 1]`, through
    `encoders.LatentCodec` on the CPU, loaded on the first call. `seconds`: the time of the last call (load
    included on the first)."""

    def __init__(self, folder: str, subfolder: str):
        self.folder, self.subfolder = folder, subfolder
        self._codec = None
        self.seconds = 0.0

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        from flowmap_jax.data.encoders import LatentCodec

        start = time.perf_counter()
        if self._codec is None:
            self._codec = LatentCodec.from_pretrained(self.folder, self.subfolder, device="cpu", flag="--teacher.path")
        images = self._codec.decode(np.asarray(latents, np.float32))
        self.seconds = time.perf_counter() - start
        return images


def grid_decoder(teacher, data, channels: int) -> tuple[Callable | None, str | None]:
    """(decoder or None, one-line note or None) for a teacher UNet of `channels` input channels (see the module
    docstring). The VAE is found now, loaded on the first grid; a VAE that is there but cannot be loaded is a
    note, not an error (the run trains without torch)."""
    if channels in (1, 3):
        return None, None
    found = find_grid_vae(teacher, data)
    if found is None:
        return None, (f"sample grids show latents (first 3 of {channels} channels, rescaled): the teacher "
                      f"{teacher.path} has no vae/ and --data.vae is not set")
    try:  # the import and the config, so a run without torch says so at the start, not at the first grid
        from diffusers import AutoencoderKL
    except ImportError as error:
        return None, (f"sample grids show latents: decoding them with {os.path.join(*found)} needs the [torch] "
                      f"extra ({error})")
    del AutoencoderKL
    return GridDecoder(*found), None
