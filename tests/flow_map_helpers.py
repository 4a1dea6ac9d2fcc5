"""Small networks written twice (JAX functions of a params dict, torch nn.Modules) with the same math, and
weight copying torch -> JAX through numpy, for the flow-map core tests (test_schedules, test_flow_map,
test_samplers, test_objectives, test_core_parity).

Networks follow the flow-map interface: JAX `net(params, x, t_source, t_target, cond)` with x (B, H, W, C);
torch `net(x, t_source, t_target, cond)` with x (B, C, H, W). Times are divided by `unit` (the schedule's
time_unit) and embedded as sin/cos features. cond: None or {"context": (B, K)}.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

# One intra-op thread: with XLA's threads in the same process on a small shared CPU, torch's default
# thread pool spins against them (a 10 ms tiny-UNet call took 2.5 s). Tests that import this module run
# torch single-threaded.
torch.set_num_threads(1)

N_FREQ = 4
TIME_FEATURES = 4 * N_FREQ


def time_features_jax(t_source, t_target, unit):
    k = jnp.arange(1, N_FREQ + 1, dtype=jnp.float32) * math.pi
    feats = []
    for t in (t_source, t_target):
        tau = (t / unit)[:, None] * k[None]
        feats += [jnp.sin(tau), jnp.cos(tau)]
    return jnp.concatenate(feats, axis=1)


def time_features_torch(t_source, t_target, unit):
    k = torch.arange(1, N_FREQ + 1, dtype=torch.float32) * math.pi
    feats = []
    for t in (t_source, t_target):
        tau = (t / unit)[:, None] * k[None]
        feats += [torch.sin(tau), torch.cos(tau)]
    return torch.cat(feats, dim=1)


def _silu_jax(x):
    return x * jax.nn.sigmoid(x)


# ------------------------------------------------------------------------------------------------
# MLP on the flattened NHWC image (+ time features + optional context).

class TorchMLP(nn.Module):
    """cond: {"context": (B, context_dim)} and, with guidance_dim, {"timestep_cond": (B, guidance_dim)}."""

    def __init__(self, shape_hwc, hidden=32, context_dim=0, unit=1.0, seed=0, guidance_dim=0):
        super().__init__()
        torch.manual_seed(seed)
        self.shape_hwc, self.unit, self.context_dim, self.guidance_dim = tuple(shape_hwc), unit, context_dim, guidance_dim
        d = int(np.prod(shape_hwc))
        self.l1 = nn.Linear(d + TIME_FEATURES + context_dim + guidance_dim, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, d)

    def forward(self, x, t_source, t_target, cond=None):
        b = x.shape[0]
        h = x.permute(0, 2, 3, 1).reshape(b, -1)  # NCHW -> NHWC order, as the JAX twin
        parts = [h, time_features_torch(t_source, t_target, self.unit)]
        if self.context_dim:
            parts.append(cond["context"])
        if self.guidance_dim:
            parts.append(cond["timestep_cond"])
        h = nn.functional.silu(self.l1(torch.cat(parts, 1)))
        h = nn.functional.silu(self.l2(h))
        out = self.l3(h).reshape((b,) + self.shape_hwc)
        return out.permute(0, 3, 1, 2)


def jax_mlp(unit, context_dim=0, guidance_dim=0):
    def net(params, x, t_source, t_target, cond):
        b = x.shape[0]
        parts = [x.reshape(b, -1), time_features_jax(t_source, t_target, unit)]
        if context_dim:
            parts.append(cond["context"])
        if guidance_dim:
            parts.append(cond["timestep_cond"])
        h = jnp.concatenate(parts, 1)
        h = _silu_jax(h @ params["l1"]["w"] + params["l1"]["b"])
        h = _silu_jax(h @ params["l2"]["w"] + params["l2"]["b"])
        return (h @ params["l3"]["w"] + params["l3"]["b"]).reshape(x.shape)
    return net


def torch_grads_to_jax_layout(named_grads: dict):
    """{"l1.weight": (out, in), "l1.bias": ...} torch gradients -> the JAX MLP/affine param tree (numpy)."""
    tree = {}
    for name, g in named_grads.items():
        layer, kind = name.split(".")
        g = g.detach().numpy()
        tree.setdefault(layer, {})["w" if kind == "weight" else "b"] = g.T if kind == "weight" else g
    return tree


def mlp_params_to_jax(module: TorchMLP):
    return {name: {"w": jnp.asarray(getattr(module, name).weight.detach().numpy().T),
                   "b": jnp.asarray(getattr(module, name).bias.detach().numpy())} for name in ("l1", "l2", "l3")}


# ------------------------------------------------------------------------------------------------
# Conv net: conv3x3 -> + time-embedding bias -> SiLU -> conv3x3.

class TorchConv(nn.Module):
    def __init__(self, channels, hidden=8, unit=1.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.unit = unit
        self.c1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.temb = nn.Linear(TIME_FEATURES, hidden)
        self.c2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, t_source, t_target, cond=None):
        h = self.c1(x) + self.temb(time_features_torch(t_source, t_target, self.unit))[:, :, None, None]
        return self.c2(nn.functional.silu(h))


def _conv_jax(x, w, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def jax_conv(unit):
    def net(params, x, t_source, t_target, cond):
        h = _conv_jax(x, params["c1"]["w"], params["c1"]["b"])
        h = h + (time_features_jax(t_source, t_target, unit) @ params["temb"]["w"] + params["temb"]["b"])[:, None, None]
        return _conv_jax(_silu_jax(h), params["c2"]["w"], params["c2"]["b"])
    return net


def conv_params_to_jax(module: TorchConv):
    def conv(m):
        return {"w": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)), "b": jnp.asarray(m.bias.detach().numpy())}
    return {"c1": conv(module.c1), "c2": conv(module.c2),
            "temb": {"w": jnp.asarray(module.temb.weight.detach().numpy().T), "b": jnp.asarray(module.temb.bias.detach().numpy())}}


# ------------------------------------------------------------------------------------------------
# "Affine in x" net: F = a(s, t) * x + b(s, t), a and b per element from an MLP of the times. The exact
# flow map of Gaussian data lies in this family, so training on the closed-form teacher can succeed.

def jax_affine(unit, hidden=64):
    def net(params, x, t_source, t_target, cond):
        h = time_features_jax(t_source, t_target, unit)
        h = _silu_jax(h @ params["l1"]["w"] + params["l1"]["b"])
        h = _silu_jax(h @ params["l2"]["w"] + params["l2"]["b"])
        ab = h @ params["l3"]["w"] + params["l3"]["b"]
        d = int(np.prod(x.shape[1:]))
        return (ab[:, :d].reshape(x.shape) * x + ab[:, d:].reshape(x.shape))
    return net


def init_affine_params(rng, d, hidden=64):
    k1, k2, k3 = jax.random.split(rng, 3)

    def dense(k, n_in, n_out, scale=1.0):
        return {"w": scale * jax.random.normal(k, (n_in, n_out)) / math.sqrt(n_in), "b": jnp.zeros((n_out,))}

    return {"l1": dense(k1, TIME_FEATURES, hidden), "l2": dense(k2, hidden, hidden),
            "l3": dense(k3, hidden, 2 * d, 0.1)}


class TorchAffine(nn.Module):
    def __init__(self, shape_hwc, hidden=64, unit=1.0):
        super().__init__()
        self.shape_hwc, self.unit = tuple(shape_hwc), unit
        d = int(np.prod(shape_hwc))
        self.l1 = nn.Linear(TIME_FEATURES, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, 2 * d)

    def forward(self, x, t_source, t_target, cond=None):
        b = x.shape[0]
        h = nn.functional.silu(self.l1(time_features_torch(t_source, t_target, self.unit)))
        h = nn.functional.silu(self.l2(h))
        ab = self.l3(h)
        d = int(np.prod(self.shape_hwc))
        a = ab[:, :d].reshape((b,) + self.shape_hwc).permute(0, 3, 1, 2)
        c = ab[:, d:].reshape((b,) + self.shape_hwc).permute(0, 3, 1, 2)
        return a * x + c


def affine_params_to_torch(params, module: TorchAffine):
    with torch.no_grad():
        for name in ("l1", "l2", "l3"):
            getattr(module, name).weight.copy_(torch.from_numpy(np.asarray(params[name]["w"]).T.copy()))
            getattr(module, name).bias.copy_(torch.from_numpy(np.asarray(params[name]["b"]).copy()))
    return module


# ------------------------------------------------------------------------------------------------

def nhwc(x):
    """torch (B, C, H, W) or numpy -> jnp (B, H, W, C)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().numpy()
    return jnp.asarray(np.transpose(np.asarray(x), (0, 2, 3, 1)))


def nchw(x):
    """jnp/numpy (B, H, W, C) -> torch (B, C, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))).astype(np.float32))


def rel_err(a, b):
    """|a - b| / |b| (Frobenius), numpy arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_scaled_err(a, b):
    """max |a - b| / max |b|: the 'max abs error <= tol * output scale' measure."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
