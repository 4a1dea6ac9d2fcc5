"""The flow map X(x_s, s, t) in JAX (mirrored by `torch_ref.flow_map`).

Parameterisation (docs/DESIGN.md, "The flow map"): a network predicts, in the teacher's prediction type,
at (x_s, s) told the target time t; the map is the teacher's own first-order step with that prediction,

    X(x_s, s, t) = alpha_t * x0_hat + sigma_t * eps_hat = c_x(s, t) * x_s + c_pred(s, t) * F(x_s, s, t),

(`predictions.jump_coefficients`; rectified flow: x_s + (t - s) * u_hat). Hence X(x, s, s) = x exactly
(bit for bit), and a network initialised from the teacher (target-time hook zeroed) makes X the teacher's
DDIM step. Jumps go both ways: s > t towards data (sampling), t > s towards noise (inversion).

A *network* is `net(params, x, t_source, t_target, cond) -> prediction` with x (B, ...) (Flax images
(B, H, W, C)), t_source and t_target (B,) float32 in teacher units, cond a dict of keyword arguments of the
UNet (encoder_hidden_states, timestep_cond, added_cond_kwargs) or None. `unet_network(unet)` adapts
`flowmap_jax.unet.FlaxUNet2DConditionModel`: the target time goes in as `class_labels`
(class_embed_type="timestep"; `add_target_time_hook` builds that from a teacher).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax import predictions as pred_lib
from flowmap_jax import schedules
from flowmap_jax.schedules import batch_times, expand_time
from flowmap_jax.spec.prediction_types import check_prediction_type
from flowmap_jax.spec.schedule import ScheduleConfig
from flowmap_jax.spec.target_time_hook import add_target_time_hook_config

__all__ = ["FlowMap", "unet_network", "add_target_time_hook", "guidance_scale_embedding", "batch_times"]


@dataclasses.dataclass(frozen=True)
class FlowMap:
    """X(x_s, s, t) from a network in the teacher's prediction type (see the module docstring).

    net: (params, x, t_source, t_target, cond) -> prediction. schedule, prediction_type: the teacher's.
    Frozen and hashable (by the identity of `net`): close over it, pass params as jit arguments.
    """

    net: Callable
    schedule: ScheduleConfig
    prediction_type: str

    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        if not isinstance(self.schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig, got {type(self.schedule).__name__}")

    @classmethod
    def from_teacher(cls, net, teacher) -> "FlowMap":
        """A flow map with the teacher's schedule and prediction type."""
        return cls(net=net, schedule=teacher.schedule, prediction_type=teacher.prediction_type)

    def _times(self, x_s, t_source, t_target):
        if jnp.ndim(x_s) < 1:
            raise ValueError(f"x_s must have a batch axis, got shape {jnp.shape(x_s)}")
        schedules.check_times(self.schedule, t_source, "t_source")
        schedules.check_times(self.schedule, t_target, "t_target")
        batch = x_s.shape[0]
        return batch_times(t_source, batch, "t_source"), batch_times(t_target, batch, "t_target")

    def prediction(self, params, x_s, t_source, t_target, cond=None):
        """The network's raw prediction F(x_s, s, t), shape of x_s."""
        s, t = self._times(x_s, t_source, t_target)
        out = self.net(params, x_s, s, t, cond)
        if out.shape != x_s.shape:
            raise ValueError(f"the network returned shape {out.shape} for x_s of shape {x_s.shape}")
        return out

    def coefficients(self, t_source, t_target):
        """(c_x, c_pred), each of the broadcast shape of the times: X = c_x x_s + c_pred F."""
        a_s, s_s = schedules.alpha_sigma(self.schedule, t_source)
        a_t, s_t = schedules.alpha_sigma(self.schedule, t_target)
        return pred_lib.jump_coefficients(a_s, s_s, a_t, s_t, self.prediction_type)

    def __call__(self, params, x_s, t_source, t_target, cond=None):
        """X(x_s, s, t): x_s (B, ...); t_source, t_target scalars or (B,) in teacher units. Shape of x_s."""
        s, t = self._times(x_s, t_source, t_target)
        prediction = self.net(params, x_s, s, t, cond)
        if prediction.shape != x_s.shape:
            raise ValueError(f"the network returned shape {prediction.shape} for x_s of shape {x_s.shape}")
        c_x, c_pred = self.coefficients(s, t)
        return expand_time(c_x, x_s) * x_s + expand_time(c_pred, x_s) * prediction

    def x0_eps(self, params, x_s, t_source, t_target, cond=None):
        """(x0_hat, eps_hat) the network implies at (x_s, s) told t."""
        s, _ = self._times(x_s, t_source, t_target)
        alpha, sigma = schedules.alpha_sigma(self.schedule, s)
        return pred_lib.to_x0_eps(self.prediction(params, x_s, t_source, t_target, cond), x_s, alpha, sigma,
                                  self.prediction_type)


def unet_network(unet):
    """net(params, x, t_source, t_target, cond) for a `flowmap_jax.unet.FlaxUNet2DConditionModel` with the
    target-time hook: `unet.apply({'params': params}, x, t_source, class_labels=t_target, **cond)`.
    x (B, H, W, C); params the UNet's parameter dict (without the {'params': ...} wrapper)."""
    if getattr(unet.config, "class_embed_type", None) != "timestep":
        raise ValueError("unet_network needs a UNet with class_embed_type='timestep' (the target-time hook); got "
                         f"class_embed_type={getattr(unet.config, 'class_embed_type', None)!r}: see add_target_time_hook")

    def net(params, x, t_source, t_target, cond):
        return unet.apply({"params": params}, x, t_source, class_labels=t_target, **dict(cond or {}))

    return net


def add_target_time_hook(unet_config: dict, params: dict, rng) -> tuple[dict, dict]:
    """(config, params) of a flow-map UNet from a teacher's diffusers config dict and Flax parameters.

    Adds `class_embed_type="timestep"` (`spec.target_time_hook.add_target_time_hook_config`) and the parameters of
    `class_embedding`: linear_1 initialised as torch's nn.Linear default (uniform(+-1/sqrt(fan_in)), weight
    and bias), linear_2 zero (kernel and bias), so the new UNet reproduces the teacher exactly and only the
    last layer is zero (gradients reach linear_2 from the first step). Shapes follow the teacher's
    `time_embedding` (same TimestepEmbedding in diffusers). `rng`: a jax PRNG key. params are not mutated.
    """
    config = add_target_time_hook_config(unet_config)
    time_embedding = params["time_embedding"]
    in_dim, embed_dim = np.shape(time_embedding["linear_1"]["kernel"])
    out_dim = np.shape(time_embedding["linear_2"]["kernel"])[1]
    k_w, k_b = jax.random.split(rng)
    bound = 1.0 / math.sqrt(in_dim)
    hook = {
        "linear_1": {"kernel": jax.random.uniform(k_w, (in_dim, embed_dim), jnp.float32, -bound, bound),
                     "bias": jax.random.uniform(k_b, (embed_dim,), jnp.float32, -bound, bound)},
        "linear_2": {"kernel": jnp.zeros((embed_dim, out_dim), jnp.float32),
                     "bias": jnp.zeros((out_dim,), jnp.float32)},
    }
    return config, dict(params, class_embedding=hook)


def guidance_scale_embedding(w, embedding_dim: int):
    """LCM's guidance-scale embedding (diffusers `get_guidance_scale_embedding`): (B,) -> (B, embedding_dim)
    float32, [sin, cos] of 1000 w times geometric frequencies. Diffusers' LCM pipeline embeds w - 1 (the
    objectives do the same); this function embeds what it is given."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 1:
        raise ValueError(f"guidance_scale_embedding expects (B,) scales, got shape {w.shape}")
    w = w * 1000.0
    half = embedding_dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
