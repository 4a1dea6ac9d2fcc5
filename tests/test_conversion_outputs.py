"""`python -m conversion to-flax / to-diffusers` outputs and refusals: never into a folder holding other
files or onto a file, written atomically with normal permissions; a malicious pickle behind
--allow-torch-bin refused as a one-line error, without running it."""

import json
import os
import stat

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conversion.__main__ import main as conversion_main
from flowmap_jax.unet import diffusers_io
from tests.test_unet_parity import DIFFUSERS_TINY_2
from tests.unet_helpers import make_torch_unet


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A diffusers UNet folder and its to-flax output."""
    root = tmp_path_factory.mktemp("conv")
    make_torch_unet(DIFFUSERS_TINY_2).save_pretrained(root / "unet")
    assert conversion_main(["to-flax", str(root / "unet"), str(root / "flax")]) == 0
    return root


def _error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_to_flax_onto_a_file_is_a_one_line_error(folders, tmp_path, capsys):
    (tmp_path / "out").write_text("user data")
    assert conversion_main(["to-flax", str(folders / "unet"), str(tmp_path / "out")]) == 2
    assert _error_line(capsys) == f"error: output folder {tmp_path / 'out'} is a file; choose a folder"
    assert conversion_main(["to-flax", str(folders / "unet"), str(tmp_path / "out" / "deeper")]) == 2
    assert "lies under" in _error_line(capsys)
    assert (tmp_path / "out").read_text() == "user data"


def test_to_diffusers_refuses_a_folder_with_other_files(folders, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert conversion_main(["to-diffusers", str(folders / "flax"), str(out)]) == 2
    assert _error_line(capsys) == (f"error: refusing to write into {out}: it holds files that `to-diffusers` did not "
                                   f"write (notes.txt); choose an empty or new output folder")
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_to_diffusers_writes_atomically_with_normal_permissions(folders, tmp_path, monkeypatch, capsys):
    out = tmp_path / "back"
    assert conversion_main(["to-diffusers", str(folders / "flax"), str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~umask, name  # main: 0600
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(out)
    assert reloaded.conv_in.weight.shape[0] == DIFFUSERS_TINY_2["block_out_channels"][0]
    # A second conversion replaces its own earlier output; one that fails half way changes nothing.
    before = (out / "diffusion_pytorch_model.safetensors").read_bytes()

    def fail_after_weights(state_dict, config, folder):
        diffusers_io.atomic_write_bytes(folder / "diffusion_pytorch_model.safetensors", b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffusers_io, "save_state_dict", fail_after_weights)
    with pytest.raises(OSError, match="No space left"):
        conversion_main(["to-diffusers", str(folders / "flax"), str(out)])
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["back"]  # no temporary folder left behind
    monkeypatch.undo()
    assert conversion_main(["to-diffusers", str(folders / "flax"), str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_malicious_pickle_is_refused_as_a_one_line_error(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(DIFFUSERS_TINY_2, _class_name="UNet2DConditionModel")))
    torch.save({"conv_in.weight": Payload(), "conv_in.bias": torch.zeros(3)}, folder / "diffusion_pytorch_model.bin")
    assert conversion_main(["to-flax", str(folder), str(tmp_path / "out"), "--allow-torch-bin"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: refused to load {folder / 'diffusion_pytorch_model.bin'}: torch.load("
                           "weights_only=True) found more than tensors in it or could not read it (")
    assert "posix.system" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
