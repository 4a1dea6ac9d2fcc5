"""UNetConfig: the diffusers `UNet2DConditionModel` configuration the Flax port implements.

Pure Python (no jax, no torch), so both backends and the conversion tools can share it.

Every key of a diffusers `config.json` is either implemented, or accepted only at the value where it has
no effect, or refused with a `ValueError` that names the key and the value. Keys starting with `_`
(`_class_name`, `_diffusers_version`, `_name_or_path`) are metadata and are kept but not interpreted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
SUPPORTED_ACTIVATIONS = ("silu", "swish", "mish", "gelu")

# Keys whose value diffusers' standard blocks (the ones above) never read: accepted at any value, and
# without effect here exactly as in diffusers.
NO_EFFECT_KEYS = (
    "resnet_skip_time_act",  # read only by the SimpleCrossAttn / ResnetDownsample blocks
    "resnet_out_scale_factor",  # read only by the SimpleCrossAttn / ResnetDownsample blocks
    "mid_block_only_cross_attention",  # read only by UNetMidBlock2DSimpleCrossAttn
    "addition_embed_type_num_heads",  # read only by addition_embed_type="text"
    "sample_size",  # metadata: the default latent size; any size divisible or not works
)

# Keys the port does not implement, with the only value it accepts (the diffusers default).
FIXED_VALUE_KEYS = {
    "dropout": 0.0,
    "dual_cross_attention": False,
    "num_attention_heads": None,
    "time_embedding_type": "positional",
    "attention_type": "default",
    "cross_attention_norm": None,
}


def _as_tuple(value, n, name):
    """Broadcasts an int/bool/None config value to a tuple of length n; checks a list's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config key {name!r} has {len(value)} entries, expected {n} (one per block): {value}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers UNet2DConditionModel config fields (same names, same defaults as diffusers 0.42)."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: Any = 8
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    class_embeddings_concat: bool = False
    # Everything else from the diffusers dict (no-effect keys, fixed-value keys at their default,
    # metadata): kept so that an export writes back the config it read.
    extra: tuple = ()

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        """Builds the config from a diffusers `config.json` dict; refuses what the port cannot run."""
        if not isinstance(config, dict):
            raise TypeError(f"UNetConfig.from_dict expects a dict, got {type(config).__name__}")
        class_name = config.get("_class_name")
        if class_name not in (None, "UNet2DConditionModel"):
            raise ValueError(f"UNet config '_class_name' is {class_name!r}; only 'UNet2DConditionModel' is supported")
        field_names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for key, value in config.items():
            if key.startswith("_") or key in NO_EFFECT_KEYS:
                extra[key] = value
            elif key in FIXED_VALUE_KEYS:
                if value != FIXED_VALUE_KEYS[key]:
                    raise ValueError(
                        f"UNet config key {key!r}={value!r} is not supported by the Flax port "
                        f"(only {FIXED_VALUE_KEYS[key]!r})"
                    )
                extra[key] = value
            elif key in field_names:
                kwargs[key] = _deep_tuple(value)
            else:
                raise ValueError(f"UNet config key {key!r} (value {value!r}) is not known to the Flax port")
        config_obj = cls(**kwargs, extra=tuple(sorted(extra.items(), key=lambda kv: kv[0])))
        config_obj.validate()
        return config_obj

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "UNetConfig":
        """Reads a diffusers `config.json`; errors name the file."""
        try:
            with open(path) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"UNet config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"UNet config file {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(config)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        """The diffusers config dict (lists, not tuples), including the metadata read in."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = _to_json(value)
        for key, value in self.extra:
            out[key] = _to_json(value)
        out.setdefault("_class_name", "UNet2DConditionModel")
        return out

    def replace(self, **changes) -> "UNetConfig":
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        n = len(self.down_block_types)
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UNet config key {name!r} has {len(getattr(self, name))} entries but down_block_types has {n}"
                )
        for block in self.down_block_types:
            if block not in SUPPORTED_DOWN_BLOCKS:
                raise ValueError(f"UNet config key 'down_block_types' has {block!r}; supported: {SUPPORTED_DOWN_BLOCKS}")
        for block in self.up_block_types:
            if block not in SUPPORTED_UP_BLOCKS:
                raise ValueError(f"UNet config key 'up_block_types' has {block!r}; supported: {SUPPORTED_UP_BLOCKS}")
        if self.mid_block_type not in SUPPORTED_MID_BLOCKS:
            raise ValueError(f"UNet config key 'mid_block_type' is {self.mid_block_type!r}; supported: {SUPPORTED_MID_BLOCKS}")
        if self.act_fn not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"UNet config key 'act_fn' is {self.act_fn!r}; supported: {SUPPORTED_ACTIVATIONS}")
        for key in ("time_embedding_act_fn", "timestep_post_act"):
            if getattr(self, key) not in (None,) + SUPPORTED_ACTIVATIONS:
                raise ValueError(f"UNet config key {key!r} is {getattr(self, key)!r}; supported: {SUPPORTED_ACTIVATIONS}")
        if self.norm_num_groups is None:
            raise ValueError("UNet config key 'norm_num_groups'=None is not supported by the Flax port")
        if self.class_embed_type not in (None, "timestep", "projection"):
            raise ValueError(
                f"UNet config key 'class_embed_type' is {self.class_embed_type!r}; supported: None, 'timestep', 'projection'"
            )
        if self.class_embed_type == "projection" and self.projection_class_embeddings_input_dim is None:
            raise ValueError("UNet config: class_embed_type='projection' needs 'projection_class_embeddings_input_dim'")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"UNet config key 'addition_embed_type' is {self.addition_embed_type!r}; supported: None, 'text_time'"
            )
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                "UNet config: addition_embed_type='text_time' needs 'addition_time_embed_dim' and "
                "'projection_class_embeddings_input_dim'"
            )
        hid_type = self.encoder_hid_dim_type
        if hid_type is None and self.encoder_hid_dim is not None:
            hid_type = "text_proj"  # diffusers' own default
        if hid_type not in (None, "text_proj"):
            raise ValueError(f"UNet config key 'encoder_hid_dim_type' is {hid_type!r}; supported: None, 'text_proj'")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                f"UNet config key 'resnet_time_scale_shift' is {self.resnet_time_scale_shift!r}; "
                "supported: 'default', 'scale_shift'"
            )
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNet config key 'downsample_padding' is {self.downsample_padding!r}; supported: 0, 1")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, key) % 2 != 1:
                raise ValueError(f"UNet config key {key!r} must be odd, got {getattr(self, key)}")
        heads = self.heads_per_block
        for i, (channels, h) in enumerate(zip(self.block_out_channels, heads)):
            if h is None or channels % h:
                raise ValueError(
                    f"UNet config key 'attention_head_dim' (the head count, in diffusers' naming) {h!r} of block {i} "
                    f"does not divide block_out_channels[{i}]={channels}"
                )
        tl = self.transformer_layers_per_block
        if isinstance(tl, (list, tuple)) and self.reverse_transformer_layers_per_block is None:
            if any(isinstance(v, (list, tuple)) for v in tl):
                raise ValueError(
                    "UNet config: nested 'transformer_layers_per_block' needs 'reverse_transformer_layers_per_block'"
                )
        for name in ("only_cross_attention", "attention_head_dim", "cross_attention_dim", "layers_per_block",
                     "transformer_layers_per_block"):
            _as_tuple(getattr(self, name), n, name)

    # ---- per-block views, resolved the way diffusers resolves them -------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def heads_per_block(self) -> tuple:
        """Number of attention heads per down block (diffusers stores it under `attention_head_dim`)."""
        return _as_tuple(self.attention_head_dim, self.num_blocks, "attention_head_dim")

    @property
    def cross_attention_dims(self) -> tuple:
        return _as_tuple(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    @property
    def layers_per_block_list(self) -> tuple:
        return _as_tuple(self.layers_per_block, self.num_blocks, "layers_per_block")

    @property
    def transformer_layers_list(self) -> tuple:
        return _as_tuple(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    @property
    def only_cross_attention_list(self) -> tuple:
        return _as_tuple(self.only_cross_attention, self.num_blocks, "only_cross_attention")

    @property
    def reverse_transformer_layers_list(self) -> tuple:
        if self.reverse_transformer_layers_per_block is None:
            return tuple(reversed(self.transformer_layers_list))
        return _as_tuple(self.reverse_transformer_layers_per_block, self.num_blocks, "reverse_transformer_layers_per_block")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def timestep_input_dim(self) -> int:
        return self.block_out_channels[0]

    @property
    def effective_encoder_hid_dim_type(self) -> str | None:
        if self.encoder_hid_dim_type is None and self.encoder_hid_dim is not None:
            return "text_proj"
        return self.encoder_hid_dim_type

    @property
    def uses_cross_attention(self) -> bool:
        return (
            any(b.startswith("CrossAttn") for b in self.down_block_types + self.up_block_types)
            or self.mid_block_type == "UNetMidBlock2DCrossAttn"
        )


def _deep_tuple(value):
    """Lists (possibly nested) -> tuples, so the config is hashable (a static jit argument)."""
    if isinstance(value, (list, tuple)):
        return tuple(_deep_tuple(v) for v in value)
    return value


def _to_json(value):
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value
