"""Prediction types and their conversions, in JAX (mirrored by `torch_ref.predictions`).

A network at (x_t, t) predicts, in its prediction type (x_t = alpha_t x0 + sigma_t eps):
  "epsilon":      eps
  "v_prediction": v = alpha_t eps - sigma_t x0
  "sample":       x0
  "flow":         u = eps - x0 (SD3/FLUX; dx/dt in [0, 1] time for rectified flow)
The formulas below hold for any (alpha, sigma), VP or not.

Shapes: `prediction`, `x_t`, `x0`, `eps`: (B, ...) (Flax images (B, H, W, C)); alpha/sigma and their
derivatives: scalars, (B,) per example (reshaped here to (B, 1, ..., 1)), or already broadcastable.
"""

from __future__ import annotations

from flowmap_jax.core.schedules import expand_time
from flowmap_jax.spec.prediction_types import PREDICTION_TYPES, check_prediction_type

__all__ = ["PREDICTION_TYPES", "check_prediction_type", "to_x0_eps", "from_x0_eps", "velocity",
           "jump_coefficients", "ddim_step"]


def to_x0_eps(prediction, x_t, alpha_t, sigma_t, prediction_type: str):
    """(x0_hat, eps_hat) from a prediction at (x_t, t). Shapes as x_t."""
    check_prediction_type(prediction_type)
    a, s = expand_time(alpha_t, x_t), expand_time(sigma_t, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * prediction) / a, prediction
    if prediction_type == "sample":
        return prediction, (x_t - a * prediction) / s
    if prediction_type == "v_prediction":
        norm = a * a + s * s
        return (a * x_t - s * prediction) / norm, (s * x_t + a * prediction) / norm
    norm = a + s  # flow: u = eps - x0
    return (x_t - s * prediction) / norm, (x_t + a * prediction) / norm


def from_x0_eps(x0, eps, alpha_t, sigma_t, prediction_type: str):
    """The prediction of type `prediction_type` that (x0, eps) correspond to at time t (x_t implied)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return expand_time(alpha_t, x0) * eps - expand_time(sigma_t, x0) * x0
    return eps - x0


def velocity(x0_hat, eps_hat, d_alpha_dt, d_sigma_dt):
    """PF-ODE velocity dx/dt = alpha'_t x0_hat + sigma'_t eps_hat (teacher time units)."""
    return expand_time(d_alpha_dt, x0_hat) * x0_hat + expand_time(d_sigma_dt, x0_hat) * eps_hat


def jump_coefficients(alpha_s, sigma_s, alpha_t, sigma_t, prediction_type: str):
    """(c_x, c_pred) with alpha_t x0_hat + sigma_t eps_hat = c_x * x_s + c_pred * prediction, where
    (x0_hat, eps_hat) follow from `prediction` at (x_s, s): the DDIM step from s to t.

    Written so that s == t gives c_x == 1 and c_pred == 0 exactly in floating point, hence X(x, s, s) = x
    bit for bit. Shapes: those of the inputs (scalars or (B,)).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        ratio = alpha_t / alpha_s
        return ratio, sigma_t - sigma_s * ratio
    if prediction_type == "sample":
        ratio = sigma_t / sigma_s
        return ratio, alpha_t - alpha_s * ratio
    if prediction_type == "v_prediction":
        norm = alpha_s * alpha_s + sigma_s * sigma_s
        return (alpha_t * alpha_s + sigma_t * sigma_s) / norm, (sigma_t * alpha_s - alpha_t * sigma_s) / norm
    norm = alpha_s + sigma_s
    return (alpha_t + sigma_t) / norm, (sigma_t * alpha_s - alpha_t * sigma_s) / norm


def ddim_step(prediction, x_s, alpha_s, sigma_s, alpha_t, sigma_t, prediction_type: str):
    """The teacher's first-order (DDIM, eta = 0) step from s to t with `prediction` made at (x_s, s):
    alpha_t x0_hat + sigma_t eps_hat. x_s, prediction: (B, ...); alpha/sigma: scalars or (B,)."""
    c_x, c_pred = jump_coefficients(alpha_s, sigma_s, alpha_t, sigma_t, prediction_type)
    return expand_time(c_x, x_s) * x_s + expand_time(c_pred, x_s) * prediction
