"""The flow map X(x_s, s, t) in PyTorch, mirroring `flowmap_jax.core.flow_map` (see its docstring for the
parameterisations "angle" (VP: X = cos(theta_s - theta_t) x - sin(theta_s - theta_t) F, F v-like), "linear"
(rectified flow: X = x + (tau_t - tau_s) F, F a flow velocity) and "teacher_step" (export format 1: the
teacher's DDIM step with F in the teacher's prediction type), the teacher blend of the head warm-up, and
X(x, s, s) = x exactly).

A *network* is an `nn.Module` (or callable) `net(x, t_source, t_target, cond) -> F`, x (B, ...)
(PyTorch images (B, C, H, W)), times (B,) float32 in teacher units, cond a dict of UNet keyword arguments
or None. `FlowMap.__call__(params, x_s, t_source, t_target, cond)` takes `params` like the JAX side: None
(the module's own parameters) or a dict name -> tensor used through `torch.func.functional_call` (what the
objectives differentiate). `unet_network(unet)` adapts diffusers' `UNet2DConditionModel` (target time ->
`class_labels`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from flowmap_jax.spec.parameterization import ANCHOR_ALPHA, resolve_parameterization
from flowmap_jax.spec.prediction_types import check_prediction_type
from flowmap_jax.spec.schedule import ScheduleConfig
from flowmap_jax.spec.target_time_hook import (
    add_guidance_input_config,
    add_target_time_hook_config,
)
from torch_ref import predictions as pred_lib
from torch_ref import schedules
from torch_ref.schedules import batch_times, expand_time

__all__ = ["FlowMap", "UNetNetwork", "unet_network", "add_target_time_hook", "add_guidance_input",
           "guidance_scale_embedding", "guidance_input_cond", "batch_times", "call_network", "finite_difference_jvp"]


# Copied from flowmap_jax.core.flow_map.mix_coefficients
def mix_coefficients(own, teacher_step, weight):
    """(1 - weight) own + weight teacher_step, for (c_x, c_F) pairs: the teacher blend of `FlowMap.coefficients`
    and the "anchored" form's blend (weight a float, (B,) or broadcastable)."""
    return tuple((1.0 - weight) * a + weight * b for a, b in zip(own, teacher_step, strict=True))


# Copied from flowmap_jax.core.flow_map.anchor_weight with jnp.clip->torch.clamp
def anchor_weight(schedule, t_source):
    """The "anchored" map's weight on the teacher's DDIM step at the source time, clip((alpha_s - lo) / (hi - lo),
    0, 1) with (lo, hi) = `spec.parameterization.ANCHOR_ALPHA`; the broadcast shape of t_source."""
    lo, hi = ANCHOR_ALPHA
    alpha, _ = schedules.alpha_sigma(schedule, t_source)
    return torch.clamp((alpha - lo) / (hi - lo), 0.0, 1.0)


def call_network(net, params, x, t_source, t_target, cond):
    """net(x, s, t, cond) with `params` (None: the module's own; dict: torch.func.functional_call)."""
    if params is None:
        return net(x, t_source, t_target, cond)
    return torch.func.functional_call(net, params, (x, t_source, t_target, cond))


def finite_difference_jvp(fn, primals, tangents, eps: float):
    """(fn(*primals), (fn(p + eps t) - fn(p - eps t)) / (2 eps)): the central-difference stand-in for jvp."""
    plus = fn(*[p + eps * d for p, d in zip(primals, tangents, strict=True)])
    minus = fn(*[p - eps * d for p, d in zip(primals, tangents, strict=True)])
    return fn(*primals), (plus - minus) / (2.0 * eps)


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMap:
    """X(x_s, s, t) (see the module docstring). net: nn.Module (x, t_source, t_target, cond) -> F;
    schedule and prediction_type: the teacher's; parameterization: "auto" or one of
    `spec.parameterization.PARAMETERIZATIONS`; teacher_blend: weight of the teacher's DDIM step in the coefficients."""

    net: nn.Module
    schedule: ScheduleConfig
    prediction_type: str
    parameterization: str = "auto"
    teacher_blend: Any = 0.0

    # Copied from flowmap_jax.core.flow_map.FlowMap.__post_init__
    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        if not isinstance(self.schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig, got {type(self.schedule).__name__}")
        object.__setattr__(self, "parameterization", resolve_parameterization(self.schedule, self.parameterization))

    # Copied from flowmap_jax.core.flow_map.FlowMap.from_teacher
    @classmethod
    def from_teacher(cls, net, teacher, parameterization: str = "auto") -> "FlowMap":
        """A flow map with the teacher's schedule and prediction type."""
        return cls(net=net, schedule=teacher.schedule, prediction_type=teacher.prediction_type,
                   parameterization=parameterization)

    def with_teacher_blend(self, blend) -> "FlowMap":
        """The same map with coefficients (1 - blend) own + blend teacher's DDIM step."""
        return dataclasses.replace(self, teacher_blend=blend)

    @property
    def output_type(self) -> str:
        """The prediction type F is read in (see `flowmap_jax.core.flow_map.FlowMap.output_type`)."""
        if self.parameterization == "anchored":
            raise ValueError("an 'anchored' flow map reads F in the teacher's prediction type at low noise and as v "
                             "at high noise (spec.parameterization.ANCHOR_ALPHA): it has no single output type")
        return {"angle": "v_prediction", "linear": "flow"}.get(self.parameterization, self.prediction_type)

    def _times(self, x_s, t_source, t_target):
        if x_s.ndim < 1:
            raise ValueError(f"x_s must have a batch axis, got shape {tuple(x_s.shape)}")
        schedules.check_times(self.schedule, t_source, "t_source")
        schedules.check_times(self.schedule, t_target, "t_target")
        batch = x_s.shape[0]
        return batch_times(t_source, batch, "t_source", x_s), batch_times(t_target, batch, "t_target", x_s)

    def _net(self, params, x, s, t, cond):
        out = call_network(self.net, params, x, s, t, cond)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for x_s of shape {tuple(x.shape)}")
        return out

    # Copied from flowmap_jax.core.flow_map.FlowMap.prediction
    def prediction(self, params, x_s, t_source, t_target, cond=None):
        """The network's raw output F(x_s, s, t), shape of x_s (in `output_type`)."""
        s, t = self._times(x_s, t_source, t_target)
        return self._net(params, x_s, s, t, cond)

    def own_coefficients(self, t_source, t_target):
        """(c_x, c_F) of the map's own parameterisation (no teacher blend)."""
        if self.parameterization == "angle":
            return self.angle_coefficients(t_source, t_target)
        if self.parameterization == "linear":
            d_tau = (torch.as_tensor(t_target, dtype=torch.float32) - torch.as_tensor(t_source, dtype=torch.float32)
                     ) / self.schedule.time_unit
            return torch.ones_like(d_tau), d_tau
        if self.parameterization == "anchored":
            return mix_coefficients(self.angle_coefficients(t_source, t_target),
                                    self.teacher_step_coefficients(t_source, t_target),
                                    anchor_weight(self.schedule, t_source))
        return self.teacher_step_coefficients(t_source, t_target)

    # Copied from flowmap_jax.core.flow_map.FlowMap.angle_coefficients with jnp->torch
    def angle_coefficients(self, t_source, t_target):
        """(cos(theta_s - theta_t), -sin(theta_s - theta_t)): the "angle" form's (c_x, c_F)."""
        delta = schedules.angle(self.schedule, t_source) - schedules.angle(self.schedule, t_target)
        return torch.cos(delta), -torch.sin(delta)

    # Copied from flowmap_jax.core.flow_map.FlowMap.teacher_step_coefficients
    def teacher_step_coefficients(self, t_source, t_target):
        """(c_x, c_pred) of the teacher's DDIM step with F in the teacher's prediction type."""
        a_s, s_s = schedules.alpha_sigma(self.schedule, t_source)
        a_t, s_t = schedules.alpha_sigma(self.schedule, t_target)
        return pred_lib.jump_coefficients(a_s, s_s, a_t, s_t, self.prediction_type)

    def coefficients(self, t_source, t_target):
        """(c_x, c_F): X = c_x x_s + c_F F."""
        c_x, c_f = self.own_coefficients(t_source, t_target)
        blend = self.teacher_blend
        if isinstance(blend, (int, float)) and blend == 0:
            return c_x, c_f
        return mix_coefficients((c_x, c_f), self.teacher_step_coefficients(t_source, t_target), blend)

    def __call__(self, params, x_s, t_source, t_target, cond=None):
        """X(x_s, s, t): x_s (B, ...); t_source, t_target numbers or (B,) in teacher units. Shape of x_s."""
        s, t = self._times(x_s, t_source, t_target)
        out = self._net(params, x_s, s, t, cond)
        c_x, c_f = self.coefficients(s, t)
        return expand_time(c_x, x_s) * x_s + expand_time(c_f, x_s) * out

    def jvp(self, params, x_s, t_source, t_target, cond=None, tangents=(None, None, None), *,
            network_tangent_scale=None, method: str = "exact", fd_eps: float = 5e-3):
        """(X, dX, F) along tangents (dx, ds, dt) (None: zero); see `flowmap_jax.core.flow_map.FlowMap.jvp`.
        Forward mode is `torch.func.jvp`."""
        s, t = self._times(x_s, t_source, t_target)
        b = x_s.shape[0]
        given = [i for i, d in enumerate(tangents) if d is not None]
        primals = (x_s, s, t)
        tans = {0: tangents[0], 1: None if tangents[1] is None else batch_times(tangents[1], b, "ds", x_s),
                2: None if tangents[2] is None else batch_times(tangents[2], b, "dt", x_s)}
        ds, dt = tans[1], tans[2]

        def net_fn(*moving):  # only the moving arguments (a zero tangent through an infinite derivative is NaN)
            args = list(primals)
            for i, value in zip(given, moving, strict=True):
                args[i] = value
            return self._net(params, args[0], args[1], args[2], cond)

        moving_primals = tuple(primals[i] for i in given)
        moving_tangents = tuple(tans[i] for i in given)
        if not given:
            out = net_fn()
            d_out = torch.zeros_like(out)
        elif method == "finite_difference":
            out, d_out = finite_difference_jvp(net_fn, moving_primals, moving_tangents, fd_eps)
        elif method == "exact":
            out, d_out = torch.func.jvp(net_fn, moving_primals, moving_tangents)
        else:
            raise ValueError(f"unknown jvp method {method!r}: expected 'exact' or 'finite_difference'")
        dx = torch.zeros_like(x_s) if tangents[0] is None else tangents[0]
        # Coefficients differentiated only along the times that move: at the clean end (sigma = 0) the
        # time derivative of the DDPM/cosine angle is infinite, and inf * 0 would be NaN.
        if tangents[1] is None and tangents[2] is None:
            c_x, c_f = self.coefficients(s, t)
            dc_x, dc_f = torch.zeros_like(c_x), torch.zeros_like(c_x)
        elif tangents[1] is None:
            (c_x, c_f), (dc_x, dc_f) = torch.func.jvp(lambda tt: self.coefficients(s, tt), (t,), (dt,))
        elif tangents[2] is None:
            (c_x, c_f), (dc_x, dc_f) = torch.func.jvp(lambda ss: self.coefficients(ss, t), (s,), (ds,))
        else:
            (c_x, c_f), (dc_x, dc_f) = torch.func.jvp(self.coefficients, (s, t), (ds, dt))
        k = torch.ones(b, device=x_s.device) if network_tangent_scale is None else network_tangent_scale
        x_map = expand_time(c_x, x_s) * x_s + expand_time(c_f, x_s) * out
        d_map = (expand_time(dc_x, x_s) * x_s + expand_time(c_x, x_s) * dx + expand_time(dc_f, x_s) * out
                 + expand_time(k * c_f, x_s) * d_out)
        return x_map, d_map, out

    def velocity(self, params, x_s, t_source, cond=None):
        """d/dtheta_t X(x_s, s, t) at t = s (per unit angle), with one network pass: c_F(s, s) = 0, so the
        network's own t-derivative drops out (see `flowmap_jax.core.flow_map.FlowMap.velocity`). Shape of x_s."""
        s, _ = self._times(x_s, t_source, t_source)
        dt = 1.0 / schedules.dtheta_dt(self.schedule, s)
        _, (dc_x, dc_f) = torch.func.jvp(lambda tt: self.coefficients(s, tt), (s,), (dt,))
        out = self._net(params, x_s, s, s, cond)
        return expand_time(dc_x, x_s) * x_s + expand_time(dc_f, x_s) * out

    def x0_eps(self, params, x_s, t_source, t_target, cond=None):
        """(x0_hat, eps_hat) the network implies at (x_s, s) told t, F read in `output_type`."""
        s, _ = self._times(x_s, t_source, t_target)
        alpha, sigma = schedules.alpha_sigma(self.schedule, s)
        return pred_lib.to_x0_eps(self.prediction(params, x_s, t_source, t_target, cond), x_s, alpha, sigma,
                                  self.output_type)


class UNetNetwork(nn.Module):
    """net(x, t_source, t_target, cond) around a diffusers `UNet2DConditionModel` with the target-time hook:
    `unet(x, t_source, class_labels=t_target, **cond).sample`. Parameters are `unet.*`."""

    def __init__(self, unet):
        super().__init__()
        if getattr(unet.config, "class_embed_type", None) != "timestep":
            raise ValueError("unet_network needs a UNet with class_embed_type='timestep' (the target-time hook); "
                             f"got class_embed_type={getattr(unet.config, 'class_embed_type', None)!r}: see "
                             "add_target_time_hook")
        self.unet = unet

    def forward(self, x, t_source, t_target, cond=None):
        return self.unet(x, t_source, class_labels=t_target, **dict(cond or {})).sample


def unet_network(unet) -> UNetNetwork:
    """The network of a flow map around a diffusers `UNet2DConditionModel` (see UNetNetwork)."""
    return UNetNetwork(unet)


def add_target_time_hook(unet_config: dict, params: dict, rng) -> tuple[dict, dict]:
    """(config, state_dict) of a flow-map UNet from a teacher's diffusers config dict and state dict
    (mirrors `flowmap_jax.core.flow_map.add_target_time_hook`): `class_embed_type="timestep"` and
    `class_embedding.linear_1` initialised as nn.Linear's default (uniform(+-1/sqrt(fan_in))),
    `class_embedding.linear_2` zero (weight and bias). rng: a torch.Generator or an int seed.
    Load with `UNet2DConditionModel.from_config(config)` then `load_state_dict(state_dict)`."""
    config = add_target_time_hook_config(unet_config)
    if isinstance(rng, int):
        rng = torch.Generator().manual_seed(rng)
    w1 = params["time_embedding.linear_1.weight"]
    w2 = params["time_embedding.linear_2.weight"]
    embed_dim, in_dim = w1.shape
    out_dim = w2.shape[0]
    bound = 1.0 / math.sqrt(in_dim)

    def uniform(*shape):
        return (torch.rand(shape, generator=rng) * 2 - 1).mul_(bound).to(w1.dtype)

    state = dict(params)
    state["class_embedding.linear_1.weight"] = uniform(embed_dim, in_dim)
    state["class_embedding.linear_1.bias"] = uniform(embed_dim)
    state["class_embedding.linear_2.weight"] = torch.zeros(out_dim, embed_dim, dtype=w2.dtype)
    state["class_embedding.linear_2.bias"] = torch.zeros(out_dim, dtype=w2.dtype)
    return config, state


def add_guidance_input(unet_config: dict, params: dict, embedding_dim: int) -> tuple[dict, dict]:
    """(config, state_dict) of a flow-map UNet that takes the guidance scale as an input (mirrors
    `flowmap_jax.core.flow_map.add_guidance_input`): `time_cond_proj_dim = embedding_dim` and
    `time_embedding.cond_proj.weight` (time projection width, embedding_dim) zero, so the UNet equals the one it
    was built from at every w. Load with `UNet2DConditionModel.from_config(config)` then `load_state_dict`."""
    config = add_guidance_input_config(unet_config, embedding_dim)
    w1 = params["time_embedding.linear_1.weight"]
    state = dict(params)
    state["time_embedding.cond_proj.weight"] = torch.zeros(w1.shape[1], int(embedding_dim), dtype=w1.dtype)
    return config, state


# Copied from flowmap_jax.core.flow_map.guidance_input_cond
def guidance_input_cond(cond, w, embedding_dim: int):
    """cond (a dict of UNet keyword arguments, or None) with the guidance input of a map that distilled
    guidance as an input: timestep_cond = guidance_scale_embedding(w - 1, embedding_dim), w (B,) the scales
    (LCM's w - 1 convention; `flowmap.json`'s "guidance" records it). A new dict; cond is not mutated."""
    return dict(cond or {}, timestep_cond=guidance_scale_embedding(w - 1.0, embedding_dim))


def guidance_scale_embedding(w, embedding_dim: int):
    """LCM's guidance-scale embedding (diffusers `get_guidance_scale_embedding`): (B,) -> (B, embedding_dim)
    float32 (see `flowmap_jax.core.flow_map.guidance_scale_embedding`)."""
    w = torch.as_tensor(w, dtype=torch.float32)
    if w.ndim != 1:
        raise ValueError(f"guidance_scale_embedding expects (B,) scales, got shape {tuple(w.shape)}")
    w = w * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
