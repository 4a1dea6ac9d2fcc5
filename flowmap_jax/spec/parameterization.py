"""The flow map's own output parameterisation: names and which schedule each needs. Pure Python.

`flowmap_jax.core.flow_map` (and its twin `torch_ref.flow_map`) owns the algebra; this module only names the
forms, so the export format and the training configuration can check them without a backend.
"""

from __future__ import annotations

from flowmap_jax.spec.schedule import ScheduleConfig

__all__ = ["ANCHOR_ALPHA", "PARAMETERIZATIONS", "resolve_parameterization"]

PARAMETERIZATIONS = ("angle", "linear", "teacher_step", "anchored")
"""The flow map's own output parameterisation (`flowmap_jax.core.flow_map` explains each): "angle" for VP
schedules (X = cos(theta_s - theta_t) x - sin(theta_s - theta_t) F, F v-like), "linear" for rectified flow
(X = x + (tau_t - tau_s) F, F a flow velocity), "teacher_step" (the teacher's DDIM step with F in the
teacher's prediction type; export format 1), "anchored" for VP schedules (the teacher's DDIM step where the
source is clean enough, alpha_s >= ANCHOR_ALPHA[1], "angle" where alpha_s <= ANCHOR_ALPHA[0], linear in
alpha_s between)."""

ANCHOR_ALPHA = (0.3, 0.6)
"""(alpha_lo, alpha_hi) of "anchored": its weight on the teacher's DDIM step is clip((alpha_s - lo) / (hi - lo),
0, 1). The DDIM step's coefficients are bounded by 1 / alpha_s wherever it has weight, so by 1 / lo."""


_REQUIREMENTS = {
    "angle": "needs a VP schedule (alpha^2 + sigma^2 = 1)",
    "linear": "is for rectified flow (alpha + sigma = 1)",
    "teacher_step": "is the teacher's own step",
    "anchored": "needs a VP schedule (alpha^2 + sigma^2 = 1)",
}
"""What each parameterisation asks of the schedule, in words (for the error naming both)."""


def resolve_parameterization(schedule: ScheduleConfig, parameterization: str) -> str:
    """The parameterisation a flow map on `schedule` uses: "auto" -> the schedule's default ("angle" for VP
    schedules, "linear" for rectified flow); a named one is checked against those the schedule allows
    (`schedule.parameterizations`; ValueError naming both otherwise)."""
    if parameterization == "auto":
        return schedule.default_parameterization
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown flow-map parameterization {parameterization!r}: expected 'auto' or one of "
                         f"{PARAMETERIZATIONS}")
    if parameterization not in schedule.parameterizations:
        raise ValueError(f"parameterization {parameterization!r} {_REQUIREMENTS[parameterization]}; a "
                         f"{schedule.kind} schedule uses {schedule.default_parameterization!r} (it allows "
                         f"{schedule.parameterizations})")
    return parameterization
