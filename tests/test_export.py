"""Export to PyTorch (issue 5): a real Orbax checkpoint of a tiny flow-map UNet -> diffusers folder ->
samples in PyTorch equal to JAX; the stock UNet loads and cannot be misused by a stock pipeline;
export -> import -> export is exact; the sampling CLIs agree.

Tolerances (fp32, CPU): samples max |torch - jax| <= 1e-4 * max(1, max |jax|) (the issue's bound); the
network output of `from_pretrained` against the Flax flow map's prediction: the same bound.
"""

import json
import os

import numpy as np
import pytest
import torch

from conversion.__main__ import main as conversion_main
from conversion.export import export_flow_map
from flowmap_jax.core.export_loading import load_flow_map_export
from flowmap_jax.spec.export_format import FLOWMAP_JSON, read_export
from flowmap_jax.spec.layout import nhwc_to_nchw
from flowmap_jax.spec.sampling_inputs import initial_noise
from flowmap_jax.spec.time_grid import time_grid
from tests import export_helpers as eh

BATCH = 4


def _rel(ref, out):
    return float(np.max(np.abs(np.asarray(out) - np.asarray(ref))) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """{"run", "teacher", "export", "params", "ema"}: a run folder with checkpoints 5 and 7, exported by the CLI."""
    root = tmp_path_factory.mktemp("export")
    teacher = eh.write_teacher(str(root / "teacher"))
    params = eh.random_params(eh.student_config(), seed=0)
    run_dir = eh.write_run(str(root / "run"), teacher, params, params)
    out = str(root / "export")
    assert conversion_main(["export", run_dir, out]) == 0
    return {"root": root, "run": run_dir, "teacher": teacher, "export": out, "params": params}


@pytest.fixture(scope="module")
def loaded(run):
    """The export loaded in both backends (JAX network compiled once for BATCH)."""
    from flowmap_jax import sample as jax_sample
    from torch_ref import sample as torch_sample

    return jax_sample.load_flow_map(run["export"]), torch_sample.load_flow_map(run["export"], device="cpu")


def _inputs(loaded_jax, seed=0, labels=(0, 3, 7, 10)):
    noise, _ = initial_noise(seed, BATCH, eh.SAMPLE_SHAPE)
    table = loaded_jax.export.label_table()
    return noise, {"encoder_hidden_states": table[np.asarray(labels)][:, None, :]}


def test_export_folder(run):
    folder = run["export"]
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors", FLOWMAP_JSON,
                                          "label_embeddings.safetensors"]
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert config["class_embed_type"] == "timestep" and config["time_cond_proj_dim"] == eh.GUIDANCE_DIM
    meta = json.loads(open(os.path.join(folder, FLOWMAP_JSON)).read())
    assert meta["format"] == "flowmap-jax/flow-map" and meta["prediction_type"] == "epsilon"
    assert meta["scheduler_config"] == eh.SCHEDULER_CONFIG
    assert meta["schedule"]["kind"] == "ddpm" and meta["schedule"]["beta_schedule"] == "scaled_linear"
    assert meta["time"]["t_clean"] == -1.0 and meta["time"]["t_noise"] == 999.0
    assert meta["hooks"]["class_labels"]["class_embed_type"] == "timestep"
    assert meta["hooks"]["timestep_cond"]["dim"] == eh.GUIDANCE_DIM
    assert meta["guidance"] == dict(meta["guidance"], teacher_guidance="cfg", scale=2.0, embedded=True,
                                    scale_range=[1.0, 3.0])
    assert meta["conditioning"]["num_labels"] == eh.NUM_LABELS and meta["sample_shape"] == [8, 8, 1]
    prov = meta["provenance"]
    assert prov["step"] == 7 and prov["weights"] == "ema" and prov["teacher"]["path"] == run["teacher"]
    assert [o["name"] for o in prov["objectives"]] == ["eulerian", "pairs"] and prov["date"]
    assert prov["flowmap_jax_version"] and prov["checkpoint"].endswith(os.path.join("checkpoints", "7"))
    # The tensors are the EMA weights of step 7, exactly.
    from conversion import flax_to_state_dict

    want = flax_to_state_dict(eh.checkpoint_params(run["params"], 7, "ema"))
    got = eh.read_tensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_lora_and_merge_flags_on_a_full_run_are_errors(run, tmp_path, capsys):
    """A full fine-tune has no adapters: `export --lora` / `--merge` exit non-zero naming why, writing nothing."""
    for flag in ("--lora", "--merge"):
        capsys.readouterr()
        assert conversion_main(["export", run["run"], str(tmp_path / "out"), flag]) != 0
        assert "fine-tuned every parameter" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_export_raw_params_of_a_given_step(run, tmp_path):
    from conversion import flax_to_state_dict

    out = tmp_path / "raw"
    assert conversion_main(["export", os.path.join(run["run"], "checkpoints", "5"), str(out),
                            "--weights", "params"]) == 0
    want = flax_to_state_dict(eh.checkpoint_params(run["params"], 5, "params"))
    got = eh.read_tensors(out / "diffusion_pytorch_model.safetensors")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert read_export(out).metadata["provenance"]["weights"] == "params"


def test_torch_samples_equal_jax_samples(loaded):
    from flowmap_jax import sample as jax_sample
    from torch_ref import sample as torch_sample

    loaded_jax, loaded_torch = loaded
    schedule = loaded_jax.export.config.schedule
    noise, cond = _inputs(loaded_jax)
    errors = {}
    for jumps in (1, 2, 4):
        grid = time_grid(schedule, jumps)
        x_jax = jax_sample.sample(loaded_jax, noise, grid, cond, guidance_scale=2.5)
        x_torch = torch_sample.sample(loaded_torch, noise, grid, cond, guidance_scale=2.5)
        assert x_jax.shape == x_torch.shape == (BATCH, *eh.SAMPLE_SHAPE) and np.all(np.isfinite(x_jax))
        errors[jumps] = _rel(x_jax, x_torch)
    # Any grid, with re-noising (the same numpy noise in both backends).
    grid = np.array([999.0, 700.5, 301.25, -1.0])
    _, renoise = initial_noise(1, BATCH, eh.SAMPLE_SHAPE, gamma_jumps=2)
    x_jax = jax_sample.sample(loaded_jax, noise, grid, cond, guidance_scale=1.5, gamma=0.5, renoise=renoise)
    x_torch = torch_sample.sample(loaded_torch, noise, grid, cond, guidance_scale=1.5, gamma=0.5, renoise=renoise)
    errors["gamma"] = _rel(x_jax, x_torch)
    print("max |torch - jax| / max(1, max |jax|):", errors)
    assert max(errors.values()) <= 1e-4, errors


def test_from_pretrained_is_the_flow_map_network(run, loaded):
    """A stock from_pretrained UNet told class_labels=t gives the flow map's network output; t matters."""
    from diffusers import UNet2DConditionModel

    from flowmap_jax.core.flow_map import guidance_scale_embedding

    loaded_jax, _ = loaded
    unet = UNet2DConditionModel.from_pretrained(run["export"]).eval()
    noise, cond = _inputs(loaded_jax, seed=2)
    s = np.array([999.0, 800.0, 500.0, 250.0], np.float32)
    t = np.array([-1.0, 400.0, 499.0, 0.0], np.float32)
    w = np.full((BATCH,), 2.0, np.float32)
    embedding = np.array(guidance_scale_embedding(w - 1.0, eh.GUIDANCE_DIM))
    jax_cond = dict(cond, timestep_cond=embedding)
    ref = nhwc_to_nchw(np.asarray(loaded_jax.flow_map.prediction(loaded_jax.params, noise, s, t, jax_cond)))
    with torch.no_grad():
        kwargs = dict(encoder_hidden_states=torch.from_numpy(cond["encoder_hidden_states"]),
                      timestep_cond=torch.from_numpy(embedding))
        x = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(noise)))
        out = unet(x, torch.from_numpy(s), class_labels=torch.from_numpy(t), **kwargs).sample.numpy()
        other = unet(x, torch.from_numpy(s), class_labels=torch.from_numpy(s), **kwargs).sample.numpy()
    assert _rel(ref, out) <= 1e-4
    assert _rel(out, other) > 1e-3  # the target-time hook is live


def test_stock_pipeline_loop_fails_loudly(run, loaded):
    """The loop of StableDiffusionPipeline / LCM pipelines (stock scheduler, UNet called without class_labels)
    raises instead of sampling with a wrong time."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    loaded_jax, _ = loaded
    unet = UNet2DConditionModel.from_pretrained(run["export"]).eval()
    scheduler = DDIMScheduler.from_config(read_export(run["export"]).metadata["scheduler_config"])
    scheduler.set_timesteps(4)
    noise, cond = _inputs(loaded_jax)
    latents = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(noise)))
    ehs = torch.from_numpy(cond["encoder_hidden_states"])
    with torch.no_grad(), pytest.raises(ValueError, match="class_labels should be provided"):
        for t in scheduler.timesteps:
            noise_pred = unet(latents, t, encoder_hidden_states=ehs, timestep_cond=torch.zeros(BATCH, eh.GUIDANCE_DIM),
                              return_dict=False)[0]
            latents = scheduler.step(noise_pred, t, latents).prev_sample


def test_export_import_export_is_exact(run, tmp_path):
    first = run["export"]
    again = tmp_path / "again"
    # Through the CLI (an export folder as the source) and through the API.
    assert conversion_main(["export", first, str(again)]) == 0
    exported = load_flow_map_export(first)
    assert exported.config == read_export(first).config and exported.provenance["step"] == 7
    third = export_flow_map(exported.params, exported.unet_config, exported.config, tmp_path / "third",
                            exported.provenance)
    for folder in (again, third):
        for name in ("diffusion_pytorch_model.safetensors", "label_embeddings.safetensors", "config.json"):
            assert open(os.path.join(first, name), "rb").read() == open(os.path.join(folder, name), "rb").read(), name
        meta_a = json.loads(open(os.path.join(first, FLOWMAP_JSON)).read())
        meta_b = json.loads(open(os.path.join(folder, FLOWMAP_JSON)).read())
        assert {k: v for k, v in meta_a.items() if k != "provenance"} == \
               {k: v for k, v in meta_b.items() if k != "provenance"}
    # The imported tensors are the exported ones, in the Flax layout, dtype kept.
    from conversion import flax_to_state_dict

    tensors = eh.read_tensors(os.path.join(first, "diffusion_pytorch_model.safetensors"))
    for key, value in flax_to_state_dict(exported.params).items():
        assert value.dtype == tensors[key].dtype and np.array_equal(value, tensors[key]), key


def test_sample_clis_agree(run, tmp_path):
    from flowmap_jax import sample as jax_sample
    from torch_ref import sample as torch_sample

    flags = ["--model", run["export"], "--steps", "2", "--batch", str(BATCH), "--seed", "3", "--labels", "1,2",
             "--guidance", "2.5", "--grid-columns", "2"]
    assert torch_sample.main(flags + ["--out", str(tmp_path / "torch"), "--device", "cpu"]) == 0
    assert jax_sample.main(flags + ["--out", str(tmp_path / "jax"), "--device", "cpu"]) == 0
    for name in ("noise.npy", "labels.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "torch" / name), np.load(tmp_path / "jax" / name))
    np.testing.assert_array_equal(np.load(tmp_path / "jax" / "labels.npy"), [1, 2, 1, 2])
    a, b = np.load(tmp_path / "jax" / "samples.npy"), np.load(tmp_path / "torch" / "samples.npy")
    assert a.shape == (BATCH, *eh.SAMPLE_SHAPE) and _rel(a, b) <= 1e-4
    assert (tmp_path / "torch" / "grid.png").stat().st_size > 0
    info = json.loads((tmp_path / "torch" / "sample_info.json").read_text())
    assert info["backend"] == "torch" and info["timesteps"] == [999.0, 499.0, -1.0]


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.1), ("fp16", 0.02)])
def test_torch_low_precision_close_to_fp32(run, loaded, dtype, tol):
    """The UNet in bf16/fp16 (state and coefficients float32): close to fp32 (relative to the output scale)."""
    from torch_ref import sample as torch_sample

    loaded_jax, loaded_torch = loaded
    noise, cond = _inputs(loaded_jax)
    grid = time_grid(loaded_torch.config.schedule, 2)
    low = torch_sample.load_flow_map(run["export"], dtype=dtype, device="cpu")
    ref = torch_sample.sample(loaded_torch, noise, grid, cond)
    out = torch_sample.sample(low, noise, grid, cond)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    assert err < tol, err


@pytest.mark.slow
def test_jax_bf16_close_to_fp32(run, loaded):
    from flowmap_jax import sample as jax_sample

    loaded_jax, _ = loaded
    noise, cond = _inputs(loaded_jax)
    grid = time_grid(loaded_jax.export.config.schedule, 2)
    low = jax_sample.load_flow_map(run["export"], dtype="bf16")
    ref = jax_sample.sample(loaded_jax, noise, grid, cond)
    out = jax_sample.sample(low, noise, grid, cond)
    assert float(np.max(np.abs(out - ref)) / np.max(np.abs(ref))) < 0.1


def test_corrupted_newest_checkpoint_falls_back(run, tmp_path, capsys):
    """Like the trainer's resume: a newest checkpoint whose arrays do not match their fingerprint is
    skipped (said on stdout) for the previous one; asked for by step, it is an error."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    meta_path = copy / "checkpoints" / "7" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = {path: v if path == "train_state/step" else v[:1] + [x * 1.5 + 1.0 for x in v[1:]]
                           for path, v in meta["fingerprint"].items()}
    meta_path.write_text(json.dumps(meta))
    assert conversion_main(["export", str(copy), str(tmp_path / "out")]) == 0
    assert "checkpoint at step 7 is unusable" in capsys.readouterr().out
    assert read_export(tmp_path / "out").metadata["provenance"]["step"] == 5
    assert conversion_main(["export", str(copy), str(tmp_path / "out7"), "--step", "7"]) == 2
    assert "do not match the fingerprint" in capsys.readouterr().err
    assert conversion_main(["export", str(copy), str(tmp_path / "out9"), "--step", "9"]) == 2
    assert "no checkpoint for step 9" in capsys.readouterr().err


def test_format_1_export_loads_and_samples_as_before(run, loaded, tmp_path):
    """A format-1 folder (flowmap.json version 1, no 'parameterization': the teacher's DDIM step with F in
    the teacher's prediction type) still loads in both backends as "teacher_step", and one jump is that
    DDIM step of the network's output (epsilon: (x - sigma_s F) / alpha_s at the clean end, written here),
    the same in JAX and PyTorch; the current export (format 2) names its parameterisation."""
    import shutil

    from flowmap_jax import sample as jax_sample
    from torch_ref import sample as torch_sample

    meta = json.loads((open(os.path.join(run["export"], FLOWMAP_JSON))).read())
    assert meta["format_version"] == 2 and meta["parameterization"] == "angle"
    old = tmp_path / "format1"
    shutil.copytree(run["export"], old)
    meta = dict(meta, format_version=1)
    del meta["parameterization"]
    (old / FLOWMAP_JSON).write_text(json.dumps(meta))
    old_jax, old_torch = jax_sample.load_flow_map(str(old)), torch_sample.load_flow_map(str(old), device="cpu")
    assert old_jax.flow_map.parameterization == old_torch.flow_map.parameterization == "teacher_step"
    assert old_jax.export.config.prediction_type == "epsilon"
    noise, cond = _inputs(old_jax)
    schedule = old_jax.export.config.schedule
    grid = np.array([schedule.t_noise, schedule.t_clean])
    x_jax = jax_sample.sample(old_jax, noise, grid, cond, guidance_scale=2.5)
    x_torch = torch_sample.sample(old_torch, noise, grid, cond, guidance_scale=2.5)
    assert _rel(x_jax, x_torch) <= 1e-4
    # The same network read by the format-2 loader (angle) gives another map; the format-1 jump is the
    # epsilon DDIM step of F: x0_hat = (x - sigma_s F) / alpha_s.
    loaded_jax, _ = loaded
    new = jax_sample.sample(loaded_jax, noise, grid, cond, guidance_scale=2.5)
    assert _rel(new, x_jax) > 1e-2
    import jax.numpy as jnp

    c = jax_sample._cond_arrays(old_jax, cond, 2.5, BATCH)
    f = np.asarray(old_jax.flow_map.prediction(old_jax.params, jnp.asarray(noise), grid[0], grid[1], c))
    from flowmap_jax.core import schedules

    alpha, sigma = (float(v) for v in schedules.alpha_sigma(schedule, grid[0]))
    assert _rel((noise - sigma * f) / alpha, x_jax) <= 1e-4
