"""Bad inputs of the export, the loaders (JAX and PyTorch) and the sampling CLIs: clear errors that name the
file and the key; a failed export leaves the previous folder in place. No network is run here."""

import json
import os
import shutil

import numpy as np
import pytest

from conversion import ConversionError, save_diffusers_unet
from conversion.__main__ import main as conversion_main
from conversion.export import export_flow_map
from flowmap_jax.core.export_loading import load_flow_map_export
from flowmap_jax.spec.export_format import (
    FLOWMAP_JSON,
    ExportFormatError,
    FlowMapConfig,
    read_export,
)
from flowmap_jax.spec.sampling_inputs import resolve_guidance
from flowmap_jax.spec.schedule import load_scheduler
from tests import export_helpers as eh


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid export (written through the API) and a plain teacher UNet folder."""
    root = tmp_path_factory.mktemp("errors")
    teacher = eh.write_teacher(str(root / "teacher"))
    schedule, prediction_type = load_scheduler(eh.SCHEDULER_CONFIG)
    config = FlowMapConfig(schedule=schedule, prediction_type=prediction_type, scheduler_config=eh.SCHEDULER_CONFIG,
                           guidance="cfg", guidance_scale=2.0, guidance_embedding_dim=eh.GUIDANCE_DIM,
                           label_embeddings=os.path.join(teacher, "label_embeddings.safetensors"),
                           sample_shape=eh.SAMPLE_SHAPE)
    params = eh.random_params(eh.student_config())
    export = export_flow_map(params, eh.student_config(), config, root / "export", {"note": "test"})
    plain_params = eh.random_params(eh.TEACHER_UNET_CONFIG)
    plain = save_diffusers_unet(plain_params, eh.TEACHER_UNET_CONFIG, root / "plain_unet")
    return {"root": root, "export": str(export), "plain": str(plain), "config": config, "params": params}


def _copy(good, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(good["export"], dst)
    return dst


def _edit_json(path, edit):
    data = json.loads(open(path).read())
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _both_loaders_raise(folder, error, match):
    """The JAX importer, the PyTorch loader and read_export all raise `error` matching `match`."""
    from torch_ref.export_loading import load_flow_map_export as torch_load

    for load in (load_flow_map_export, torch_load):
        with pytest.raises(error, match=match):
            load(folder)


def test_plain_unet_folder_is_refused(good, capsys):
    _both_loaders_raise(good["plain"], ExportFormatError, r"flowmap\.json is missing.*class_embed_type")
    from torch_ref import sample as torch_sample

    assert torch_sample.main(["--model", good["plain"], "--out", os.path.join(good["root"], "x")]) == 2
    assert "not a flow-map export" in capsys.readouterr().err


def test_plain_unet_with_a_copied_flowmap_json_is_refused(good, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(good["plain"], folder)
    shutil.copy(os.path.join(good["export"], FLOWMAP_JSON), folder)
    shutil.copy(os.path.join(good["export"], "label_embeddings.safetensors"), folder)
    _both_loaders_raise(folder, ExportFormatError, r"config\.json: key 'class_embed_type' is None")


def test_missing_json_names_the_file(good, tmp_path):
    folder = _copy(good, tmp_path)
    os.remove(folder / FLOWMAP_JSON)
    _both_loaders_raise(folder, ExportFormatError, r"flowmap\.json is missing: .* is not a flow-map export")
    os.remove(folder / "config.json")
    _both_loaders_raise(folder, FileNotFoundError, r"no config\.json in")
    _both_loaders_raise(tmp_path / "nowhere", FileNotFoundError, "no flow-map export folder")


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["schedule"].update(kind="ddim"), r"flowmap\.json: schedule: unknown schedule kind 'ddim'"),
    (lambda m: m["schedule"].update(beta_schedule="cosine"), r"schedule: unsupported beta_schedule 'cosine'"),
    (lambda m: m["schedule"].update(warp=1), r"schedule has unknown key\(s\) \['warp'\]"),
    (lambda m: m.pop("schedule"), r"key 'schedule' is missing"),
    (lambda m: m["schedule"].update(beta_end=0.02), r"scheduler_config describes another schedule.*beta_end"),
    (lambda m: m["scheduler_config"].update(prediction_type="v_prediction"),
     r"scheduler_config has prediction_type 'v_prediction' but 'prediction_type' is 'epsilon'"),
    (lambda m: m.update(prediction_type="noise"), r"key 'prediction_type': unknown prediction type 'noise'"),
    (lambda m: m.update(format="something-else"), r"key 'format' is 'something-else'"),
    (lambda m: m.update(format_version=99), r"key 'format_version' is 99"),
    (lambda m: m["hooks"]["class_labels"].update(class_embed_type="projection"),
     r"hooks\.class_labels\.class_embed_type is 'projection'"),
    (lambda m: m["hooks"]["timestep_cond"].update(dim=8), r"config\.json: key 'time_cond_proj_dim' is 16 .* dim 8"),
    (lambda m: m["conditioning"].update(label_embeddings="gone.safetensors"),
     r"conditioning\.label_embeddings names gone\.safetensors, which is not in"),
])
def test_bad_flowmap_json_names_the_key(good, tmp_path, edit, match):
    folder = _copy(good, tmp_path)
    _edit_json(folder / FLOWMAP_JSON, edit)
    with pytest.raises(ExportFormatError, match=match):
        read_export(folder)
    _both_loaders_raise(folder, ExportFormatError, match)


def test_weights_not_matching_the_config_name_the_key(good, tmp_path):
    from safetensors.numpy import save_file

    folder = _copy(good, tmp_path)
    tensors = eh.read_tensors(folder / "diffusion_pytorch_model.safetensors")
    del tensors["class_embedding.linear_2.weight"]
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing key class_embedding\.linear_2\.weight"):
        load_flow_map_export(folder)
    from torch_ref.export_loading import load_flow_map_export as torch_load

    with pytest.raises(ExportFormatError, match=r"missing key class_embedding\.linear_2\.weight"):
        torch_load(folder)
    os.remove(folder / "diffusion_pytorch_model.safetensors")
    _both_loaders_raise(folder, FileNotFoundError, "no diffusion_pytorch_model.safetensors")


def test_export_refuses_a_unet_without_the_hook(good, tmp_path):
    with pytest.raises(ExportFormatError, match="unet_config: key 'class_embed_type' is None"):
        export_flow_map(eh.random_params(eh.TEACHER_UNET_CONFIG), eh.TEACHER_UNET_CONFIG,
                        good["config"].replace(guidance_embedding_dim=None), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportFormatError, match="'time_cond_proj_dim' is None but flowmap.json's guidance"):
        config = dict(eh.student_config(), time_cond_proj_dim=None)
        export_flow_map(good["params"], config, good["config"], tmp_path / "out")


def test_failed_export_keeps_the_previous_folder(good, tmp_path, monkeypatch):
    import flowmap_jax.training.export_writer as export_module

    folder = _copy(good, tmp_path, "export")
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    real = export_module.atomic_write_bytes

    def failing(path, data):
        if os.path.basename(path) == FLOWMAP_JSON:
            raise OSError("disk full (simulated)")
        return real(path, data)

    monkeypatch.setattr(export_module, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        export_flow_map(good["params"], eh.student_config(), good["config"], folder)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind
    monkeypatch.setattr(export_module, "atomic_write_bytes", real)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace .*other: it is not empty and not a flow-map export"):
        export_flow_map(good["params"], eh.student_config(), good["config"], tmp_path / "other")


def test_export_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert conversion_main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert conversion_main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no run or checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_guidance_rules(good):
    baked = good["config"].replace(guidance_embedding_dim=None)
    assert resolve_guidance(baked, None) is None and resolve_guidance(baked, 2.0) is None
    with pytest.raises(ValueError, match="no guidance input .* guided at scale 2.0"):
        resolve_guidance(baked, 3.0)
    assert resolve_guidance(good["config"], None) == 2.0 and resolve_guidance(good["config"], 4.5) == 4.5


def test_sample_flag_errors(good, tmp_path, capsys):
    from flowmap_jax import sample as jax_sample

    base = ["--model", good["export"], "--out", str(tmp_path / "s")]
    cases = [(["--timesteps", "1200,-1"], "--timesteps=1200.0 is outside the schedule's time range"),
             (["--labels", "12"], "--labels [12] outside 0..9"),
             (["--gamma", "0.5", "--timesteps=-1,999"], "needs a decreasing time grid"),
             (["--guidance", "2.5", "--cond", str(tmp_path / "none.npy")], "--cond: no file")]
    for flags, message in cases:
        assert jax_sample.main(base + flags) == 2, flags
        err = capsys.readouterr().err
        assert message in err, (flags, err)
    assert not (tmp_path / "s").exists()


def test_sample_spacing_flag(good, tmp_path):
    from flowmap_jax import sample as jax_sample
    from flowmap_jax.spec.time_grid import time_grid

    out = tmp_path / "logsnr"
    flags = ["--model", good["export"], "--out", str(out), "--steps", "2", "--spacing", "logsnr", "--batch", "2"]
    assert jax_sample.main(flags) == 0
    info = json.loads((out / "sample_info.json").read_text())
    expected = time_grid(good["config"].schedule, 2, spacing="logsnr")
    np.testing.assert_allclose(info["timesteps"], expected)
    assert info["timesteps"] != time_grid(good["config"].schedule, 2).tolist()


def test_the_trainers_export_call(good, tmp_path):
    """What `assembly.build`'s export hook calls at the end of a run (digits-style: CFG baked in at 2.0)."""
    import json as _json

    from flowmap_jax.training.config import DataConfig, TeacherConfig, TrainConfig
    from flowmap_jax.training.run_provenance import (
        flow_map_config_from_train_config,
        run_provenance,
    )
    from flowmap_jax.spec.target_time_hook import add_target_time_hook_config

    teacher = os.path.join(good["root"], "teacher")
    config = TrainConfig(teacher=TeacherConfig(path=teacher, guidance_scale=2.0),
                                 data=DataConfig(sample_shape=eh.SAMPLE_SHAPE))
    flow_config = add_target_time_hook_config(eh.TEACHER_UNET_CONFIG)  # assembly's student config
    params = eh.random_params(flow_config)
    folder = export_flow_map(params, flow_config, flow_map_config_from_train_config(config), tmp_path / "export",
                             run_provenance(config, 1200, weights="ema"))
    info = read_export(folder)
    assert info.config.guidance == "cfg" and not info.config.guidance_embedded and info.config.guidance_scale == 2.0
    assert info.metadata["provenance"]["step"] == 1200 and info.metadata["provenance"]["objectives"][0]["name"]
    assert _json.loads(open(os.path.join(folder, "config.json")).read()).get("time_cond_proj_dim") is None
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json in"):
        flow_map_config_from_train_config(TrainConfig(teacher=TeacherConfig(
            path=str(tmp_path), scheduler_subfolder="scheduler")))


def test_increasing_timesteps_need_an_explicit_inversion_in_both_samplers(good, tmp_path, capsys):
    """An increasing grid is refused with the same message by both samplers (main: accepted, meaningless
    samples); `--direction invert` with `--init` runs it, from data to noise, and both backends agree."""
    from flowmap_jax import sample as jax_sample
    from torch_ref import sample as torch_sample

    base = ["--model", good["export"], "--batch", "2", "--device", "cpu"]
    messages = []
    for main in (jax_sample.main, torch_sample.main):
        assert main(base + ["--timesteps=-1,500,999", "--out", str(tmp_path / "no")]) == 2
        messages.append(capsys.readouterr().err)
    assert messages[0] == messages[1] == (
        "error: --timesteps -1,500,999 is not strictly decreasing: sampling goes from noise to data (e.g. 999,499,-1); "
        "to invert samples (data to noise) pass --direction invert and --init\n")
    assert jax_sample.main(base + ["--timesteps", "999,999,-1", "--out", str(tmp_path / "no")]) == 2
    assert "is not strictly decreasing" in capsys.readouterr().err
    assert jax_sample.main(base + ["--direction", "invert", "--steps", "2", "--out", str(tmp_path / "no")]) == 2
    assert "--direction invert needs --init FILE.npy" in capsys.readouterr().err
    assert jax_sample.main(base + ["--direction", "invert", "--timesteps", "999,-1", "--out", str(tmp_path / "no")]) == 2
    assert "error: --timesteps 999,-1 is not strictly increasing: --direction invert goes from data to noise" in \
        capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    # Inversion of data in [-1, 1], in both backends from the same --init.
    init = tmp_path / "data.npy"
    np.save(init, np.random.default_rng(0).uniform(-1, 1, (2, *eh.SAMPLE_SHAPE)).astype(np.float32))
    for name, main in (("jax", jax_sample.main), ("torch", torch_sample.main)):
        assert main(base + ["--direction", "invert", "--timesteps=-1,499,999", "--init", str(init),
                            "--out", str(tmp_path / name)]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / name / "noise.npy"), np.load(init))
        info = json.loads((tmp_path / name / "sample_info.json").read_text())
        assert info["timesteps"] == [-1.0, 499.0, 999.0]
    a, b = np.load(tmp_path / "jax" / "samples.npy"), np.load(tmp_path / "torch" / "samples.npy")
    assert a.shape == np.load(init).shape and np.all(np.isfinite(a))
    error = float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(a))))
    print(f"inversion, max |torch - jax| / max(1, max |jax|): {error:.2e}")
    assert error <= 2e-5  # measured 2.2e-06 (fp32, CPU)


def test_the_python_sampling_entry_refuses_an_increasing_grid_as_the_clis_do(good):
    """`flowmap_jax.sample.sample` checks its grid with the CLIs' rule (`spec.time_grid.check_direction`):
    increasing times only with direction="invert"."""
    from flowmap_jax import sample as jax_sample

    loaded = jax_sample.load_flow_map(good["export"], "fp32", "cpu")
    noise = np.zeros((1, *eh.SAMPLE_SHAPE), np.float32)
    with pytest.raises(ValueError, match=r"^timesteps 0,500,999 is not strictly decreasing: sampling goes from "
                                         r"noise to data \(e.g. 999,499,-1\)"):
        jax_sample.sample(loaded, noise, [0, 500, 999])
    cond = {"encoder_hidden_states": np.zeros((1, 1, 32), np.float32)}
    assert jax_sample.sample(loaded, noise, [-1, 999], cond, direction="invert").shape == noise.shape
