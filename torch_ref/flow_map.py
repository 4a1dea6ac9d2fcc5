"""The flow map X(x_s, s, t) in PyTorch, mirroring `flowmap_jax.flow_map` (see its docstring for the
parameterisation: X = alpha_t x0_hat + sigma_t eps_hat from the network's prediction at (x_s, s) told t,
so X(x, s, s) = x exactly).

A *network* is an `nn.Module` (or callable) `net(x, t_source, t_target, cond) -> prediction`, x (B, ...)
(PyTorch images (B, C, H, W)), times (B,) float32 in teacher units, cond a dict of UNet keyword arguments
or None. `FlowMap.__call__(params, x_s, t_source, t_target, cond)` takes `params` like the JAX side: None
(the module's own parameters) or a dict name -> tensor used through `torch.func.functional_call` (what the
objectives differentiate). `unet_network(unet)` adapts diffusers' `UNet2DConditionModel` (target time ->
`class_labels`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from flowmap_jax.spec.prediction_types import check_prediction_type
from flowmap_jax.spec.schedule import ScheduleConfig
from flowmap_jax.spec.target_time_hook import add_target_time_hook_config
from torch_ref import predictions as pred_lib
from torch_ref import schedules
from torch_ref.schedules import batch_times, expand_time

__all__ = ["FlowMap", "UNetNetwork", "unet_network", "add_target_time_hook", "guidance_scale_embedding",
           "batch_times", "call_network"]


def call_network(net, params, x, t_source, t_target, cond):
    """net(x, s, t, cond) with `params` (None: the module's own; dict: torch.func.functional_call)."""
    if params is None:
        return net(x, t_source, t_target, cond)
    return torch.func.functional_call(net, params, (x, t_source, t_target, cond))


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMap:
    """X(x_s, s, t) from a network in the teacher's prediction type. net: nn.Module
    (x, t_source, t_target, cond) -> prediction; schedule and prediction_type: the teacher's."""

    net: nn.Module
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
        if x_s.ndim < 1:
            raise ValueError(f"x_s must have a batch axis, got shape {tuple(x_s.shape)}")
        schedules.check_times(self.schedule, t_source, "t_source")
        schedules.check_times(self.schedule, t_target, "t_target")
        batch = x_s.shape[0]
        return batch_times(t_source, batch, "t_source", x_s), batch_times(t_target, batch, "t_target", x_s)

    def prediction(self, params, x_s, t_source, t_target, cond=None):
        """The network's raw prediction F(x_s, s, t), shape of x_s."""
        s, t = self._times(x_s, t_source, t_target)
        out = call_network(self.net, params, x_s, s, t, cond)
        if out.shape != x_s.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for x_s of shape {tuple(x_s.shape)}")
        return out

    def coefficients(self, t_source, t_target):
        """(c_x, c_pred): X = c_x x_s + c_pred F."""
        a_s, s_s = schedules.alpha_sigma(self.schedule, t_source)
        a_t, s_t = schedules.alpha_sigma(self.schedule, t_target)
        return pred_lib.jump_coefficients(a_s, s_s, a_t, s_t, self.prediction_type)

    def __call__(self, params, x_s, t_source, t_target, cond=None):
        """X(x_s, s, t): x_s (B, ...); t_source, t_target numbers or (B,) in teacher units. Shape of x_s."""
        s, t = self._times(x_s, t_source, t_target)
        prediction = call_network(self.net, params, x_s, s, t, cond)
        if prediction.shape != x_s.shape:
            raise ValueError(f"the network returned shape {tuple(prediction.shape)} for x_s of shape "
                             f"{tuple(x_s.shape)}")
        c_x, c_pred = self.coefficients(s, t)
        return expand_time(c_x, x_s) * x_s + expand_time(c_pred, x_s) * prediction

    def x0_eps(self, params, x_s, t_source, t_target, cond=None):
        """(x0_hat, eps_hat) the network implies at (x_s, s) told t."""
        s, _ = self._times(x_s, t_source, t_target)
        alpha, sigma = schedules.alpha_sigma(self.schedule, s)
        return pred_lib.to_x0_eps(self.prediction(params, x_s, t_source, t_target, cond), x_s, alpha, sigma,
                                  self.prediction_type)


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
    (mirrors `flowmap_jax.flow_map.add_target_time_hook`): `class_embed_type="timestep"` and
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


def guidance_scale_embedding(w, embedding_dim: int):
    """LCM's guidance-scale embedding (diffusers `get_guidance_scale_embedding`): (B,) -> (B, embedding_dim)
    float32 (see `flowmap_jax.flow_map.guidance_scale_embedding`)."""
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
