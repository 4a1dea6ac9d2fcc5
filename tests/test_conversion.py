"""Conversion diffusers <-> Flax: exact round trips, every parameter mapped, clear errors on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conversion import (  # noqa: E402
    ConversionError,
    flax_to_state_dict,
    load_diffusers_unet,
    save_diffusers_unet,
    state_dict_to_flax,
)
from flowmap_jax.unet import UNetConfig, abstract_unet_params  # noqa: E402
from tests.test_unet_parity import DIFFUSERS_TINY_2, FLOW_MAP_HOOKS, MISC_A, SDXL  # noqa: E402
from tests.unet_helpers import make_torch_unet  # noqa: E402


def _leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


@pytest.mark.parametrize("config", [SDXL, FLOW_MAP_HOOKS, MISC_A], ids=["sdxl", "flow_map_hooks", "misc_a"])
def test_torch_flax_torch_is_bit_exact_and_every_parameter_is_mapped(config):
    unet = make_torch_unet(config)
    state = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    params = state_dict_to_flax(state, dict(unet.config))
    # Every torch tensor became exactly one Flax leaf, and the Flax model needs exactly these leaves.
    abstract = abstract_unet_params(UNetConfig.from_dict(dict(unet.config)))
    assert len(list(_leaves(params))) == len(state) == len(list(_leaves(abstract)))
    back = flax_to_state_dict(params, dict(unet.config))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key], value), key


def test_folder_round_trip_through_from_pretrained(tmp_path):
    """save_pretrained -> load_diffusers_unet -> save_diffusers_unet -> from_pretrained: identical tensors."""
    unet = make_torch_unet(FLOW_MAP_HOOKS)
    unet.save_pretrained(tmp_path / "src")
    config, params = load_diffusers_unet(tmp_path / "src", dtype=None)
    save_diffusers_unet(params, config, tmp_path / "out")
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out")
    for key, value in unet.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.config.class_embed_type == "timestep"


def test_pipeline_subfolder_and_fp16_variant(tmp_path):
    unet = make_torch_unet(DIFFUSERS_TINY_2)
    unet.half().save_pretrained(tmp_path / "pipe" / "unet", variant="fp16")
    _, kept = load_diffusers_unet(tmp_path / "pipe", subfolder="unet", variant="fp16", dtype=None)
    _, cast = load_diffusers_unet(tmp_path / "pipe", subfolder="unet", variant="fp16")
    assert {leaf.dtype for leaf in _leaves(kept)} == {np.dtype(np.float16)}
    assert {leaf.dtype for leaf in _leaves(cast)} == {np.dtype(np.float32)}


def test_state_dict_from_another_config_lists_every_offending_key():
    other = make_torch_unet(dict(DIFFUSERS_TINY_2, cross_attention_dim=16, class_embed_type="timestep"))
    state = {k: v.detach().numpy() for k, v in other.state_dict().items()}
    state["not.a.real.key"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        state_dict_to_flax(state, DIFFUSERS_TINY_2)
    message = str(err.value)
    assert "unexpected key class_embedding.linear_1.weight" in message
    assert "unexpected key not.a.real.key (shape (3,))" in message
    assert ("wrong shape for down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight: "
            "got (32, 16), expected (32, 32)") in message


def test_missing_keys_are_listed():
    unet = make_torch_unet(DIFFUSERS_TINY_2)
    state = {k: v.detach().numpy() for k, v in unet.state_dict().items() if k != "conv_in.bias"}
    with pytest.raises(ConversionError, match=r"missing key conv_in.bias \(expected shape \(32,\)\)"):
        state_dict_to_flax(state, DIFFUSERS_TINY_2)


def test_unknown_and_unsupported_config_keys_are_named():
    with pytest.raises(ValueError, match="'made_up_key'"):
        UNetConfig.from_dict(dict(DIFFUSERS_TINY_2, made_up_key=3))
    with pytest.raises(ValueError, match="'dual_cross_attention'=True"):
        UNetConfig.from_dict(dict(DIFFUSERS_TINY_2, dual_cross_attention=True))
    with pytest.raises(ValueError, match="'down_block_types' has 'SimpleCrossAttnDownBlock2D'"):
        UNetConfig.from_dict(dict(DIFFUSERS_TINY_2, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]))
    with pytest.raises(ValueError, match="'class_embed_type' is 'identity'"):
        UNetConfig.from_dict(dict(DIFFUSERS_TINY_2, class_embed_type="identity"))


def test_config_error_from_a_folder_names_the_file(tmp_path):
    make_torch_unet(DIFFUSERS_TINY_2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["made_up_key"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*'made_up_key'"):
        load_diffusers_unet(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    make_torch_unet(DIFFUSERS_TINY_2).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors.*truncated or corrupt"):
        load_diffusers_unet(tmp_path)


def test_pickle_weights_are_refused_unless_opted_in(tmp_path):
    unet = make_torch_unet(DIFFUSERS_TINY_2)
    unet.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_diffusers_unet(tmp_path)
    _, params = load_diffusers_unet(tmp_path, allow_torch_bin=True)  # torch.load(weights_only=True)
    np.testing.assert_array_equal(params["conv_in"]["bias"], unet.conv_in.bias.detach().numpy())


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub id"):
        load_diffusers_unet(tmp_path / "nope" / "deeper")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_diffusers_unet(tmp_path / "empty")


def test_cli_round_trip(tmp_path):
    unet = make_torch_unet(DIFFUSERS_TINY_2)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    run = lambda *a: subprocess.run([sys.executable, "-m", "conversion", *a], capture_output=True, text=True)  # noqa: E731
    assert "to-flax" in run("--help").stdout
    r = run("to-flax", str(tmp_path / "pipe"), str(tmp_path / "flax"), "--subfolder", "unet")
    assert r.returncode == 0, r.stderr
    r = run("to-diffusers", str(tmp_path / "flax"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "back")
    for key, value in unet.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    r = run("to-flax", str(tmp_path / "missing_dir" / "x"), str(tmp_path / "o"))
    assert r.returncode == 2 and "error:" in r.stderr
