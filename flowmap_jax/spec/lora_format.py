"""A LoRA flow map on disk, and which modules get adapters (pure Python and numpy; no jax, no torch).

A LoRA run trains low-rank adapters on the frozen teacher UNet plus the flow map's own new inputs (the
target-time embedding `class_embedding`, and `time_embedding.cond_proj` where the guidance scale is an input).
Its export (`python -m conversion export RUN OUT --lora`, written by `flowmap_jax.training.lora_export_writer`)::

    <folder>/pytorch_lora_weights.safetensors  the adapters in diffusers' LoRA format: keys
                                               "unet.<module>.lora_A.weight" (r, in) or (r, in, kh, kw) and
                                               "unet.<module>.lora_B.weight" (out, r) or (out, r, 1, 1), the keys
                                               `load_lora_weights` / `UNet2DConditionModel.load_lora_adapter` take;
                                               the scale alpha / r is folded into lora_B, so a loader that assumes
                                               alpha = r (diffusers does when no alpha is stored) applies it exactly
    <folder>/flowmap_inputs.safetensors        the flow map's own inputs, diffusers keys (class_embedding.*, and
                                               time_embedding.cond_proj.weight where guidance is an input)
    <folder>/flowmap.json                      as a full export's (schedule, hooks, guidance...), with "network"
                                               naming the two files and a "lora" section: rank, alpha, targets, the
                                               flow-map UNet config, the base's architecture and fingerprint
    <folder>/label_embeddings.safetensors      optional, as in a full export

The weights of a target module W (diffusers layout) become W + (alpha / r) B A on top of the base: peft's
merge, for Linear (B A) and Conv2d (B (out, r, 1, 1) applied after A's kernel). Any base UNet of the
recorded architecture takes the adapters (as LCM-LoRA goes on fine-tunes of its base); how good the flow map
is on another base than the one it was trained on is for the user to judge.

Target modules: diffusers module names (as in the state dict, without ".weight"), matched with peft's rule for
a list of names: a module is adapted when its name equals a target or ends with "." + target. Only Linear and
Conv2d modules take adapters; the flow map's own inputs never do (they are trained in full).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flowmap_jax.spec.export_format import (
    FLOWMAP_JSON,
    LORA_NETWORK_KIND,
    ExportFormatError,
    FlowMapConfig,
    check_unet_hooks,
    config_from_metadata,
)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
FLOW_MAP_INPUTS_NAME = "flowmap_inputs.safetensors"
LORA_KEY_PREFIX = "unet."

# diffusers' LCM-LoRA training script (examples/consistency_distillation/train_lcm_distill_lora_sd*.py),
# its default `lora_target_modules`: every attention projection, the transformer's in/out projections and
# feed-forward, the ResNet convolutions, shortcuts and time projections, and the down/up-sampling convolutions.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                        "time_emb_proj")

# The flow map's own inputs (diffusers module prefixes): trained in full in a LoRA run, never adapted.
FLOW_MAP_INPUT_MODULES = ("class_embedding", "time_embedding.cond_proj")

# UNet config keys that fix the parameter shapes: a base must agree on all of them to take the adapters.
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "mid_block_type",
                     "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                     "num_attention_heads", "transformer_layers_per_block", "use_linear_projection",
                     "addition_embed_type", "projection_class_embeddings_input_dim", "conv_in_kernel",
                     "conv_out_kernel", "norm_num_groups", "encoder_hid_dim", "encoder_hid_dim_type",
                     "time_embedding_dim", "only_cross_attention")


def module_matches(module: str, targets) -> bool:
    """peft's rule for a list of target names: `module` equals one or ends with "." + one."""
    return any(module == target or module.endswith("." + target) for target in targets)


def is_flow_map_input(module: str) -> bool:
    """True for the flow map's own input modules (and anything inside them)."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in FLOW_MAP_INPUT_MODULES)


def check_lora_settings(rank: int, alpha, targets) -> tuple[int, float, tuple[str, ...]]:
    """(rank, alpha, targets) checked: rank >= 1, alpha > 0 (None: alpha = rank, no scaling, the LCM-LoRA
    script's default), at least one target name. ValueError naming the setting."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha!r}")
    targets = tuple(str(t).strip() for t in targets if str(t).strip())
    if not targets:
        raise ValueError("lora_targets names no module")
    return rank, alpha, targets


# diffusers' UNet2DConditionModel defaults of the keys above that a config may leave out (or set to null).
ARCHITECTURE_DEFAULTS = {"in_channels": 4, "out_channels": 4, "mid_block_type": "UNetMidBlock2DCrossAttn",
                         "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                         "cross_attention_dim": 1280, "attention_head_dim": 8, "transformer_layers_per_block": 1,
                         "use_linear_projection": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
                         "norm_num_groups": 32, "only_cross_attention": False}


def architecture(unet_config: dict) -> dict:
    """The entries of a diffusers UNet config that fix the parameter shapes, diffusers' default where a key is
    missing or null (null where diffusers' default is null)."""
    out = {}
    for key in ARCHITECTURE_KEYS:
        value = unet_config.get(key)
        out[key] = _plain(ARCHITECTURE_DEFAULTS.get(key) if value is None else value)
    return out


def _same_setting(a, b) -> bool:
    """Equal, counting a scalar the same as a per-block list of it (diffusers accepts both, e.g.
    attention_head_dim 8 and [8, 8, 8, 8])."""
    if isinstance(a, list) and not isinstance(b, list):
        return all(x == b for x in a)
    if isinstance(b, list) and not isinstance(a, list):
        return all(x == a for x in b)
    return a == b


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_base_architecture(base_config: dict, recorded: dict, where: str, base_where: str) -> None:
    """ExportFormatError naming the first key where a base UNet config differs from the architecture the LoRA
    was trained on (`recorded`, flowmap.json's lora.base.architecture)."""
    actual = architecture(base_config)
    expected = architecture(recorded)
    for key in ARCHITECTURE_KEYS:
        if key in recorded and not _same_setting(expected[key], actual[key]):
            raise ExportFormatError(
                f"{base_where}: key {key!r} is {actual[key]!r} but the LoRA in {where} was trained on a base with "
                f"{key}={expected[key]!r}: a base of another architecture cannot take these adapters")


def lora_metadata(full_metadata: dict, *, rank: int, alpha: float, targets, unet_config: dict, base_config: dict,
                  base_fingerprint: str | None, num_adapters: int) -> dict:
    """A LoRA export's flowmap.json: `full_metadata` (`export_format.flow_map_metadata`) with "network" naming the
    LoRA files and a "lora" section."""
    meta = dict(full_metadata)
    meta["network"] = {
        "class": "UNet2DConditionModel",
        "kind": LORA_NETWORK_KIND,
        "base": "a diffusers UNet2DConditionModel of the architecture in lora.base.architecture (the teacher, or a "
                "fine-tune of it), plus the target-time hook (lora.unet_config)",
        "lora_weights": LORA_WEIGHTS_NAME,
        "flow_map_inputs": FLOW_MAP_INPUTS_NAME,
        "layout": "PyTorch (B, C, H, W); the Flax port takes (B, H, W, C)",
    }
    meta["lora"] = {
        "rank": int(rank),
        "alpha": float(alpha),
        "scale_folded_into_lora_B": float(alpha) / int(rank),
        "targets": list(targets),
        "num_adapted_modules": int(num_adapters),
        "key_prefix": LORA_KEY_PREFIX,
        "unet_config": unet_config,
        "base": {"architecture": architecture(base_config), "fingerprint": base_fingerprint},
        "flow_map_inputs": list(FLOW_MAP_INPUT_MODULES),
        "note": "W + B A on each adapted module (alpha / r already in B); the flow map's inputs are loaded in full",
    }
    return meta


@dataclasses.dataclass(frozen=True)
class LoraExportInfo:
    """What `read_lora_export` finds (no weights read). unet_config: the flow-map UNet config (the base's plus
    the hooks); base_architecture: the recorded base architecture; metadata: flowmap.json as read."""

    folder: Path
    rank: int
    alpha: float
    targets: tuple[str, ...]
    unet_config: dict
    base_architecture: dict
    base_fingerprint: str | None
    config: FlowMapConfig
    metadata: dict

    @property
    def lora_weights_path(self) -> Path:
        return self.folder / LORA_WEIGHTS_NAME

    @property
    def inputs_path(self) -> Path:
        return self.folder / FLOW_MAP_INPUTS_NAME


def read_lora_export(folder) -> LoraExportInfo:
    """Reads and checks a LoRA flow map's flowmap.json and that its two weight files exist.

    FileNotFoundError naming the missing folder or file; ExportFormatError naming the file and the key for a
    folder that is not a LoRA flow map or whose metadata is inconsistent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no LoRA flow-map folder at {folder}")
    meta_path = folder / FLOWMAP_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {FLOWMAP_JSON} in {folder}: not a LoRA flow map (export one with `python -m "
                                "conversion export RUN OUT --lora`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{meta_path} is not valid JSON: {err}") from None
    where = str(meta_path)
    network = meta.get("network") if isinstance(meta, dict) else None
    if not isinstance(network, dict) or network.get("kind") != LORA_NETWORK_KIND:
        raise ExportFormatError(f"{where}: key 'network.kind' is not {LORA_NETWORK_KIND!r}: {folder} is a full flow-map export, "
                                "not a LoRA (load it without --lora)")
    section = meta.get("lora")
    if not isinstance(section, dict):
        raise ExportFormatError(f"{where}: key 'lora' is missing or not an object")
    try:
        rank, alpha, targets = check_lora_settings(section.get("rank"), section.get("alpha"), section.get("targets") or ())
    except ValueError as err:
        raise ExportFormatError(f"{where}: lora: {err}") from None
    unet_config = section.get("unet_config")
    if not isinstance(unet_config, dict):
        raise ExportFormatError(f"{where}: key 'lora.unet_config' is missing or not an object")
    base = section.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("architecture"), dict):
        raise ExportFormatError(f"{where}: key 'lora.base.architecture' is missing or not an object")
    config = config_from_metadata(meta, folder, where)
    check_unet_hooks(unet_config, config, f"{where}: lora.unet_config")
    for name in (LORA_WEIGHTS_NAME, FLOW_MAP_INPUTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder} (the LoRA flow map's "
                                    f"{'adapters' if name == LORA_WEIGHTS_NAME else 'own inputs'})")
    return LoraExportInfo(folder=folder, rank=rank, alpha=alpha, targets=targets, unet_config=unet_config,
                          base_architecture=base["architecture"], base_fingerprint=base.get("fingerprint"),
                          config=config, metadata=meta)


def lora_rank_of(state_shapes: dict, where: str) -> int:
    """The one rank of a LoRA state dict {key: shape}; ExportFormatError naming the key of a second rank or of a
    key that is not a lora_A / lora_B weight."""
    rank, first = None, None
    for key, shape in sorted(state_shapes.items()):
        if key.endswith(".lora_A.weight"):
            r = int(shape[0])
        elif key.endswith(".lora_B.weight"):
            r = int(shape[1])
        else:
            raise ExportFormatError(f"{where}: key {key!r} is not a lora_A / lora_B weight")
        if rank is None:
            rank, first = r, key
        elif r != rank:
            raise ExportFormatError(f"{where}: key {key!r} has rank {r}, but {first!r} has rank {rank}")
    if rank is None:
        raise ExportFormatError(f"{where} holds no adapter")
    return rank



def check_lora_rank(shapes: dict, info: LoraExportInfo) -> int:
    """The rank of the LoRA file whose {key: shape} is `shapes` (`lora_rank_of`); ExportFormatError naming the file
    unless it is flowmap.json's lora.rank."""
    path = info.lora_weights_path
    rank = lora_rank_of(shapes, str(path))
    if rank != info.rank:
        raise ExportFormatError(f"{path}: the adapters have rank {rank} but {info.folder / FLOWMAP_JSON} says "
                                f"lora.rank = {info.rank}")
    return rank


def check_flow_map_inputs(expected: dict, found: dict, path) -> None:
    """flowmap_inputs.safetensors holds exactly the `expected` keys ({key: shape}: what the hooked UNet has and the
    base lacks), each of that shape (`found`: the file's {key: shape}); ExportFormatError naming the file and the
    first key at fault otherwise."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        detail = (f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r} (not an input the "
                                                                 "flow map adds to the base)")
        raise ExportFormatError(f"{path}: {detail}")
    for key, shape in sorted(expected.items()):
        if tuple(found[key]) != tuple(shape):
            raise ExportFormatError(f"{path}: key {key!r} has shape {tuple(found[key])}, expected {tuple(shape)}")


def base_unet_subfolder(base, subfolder: str | None) -> tuple[str | None, Path]:
    """(the subfolder to read, the path of the base UNet's config.json) of a base given as a pipeline folder (the
    UNet in `subfolder`) or as the UNet folder itself (no `subfolder` there, a config.json at the top)."""
    path = Path(base)
    if subfolder and path.is_dir() and not (path / subfolder).is_dir() and (path / "config.json").is_file():
        subfolder = None
    return subfolder or None, (path / subfolder / "config.json" if subfolder else path / "config.json")
