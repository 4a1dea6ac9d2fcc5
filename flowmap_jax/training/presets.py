"""The presets: each a small delta over the default `TrainConfig` (`flowmap_jax.training.config`), found by name in `PRESETS`.

    python -m flowmap_jax.train                       # digits, the default: TrainConfig() itself
    python -m flowmap_jax.train --preset sd15 --teacher.path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data.source shards --data.path /data/laion_shards --mesh.fsdp -1
    python -m flowmap_jax.train --preset sdxl --teacher.path SDXL_FOLDER --data.path /data/sdxl_shards

A preset is data: a function returning a complete `TrainConfig`, written as the fields that differ from its
base (`derive`). Nothing elsewhere branches on a preset's name (the trainer reads fields only). Adding a preset
is adding one function here and its entry in `PRESETS`; the command line's `--preset` choices and its `--help`
come from `PRESETS`.
"""

from __future__ import annotations

import dataclasses
import typing

from flowmap_jax.training.config import TrainConfig


def derive(base: TrainConfig, preset: str, **sections: dict) -> TrainConfig:
    """`base` with `preset` set and, per section, the fields given as a dict changed (a nested dataclass such
    as `objective.options` takes a dict of its own fields too); every other field keeps `base`'s value.
    A field name the section lacks raises TypeError naming it (from `dataclasses.replace`)."""
    return _replace(base, {"preset": preset, **sections})


def _replace(value, changes: dict):
    nested = {name: _replace(getattr(value, name), change)
              if isinstance(change, dict) and dataclasses.is_dataclass(getattr(value, name, None)) else change
              for name, change in changes.items()}
    return dataclasses.replace(value, **nested)


def digits() -> TrainConfig:
    """The embedded default: distil the shipped digits teacher (16x16x1 pixels, class labels through
    cross-attention, classifier-free guidance) on a CPU in minutes.

    Sized for a 2-core CPU (300 steps of 32 examples, 3 minutes on an idle one). Objective `pairs`: the regression target
    is the teacher's PF-ODE from s to t in 4 DPM-Solver++(2M) log-SNR steps; lr 1e-3 with a cosine decay, the loss in
    the map's output units (output_scale_power 2) and jump lengths drawn with length_power 0.3 (issue 26: MSE to the
    teacher 0.014 / 0.0071 / 0.0042 / 0.0043 at 1 / 2 / 4 / 8 jumps, seed 0, against 0.024 / 0.016 / 0.018 at
    lr 1e-4, docs/DESIGN.md "Objectives"). The measurements below were made with that earlier recipe. On the job's own training pairs that
    target is 5.4% off a converged 64-step solution, against 13.5% for the trained map itself
    (`python benchmarks/pairs_target_error.py --run runs/digits`); 8 steps (1.7%) cost ~1.8x the teacher
    passes per step and did not change the quality table at this budget (2 / 4 jumps MSE 0.0167 / 0.0204
    with 8 steps against 0.0164 / 0.0180 with 4, seed 0), so the longer runs are where 8 pays.
    The other objectives at this budget (300 steps, their default options; numbers in the sd15 docstring)
    improved every row too, but less (1-jump FD: eulerian 160, progressive 236, lagrangian 354, against 71).
    """
    return TrainConfig()  # the schema's defaults are this preset (preset="digits")


def sd15() -> TrainConfig:
    """Stable Diffusion 1.5: 64x64x4 latents (512px images), 768-d CLIP text embeddings from
    precomputed shards (`python -m flowmap_jax.write_shards`), bf16 compute, remat, 8-way data parallel.

    Guidance: baked in at --teacher.guidance_scale 7.5. To distil it as an input instead (w drawn per example,
    the student's UNet gains time_cond_proj_dim; sample later at any w in the range, 7.5 the default):
    `--objective.options '{"guidance_scale_range": [2, 12], "guidance_embedding_dim": 256}'` (256 as the
    LCM SD 1.5 UNets; the JSON updates the preset's options).

    Objective: `pairs` with 8-step targets (DPM-Solver++(2M), log-SNR grid; 2.9% relative error on SD's
    schedule against the exact ODE of a narrow-mode mixture, `benchmarks/results/teacher_target_error.md`),
    chosen from what trained in the bounded parameterisation on the digits teacher at the default budget
    (300 steps, each objective with its default options, seed 0; docs/DESIGN.md has seed 1): every objective
    improved every row of the quality table, `pairs` the most. MSE to the teacher at 1 / 2 / 4 jumps:
    pairs 0.024 / 0.016 / 0.018, eulerian 0.074 / 0.046 / 0.032, progressive 0.085 / 0.040 / 0.024,
    lagrangian 0.19 / 0.099 / 0.040, untrained 1.65 / 0.63 / 0.16; FD against the teacher's 68.9: pairs 71 /
    60 / 61, eulerian 160 / 121 / 87, progressive 236 / 109 / 83, lagrangian 354 / 228 / 103, untrained
    1439 / 1354 / 392. Not yet measured on SD itself. Cost: 9 guided teacher evaluations (18 UNet passes,
    forward only) per example against the student's ~3, about 3x an eulerian step's compute and less memory
    (no tangent). The cheaper alternatives: `--objective.names eulerian` (Align Your Flow's JVP objective; one
    guided teacher evaluation and one JVP per example) and `progressive` (one guided teacher evaluation)."""
    return derive(
        digits(), "sd15",
        run={"dir": "runs/sd15", "steps": 20_000, "log_every": 50, "sample_every": 1000, "checkpoint_every": 1000,
             "quality_samples": 0},
        teacher={"path": "stable-diffusion-v1-5/stable-diffusion-v1-5", "guidance_scale": 7.5},
        model={"dtype": "bfloat16", "remat": True},
        data={"source": "shards", "batch_size": 256, "image_size": 512, "sample_shape": (64, 64, 4)},
        # digits' loss units and jump lengths are measured on digits only: SD keeps X's units and uniform lengths
        objective={"options": {"teacher_steps": 8, "output_scale_power": None, "time_pairs": {"length_power": 1.0}}},
        optim={"lr": 1e-5, "warmup_steps": 500, "schedule": "cosine", "weight_decay": 0.01, "ema_decay": 0.9999},
        sample={"jumps": (1, 2, 4), "grid_columns": 4},
    )


def sdxl() -> TrainConfig:
    """Stable Diffusion XL base: 128x128x4 latents (1024px images), two text encoders' 2048-d hidden states
    plus the pooled text embedding and the six size/crop time ids (`added_cond_kwargs`), all from precomputed
    shards (`python -m flowmap_jax.write_shards --pipeline SDXL_FOLDER`), bf16 compute, remat, FSDP over 8
    devices (the 2.6 B-parameter UNet's AdamW state does not fit one device replicated). Guidance as an input
    instead of baked in at 5.0: as for sd15, e.g. `--objective.options '{"guidance_scale_range": [2, 8],
    "guidance_embedding_dim": 256}'`. Objective: `pairs` with 8-step targets, as sd15 (why there). Each device
    runs its batch (16 on 8 devices) 4 examples at a time (`optim.microbatch_size`), gradients averaged: the step
    plans at 61.4 GiB per device with FSDP over 8 against 181.6 in one pass (benchmarks/README.md, XLA CPU's
    plan)."""
    return derive(
        sd15(), "sdxl",
        run={"dir": "runs/sdxl"},
        teacher={"path": "stabilityai/stable-diffusion-xl-base-1.0", "guidance_scale": 5.0},
        data={"batch_size": 128, "image_size": 1024, "sample_shape": (128, 128, 4)},
        mesh={"fsdp": -1},  # shard over all the devices there are (8 on an 8-GPU host; 1 still runs)
        optim={"microbatch_size": 4},  # the most examples a device runs at once (memory, not the batch)
    )


PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {"digits": digits, "sd15": sd15, "sdxl": sdxl}
"""Every preset by name (the `--preset` choices, in this order)."""
DEFAULT_PRESET = "digits"
