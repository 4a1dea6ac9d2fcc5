"""Few-step sampling from an exported flow map in PyTorch: `python -m torch_ref.sample --help`.

    python -m torch_ref.sample --model runs/digits/export --steps 4 --batch 16 --seed 0 --out samples
    python -m torch_ref.sample --model runs/digits/export --steps 2 --dtype bf16 --device cuda
    python -m torch_ref.sample --model path/to/sd15 --lora runs/sd15/lora --prompt "a cat" --steps 2

The same flags, inputs and output files as `python -m flowmap_jax.sample` (`flowmap_jax.cli.sample_cli`); in fp32
the two agree to float rounding. API (mirrors `flowmap_jax.sample`):

- `load_flow_map(folder, dtype="fp32", device="auto", lora=None) -> TorchFlowMapExport` (`torch_ref.export_loading`;
  with `lora`, `folder` is the base the LoRA flow map goes on, `torch_ref.lora_loading`);
- `sample(loaded, noise, timesteps, cond=None, guidance_scale=None, gamma=0.0, renoise=None)`: N jumps of
  `torch_ref.samplers.flow_map_sample`; noise (B, H, W, C) numpy (the CLI's, channels last) or a
  (B, C, H, W) tensor; returns (B, H, W, C) float32 numpy for numpy input, else a (B, C, H, W) tensor.
"""

from __future__ import annotations

import sys

import numpy as np

from flowmap_jax.cli import cli_exit, sample_cli
from flowmap_jax.data import encoders
from flowmap_jax.spec.layout import nchw_to_nhwc, nhwc_to_nchw
from flowmap_jax.spec.time_grid import check_direction

try:
    import torch

    from torch_ref import samplers
    from torch_ref.export_loading import TorchFlowMapExport, load_flow_map_export
    from torch_ref.lora_loading import load_lora_flow_map
except ModuleNotFoundError as missing:  # without the "torch" extra: one line and exit 2, no traceback
    cli_exit.exit_if_missing_extra(missing, __name__)
    raise

__all__ = ["load_flow_map", "sample", "main"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device(name)


def load_flow_map(folder, dtype: str = "fp32", device: str = "auto", lora=None) -> TorchFlowMapExport:
    """An exported flow map ready to sample in PyTorch (UNet in `dtype` on `device`). With `lora` (a `conversion
    export --lora` folder), `folder` is the base (a diffusers pipeline folder with unet/, or a UNet folder) and the
    LoRA flow map is loaded onto it (`torch_ref.lora_loading`)."""
    if lora is not None:
        return load_lora_flow_map(folder, lora, device=_device(device), dtype=dtype)
    return load_flow_map_export(folder, device=_device(device), dtype=dtype)


def _to_nchw(array, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(np.asarray(array, np.float32)))).to(device)


def sample(loaded: TorchFlowMapExport, noise, timesteps, cond=None, guidance_scale=None, gamma: float = 0.0,
           renoise=None, direction: str = "generate"):
    """N = len(timesteps) - 1 jumps from `noise` at timesteps[0] (teacher units). cond: numpy/tensor dict
    (encoder_hidden_states (B, L, D), added_cond_kwargs) or None; guidance_scale: fed as timestep_cond where
    the export has a guidance input. renoise: N - 1 noise arrays for gamma > 0 (numpy channels-last like
    `noise`, or tensors (B, C, H, W)); without it a gamma > 0 run draws torch noise (not the JAX numbers). direction: "generate" (timesteps
    strictly decreasing) or "invert" (strictly increasing); another grid is a ValueError (`spec.time_grid.check_direction`)."""
    check_direction(timesteps, direction)
    as_numpy = isinstance(noise, np.ndarray)
    x = _to_nchw(noise, loaded.device) if as_numpy else noise.to(loaded.device, torch.float32)
    cond = dict(cond or {})
    kwargs = loaded.cond(x.shape[0], encoder_hidden_states=cond.get("encoder_hidden_states"),
                         added_cond_kwargs=cond.get("added_cond_kwargs"), guidance_scale=guidance_scale)
    z = None
    if renoise is not None:
        z = [_to_nchw(r, loaded.device) if isinstance(r, np.ndarray) else r.to(loaded.device, torch.float32)
             for r in renoise]
    with torch.no_grad():
        out = samplers.flow_map_sample(loaded.flow_map, None, x, np.asarray(timesteps, np.float64), kwargs,
                                       gamma=gamma, noise=z, rng=0 if gamma > 0 and z is None else None)
    if as_numpy:
        return np.ascontiguousarray(nchw_to_nhwc(out.float().cpu().numpy()))
    return out


# --model may name a FlowMapPipeline folder: prompts through its text encoder(s), images through its VAE (PyTorch),
# --init-image through its VAE too.
PIPELINE_CODECS = sample_cli.PipelineCodecs(encode_prompts=encoders.prompt_conditioning,
                                            decode_latents=encoders.decode_latents,
                                            encode_images=encoders.encode_images)


def _run(request: sample_cli.SampleRequest):
    if request.lora is not None:  # --lora: the LoRA flow map on the base at --model (torch_ref.lora_loading)
        loaded = load_flow_map(request.args["model"], request.dtype, request.device, lora=request.lora)
    else:
        loaded = load_flow_map(request.info.folder, request.dtype, request.device)
    samples = sample(loaded, request.noise, request.timesteps, request.cond, request.guidance_scale, request.gamma,
                     request.renoise, direction=request.args.get("direction") or "generate")
    return samples, str(loaded.device)


def main(argv=None) -> int:
    return sample_cli.main(sys.argv[1:] if argv is None else argv, backend="torch", prog="python -m torch_ref.sample",
                           run=_run, codecs=PIPELINE_CODECS)


if __name__ == "__main__":
    cli_exit.run_main(main)
