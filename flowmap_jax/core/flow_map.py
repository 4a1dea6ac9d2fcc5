"""The flow map X(x_s, s, t) in JAX (mirrored by `torch_ref.flow_map`).

Parameterisation: the student's own, separate from the teacher's prediction type, with jump coefficients
bounded for every (s, t) (`spec.parameterization.PARAMETERIZATIONS`; the name is recorded in `flowmap.json`):

- "angle" (VP schedules: DDPM betas, VP cosine; TrigFlow of sCM). In the angle theta_t = arctan(sigma_t /
  alpha_t) (alpha = cos theta, sigma = sin theta),

      X(x_s, s, t) = cos(theta_s - theta_t) x_s - sin(theta_s - theta_t) F(x_s, s, t),

  F a v-like output: with F = v = alpha eps - sigma x0 (diffusers' v_prediction, which is dx/dtheta on a VP
  schedule) this is exactly the DDIM step from s to t. |c_x|, |c_F| <= 1 for every (s, t), so an error in
  F moves X by at most as much, at the noise end (alpha = 0) included.
- "linear" (rectified flow, x_t = (1 - tau) x0 + tau eps with tau = t / T):
  X(x_s, s, t) = x_s + (tau_t - tau_s) F, F a flow-velocity output u = eps - x0 (= dx/dtau; the "flow"
  prediction type of SD3/FLUX). |c_F| <= 1.
- "teacher_step" (export format 1, kept to load old exports): X = c_x x_s + c_pred F with F in the
  teacher's prediction type and (c_x, c_pred) the teacher's DDIM step (`predictions.jump_coefficients`).
  For an epsilon teacher jumping from DDPM t = 999 to clean data, c_x = 1 / alpha_s ~ 157 (linear betas)
  and ~14.6 (SD's scaled_linear): the network's error is multiplied by that on a one-jump sample, which is
  why it is no longer the default.

In each, s == t gives c_x == 1 and c_F == 0 exactly in floating point, so X(x, s, s) = x bit for bit, and
jumps go both ways: s > t towards data (sampling), t > s towards noise (inversion).

Head mismatch. The student starts from the teacher's weights (plus the zero-initialised target-time hook),
so at initialisation F is the teacher's output in the teacher's type. Only a teacher of the map's own type
(v_prediction for "angle", flow for "linear") reproduces its DDIM step exactly at start. For others
`teacher_blend` in [0, 1] mixes the coefficients: X = (1 - b) X_teacher_step + b X_own with b =
teacher_blend, so b = 1 reads the teacher's epsilon output as the teacher's DDIM step (the untrained map is
the teacher's DDIM sampler) and b = 0 is the bounded map; the trainer ramps b from 1 to 0 over the first
steps (`head_warmup_steps`, an option every objective has) while the network's head converts.

A *network* is `net(params, x, t_source, t_target, cond) -> F` with x (B, ...) (Flax images
(B, H, W, C)), t_source and t_target (B,) float32 in teacher units, cond a dict of keyword arguments of the
UNet (encoder_hidden_states, timestep_cond, added_cond_kwargs) or None. `unet_network(unet)` adapts
`flowmap_jax.unet.FlaxUNet2DConditionModel`: the target time goes in as `class_labels`
(class_embed_type="timestep"; `add_target_time_hook` builds that from a teacher). With the guidance scale w
distilled as an input, `add_guidance_input` adds `time_cond_proj_dim` and a zero `time_embedding.cond_proj`, and
cond carries timestep_cond = guidance_scale_embedding(w - 1, dim).

`FlowMap` alone knows this algebra: the objectives and samplers ask it for X (`__call__`), its
directional derivative (`jvp`), its velocity at t = s (`velocity`) and its coefficients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flowmap_jax.core import predictions as pred_lib
from flowmap_jax.core import schedules
from flowmap_jax.core.schedules import batch_times, expand_time
from flowmap_jax.spec.parameterization import ANCHOR_ALPHA, resolve_parameterization
from flowmap_jax.spec.prediction_types import check_prediction_type
from flowmap_jax.spec.schedule import ScheduleConfig
from flowmap_jax.spec.target_time_hook import (
    add_guidance_input_config,
    add_target_time_hook_config,
)

__all__ = ["FlowMap", "unet_network", "add_target_time_hook", "add_guidance_input", "guidance_scale_embedding",
           "guidance_input_cond", "batch_times",
           "finite_difference_jvp"]


def finite_difference_jvp(fn, primals, tangents, eps: float):
    """(fn(*primals), central difference (fn(p + eps t) - fn(p - eps t)) / (2 eps)): second-order accurate
    stand-in for `jax.jvp` (three evaluations of fn)."""
    plus = fn(*[p + eps * d for p, d in zip(primals, tangents, strict=True)])
    minus = fn(*[p - eps * d for p, d in zip(primals, tangents, strict=True)])
    return fn(*primals), (plus - minus) / (2.0 * eps)


@dataclasses.dataclass(frozen=True)
class FlowMap:
    """X(x_s, s, t) (see the module docstring).

    net: (params, x, t_source, t_target, cond) -> F. schedule, prediction_type: the teacher's.
    parameterization: one of `spec.parameterization.PARAMETERIZATIONS` or "auto" (the schedule's bounded form:
        "angle" for VP schedules, "linear" for rectified flow), resolved in __post_init__.
    teacher_blend: weight of the teacher's DDIM step in the coefficients (0: the map's own form; a float or
        a traced scalar inside a loss).
    Frozen and hashable (by the identity of `net`): close over it, pass params as jit arguments.
    """

    net: Callable
    schedule: ScheduleConfig
    prediction_type: str
    parameterization: str = "auto"
    teacher_blend: Any = 0.0

    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        if not isinstance(self.schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig, got {type(self.schedule).__name__}")
        object.__setattr__(self, "parameterization", resolve_parameterization(self.schedule, self.parameterization))

    def __hash__(self):
        return hash((id(self.net), self.schedule, self.prediction_type, self.parameterization,
                     float(self.teacher_blend) if isinstance(self.teacher_blend, (int, float)) else id(self.teacher_blend)))

    @classmethod
    def from_teacher(cls, net, teacher, parameterization: str = "auto") -> "FlowMap":
        """A flow map with the teacher's schedule and prediction type."""
        return cls(net=net, schedule=teacher.schedule, prediction_type=teacher.prediction_type,
                   parameterization=parameterization)

    def with_teacher_blend(self, blend) -> "FlowMap":
        """The same map with coefficients (1 - blend) own + blend teacher's DDIM step (blend may be traced)."""
        return dataclasses.replace(self, teacher_blend=blend)

    @property
    def output_type(self) -> str:
        """The prediction type F is read in: "v_prediction" ("angle"), "flow" ("linear") or the teacher's
        ("teacher_step"). "anchored" reads F as the teacher's type at low noise and as v at high noise: it has
        no single type (ValueError)."""
        if self.parameterization == "anchored":
            raise ValueError("an 'anchored' flow map reads F in the teacher's prediction type at low noise and as v "
                             "at high noise (spec.parameterization.ANCHOR_ALPHA): it has no single output type")
        return {"angle": "v_prediction", "linear": "flow"}.get(self.parameterization, self.prediction_type)

    def _times(self, x_s, t_source, t_target):
        if jnp.ndim(x_s) < 1:
            raise ValueError(f"x_s must have a batch axis, got shape {jnp.shape(x_s)}")
        schedules.check_times(self.schedule, t_source, "t_source")
        schedules.check_times(self.schedule, t_target, "t_target")
        batch = x_s.shape[0]
        return batch_times(t_source, batch, "t_source"), batch_times(t_target, batch, "t_target")

    def _net(self, params, x, s, t, cond):
        out = self.net(params, x, s, t, cond)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {out.shape} for x_s of shape {x.shape}")
        return out

    def prediction(self, params, x_s, t_source, t_target, cond=None):
        """The network's raw output F(x_s, s, t), shape of x_s (in `output_type`)."""
        s, t = self._times(x_s, t_source, t_target)
        return self._net(params, x_s, s, t, cond)

    def own_coefficients(self, t_source, t_target):
        """(c_x, c_F) of the map's own parameterisation (no teacher blend), broadcast shape of the times."""
        if self.parameterization == "angle":
            return self.angle_coefficients(t_source, t_target)
        if self.parameterization == "linear":
            d_tau = (jnp.asarray(t_target, jnp.float32) - jnp.asarray(t_source, jnp.float32)) / self.schedule.time_unit
            return jnp.ones_like(d_tau), d_tau
        if self.parameterization == "anchored":
            return mix_coefficients(self.angle_coefficients(t_source, t_target),
                                    self.teacher_step_coefficients(t_source, t_target),
                                    anchor_weight(self.schedule, t_source))
        return self.teacher_step_coefficients(t_source, t_target)

    def angle_coefficients(self, t_source, t_target):
        """(cos(theta_s - theta_t), -sin(theta_s - theta_t)): the "angle" form's (c_x, c_F)."""
        delta = schedules.angle(self.schedule, t_source) - schedules.angle(self.schedule, t_target)
        return jnp.cos(delta), -jnp.sin(delta)

    def teacher_step_coefficients(self, t_source, t_target):
        """(c_x, c_pred) of the teacher's DDIM step with F in the teacher's prediction type."""
        a_s, s_s = schedules.alpha_sigma(self.schedule, t_source)
        a_t, s_t = schedules.alpha_sigma(self.schedule, t_target)
        return pred_lib.jump_coefficients(a_s, s_s, a_t, s_t, self.prediction_type)

    def coefficients(self, t_source, t_target):
        """(c_x, c_F), each of the broadcast shape of the times: X = c_x x_s + c_F F."""
        c_x, c_f = self.own_coefficients(t_source, t_target)
        blend = self.teacher_blend
        if isinstance(blend, (int, float)) and blend == 0:
            return c_x, c_f
        return mix_coefficients((c_x, c_f), self.teacher_step_coefficients(t_source, t_target), blend)

    def _combine(self, x_s, s, t, out):
        c_x, c_f = self.coefficients(s, t)
        return expand_time(c_x, x_s) * x_s + expand_time(c_f, x_s) * out

    def __call__(self, params, x_s, t_source, t_target, cond=None):
        """X(x_s, s, t): x_s (B, ...); t_source, t_target scalars or (B,) in teacher units. Shape of x_s."""
        s, t = self._times(x_s, t_source, t_target)
        return self._combine(x_s, s, t, self._net(params, x_s, s, t, cond))

    def jvp(self, params, x_s, t_source, t_target, cond=None, tangents=(None, None, None), *,
            network_tangent_scale=None, method: str = "exact", fd_eps: float = 5e-3):
        """(X(x_s, s, t), its directional derivative) along tangents (dx, ds, dt) (None: zero); dx of x_s's
        shape, ds and dt scalars or (B,) in teacher units per unit of the caller's variable.

        d X = dc_x x_s + c_x dx + dc_F F + k c_F dF, with (dc_x, dc_F) exact (jax.jvp of the coefficients
        along the times whose tangent is given),
        dF the network's JVP (method "exact": jax.jvp; "finite_difference": central difference with step
        fd_eps along the tangent) and k = network_tangent_scale ((B,) or None = 1; the tangent warm-up).
        Returns (X, dX, F): F, the network's output, for callers that need it.
        """
        s, t = self._times(x_s, t_source, t_target)
        b = x_s.shape[0]
        given = [i for i, d in enumerate(tangents) if d is not None]
        primals = (x_s, s, t)
        tans = {0: tangents[0], 1: None if tangents[1] is None else batch_times(tangents[1], b, "ds"),
                2: None if tangents[2] is None else batch_times(tangents[2], b, "dt")}
        ds, dt = tans[1], tans[2]

        def net_fn(*moving):  # the network as a function of the arguments that move only (a zero tangent
            args = list(primals)  # through an infinite local derivative would give NaN)
            for i, value in zip(given, moving, strict=True):
                args[i] = value
            return self._net(params, args[0], args[1], args[2], cond)

        moving_primals = tuple(primals[i] for i in given)
        moving_tangents = tuple(tans[i] for i in given)
        if not given:
            out = net_fn()
            d_out = jnp.zeros_like(out)
        elif method == "finite_difference":
            out, d_out = finite_difference_jvp(net_fn, moving_primals, moving_tangents, fd_eps)
        elif method == "exact":
            out, d_out = jax.jvp(net_fn, moving_primals, moving_tangents)
        else:
            raise ValueError(f"unknown jvp method {method!r}: expected 'exact' or 'finite_difference'")
        dx = jnp.zeros_like(x_s) if tangents[0] is None else tangents[0]
        # Coefficients differentiated only along the times that move: at the clean end (sigma = 0) the
        # time derivative of the DDPM/cosine angle is infinite, and inf * 0 would be NaN.
        if tangents[1] is None and tangents[2] is None:
            c_x, c_f = self.coefficients(s, t)
            dc_x, dc_f = jnp.zeros_like(c_x), jnp.zeros_like(c_x)
        elif tangents[1] is None:
            (c_x, c_f), (dc_x, dc_f) = jax.jvp(lambda tt: self.coefficients(s, tt), (t,), (dt,))
        elif tangents[2] is None:
            (c_x, c_f), (dc_x, dc_f) = jax.jvp(lambda ss: self.coefficients(ss, t), (s,), (ds,))
        else:
            (c_x, c_f), (dc_x, dc_f) = jax.jvp(self.coefficients, (s, t), (ds, dt))
        k = jnp.ones((b,), jnp.float32) if network_tangent_scale is None else network_tangent_scale
        x_map = expand_time(c_x, x_s) * x_s + expand_time(c_f, x_s) * out
        d_map = (expand_time(dc_x, x_s) * x_s + expand_time(c_x, x_s) * dx + expand_time(dc_f, x_s) * out
                 + expand_time(k * c_f, x_s) * d_out)
        return x_map, d_map, out

    def velocity(self, params, x_s, t_source, cond=None):
        """d/dtheta_t X(x_s, s, t) at t = s: the map's PF-ODE velocity at (x_s, s) per unit of the angle
        theta (`schedules.angle`); F itself for "angle". Shape of x_s.

        One network pass: with X = c_x x_s + c_F F, d/dt X = dc_x/dt x_s + dc_F/dt F + c_F dF/dt, and c_F(s, s)
        = 0 in every parameterisation (teacher blend included), so the network's own t-derivative drops out."""
        s, _ = self._times(x_s, t_source, t_source)
        dt = 1.0 / schedules.dtheta_dt(self.schedule, s)
        _, (dc_x, dc_f) = jax.jvp(lambda tt: self.coefficients(s, tt), (s,), (dt,))
        out = self._net(params, x_s, s, s, cond)
        return expand_time(dc_x, x_s) * x_s + expand_time(dc_f, x_s) * out

    def x0_eps(self, params, x_s, t_source, t_target, cond=None):
        """(x0_hat, eps_hat) the network implies at (x_s, s) told t, reading F in `output_type` (without the
        teacher blend)."""
        s, _ = self._times(x_s, t_source, t_target)
        alpha, sigma = schedules.alpha_sigma(self.schedule, s)
        return pred_lib.to_x0_eps(self.prediction(params, x_s, t_source, t_target, cond), x_s, alpha, sigma,
                                  self.output_type)


def mix_coefficients(own, teacher_step, weight):
    """(1 - weight) own + weight teacher_step, for (c_x, c_F) pairs: the teacher blend of `FlowMap.coefficients`
    and the "anchored" form's blend (weight a float, (B,) or broadcastable)."""
    return tuple((1.0 - weight) * a + weight * b for a, b in zip(own, teacher_step, strict=True))


def anchor_weight(schedule, t_source):
    """The "anchored" map's weight on the teacher's DDIM step at the source time, clip((alpha_s - lo) / (hi - lo),
    0, 1) with (lo, hi) = `spec.parameterization.ANCHOR_ALPHA`; the broadcast shape of t_source."""
    lo, hi = ANCHOR_ALPHA
    alpha, _ = schedules.alpha_sigma(schedule, t_source)
    return jnp.clip((alpha - lo) / (hi - lo), 0.0, 1.0)


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


def add_guidance_input(unet_config: dict, params: dict, embedding_dim: int) -> tuple[dict, dict]:
    """(config, params) of a flow-map UNet that takes the guidance scale w as an input (guidance distilled as an
    input): `time_cond_proj_dim = embedding_dim` (`spec.target_time_hook.add_guidance_input_config`) and
    `time_embedding/cond_proj/kernel` (embedding_dim, time projection width) zero, so the UNet equals the one
    it was built from at every w until training moves it (gradients reach the kernel from the first step).
    The network is then fed timestep_cond = guidance_scale_embedding(w - 1, embedding_dim). params are not
    mutated."""
    config = add_guidance_input_config(unet_config, embedding_dim)
    time_embedding = params["time_embedding"]
    in_dim = np.shape(time_embedding["linear_1"]["kernel"])[0]
    cond_proj = {"kernel": jnp.zeros((int(embedding_dim), in_dim), jnp.float32)}
    return config, dict(params, time_embedding=dict(time_embedding, cond_proj=cond_proj))


def guidance_input_cond(cond, w, embedding_dim: int):
    """cond (a dict of UNet keyword arguments, or None) with the guidance input of a map that distilled
    guidance as an input: timestep_cond = guidance_scale_embedding(w - 1, embedding_dim), w (B,) the scales
    (LCM's w - 1 convention; `flowmap.json`'s "guidance" records it). A new dict; cond is not mutated."""
    return dict(cond or {}, timestep_cond=guidance_scale_embedding(w - 1.0, embedding_dim))


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
