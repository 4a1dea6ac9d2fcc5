"""What a network predicts: the prediction types both backends understand. Pure Python."""

from __future__ import annotations

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
"""What a network predicts at (x_t, t): the noise eps, v = alpha eps - sigma x0, the data x0, or the flow
velocity u = eps - x0 (SD3/FLUX; equal to dx/dt in [0, 1] time for rectified flow)."""


def check_prediction_type(prediction_type: str) -> str:
    """Returns `prediction_type` if it is one of PREDICTION_TYPES, else raises ValueError naming it."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
    return prediction_type
