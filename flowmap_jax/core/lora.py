"""LoRA on the Flax UNet's parameters: adapters beside a frozen base, merged into the kernels inside the step.

The UNet module is untouched: a LoRA flow map is the parameter tree

    merged = base (the teacher's frozen weights) + the flow map's own inputs (trained in full)
             with each target kernel W replaced by W + (alpha / r) * delta(A, B)

computed by `merge_params` inside the jitted step, so the parameter tree and its diffusers key map stay one to
one and the teacher is the base tree itself (one copy of the UNet in memory). Only the trainable tree gets
gradients and optimiser state::

    trainable = {"adapters": {<module path>: {"lora_A": {"kernel": A}, "lora_B": {"kernel": B}}},
                 "inputs":   {"class_embedding": {...}, "time_embedding": {"cond_proj": {...}}}}

Layouts follow `flowmap_jax.unet.key_map` (Flax is diffusers transposed), so `flax_to_state_dict` of the
adapters gives diffusers/peft keys "<module>.lora_A.weight" directly:
- Dense kernel W (in, out): A (in, r), B (r, out), delta = A @ B (peft: B (out, r) @ A (r, in), transposed).
- Conv kernel W (kh, kw, in, out): A (kh, kw, in, r) (peft's lora_A is a Conv2d with the base's kernel, stride
  and padding), B (1, 1, r, out) (a 1x1 Conv2d), delta[h, w, i, o] = sum_r A[h, w, i, r] B[0, 0, r, o].
Initialisation is peft's default: A kaiming-uniform (bound 1/sqrt(fan_in)), B zero, so the untrained LoRA
student is the full student exactly. Which modules: `flowmap_jax.spec.lora_format` (peft's name rule, the
LCM-LoRA default targets, the flow map's inputs excluded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flowmap_jax.spec.lora_format import (
    DEFAULT_LORA_TARGETS,
    LORA_KEY_PREFIX,
    check_lora_settings,
    is_flow_map_input,
    module_matches,
)
from flowmap_jax.unet.key_map import flax_path_to_torch_key
from flowmap_jax.unet.state_dict import flax_to_state_dict

ADAPTERS = "adapters"
INPUTS = "inputs"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """rank r >= 1, alpha > 0 (the update is (alpha / r) B A; alpha = r: no scaling), target module names."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @classmethod
    def create(cls, rank: int, alpha=None, targets=DEFAULT_LORA_TARGETS) -> "LoraSettings":
        rank, alpha, targets = check_lora_settings(rank, alpha, targets)
        return cls(rank=rank, alpha=alpha, targets=targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def module_name(path: tuple[str, ...]) -> str:
    """The diffusers module name of a Flax module path: ('down_blocks_0', 'resnets_1', 'conv1') ->
    'down_blocks.0.resnets.1.conv1'."""
    return flax_path_to_torch_key(tuple(path) + ("kernel",))[: -len(".weight")]


def adapted_modules(params, targets) -> list[tuple[str, ...]]:
    """Flax module paths (sorted) of the Dense and Conv kernels whose diffusers module name matches `targets`,
    the flow map's own inputs excluded."""
    out = []
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel" or np.ndim(leaf) not in (2, 4):
            continue
        name = module_name(path[:-1])
        if module_matches(name, targets) and not is_flow_map_input(name):
            out.append(tuple(path[:-1]))
    return sorted(out)


def _get(tree, path):
    for segment in path:
        tree = tree[segment]
    return tree


def init_adapters(params, settings: LoraSettings, rng) -> dict:
    """Adapters for every target module of `params` (a UNet parameter tree; only shapes are read): A uniform in
    +-1/sqrt(fan_in) (peft's kaiming-uniform with a = sqrt(5)), B zero, float32. One key per module, folded
    from `rng` by the module's name (a stable order). ValueError naming the targets if none matches."""
    modules = adapted_modules(params, settings.targets)
    if not modules:
        raise ValueError(f"lora_targets {list(settings.targets)} match no Linear or Conv2d module of the UNet (names "
                         "as in diffusers' state dict, e.g. 'to_q', 'ff.net.2', 'conv1')")
    r = settings.rank
    adapters = {}
    for path in modules:
        shape = np.shape(_get(params, path)["kernel"])
        key = jax.random.fold_in(rng, int.from_bytes(hashlib.sha256(module_name(path).encode()).digest()[:4], "little"))
        if len(shape) == 2:
            fan_in, (a_shape, b_shape) = shape[0], ((shape[0], r), (r, shape[1]))
        else:
            kh, kw, cin, cout = shape
            fan_in, (a_shape, b_shape) = kh * kw * cin, ((kh, kw, cin, r), (1, 1, r, cout))
        bound = 1.0 / math.sqrt(fan_in)
        node = adapters
        for segment in path:
            node = node.setdefault(segment, {})
        node["lora_A"] = {"kernel": np.asarray(jax.random.uniform(key, a_shape, jnp.float32, -bound, bound))}
        node["lora_B"] = {"kernel": np.zeros(b_shape, np.float32)}
    return adapters


def flow_map_inputs(student_params, base_params) -> dict:
    """The leaves of the flow-map UNet's tree that its base lacks (the target-time embedding, the guidance input),
    as a nested dict."""
    base = traverse_util.flatten_dict(base_params)
    return traverse_util.unflatten_dict({p: v for p, v in traverse_util.flatten_dict(student_params).items()
                                         if p not in base})


def init_trainable(student_params, base_params, settings: LoraSettings, rng) -> dict:
    """{"adapters": init_adapters(base), "inputs": the flow map's own inputs (from `student_params`)}."""
    return {ADAPTERS: init_adapters(base_params, settings, rng), INPUTS: flow_map_inputs(student_params, base_params)}


def kernel_delta(lora_a, lora_b):
    """delta(A, B) in the base kernel's layout (see the module docstring), float32."""
    a = jnp.asarray(lora_a, jnp.float32)
    b = jnp.asarray(lora_b, jnp.float32)
    if a.ndim == 2:
        return a @ b
    return jnp.einsum("hwir,ro->hwio", a, b[0, 0])


def merge_params(base_params, trainable, scale: float):
    """The flow-map UNet's full parameter tree: `base_params` with the trainable inputs added and each adapted
    kernel W replaced by (W in float32 + scale * delta) cast back to W's dtype (bf16 base: bf16 kernels; B = 0
    gives W bit for bit). Works under jit and on numpy (then returns jax arrays for the adapted kernels)."""
    flat = dict(traverse_util.flatten_dict(base_params))
    for path, leaf in traverse_util.flatten_dict(trainable[INPUTS]).items():
        if path in flat:
            raise ValueError(f"flow-map input {'/'.join(path)} is also a base parameter")
        flat[path] = leaf
    adapters = trainable[ADAPTERS]
    for path, pair in adapter_pairs(adapters):
        key = path + ("kernel",)
        if key not in flat:
            raise ValueError(f"adapter for {module_name(path)}: the base has no kernel there")
        kernel = flat[key]
        delta = kernel_delta(pair["lora_A"]["kernel"], pair["lora_B"]["kernel"])
        if tuple(delta.shape) != tuple(np.shape(kernel)):
            raise ValueError(f"adapter for {module_name(path)} gives a {tuple(delta.shape)} update for a "
                             f"{tuple(np.shape(kernel))} kernel")
        dtype = jnp.asarray(kernel).dtype
        flat[key] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(dtype)
    return traverse_util.unflatten_dict(flat)


def on_merged_params(loss_fn, scale: float):
    """`loss_fn(params, teacher, batch, rng)` of the full flow-map tree -> the same function of a LoRA trainable
    tree: the full tree is `merge_params(teacher.params, trainable, scale)`, built inside the step, so gradients
    reach only the adapters and the flow map's inputs and the teacher's arrays are the base (one copy)."""

    def lora_loss(trainable, teacher, batch, rng):
        return loss_fn(merge_params(teacher.params, trainable, scale), teacher, batch, rng)

    return lora_loss


def adapter_pairs(adapters):
    """[(module path, {"lora_A": ..., "lora_B": ...})] of an adapters tree, sorted."""
    out = []

    def walk(node, prefix):
        if "lora_A" in node or "lora_B" in node:
            out.append((prefix, node))
            return
        for name, child in node.items():
            walk(child, prefix + (name,))

    walk(adapters, ())
    return sorted(out, key=lambda item: item[0])


def num_adapters(adapters) -> int:
    return len(adapter_pairs(adapters))


def adapters_to_lora_state_dict(adapters, scale: float, dtype=np.float32) -> dict[str, np.ndarray]:
    """Adapters -> diffusers' LoRA state dict {"unet.<module>.lora_A.weight": (r, in[, kh, kw]),
    "unet.<module>.lora_B.weight": (out, r[, 1, 1])}, numpy in `dtype`, with `scale` folded into lora_B."""
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
    for _, pair in adapter_pairs(host):
        pair["lora_B"] = {"kernel": pair["lora_B"]["kernel"] * np.float32(scale)}
    return {LORA_KEY_PREFIX + k: np.ascontiguousarray(v.astype(dtype)) for k, v in flax_to_state_dict(host).items()}


def adapters_from_lora_state_dict(state: dict, where: str) -> dict:
    """diffusers' LoRA state dict (keys with or without the "unet." prefix, lora_A / lora_B weights) -> the
    adapters tree (float32, scale 1: the file's lora_B already carries alpha / r). ValueError naming the key."""
    from flowmap_jax.unet.key_map import torch_to_flax_layout
    from flowmap_jax.unet.state_dict import _to_numpy

    adapters: dict = {}
    for key, value in state.items():
        name = key[len(LORA_KEY_PREFIX):] if key.startswith(LORA_KEY_PREFIX) else key
        module, _, leaf = name.rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight") or not module:
            raise ValueError(f"{where}: key {key!r} is not a '<module>.lora_A.weight' / '.lora_B.weight' key")
        array = np.asarray(_to_numpy(value), np.float32)
        if array.ndim not in (2, 4):
            raise ValueError(f"{where}: key {key!r} has shape {array.shape}; LoRA weights are 2-D or 4-D")
        path = _module_path(module)
        node = adapters
        for segment in path:
            node = node.setdefault(segment, {})
        node["lora_" + leaf[0]] = {"kernel": torch_to_flax_layout(array, "kernel")}
    for path, pair in adapter_pairs(adapters):
        for half in ("lora_A", "lora_B"):
            if half not in pair:
                raise ValueError(f"{where}: {module_name(path)}.{half}.weight is missing (its other half is there)")
    return adapters


def _module_path(module: str) -> tuple[str, ...]:
    """'down_blocks.0.attentions.1.to_out.0' -> ('down_blocks_0', 'attentions_1', 'to_out_0')."""
    from flowmap_jax.unet.key_map import LIST_MODULES

    out: list[str] = []
    for segment in module.split("."):
        if segment.isdigit() and out and out[-1] in LIST_MODULES:
            out[-1] = f"{out[-1]}_{segment}"
        else:
            out.append(segment)
    return tuple(out)


def check_adapters_fit(adapters, base_params, where: str) -> int:
    """ValueError naming the first adapter whose module is missing from the base or whose shapes do not fit its
    kernel; returns the rank."""
    rank = None
    for path, pair in adapter_pairs(adapters):
        try:
            kernel = _get(base_params, path)["kernel"]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: adapter {module_name(path)} names no module of the base UNet (a base of "
                             "another architecture?)") from None
        a, b = np.shape(pair["lora_A"]["kernel"]), np.shape(pair["lora_B"]["kernel"])
        shape = np.shape(kernel)
        r = a[-1]
        fits = (len(shape) == 2 and a == (shape[0], r) and b == (r, shape[1])) or (
            len(shape) == 4 and a == (*shape[:3], r) and b == (1, 1, r, shape[3]))
        if not fits:
            raise ValueError(f"{where}: adapter {module_name(path)} (lora_A {a}, lora_B {b} in Flax layout) does not "
                             f"fit the base kernel {shape} (a base of another architecture?)")
        if rank is not None and r != rank:
            raise ValueError(f"{where}: adapter {module_name(path)} has rank {r}, others {rank}")
        rank = r
    return int(rank or 0)


def base_fingerprint(params) -> str:
    """sha256 (hex) of a parameter tree's paths, dtypes, shapes and bytes (sorted paths): the identity of the
    frozen base a LoRA was trained on."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(params).items()):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update("/".join(path).encode())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
