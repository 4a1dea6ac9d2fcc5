"""Few-step sampling from an exported flow map in JAX: `python -m flowmap_jax.sample --help`.

    python -m flowmap_jax.sample --model runs/digits/export --steps 4 --batch 16 --seed 0 --out samples
    python -m flowmap_jax.sample --model path/to/sd15 --lora runs/sd15_lora/export --prompt "a cat" --steps 2

The same flags, inputs and output files as `python -m torch_ref.sample` (`flowmap_jax.cli.sample_cli`); in fp32
the two agree to float rounding. API (mirrored by `torch_ref.sample`):

- `load_flow_map(folder, dtype="fp32", device="auto", lora=None) -> LoadedFlowMap` (flow_map, params, export);
  with `lora`, `folder` is the base UNet the LoRA flow map goes on (`--model BASE --lora FOLDER`);
- `sample(loaded, noise, timesteps, cond=None, guidance_scale=None, gamma=0.0, renoise=None)`: N jumps
  `samplers.flow_map_sample` on the time grid `timesteps` (teacher units, noise -> data), x (B, H, W, C)
  float32; the network computes in `dtype`, the state and the jump coefficients stay float32.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from flowmap_jax.data import encoders
from flowmap_jax.cli import sample_cli
from flowmap_jax.spec.time_grid import check_direction

__all__ = ["LoadedFlowMap", "load_flow_map", "sample", "main"]

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclasses.dataclass
class LoadedFlowMap:
    """flow_map: `flowmap_jax.core.flow_map.FlowMap` (jitted network); params: its Flax params (on `device`);
    export: the `flowmap_jax.core.export_loading.FlowMapExport` it came from; device: a jax.Device."""

    flow_map: object
    params: dict
    export: object
    device: object
    jump: object = None  # samplers.make_jump(flow_map): one compiled jump for every grid


def _device(name: str):
    import jax

    if name == "auto":
        return jax.devices()[0]
    platform = "gpu" if name in ("cuda", "gpu") else name
    try:
        return jax.devices(platform)[0]
    except RuntimeError as err:
        raise ValueError(f"--device {name}: no {platform} device for JAX ({err})") from None


def load_flow_map(folder, dtype: str = "fp32", device: str = "auto", lora=None) -> LoadedFlowMap:
    """An exported flow map ready to sample in JAX: params float32 on `device`, compute in `dtype`. With `lora` (a
    `conversion export --lora` folder), `folder` is the base (a diffusers pipeline folder with unet/, or a UNet
    folder) and the LoRA flow map is loaded onto it (`flowmap_jax.core.lora_loading`)."""
    import jax
    import jax.numpy as jnp

    from flowmap_jax.core.export_loading import jax_flow_map, load_flow_map_export

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if lora is not None:
        from flowmap_jax.core.lora_loading import load_lora_flow_map

        exported = load_lora_flow_map(folder, lora)
    else:
        exported = load_flow_map_export(folder, dtype=np.float32)
    dev = _device(device)
    params = jax.device_put(exported.params, dev)
    from flowmap_jax.core import samplers

    flow_map = jax_flow_map(exported, dtype=getattr(jnp, _DTYPES[dtype]), jit=False)
    return LoadedFlowMap(flow_map=flow_map, params=params, export=exported, device=dev,
                         jump=samplers.make_jump(flow_map))


def _cond_arrays(loaded: LoadedFlowMap, cond, guidance_scale, batch: int):
    import jax
    import jax.numpy as jnp

    from flowmap_jax.core.flow_map import guidance_input_cond

    out = None if cond is None else jax.tree.map(lambda v: jax.device_put(jnp.asarray(v, jnp.float32),
                                                                           loaded.device), dict(cond))
    from flowmap_jax.spec.sampling_inputs import resolve_guidance

    # None where the map has no guidance input (a scale other than the baked-in one raises), else the scale,
    # checked against the trained range.
    scale = resolve_guidance(loaded.export.config, guidance_scale)
    if scale is not None:
        dim = loaded.export.config.guidance_embedding_dim
        w = jax.device_put(jnp.full((batch,), scale, jnp.float32), loaded.device)
        out = guidance_input_cond(out, w, dim)
    return out


def sample(loaded: LoadedFlowMap, noise, timesteps, cond=None, guidance_scale=None, gamma: float = 0.0,
           renoise=None, direction: str = "generate") -> np.ndarray:
    """N = len(timesteps) - 1 jumps from `noise` (B, H, W, C) at timesteps[0]; returns (B, H, W, C) float32
    numpy. cond: dict of numpy/jax arrays (encoder_hidden_states (B, L, D), added_cond_kwargs) or None.
    guidance_scale: fed as timestep_cond where the export has a guidance input. renoise: N - 1 arrays of
    standard normal noise for gamma > 0 (required then: the CLI draws them with numpy). direction: "generate"
    (timesteps strictly decreasing, noise to data) or "invert" (strictly increasing, data to noise); another grid
    is a ValueError, the CLIs' rule (`spec.time_grid.check_direction`)."""
    check_direction(timesteps, direction)
    import jax
    import jax.numpy as jnp

    from flowmap_jax.core import samplers

    x = jax.device_put(jnp.asarray(noise, jnp.float32), loaded.device)
    c = _cond_arrays(loaded, cond, guidance_scale, x.shape[0])
    if gamma > 0 and renoise is None:
        raise ValueError("gamma > 0 needs `renoise` (N - 1 arrays of standard normal noise)")
    z = None if renoise is None else [jax.device_put(jnp.asarray(r, jnp.float32), loaded.device) for r in renoise]
    with jax.default_device(loaded.device):
        out = samplers.flow_map_sample(loaded.flow_map, loaded.params, x, np.asarray(timesteps, np.float64), c,
                                       gamma=gamma, noise=z, jump=loaded.jump)
    return np.asarray(jax.device_get(out), np.float32)


# --model may name a FlowMapPipeline folder: prompts through its text encoder(s), images through its VAE (PyTorch),
# --init-image through its VAE too.
PIPELINE_CODECS = sample_cli.PipelineCodecs(encode_prompts=encoders.prompt_conditioning,
                                            decode_latents=encoders.decode_latents,
                                            encode_images=encoders.encode_images)


def _run(request: sample_cli.SampleRequest):
    if request.lora is not None:  # --lora: the LoRA flow map on the base at --model (core.lora_loading)
        loaded = load_flow_map(request.args["model"], request.dtype, request.device, lora=request.lora)
    else:
        loaded = load_flow_map(request.info.folder, request.dtype, request.device)
    samples = sample(loaded, request.noise, request.timesteps, request.cond, request.guidance_scale, request.gamma,
                     request.renoise, direction=request.args.get("direction") or "generate")
    return samples, f"{loaded.device.platform}:{loaded.device.id}"


def main(argv=None) -> int:
    return sample_cli.main(sys.argv[1:] if argv is None else argv, backend="jax", prog="python -m flowmap_jax.sample",
                           run=_run, codecs=PIPELINE_CODECS, needs=("jax", "flax"))


if __name__ == "__main__":
    from flowmap_jax.cli.cli_exit import run_main

    run_main(main)
