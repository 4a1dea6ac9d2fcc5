"""The teacher: any callable (params, x, t, cond) -> prediction, with guidance folded into its velocity.

`Teacher` is a `flax.struct.PyTreeNode`: its parameters (and the guidance scale and unconditional
embedding) are pytree leaves, so a teacher passes through `jax.jit` as an *argument* and is never baked
into the compiled program as a constant (an SD teacher is 3.4 GB). The apply function, schedule and
prediction type are static.

Guidance (part of the teacher, so it is distilled):
- classifier-free guidance: pred = pred(x, t, uncond) + w * (pred(x, t, cond) - pred(x, t, uncond)),
- autoguidance (Karras et al. 2024): pred = pred_weak(x, t, cond) + w * (pred(x, t, cond) - pred_weak(x, t, cond))
  with a weaker teacher (fewer steps of training, smaller model).
Guidance on predictions equals guidance on (x0_hat, eps_hat) and on the PF-ODE velocity (all are affine in
the prediction at fixed x_t). w = 1 is the plain conditional teacher.

Time: teacher time units (see `flowmap_jax.spec.schedule`). The network is evaluated at
max(t, schedule.t_eval_min): for DDPM the segment [-1, 0) was never trained, and there the teacher uses its
prediction at t = 0, exactly as DDIM's last step does.

Shapes: x (B, ...) (Flax images (B, H, W, C)); t scalar or (B,); cond a dict of keyword arguments of the
network (e.g. {"encoder_hidden_states": (B, L, D)}) or None; `uncond` leaves have batch 1 or B, and a key
`uncond` lacks is taken from `cond` (`fill_uncond`: SDXL's time_ids).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from flowmap_jax.core import predictions as pred_lib
from flowmap_jax.core import schedules
from flowmap_jax.core.schedules import batch_times, expand_time
from flowmap_jax.spec.prediction_types import check_prediction_type
from flowmap_jax.spec.schedule import ScheduleConfig

__all__ = ["Teacher", "unet_teacher_fn", "gaussian_teacher_fn", "gaussian_exact_flow", "gaussian_mixture_teacher_fn"]


def _check_cond_batch(cond, batch: int, name: str = "cond"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(cond):
        shape = jnp.shape(leaf)
        if len(shape) == 0 or shape[0] not in (1, batch):
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} has shape {shape}: its first axis must be the "
                             f"batch ({batch}) or 1")


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
    return jax.tree.map(lambda v: jnp.broadcast_to(v, (batch,) + jnp.shape(v)[1:]), tree)


class Teacher(flax.struct.PyTreeNode):
    """A diffusion teacher. Build with `Teacher.create(...)`.

    params: pytree of the network's parameters (leaf). apply_fn: (params, x, t, cond) -> prediction, t (B,)
    float32 in teacher units (static). schedule, prediction_type: static. guidance_scale: scalar or (B,)
    (leaf). uncond: unconditional cond for classifier-free guidance (leaf) or None. weak_params /
    weak_apply_fn: the weaker teacher for autoguidance, or None.
    """

    params: Any = None
    guidance_scale: Any = 1.0
    uncond: Any = None
    weak_params: Any = None
    apply_fn: Callable = flax.struct.field(pytree_node=False, default=None)
    weak_apply_fn: Callable | None = flax.struct.field(pytree_node=False, default=None)
    schedule: ScheduleConfig = flax.struct.field(pytree_node=False, default=None)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    guidance: str = flax.struct.field(pytree_node=False, default="none")

    @classmethod
    def create(cls, apply_fn, params, schedule: ScheduleConfig, prediction_type: str, guidance_scale=1.0,
               uncond=None, weak_apply_fn=None, weak_params=None) -> "Teacher":
        """A teacher; `uncond` turns on classifier-free guidance, `weak_apply_fn`/`weak_params` autoguidance
        (weak_apply_fn defaults to apply_fn). Both at once is an error."""
        check_prediction_type(prediction_type)
        if not isinstance(schedule, ScheduleConfig):
            raise TypeError(f"schedule must be a ScheduleConfig, got {type(schedule).__name__}")
        if uncond is not None and weak_params is not None:
            raise ValueError("choose classifier-free guidance (uncond) or autoguidance (weak_params), not both")
        guidance = "cfg" if uncond is not None else "autoguidance" if weak_params is not None else "none"
        if guidance == "autoguidance" and weak_apply_fn is None:
            weak_apply_fn = apply_fn
        # A float32 array leaf: changing the scale never retraces (a Python float would be weakly typed).
        guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
        return cls(params=params, guidance_scale=guidance_scale, uncond=uncond, weak_params=weak_params,
                   apply_fn=apply_fn, weak_apply_fn=weak_apply_fn, schedule=schedule,
                   prediction_type=prediction_type, guidance=guidance)

    def model_time(self, t):
        """The time the network is evaluated at: max(t, t_eval_min)."""
        return jnp.maximum(t, self.schedule.t_eval_min)

    def raw_prediction(self, x, t, cond=None):
        """The (strong, conditional) network's prediction at (x, t), unguided. t: scalar or (B,)."""
        t = self.model_time(batch_times(t, x.shape[0], "t"))
        return self.apply_fn(self.params, x, t, cond)

    def prediction(self, x, t, cond=None, guidance_scale=None):
        """The guided prediction at (x, t) in the teacher's prediction type. guidance_scale: None (the
        teacher's own), scalar or (B,)."""
        batch = x.shape[0]
        schedules.check_times(self.schedule, t, "t")
        t = self.model_time(batch_times(t, batch, "t"))
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if cond is not None:
            _check_cond_batch(cond, batch)
            cond = _broadcast_batch(cond, batch)
        if self.guidance == "cfg":
            if cond is None:
                raise ValueError("classifier-free guidance needs a cond (the conditional branch); got cond=None")
            _check_cond_batch(self.uncond, batch, "uncond")
            uncond = _broadcast_batch(fill_uncond(cond, self.uncond), batch)
            both_cond = jax.tree.map(lambda c, u: jnp.concatenate([c, u], 0), cond, uncond)
            both = self.apply_fn(self.params, jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both_cond)
            p_cond, p_base = both[:batch], both[batch:]
        elif self.guidance == "autoguidance":
            p_cond = self.apply_fn(self.params, x, t, cond)
            p_base = self.weak_apply_fn(self.weak_params, x, t, cond)
        else:
            return self.apply_fn(self.params, x, t, cond)
        w = expand_time(jnp.asarray(w, jnp.float32), x)
        return p_base + w * (p_cond - p_base)

    def x0_eps(self, x, t, cond=None, guidance_scale=None):
        """Guided (x0_hat, eps_hat) at (x, t)."""
        alpha, sigma = schedules.alpha_sigma(self.schedule, batch_times(t, x.shape[0], "t"))
        return pred_lib.to_x0_eps(self.prediction(x, t, cond, guidance_scale), x, alpha, sigma,
                                  self.prediction_type)

    def velocity(self, x, t, cond=None, guidance_scale=None):
        """Guided PF-ODE velocity dx/dt at (x, t), teacher time units. Shape of x."""
        t = batch_times(t, x.shape[0], "t")
        x0_hat, eps_hat = self.x0_eps(x, t, cond, guidance_scale)
        d_alpha, d_sigma = schedules.alpha_sigma_derivatives(self.schedule, t)
        return pred_lib.velocity(x0_hat, eps_hat, d_alpha, d_sigma)

    def ddim_step(self, x, t_source, t_target, cond=None, guidance_scale=None):
        """The teacher's DDIM (first-order) jump from t_source to t_target (either direction)."""
        batch = x.shape[0]
        s, t = batch_times(t_source, batch, "t_source"), batch_times(t_target, batch, "t_target")
        schedules.check_times(self.schedule, t_target, "t_target")
        a_s, s_s = schedules.alpha_sigma(self.schedule, s)
        a_t, s_t = schedules.alpha_sigma(self.schedule, t)
        return pred_lib.ddim_step(self.prediction(x, s, cond, guidance_scale), x, a_s, s_s, a_t, s_t,
                                  self.prediction_type)


def unet_teacher_fn(unet):
    """apply_fn (params, x, t, cond) -> prediction for a `flowmap_jax.unet.FlaxUNet2DConditionModel`.

    x (B, H, W, C); t (B,) teacher units; cond: dict of the UNet's keyword arguments
    (encoder_hidden_states, timestep_cond, added_cond_kwargs) or None. A UNet that already carries the flow
    map's target-time hook (class_embed_type="timestep") is told t_target = t (zero-initialised, it is then
    exactly the teacher).
    """
    has_hook = getattr(unet.config, "class_embed_type", None) == "timestep"

    def apply_fn(params, x, t, cond):
        kwargs = dict(cond or {})
        if has_hook:
            kwargs["class_labels"] = t
        return unet.apply({"params": params}, x, t, **kwargs)

    return apply_fn


def gaussian_teacher_fn(schedule: ScheduleConfig, prediction_type: str):
    """apply_fn for the exact denoiser of Gaussian data x0 ~ N(mean, var) (elementwise), with
    params = {"mean": (...), "var": (...)} broadcastable to one example: the closed-form teacher of the
    tests. E[x0 | x_t] = mean + alpha var (x_t - alpha mean) / (alpha^2 var + sigma^2)."""
    check_prediction_type(prediction_type)

    def apply_fn(params, x, t, cond):
        del cond
        alpha, sigma = schedules.alpha_sigma(schedule, t)
        alpha, sigma = expand_time(alpha, x), expand_time(sigma, x)
        mean, var = params["mean"], params["var"]
        total = alpha * alpha * var + sigma * sigma
        resid = (x - alpha * mean) / total
        x0_hat = mean + alpha * var * resid
        eps_hat = sigma * resid
        return pred_lib.from_x0_eps(x0_hat, eps_hat, alpha, sigma, prediction_type)

    return apply_fn


def gaussian_exact_flow(schedule: ScheduleConfig, mean, var, x_s, t_source, t_target):
    """The exact PF-ODE flow map of Gaussian data N(mean, var): x_t = alpha_t mean + std_t z with
    z = (x_s - alpha_s mean) / std_s, std^2 = alpha^2 var + sigma^2 (the ODE preserves z)."""
    a_s, s_s = schedules.alpha_sigma(schedule, t_source)
    a_t, s_t = schedules.alpha_sigma(schedule, t_target)
    a_s, s_s, a_t, s_t = (expand_time(v, x_s) for v in (a_s, s_s, a_t, s_t))
    std_s = jnp.sqrt(a_s * a_s * var + s_s * s_s)
    std_t = jnp.sqrt(a_t * a_t * var + s_t * s_t)
    return a_t * mean + std_t * (x_s - a_s * mean) / std_s


def gaussian_mixture_teacher_fn(schedule: ScheduleConfig, prediction_type: str):
    """apply_fn for the exact denoiser of data whose every element is drawn independently from a 1-D
    Gaussian mixture sum_k w_k N(mean_k, var_k), with params = {"weights": (K,), "means": (K,),
    "vars": (K,)} (weights summing to 1): a multimodal closed-form teacher (narrow modes make its PF-ODE
    stiff near the clean end, unlike a single Gaussian's). With std_k^2 = alpha^2 var_k + sigma^2 and
    responsibilities r_k proportional to w_k N(x_t; alpha mean_k, std_k^2) (a softmax, float32):
    x0_hat = sum_k r_k (mean_k + alpha var_k (x_t - alpha mean_k) / std_k^2),
    eps_hat = sum_k r_k sigma (x_t - alpha mean_k) / std_k^2. Finite at both ends (alpha = 0 or sigma = 0)."""
    check_prediction_type(prediction_type)

    def apply_fn(params, x, t, cond):
        del cond
        alpha, sigma = schedules.alpha_sigma(schedule, t)
        alpha, sigma = expand_time(alpha, x)[..., None], expand_time(sigma, x)[..., None]
        weights, means, var = (jnp.asarray(params[k], jnp.float32) for k in ("weights", "means", "vars"))
        xk = x[..., None]
        total = alpha * alpha * var + sigma * sigma
        resid = (xk - alpha * means) / total
        logits = jnp.log(weights) - 0.5 * jnp.log(total) - 0.5 * resid * (xk - alpha * means)
        resp = jax.nn.softmax(logits, axis=-1)
        x0_hat = jnp.sum(resp * (means + alpha * var * resid), axis=-1)
        eps_hat = jnp.sum(resp * sigma * resid, axis=-1)
        return pred_lib.from_x0_eps(x0_hat, eps_hat, alpha[..., 0], sigma[..., 0], prediction_type)

    return apply_fn
