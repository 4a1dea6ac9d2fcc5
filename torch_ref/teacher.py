"""The teacher in PyTorch, mirroring `flowmap_jax.core.teacher` (same methods, same guidance, same time rule).

A teacher wraps any callable `model(x, t, cond) -> prediction` (x (B, ...), PyTorch images (B, C, H, W);
t (B,) float32 in teacher units; cond a dict of keyword arguments or None): a diffusers UNet through
`unet_teacher_fn`, or an analytic function (`gaussian_teacher_fn`). Classifier-free guidance
(uncond) or autoguidance (weak_model) is folded into its prediction, (x0_hat, eps_hat) and velocity.
The network is evaluated at max(t, schedule.t_eval_min) (DDPM: the prediction at t = 0 on [-1, 0)).
The teacher is never differentiated by the objectives; wrap calls in torch.no_grad() as you see fit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from flowmap_jax.spec.prediction_types import check_prediction_type
from flowmap_jax.spec.schedule import ScheduleConfig
from torch_ref import predictions as pred_lib
from torch_ref import schedules
from torch_ref.schedules import batch_times, expand_time

__all__ = ["Teacher", "unet_teacher_fn", "gaussian_teacher_fn", "gaussian_exact_flow", "gaussian_mixture_teacher_fn",
           "tree_map"]


def tree_map(fn, tree, *rest):
    """Maps fn over the tensors of nested dicts/lists/tuples (a minimal pytree map for cond dicts)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *[r[k] for r in rest]) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v, *[r[i] for r in rest]) for i, v in enumerate(tree))
    if tree is None:
        return None
    return fn(tree, *rest)


def _leaves(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{path}[{i}]")
    elif tree is not None:
        yield path, tree


def _check_cond_batch(cond, batch: int, name: str = "cond"):
    for path, leaf in _leaves(cond):
        shape = tuple(leaf.shape)
        if len(shape) == 0 or shape[0] not in (1, batch):
            raise ValueError(f"{name}{path} has shape {shape}: its first axis must be the batch ({batch}) or 1")


# Copied from flowmap_jax.core.teacher.fill_uncond
def fill_uncond(cond, uncond):
    """`uncond` with every key it lacks taken from `cond` (nested dicts): the unconditional branch keeps the
    example's own value there, as diffusers' SDXL pipeline gives both branches the same time_ids. Keys of
    uncond that cond lacks are a ValueError."""
    if not isinstance(cond, dict) or not isinstance(uncond, dict):
        return uncond
    extra = sorted(set(uncond) - set(cond))
    if extra:
        raise ValueError(f"uncond has {extra}, which cond lacks")
    return {k: fill_uncond(v, uncond[k]) if k in uncond else v for k, v in cond.items()}


def _broadcast_batch(tree, batch: int):
    return tree_map(lambda v: v.expand((batch,) + tuple(v.shape[1:])), tree)


@dataclasses.dataclass
class Teacher:
    """A diffusion teacher. Build with `Teacher.create(...)` (mirrors `flowmap_jax.core.teacher.Teacher`).

    model: (x, t, cond) -> prediction. schedule, prediction_type: the teacher's. guidance_scale: number or
    (B,) tensor. uncond: cond of the unconditional branch (classifier-free guidance) or None. weak_model:
    the weaker teacher for autoguidance, or None.
    """

    model: Callable = None
    schedule: ScheduleConfig = None
    prediction_type: str = "epsilon"
    guidance_scale: Any = 1.0
    uncond: Any = None
    weak_model: Callable | None = None
    guidance: str = "none"

    @classmethod
    def create(cls, model, schedule: ScheduleConfig, prediction_type: str, guidance_scale=1.0, uncond=None,
               weak_model=None) -> "Teacher":
        """A teacher; `uncond` turns on classifier-free guidance, `weak_model` autoguidance (not both)."""
        check_prediction_type(prediction_type)
        if not isinstance(schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig, got {type(schedule).__name__}")
        if uncond is not None and weak_model is not None:
            raise ValueError("choose classifier-free guidance (uncond) or autoguidance (weak_model), not both")
        guidance = "cfg" if uncond is not None else "autoguidance" if weak_model is not None else "none"
        return cls(model=model, schedule=schedule, prediction_type=prediction_type, guidance_scale=guidance_scale,
                   uncond=uncond, weak_model=weak_model, guidance=guidance)

    def model_time(self, t):
        """The time the network is evaluated at: max(t, t_eval_min)."""
        return torch.clamp(t, min=self.schedule.t_eval_min)

    def raw_prediction(self, x, t, cond=None):
        """The (strong, conditional) network's prediction at (x, t), unguided."""
        return self.model(x, self.model_time(batch_times(t, x.shape[0], "t", x)), cond)

    def prediction(self, x, t, cond=None, guidance_scale=None):
        """The guided prediction at (x, t) in the teacher's prediction type."""
        batch = x.shape[0]
        schedules.check_times(self.schedule, t, "t")
        t = self.model_time(batch_times(t, batch, "t", x))
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if cond is not None:
            _check_cond_batch(cond, batch)
            cond = _broadcast_batch(cond, batch)
        if self.guidance == "cfg":
            if cond is None:
                raise ValueError("classifier-free guidance needs a cond (the conditional branch); got cond=None")
            _check_cond_batch(self.uncond, batch, "uncond")
            uncond = _broadcast_batch(fill_uncond(cond, self.uncond), batch)
            both_cond = tree_map(lambda c, u: torch.cat([c, u], 0), cond, uncond)
            both = self.model(torch.cat([x, x], 0), torch.cat([t, t], 0), both_cond)
            p_cond, p_base = both[:batch], both[batch:]
        elif self.guidance == "autoguidance":
            p_cond = self.model(x, t, cond)
            p_base = self.weak_model(x, t, cond)
        else:
            return self.model(x, t, cond)
        w = expand_time(torch.as_tensor(w, dtype=torch.float32, device=x.device), x)
        return p_base + w * (p_cond - p_base)

    def x0_eps(self, x, t, cond=None, guidance_scale=None):
        """Guided (x0_hat, eps_hat) at (x, t)."""
        alpha, sigma = schedules.alpha_sigma(self.schedule, batch_times(t, x.shape[0], "t", x))
        return pred_lib.to_x0_eps(self.prediction(x, t, cond, guidance_scale), x, alpha, sigma, self.prediction_type)

    def velocity(self, x, t, cond=None, guidance_scale=None):
        """Guided PF-ODE velocity dx/dt at (x, t), teacher time units. Shape of x."""
        t = batch_times(t, x.shape[0], "t", x)
        x0_hat, eps_hat = self.x0_eps(x, t, cond, guidance_scale)
        d_alpha, d_sigma = schedules.alpha_sigma_derivatives(self.schedule, t)
        return pred_lib.velocity(x0_hat, eps_hat, d_alpha, d_sigma)

    def ddim_step(self, x, t_source, t_target, cond=None, guidance_scale=None):
        """The teacher's DDIM (first-order) jump from t_source to t_target (either direction)."""
        batch = x.shape[0]
        s, t = batch_times(t_source, batch, "t_source", x), batch_times(t_target, batch, "t_target", x)
        schedules.check_times(self.schedule, t_target, "t_target")
        a_s, s_s = schedules.alpha_sigma(self.schedule, s)
        a_t, s_t = schedules.alpha_sigma(self.schedule, t)
        return pred_lib.ddim_step(self.prediction(x, s, cond, guidance_scale), x, a_s, s_s, a_t, s_t,
                                  self.prediction_type)


def unet_teacher_fn(unet):
    """model(x, t, cond) -> prediction for a diffusers `UNet2DConditionModel`: `unet(x, t, **cond).sample`,
    x (B, C, H, W). A UNet with the flow map's target-time hook (class_embed_type="timestep") is told
    class_labels = t (zero-initialised, it is then exactly the teacher)."""
    has_hook = getattr(unet.config, "class_embed_type", None) == "timestep"

    def model(x, t, cond):
        kwargs = dict(cond or {})
        if has_hook:
            kwargs["class_labels"] = t
        return unet(x, t, **kwargs).sample

    return model


def gaussian_teacher_fn(mean, var, schedule: ScheduleConfig, prediction_type: str):
    """model(x, t, cond) for the exact denoiser of Gaussian data N(mean, var) (elementwise; mean and var
    tensors broadcastable to one example). Mirrors `flowmap_jax.core.teacher.gaussian_teacher_fn`, whose
    parameters are a pytree instead."""
    check_prediction_type(prediction_type)

    def model(x, t, cond):
        del cond
        alpha, sigma = schedules.alpha_sigma(schedule, t)
        alpha, sigma = expand_time(alpha, x), expand_time(sigma, x)
        total = alpha * alpha * var + sigma * sigma
        resid = (x - alpha * mean) / total
        return pred_lib.from_x0_eps(mean + alpha * var * resid, sigma * resid, alpha, sigma, prediction_type)

    return model


def gaussian_exact_flow(schedule: ScheduleConfig, mean, var, x_s, t_source, t_target):
    """The exact PF-ODE flow map of Gaussian data N(mean, var) (see `flowmap_jax.core.teacher`)."""
    a_s, s_s = schedules.alpha_sigma(schedule, t_source)
    a_t, s_t = schedules.alpha_sigma(schedule, t_target)
    a_s, s_s, a_t, s_t = (expand_time(v, x_s) for v in (a_s, s_s, a_t, s_t))
    std_s = torch.sqrt(a_s * a_s * var + s_s * s_s)
    std_t = torch.sqrt(a_t * a_t * var + s_t * s_t)
    return a_t * mean + std_t * (x_s - a_s * mean) / std_s


def gaussian_mixture_teacher_fn(weights, means, variances, schedule: ScheduleConfig, prediction_type: str):
    """model(x, t, cond) for the exact denoiser of elementwise 1-D Gaussian-mixture data (weights, means,
    variances: (K,) tensors). Mirrors `flowmap_jax.core.teacher.gaussian_mixture_teacher_fn`, whose parameters
    are a pytree instead."""
    check_prediction_type(prediction_type)
    weights, means, variances = (torch.as_tensor(v, dtype=torch.float32) for v in (weights, means, variances))

    def model(x, t, cond):
        del cond
        alpha, sigma = schedules.alpha_sigma(schedule, t)
        alpha, sigma = expand_time(alpha, x)[..., None], expand_time(sigma, x)[..., None]
        xk = x[..., None]
        total = alpha * alpha * variances + sigma * sigma
        resid = (xk - alpha * means) / total
        logits = torch.log(weights) - 0.5 * torch.log(total) - 0.5 * resid * (xk - alpha * means)
        resp = torch.softmax(logits, dim=-1)
        x0_hat = torch.sum(resp * (means + alpha * variances * resid), dim=-1)
        eps_hat = torch.sum(resp * sigma * resid, dim=-1)
        return pred_lib.from_x0_eps(x0_hat, eps_hat, alpha[..., 0], sigma[..., 0], prediction_type)

    return model
