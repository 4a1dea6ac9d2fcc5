"""The parts of a run, built from its configuration: teacher, flow map, objectives, data, samplers.

`build(config, mesh) -> Parts` is the one place where the trainer meets the flow-map core
(`schedules`, `teacher`, `flow_map`, `samplers`, `objectives`), the UNet port and `conversion`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class Parts:
    """What `train.run` needs; every function is pure and jit-friendly where it touches arrays.

    params: initial flow-map network parameters (pytree of float32 arrays).
    teacher: the teacher as a pytree (its parameters are leaves: jit arguments, never constants).
    loss_fn: `(params, teacher, batch, rng) -> (loss, metrics)` (weighted sum of objectives).
    dataset: a `datasets.Dataset`.
    eval_inputs: `(n, seed) -> (noise (n, H, W, C) float32, cond dict of (n, ...) or None,
        labels (n,) int or None)`: fixed inputs of sample grids and the quality table.
    sample_flow: `(params, teacher, noise, cond, jumps: int) -> (n, H, W, C)` flow-map samples.
    sample_teacher: `(teacher, noise, cond, steps: int) -> (n, H, W, C)` teacher ODE samples.
    quality: `(samples, labels) -> dict of floats or None` (the digits metrics where they apply).
    export: `(params (numpy), folder, provenance dict) -> folder`, or None when not available.
    """

    params: Any
    teacher: Any
    loss_fn: Callable
    dataset: Any
    eval_inputs: Callable
    sample_flow: Callable
    sample_teacher: Callable
    quality: Callable
    export: Callable | None = None
    info: dict = dataclasses.field(default_factory=dict)


def build(config, mesh) -> Parts:
    raise NotImplementedError("the flow-map core is not integrated yet")
