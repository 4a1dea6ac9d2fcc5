"""Cheap checks of the benchmark scripts' logic (benchmarks/*.py): plans, FLOP counting, tables, the GPU
script's argument parsing and its fail-fast without a GPU. No timing, no model runs (< 10 s)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bs = _load("backend_speed")
qs = _load("quality_vs_steps")
gc = _load("gpu_check")


# ------------------------------------------------------------------------------------------------
# FLOP counting (backend_speed.count_flops, used for GFLOP/s and the GPU's MFU).

def test_flops_dense_and_batched_matmul():
    assert bs.count_flops(lambda a, w: a @ w, jnp.ones((3, 4)), jnp.ones((4, 5))) == 2 * 3 * 4 * 5
    einsum = lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)
    assert bs.count_flops(einsum, jnp.ones((2, 8, 16, 4)), jnp.ones((2, 8, 32, 4))) == 2 * 2 * 8 * 16 * 32 * 4


def _conv(x, k, stride=1):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_flops_conv_forward_and_gradient():
    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 6))
    forward = 2 * 2 * 8 * 8 * 6 * (3 * 3 * 3)
    assert bs.count_flops(_conv, x, k) == forward
    # gradient w.r.t. input and kernel: the forward plus two transposed convolutions of the same size
    grad = jax.grad(lambda x, k: _conv(x, k).sum(), argnums=(0, 1))
    assert bs.count_flops(grad, x, k) == 3 * forward


def test_flops_scan_counts_every_iteration_and_jit_is_transparent():
    w = jnp.ones((4, 4))
    body = lambda c, _: (c @ w, None)
    fn = jax.jit(lambda x: jax.lax.scan(body, x, None, length=5)[0])
    assert bs.count_flops(fn, jnp.ones((3, 4))) == 5 * 2 * 3 * 4 * 4


def test_flops_with_abstract_inputs():
    spec = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((3, 3, 3, 6), jnp.float32)
    assert bs.count_flops(_conv, *spec) == 2 * 2 * 8 * 8 * 6 * 27


# ------------------------------------------------------------------------------------------------
# backend_speed: configs, round-robin timing, tables.

def test_case_spec_digits_and_batch_override():
    spec = bs.case_spec("digits", batch=3)
    assert spec["batch"] == 3 and spec["unet"]["in_channels"] == 1 and spec["unet"]["cross_attention_dim"] == 32
    assert bs.case_spec("mid")["batch"] == 2 and bs.case_spec("mid")["unet"]["block_out_channels"] == [128, 256, 256]
    with pytest.raises(ValueError, match="unknown config"):
        bs.case_spec("nope")


def test_round_robin_medians_and_errors():
    calls = []

    def ok():
        calls.append("ok")

    def broken():
        raise RuntimeError("no compile here\nsecond line")

    out = bs.time_round_robin({"a": {"forward": ok}, "b": {"forward": broken}}, repeats=3, warmup=2)
    assert len(out["a"]["forward"]["times_s"]) == 3 and "median_s" in out["a"]["forward"]
    assert calls == ["ok"] * 5
    assert out["b"]["forward"]["error"] == "RuntimeError: no compile here"


def test_markdown_table_ratios():
    timings = {"jax": {op: {"median_s": 0.1} for op in bs.OPS},
               "torch eager": {op: {"median_s": 0.2} for op in bs.OPS},
               "torch.compile": {"forward": {"median_s": 0.05}, "train step": {"error": "TorchRuntimeError: x"},
                                 "4-jump sample": {"median_s": 0.3}}}
    table = bs.markdown_table({"timings": timings, "flops": {"forward": 2e9}})
    lines = table.splitlines()
    assert lines[0].startswith("| op | JAX jit (ms) | torch eager (ms) | eager / JAX | torch.compile (ms)")
    assert "| forward | 100.0 | 200.0 | 2.00 | 50.0 | 0.50 | 2.00 | 20.0 |" in lines
    assert "failed: TorchRuntimeError: x" in table


# ------------------------------------------------------------------------------------------------
# quality_vs_steps: the plan of samplers and the target check.

def test_solver_steps_and_nfe():
    assert qs.solver_steps("ddim", 8) == (8, 8)
    assert qs.solver_steps("dpmpp_2m", 50) == (50, 50)
    assert [qs.solver_steps("heun", n) for n in (1, 2, 4, 100)] == [(1, 1), (1, 1), (2, 3), (50, 99)]
    with pytest.raises(ValueError):
        qs.solver_steps("euler", 4)


def test_plan_runs_dedupes_and_keeps_the_reference():
    runs = qs.plan_runs(("ddim", "heun", "dpmpp_2m"), qs.DEFAULT_NFE, (1, 2, 4, 8), 100, True)
    keys = [r["key"] for r in runs]
    assert len(keys) == len(set(keys))
    assert [r["nfe"] for r in runs if r["solver"] == "heun"] == [1, 3, 7, 15, 31, 49, 99]
    assert "dpmpp_2m_100" in keys and "ddim_50" in keys and "flow_map_8" in keys
    assert all(r["unet_passes"] == 2 * r["nfe"] for r in runs if r["kind"] == "teacher")  # guided: 2 passes
    only_ddim = qs.plan_runs(("ddim",), (1, 4), (1,), 100, False)
    assert [r["key"] for r in only_ddim] == ["ddim_1", "ddim_4", "dpmpp_2m_100"]


def test_target_checks():
    rows = [{"key": "ddim_50", "frechet_distance": 10.0}, {"key": "flow_map_2", "frechet_distance": 10.5},
            {"key": "flow_map_4", "frechet_distance": 11.0}]
    lines = qs.target_checks(rows)
    assert "(+5.0%; target <= +10%: met)" in lines[0] and "(+10.0%; target <= +5%: missed)" in lines[1]
    assert qs.target_checks(rows[1:]) == []
    rows.append({"key": "flow_map_logsnr_2", "frechet_distance": 12.0})
    assert "flow map 2 jumps (logsnr grid): Frechet 12 vs teacher DDIM 50 10 (+20.0%; target <= +10%: missed)" \
        in qs.target_checks(rows)


def test_target_checks_of_more_jumps():
    """Issue 26's lines: the MSE must fall with every doubling of the jumps, on each grid; 8 jumps against half
    of DDIM-8 and against DPM-Solver++(2M) at 8; 16 jumps against DPM-Solver++(2M) at 16."""
    def fm(n, mse, spacing="uniform"):
        return {"key": qs.flow_map_key(n, spacing), "kind": "flow_map", "steps": n, "spacing": spacing,
                "mse_to_reference": mse}
    rows = [fm(1, 0.01), fm(2, 0.008), fm(4, 0.004), fm(8, 0.002), fm(16, 0.0025),
            {"key": "ddim_8", "mse_to_reference": 0.005}, {"key": "dpmpp_2m_8", "mse_to_reference": 0.002},
            {"key": "dpmpp_2m_16", "mse_to_reference": 0.0004}, fm(4, 0.003, "logsnr"), fm(8, 0.001, "logsnr")]
    lines = qs.target_checks(rows)
    assert "flow map MSE by jumps: 0.01 (1) > 0.008 (2) > 0.004 (4) > 0.002 (8) > 0.0025 (16): falls with N: missed" \
        in lines
    assert "flow map 8 jumps: MSE 0.002 vs teacher DDIM 8 0.005 (0.40x; target <= 0.5x: met)" in lines
    assert "flow map 8 jumps: MSE 0.002 vs teacher DPM-Solver++(2M) 8 0.002 (1.00x; target <= 1x: met)" in lines
    assert "flow map 16 jumps: MSE 0.0025 vs teacher DPM-Solver++(2M) 16 0.0004 (6.25x; target <= 1x: missed)" \
        in lines
    assert "flow map (logsnr grid) MSE by jumps: 0.003 (4) > 0.001 (8): falls with N: met" in lines


def test_plan_runs_flow_map_grids():
    runs = qs.plan_runs(("ddim",), (50,), (2, 4), 100, True, ("uniform", "logsnr"))
    fm = [(r["key"], r["spacing"], r["solver"]) for r in runs if r["kind"] == "flow_map"]
    assert fm == [("flow_map_2", "uniform", "flow map"), ("flow_map_4", "uniform", "flow map"),
                  ("flow_map_logsnr_2", "logsnr", "flow map (log-SNR grid)"),
                  ("flow_map_logsnr_4", "logsnr", "flow map (log-SNR grid)")]
    with pytest.raises(ValueError, match="unknown flow-map grid 'karras'"):
        qs.plan_runs(("ddim",), (50,), (2,), 100, True, ("karras",))


def test_plan_runs_reference_grid():
    """The MSE reference on the log-SNR grid is its own run (not the uniform dpmpp_2m_100 row)."""
    runs = qs.plan_runs(("dpmpp_2m",), (100,), (2,), 100, False, reference_grid="logsnr")
    assert [(r["key"], r.get("spacing", "uniform")) for r in runs] == [("dpmpp_2m_100", "uniform"),
                                                                        ("dpmpp_2m_logsnr_100", "logsnr")]
    assert qs.reference_key(100) == "dpmpp_2m_100" and qs.reference_key(50, "logsnr") == "dpmpp_2m_logsnr_50"
    assert [r["key"] for r in qs.curves(runs)["dpmpp_2m"]] == ["dpmpp_2m_100"]
    with pytest.raises(ValueError, match="unknown reference grid 'karras'"):
        qs.plan_runs(("ddim",), (50,), (2,), 100, False, reference_grid="karras")


def test_resolve_model_errors(tmp_path):
    with pytest.raises(SystemExit, match="no exported flow map"):
        qs.resolve_model(str(tmp_path), None)
    with pytest.raises(SystemExit, match="not both"):
        qs.resolve_model("a", "b")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "flowmap.json").write_text("{}")
    assert qs.resolve_model(str(tmp_path), None) == tmp_path / "export"
    assert qs.resolve_model(None, None) is None


def test_parse_int_list():
    assert qs.parse_int_list("1,2, 4") == (1, 2, 4)
    for bad in ("", "0,1", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            qs.parse_int_list(bad)


# ------------------------------------------------------------------------------------------------
# gpu_check: CPU-safe parts.

def test_gpu_check_arguments():
    args = gc.build_parser().parse_args(["out", "--batch", "8", "--torch-compile", "all", "--peak-tflops", "500"])
    assert (args.out_dir, args.batch, args.torch_compile, args.peak_tflops, args.budget) == ("out", 8, "all", 500.0, 450.0)
    gc.check_args(args)
    for bad in (["out", "--budget", "10"], ["out", "--skip", "gpu"], ["out", "--batch", "0"]):
        with pytest.raises(SystemExit):
            gc.check_args(gc.build_parser().parse_args(bad))
    with pytest.raises(SystemExit):  # argparse: bad choice
        gc.build_parser().parse_args(["out", "--torch-compile", "maybe"])
    assert args.attention == "default"
    assert gc.build_parser().parse_args(["out", "--attention", "xla"]).attention == "xla"
    with pytest.raises(SystemExit):
        gc.build_parser().parse_args(["out", "--attention", "flash"])


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA GeForce RTX 4090", None)])
def test_bf16_peak_from_device_name(name, peak):
    assert gc.bf16_peak_tflops(name) == peak
    assert gc.bf16_peak_tflops(name, override=123.0) == 123.0


def test_gpu_check_fails_fast_without_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc.shutil, "which", lambda name: None)
    assert gc.main([str(tmp_path / "out")]) == 2
    assert "no usable NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpu_check_report_renders_partial_results():
    args = gc.build_parser().parse_args(["out"])
    results = {"env": {"status": "ok", "seconds": 3.0, "device_name": "NVIDIA H100 80GB HBM3", "bf16_peak_tflops": 989.4},
               "parity": {"status": "ok", "seconds": 60.0, "sd15_forward_rel_err": 2e-5,
                          "eulerian_grad_rel_err": 5e-3},
               "jax": {"status": "cut off at its 170s cap (partial results)", "seconds": 170.0,
                       "rows": [{"backend": "JAX jit (bf16)", "op": "forward", "median_s": 0.05, "images_per_s": 80.0,
                                 "tflops_per_s": 64.0, "mfu": 0.065, "first_s": 40.0}]},
               "torch": {"status": "ok", "seconds": 90.0,
                         "rows": [{"backend": "torch eager (bf16)", "op": "forward", "median_s": 0.06,
                                   "images_per_s": 66.7, "first_s": 2.0}]}}
    text = gc.report(results, args, 330.0)
    assert "2.00e-05 (pass, <= 0.001)" in text and "5.00e-03 (FAIL, <= 0.001)" in text
    assert "| JAX jit (bf16) | forward | 50.0 | 80.0 | 64 | 6.5% | 40.0 |" in text
    assert "torch eager (bf16) / JAX, forward: 1.20" in text


# ------------------------------------------------------------------------------------------------
# Training throughput (benchmarks/train_throughput.py): window selection, table, trainer flags.

tt = _load("train_throughput")


def test_throughput_leaves_out_the_compilation_window():
    records = [{"step": 10, "steps_per_s": 0.05}, {"step": 20, "steps_per_s": 1.0},
               {"step": 30, "steps_per_s": 3.0}, {"step": 40, "steps_per_s": 2.0}]
    assert tt.steady_rate(records) == (2.0, 3)
    with pytest.raises(ValueError, match="too few"):
        tt.steady_rate(records[:1])


def test_throughput_table_and_counts():
    rows = [{"devices": 1, "steps_per_s": 2.0, "examples_per_s": 64.0, "global_batch": 32},
            {"devices": 8, "steps_per_s": 1.0, "examples_per_s": 32.0, "global_batch": 32},
            {"devices": 4, "error": "trainer exit 1: boom"}]
    table = tt.markdown(rows)
    assert "| 8 | 32 | 4 | 1.000 | 32.0 | 0.50 |" in table
    assert "boom" in table
    assert tt.parse_counts("1,8") == (1, 8)
    with pytest.raises(argparse.ArgumentTypeError):
        tt.parse_counts("0,2")


def test_throughput_trainer_flags_parse():
    from flowmap_jax.training import train_cli

    cmd = tt.trainer_command("/tmp/x", 60, 10, ["--objective.names", "eulerian"])
    flags = cmd[cmd.index("flowmap_jax.train") + 1:]
    config = train_cli.parse_args(flags)
    assert config.run.steps == 60 and config.run.quality_samples == 0 and not config.run.export
    assert config.run.compilation_cache == "" and config.objective.names == ("eulerian",)
    assert config.run.checkpoint_every > config.run.steps


def test_throughput_tiny_sd15_arguments_and_commands(tmp_path):
    """--pipeline tiny-sd15: the set-up commands (README.md's tiny-size SD section: the pipeline and images
    written by tests.sd_pipelines, shards by write_shards) and the trainer flags, which parse as the sd15 preset
    on that folder; extra flags come after them (and override them). Nothing is run."""
    from flowmap_jax.training import train_cli

    args, extra = tt.parse_args(["--pipeline", "tiny-sd15", "--", "--optim.lr", "1e-4"])
    assert (args.pipeline, args.devices, args.steps, args.log_every, extra) == ("tiny-sd15", (1, 8), 60, 10,
                                                                               ["--optim.lr", "1e-4"])
    assert tt.parse_args([])[0].pipeline == "digits"
    for bad in (["--pipeline", "tiny-sd21"], ["--steps", "10", "--log-every", "10"], ["--log-every", "0"],
                ["--pipeline", "tiny-sd15", "--devices", "1,3"]):
        with pytest.raises(SystemExit):
            tt.parse_args(bad)
    tt.parse_args(["--pipeline", "tiny-sd15", "--devices", "3", "--", "--data.batch_size", "9"])  # the user's batch
    write, shards = tt.tiny_sd15_setup_commands(tmp_path)
    assert write[1] == "-c" and "write_sd15_pipeline(" in write[2] and "write_captioned_images(" in write[2]
    compile(write[2], "setup", "exec")  # valid Python
    assert shards[1:3] == ["-m", "flowmap_jax.write_shards"]
    assert shards[shards.index("--pipeline") + 1] == str(tmp_path / "tiny_sd15")
    assert shards[shards.index("--out") + 1] == str(tmp_path / "shards")
    assert shards[shards.index("--image-size") + 1] == "32"
    cmd = tt.trainer_command("/tmp/x", 60, 10, tt.tiny_sd15_trainer_flags(tmp_path) + extra)
    config = train_cli.parse_args(cmd[cmd.index("flowmap_jax.train") + 1:])
    assert config.preset == "sd15" and config.objective.names == ("pairs",)
    assert config.teacher.path == str(tmp_path / "tiny_sd15") and config.data.path == str(tmp_path / "shards")
    assert tuple(config.data.sample_shape) == (8, 8, 4) and config.data.batch_size == tt.TINY_SD15_BATCH
    assert config.data.batch_size % 8 == 0 and config.optim.lr == 1e-4
    env = tt.child_env(8)
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8")
    assert env["HF_HUB_OFFLINE"] == "1"
    rows = [{"devices": 1, "pipeline": "tiny-sd15", "steps_per_s": 10.0, "examples_per_s": 80.0, "global_batch": 8}]
    assert "| 1 | 8 | 8 | 10.000 | 80.0 | 1.00 | tiny-sd15 |" in tt.markdown(rows)


# ------------------------------------------------------------------------------------------------
# The full-size SD 1.5 step plan (benchmarks/sd15_step_plan.py): arguments, tables, and the script end to end
# on its --small config (compiled, never run).

sp = _load("sd15_step_plan")
pp = _load("plan_peak")


def test_sd15_plan_arguments():
    args = sp.build_parser().parse_args([])
    sp.check_args(args)
    assert (args.devices, args.batch, args.mode, args.target_step_s) == (8, 256, "both", (1.0, 2.0))
    assert args.fsdp_min_size == 2**18  # the sd15 preset's
    small = sp.build_parser().parse_args(["--small", "--devices", "2"])
    sp.check_args(small)
    assert (small.batch, small.fsdp_min_size) == (16, 2**10)
    with pytest.raises(SystemExit, match="not divisible"):
        sp.check_args(sp.build_parser().parse_args(["--batch", "100"]))
    for bad in ("0,1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            sp.parse_floats(bad)
    assert sp.SD15_UNET_CONFIG["block_out_channels"] == [320, 640, 1280, 1280]
    assert (sp.MODEL_PASSES, sp.HARDWARE_PASSES) == (6, 7)


def test_forward_equivalents_per_objective(tmp_path):
    """UNet-forward equivalents per example, counted by hand: pairs with 8 DPM-Solver++(2M) steps and CFG is
    16 teacher passes + the student's forward, backward (2) and recompute; Heun evaluates twice a step; eulerian
    6 / 7; lagrangian's direct residual backpropagates through primal and tangent (8 / 10); no guidance halves
    the teacher. And --record merges rows by their identity."""
    from flowmap_jax.spec.objective_options import ObjectiveOptions

    options = ObjectiveOptions(teacher_steps=8)
    assert sp.passes(sp.forward_equivalents(("pairs",), options)) == (19, 20)
    assert sp.passes(sp.forward_equivalents(("pairs",), options.updated({"teacher_solver": "heun"}))) == (35, 36)
    assert sp.passes(sp.forward_equivalents(("pairs",), options, guided=False)) == (11, 12)
    assert sp.passes(sp.forward_equivalents(("eulerian",), options)) == (6, 7)
    assert sp.passes(sp.forward_equivalents(("lagrangian",), options)) == (8, 10)
    assert sp.passes(sp.forward_equivalents(("pairs", "eulerian"), options)) == (25, 27)
    # DDPM (SD's schedule): teacher_solve also takes DDIM's step into the clean end, one more guided evaluation;
    # counted independently on the eager torch twin: 8 + 1 teacher calls for 8 DPM-Solver++(2M) steps.
    import torch

    from flowmap_jax.spec.schedule import ScheduleConfig
    from torch_ref import samplers as ts
    from torch_ref import teacher as tt

    schedule = ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012)
    model = tt.gaussian_teacher_fn(torch.tensor(0.0), torch.tensor(1.0), schedule, "epsilon")
    calls = []
    teacher = tt.Teacher.create(lambda *a, **k: calls.append(1) or model(*a, **k), schedule, "epsilon")
    ts.teacher_solve(teacher, torch.zeros(2, 3), torch.tensor([999.0, 500.0]), torch.tensor([-1.0, 0.0]), 8)
    equivalents = sp.forward_equivalents(("pairs",), options, clean_end_step=True)
    assert sp.passes(equivalents) == (21, 22) and len(calls) == 9
    assert sum(v for k, v in equivalents.items() if k.startswith("teacher")) == 2 * len(calls)
    row = {k: 1 for k in sp.RECORD_KEYS}
    path = tmp_path / "plans.json"
    sp.record_rows(path, [dict(row, total_gib=5.0, extra="x")])
    merged = sp.record_rows(path, [dict(row, total_gib=4.0), dict(row, mode="fsdp", total_gib=3.0)])
    assert [(r["mode"], r["total_gib"]) for r in merged] == [(1, 4.0), ("fsdp", 3.0)]
    assert set(sp.RECORD_KEYS) <= set(merged[0]) and merged[0]["detail"] == {}


def test_sd15_plan_mfu_arithmetic():
    """MFU = model FLOPs / (devices x peak x time), worked by hand for one row."""
    row = {"mode": "dp", "xla_flops_per_device": 1.5e14, "xla_flops_per_step": 1.2e15, "analytic_flops_per_step": 1.4e15,
           "xla_vs_analytic": 1.2 / 1.4, "model_flops_per_step": 1.2e15,
           "mfu": {"A100": {"1.0": 1.2e15 / (8 * 312e12)}, "H100": {"1.0": 1.2e15 / (8 * 989e12)}},
           "step_s_at_40pct_mfu": {"A100": 1.2e15 / (8 * 312e12 * 0.4), "H100": 1.2e15 / (8 * 989e12 * 0.4)}}
    table = sp.flops_table([row], (1.0,))
    assert "| eulerian | dp | 6, 7 | 150 | 1200 | 1400 | 0.857 | 1200 | 48.1% | 15.2% | 1.2 | 0.379 |" in table


def _markdown_rows(text, first_column):
    """{header cell: [cells of each row]} of the markdown table whose header starts with `first_column`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return header, rows


@pytest.mark.slow  # ~45 s CPU, minutes on a loaded machine: the compile barely shrinks with the UNet
def test_sd15_plan_small_runs_and_prints_the_table(tmp_path):
    """The script end to end at --small (fsdp on 2 simulated devices; the dp path runs in gpu_check's CPU dry
    run): every column is there and every number positive (generated code is 0 on XLA CPU, which does not
    report it)."""
    import json
    import os
    import subprocess

    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(BENCH / "sd15_step_plan.py"), "--small", "--devices", "2", "--mode",
                           "fsdp", "--fast-compile", "--json", str(out)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, rows = _markdown_rows(proc.stdout, "objective | mode | mesh")
    assert tuple(header) == sp.MEMORY_COLUMNS and [r["mode"] for r in rows] == ["fsdp"]
    for name in sp.MEMORY_COLUMNS[4:]:  # after objective, mode, mesh, batch / device
        value = float(rows[0][name])
        assert value >= 0 if name == "generated code MiB" else value > 0, (name, rows[0][name])
    header, rows = _markdown_rows(proc.stdout, "objective | mode | UNet-forward equivalents / example (model, with recompute)")
    assert tuple(header) == sp.flops_columns((1.0, 2.0))
    for name in header[2:]:  # after objective, mode: UNet-forward equivalents ("21, 22"), then numbers
        cells = rows[0][name].rstrip("%").split(", ")
        assert all(float(cell) > 0 for cell in cells), (name, rows[0][name])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mesh"] == {"data": 1, "fsdp": 2} and row["fsdp_sharded_params"] > 0
    # fsdp: the sharded state is split over 2 devices, so a device holds less than the whole state (4 copies of
    # the student, params + EMA + 2 AdamW moments) plus the replicated teacher.
    assert row["memory"]["argument"] < 4 * (4 * row["student_params"]) + 4 * row["teacher_params"]
    # XLA's FLOP count against the analytic one (forward x 22 passes for pairs on SD's DDPM schedule): XLA's cost
    # analysis counts a loop body once, so the teacher's 8-step solver loop counts as one step: measured 0.46 at
    # this toy size (the elementwise work of tiny layers weighs more), 0.28 at full size
    assert 0.2 < row["xla_vs_analytic"] < 2.0


def test_sd15_plan_small_with_microbatches_and_peak_report(tmp_path):
    """In CI: the --small plan (dp on 2 simulated devices, 8 per device in 2 microbatches of 4) compiles, prints its
    tables and, with --peak-report, what XLA holds at the step's memory peak, read back from its own dump: groups
    whose bytes add up to no more than the values at the peak, and no more than the step's whole footprint."""
    import json
    import os
    import subprocess

    out, dump = tmp_path / "plan.json", tmp_path / "dump"
    proc = subprocess.run([sys.executable, str(BENCH / "sd15_step_plan.py"), "--small", "--devices", "2", "--mode",
                           "dp", "--per-device-batch", "8", "--microbatch-size", "4", "--fast-compile", "--peak-report",
                           str(dump), "--json", str(out)], capture_output=True, text=True, env=dict(os.environ),
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, rows = _markdown_rows(proc.stdout, "objective | mode | mesh")
    assert rows[0]["objective"] == "pairs, 2 microbatches" and rows[0]["batch / device"] == "8"
    (row,) = json.loads(out.read_text())["rows"]
    assert row["microbatches"] == 2
    header, groups = _markdown_rows(proc.stdout, "kind | where")
    assert tuple(header) == ("kind", "where", "GiB", "values", "made at (median position)") and groups
    assert all(g["kind"] in ("forward", "backward", "recompute", "unnamed") or g["kind"].startswith("(other")
               for g in groups), groups
    live, hlo = pp.find_module_files(dump)
    _, _, values = pp.peak_values(live, hlo)
    total = sum(v.size for v in values)
    assert 0 < total <= row["memory"]["total"] + row["memory"]["output"]
    assert sum(g[2] for g in pp.group_peak(values)) == total
    with pytest.raises(ValueError, match="no \\*-live-range.txt"):
        pp.find_module_files(tmp_path)


def test_remat_check_on_xla_cpu():
    """The documented reason the CPU step plans overstate remat'd memory (benchmarks/README.md, stop 25): JAX
    traces the recompute (2 more matrix products), and XLA CPU merges it back into the forward (as many products
    compiled with remat as without). A tripwire: if a JAX/XLA upgrade keeps the recompute, this fails and the
    plans' reading must be redone."""
    r = pp.remat_check()
    assert r["backend"] == "cpu"
    assert (r["traced_with_remat"], r["traced_without"]) == (10, 8)
    assert r["compiled_with_remat"] == r["compiled_without"] and not r["remat_kept"], r


def test_gpu_check_train_step_option_and_report():
    args = gc.build_parser().parse_args(["out", "--train-step", "--train-batch", "16"])
    assert args.train_step and args.train_batch == 16 and "trainstep" in gc.STAGES
    with pytest.raises(SystemExit, match="train-batch"):
        gc.check_args(gc.build_parser().parse_args(["out", "--train-batch", "0"]))
    result = {"status": "ok", "seconds": 300.0, "size": "sd15", "devices": ["cuda:0"],
              "rows": [{"per_device_batch": 32, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"},
                       {"per_device_batch": 16, "memory": {"total": 40 * 2**30, "temp": 30 * 2**30},
                        "peak_bytes_in_use": 42 * 2**30, "median_s": 0.5, "images_per_s": 32.0,
                        "tflops_per_s_per_device": 154.0, "mfu": 0.156, "loss": 0.25, "first_step_s": 3.0,
                        "compile_s": 90.0}]}
    text = "\n".join(gc.trainstep_report(result))
    assert "| 32 | XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory |" in text
    assert "| 16 | 40.00 (30.00) | 42.00 | 0.500 | 32.0 | 154 | 15.6% | 0.25 | 3.0 | 90 |" in text
    assert gc.trainstep_report(None) == []


def _fake_attempt(fits: dict, calls: list):
    """A stand-in for one trainstep attempt process: preset `name` runs at a per-GPU batch <= fits[name] (None:
    never; "timeout": cut off while compiling), else runs out of memory."""
    def attempt(name, per_device, seconds):
        calls.append((name, per_device))
        limit = fits[name]
        if limit == "timeout":
            return {"status": "cut off at its 40s cap (partial results)", "seconds": 40.0, "phase": "compiling",
                    "returncode": None}
        if limit is None or per_device > limit:
            return {"status": "ok", "seconds": 5.0, "phase": "first step", "failure": "out of memory",
                    "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate",
                    "memory": {"total": 90 * 2**30, "temp": 50 * 2**30}, "devices": ["cuda:0"], "objective": "pairs",
                    "lower_s": 1.0, "compile_s": 2.0}
        return {"status": "ok", "seconds": 60.0, "phase": "done", "devices": ["cuda:0"], "objective": "pairs",
                "memory": {"total": 60 * 2**30, "temp": 20 * 2**30}, "peak_bytes_in_use": 61 * 2**30,
                "median_s": 0.5 * per_device, "examples_per_s": 2.0, "tflops_per_s_per_device": 200.0,
                "mfu": 200.0 / 989.4, "loss": 0.25, "first_step_s": 3.0, "first_step_with_compile_s": 95.0,
                "lower_s": 2.0, "compile_s": 90.0}
    return attempt


def test_gpu_check_train_presets_arguments():
    """--train-presets defaults to sd15 and sdxl; each starts at its preset's batch over 8 GPUs (read from the
    preset: sd15 256 -> 32, sdxl 128 -> 16) in its preset's mesh mode (sd15 dp, sdxl fsdp); the CPU dry run uses
    each preset's toy stand-in; --train-batch takes one number or one per preset."""
    from flowmap_jax.training.presets import PRESETS

    args = gc.build_parser().parse_args(["out", "--train-step"])
    gc.check_args(args)
    assert args.train_presets == ("sd15", "sdxl") and args.train_budget == gc.TRAIN_BUDGET
    assert [gc.train_start_batch(args, p) for p in args.train_presets] == [32, 16]
    assert [PRESETS[p]().data.batch_size // 8 for p in args.train_presets] == [32, 16]
    assert [gc.preset_train_plan(p)["mode"] for p in args.train_presets] == ["dp", "fsdp"]
    assert [gc.preset_train_plan(p, dry_run=True)["size"] for p in args.train_presets] == ["small", "small-sdxl"]
    assert sp.SIZES["small-sdxl"]["preset"] == "sdxl" and sp.SIZES["small-sdxl"]["text_embeds"]
    one = gc.build_parser().parse_args(["out", "--train-batch", "4", "--train-presets", "sdxl"])
    assert one.train_presets == ("sdxl",) and gc.train_start_batch(one, "sdxl") == 4
    per = gc.build_parser().parse_args(["out", "--train-batch", "sd15=8"])
    assert [gc.train_start_batch(per, p) for p in per.train_presets] == [8, 16]
    for bad in (["out", "--train-presets", "sd21"], ["out", "--train-presets", "sd15,sd15"], ["out", "--train-presets", ""],
                ["out", "--train-batch", "sd21=4"], ["out", "--train-batch", "x"]):
        with pytest.raises(SystemExit):  # argparse: the type's error
            gc.build_parser().parse_args(bad)
    for bad, match in ((["out", "--train-batch", "sd15=0"], "train-batch"), (["out", "--train-budget", "5"], "train-budget"),
                       (["out", "--train-presets", "sd15", "--train-batch", "sdxl=4"], "not in --train-presets")):
        with pytest.raises(SystemExit, match=match):
            gc.check_args(gc.build_parser().parse_args(bad))


def test_gpu_check_time_window():
    """With --train-step and --skip parity,torch the check ends within env 40 + jax 190 + --train-budget 230 s,
    under 8 minutes; without --train-step within the planned caps (at most --budget)."""
    args = gc.build_parser().parse_args(["out", "--train-step"])
    assert gc.time_window(["env", "jax", "trainstep"], args) == 40 + 190 + gc.TRAIN_BUDGET < 8 * 60
    assert gc.time_window(["env", "trainstep"], args) == 40 + gc.TRAIN_BUDGET
    assert gc.time_window(["env", "parity", "jax", "torch"], args) == 450
    assert gc.time_window(["env", "parity", "jax", "torch", "trainstep"], args) == 450 + gc.TRAIN_BUDGET
    assert gc.time_window(["env", "jax", "pytest"], args) == 450


def test_gpu_check_trainstep_runs_every_preset_and_halves():
    """The stage runs sd15 then sdxl, each halving its batch from its own start on out of memory, each within
    its share of the time; the report has one row per preset (the largest batch that ran, or why none did) and
    lists the batches that failed with their reason."""
    args = gc.build_parser().parse_args(["out", "--train-step"])
    calls = []
    result = gc.run_trainstep(args, None, None, 230.0, attempt=_fake_attempt({"sd15": 8, "sdxl": 2}, calls))
    assert calls == [("sd15", 32), ("sd15", 16), ("sd15", 8), ("sdxl", 16), ("sdxl", 8), ("sdxl", 4), ("sdxl", 2)]
    assert result["status"] == "ok" and list(result["presets"]) == ["sd15", "sdxl"]
    sd15, sdxl = result["presets"]["sd15"], result["presets"]["sdxl"]
    assert (sd15["best"]["per_device_batch"], sdxl["best"]["per_device_batch"]) == (8, 2)
    assert (sd15["mode"], sdxl["mode"]) == ("dp", "fsdp")
    assert sd15["seconds_allowed"] == pytest.approx(230.0 * 2 / 5, abs=1.0)  # sd15's share; sdxl gets the rest
    assert sdxl["seconds_allowed"] > 230.0 * 3 / 5 - 1.0
    text = "\n".join(gc.trainstep_report(dict(result, seconds=100.0)))
    header, rows = _markdown_rows(text, "preset")
    assert tuple(header) == gc.TRAIN_SUMMARY_COLUMNS
    assert [r["preset"] for r in rows] == ["sd15", "sdxl"]  # a missing sdxl row fails here
    assert rows[1]["mode, devices"] == "fsdp, 1" and rows[1]["largest batch / device"] == "2"
    assert (rows[0]["peak in use GiB"], rows[0]["MFU"], rows[0]["first step (s, compile included)"]) == \
        ("61.00", "20.2%", "95.0")
    assert rows[1]["batches that failed"] == "16: out of memory; 8: out of memory; 4: out of memory"
    assert "| 16 | out of memory: XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate " \
           "(while first step) (XLA plan 90.00 GiB, temp 50.00) |" in text


def test_gpu_check_trainstep_failures_keep_to_their_share():
    """A preset that never fits is recorded (no batch; each failure with its reason) and the next preset still
    gets its share; a timeout ends that preset's search and lists the batches not tried."""
    args = gc.build_parser().parse_args(["out", "--train-step"])
    calls = []
    result = gc.run_trainstep(args, None, None, 230.0, attempt=_fake_attempt({"sd15": "timeout", "sdxl": None}, calls))
    assert calls == [("sd15", 32)] + [("sdxl", b) for b in (16, 8, 4, 2, 1)]
    assert result["status"] == "failed: no batch ran for sd15, sdxl"
    sd15 = result["presets"]["sd15"]
    assert sd15["attempts"][0]["outcome"] == "timeout" and sd15["not_tried"] == [16, 8, 4, 2, 1]
    _, rows = _markdown_rows("\n".join(gc.trainstep_report(result)), "preset")
    assert [r["preset"] for r in rows] == ["sd15", "sdxl"] and rows[1]["largest batch / device"] == "none"
    assert rows[0]["batches that failed"] == "32: timeout; 16, 8, 4, 2, 1: not tried (the search stops at a timeout)"
    assert rows[1]["batches that failed"].count("out of memory") == 5
    # Out of time: no attempt starts with less than MIN_ATTEMPT_S left; what was not tried is listed.
    found = gc.search_train_batch("sdxl", 16, 5.0, lambda b, s: pytest.fail("no attempt without time"))
    assert found["attempts"] == [] and found["not_tried"] == [16, 8, 4, 2, 1]
    assert found["not_tried_why"].startswith("timeout: 5s of the preset's 5s left")


def test_gpu_check_attempt_outcomes():
    assert gc.is_out_of_memory("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")
    assert gc.is_out_of_memory("INTERNAL: Failed to allocate 123 bytes") and not gc.is_out_of_memory("TypeError: x")
    assert gc.attempt_outcome({"status": "ok", "error": "TypeError: x", "failure": "error", "phase": "building"}) == \
        ("error", "TypeError: x (while building)")
    assert gc.attempt_outcome({"status": "failed (exit -6, see logs/x.log)", "returncode": -6})[0] == "crashed"
    assert gc.attempt_outcome({"status": "failed (exit 1, see logs/x.log)", "returncode": 1})[0] == "error"
    assert gc.attempt_outcome({"status": "cut off at its 9s cap (partial results)", "seconds": 9.2,
                               "phase": "first step"}) == ("timeout", "cut off after 9s while first step")
    assert gc.attempt_outcome({"status": "ok", "median_s": 1.0}) == ("ok", "")


def test_build_step_one_device_dp_is_fsdp():
    """On one device the dp and fsdp meshes are both 1x1: build_step gives the same program either way (the
    sdxl preset's fsdp on one GPU is sd15's dp), here for the sdxl stand-in, lowered only."""
    devices = jax.devices()[:1]
    texts = {}
    for mode in ("dp", "fsdp"):
        plan = sp.build_step("small-sdxl", mode, 2, devices=devices, fsdp_min_size=2**10)
        assert dict(plan["mesh"].shape) == {"data": 1, "fsdp": 1} and plan["fsdp_sharded_params"] == 0
        assert plan["config"].preset == "sdxl" and plan["objectives"] == ("pairs",)
        texts[mode] = plan["step"].lower(*plan["args"]).as_text()
    assert texts["dp"] == texts["fsdp"]


@pytest.mark.slow  # the two toy steps' compiles: 2-6 min of CPU
def test_gpu_check_cpu_dry_run_runs_both_presets(tmp_path, monkeypatch):
    """gpu_check's CPU dry run of the trainstep stage end to end (one simulated device): both presets' toy steps
    compiled and run, one row each in gpu_check.md, with a batch that ran."""
    import json

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    out = tmp_path / "gc"
    code = gc.main([str(out), "--_cpu-dry-run", "--train-step", "--skip", "parity,jax,torch", "--train-batch", "2",
                    "--repeats", "2", "--train-budget", "1500"])
    text = (out / "gpu_check.md").read_text()
    assert code == 0, text
    _, rows = _markdown_rows(text, "preset")
    assert [r["preset"] for r in rows] == ["sd15 (small)", "sdxl (small-sdxl)"]
    assert all(r["largest batch / device"] == "2" and float(r["examples/s"]) > 0 for r in rows)
    presets = json.loads((out / "gpu_check.json").read_text())["results"]["trainstep"]["presets"]
    assert presets["sdxl"]["best"]["mesh"] == {"data": 1, "fsdp": 1} and presets["sdxl"]["best"]["loss_finite"]


# ------------------------------------------------------------------------------------------------
# jump_error.py: argument checks before any model is loaded.

def test_jump_error_rejects_bad_arguments(tmp_path):
    je = _load("jump_error")
    with pytest.raises(SystemExit, match="--jumps, --num-samples and --segment-steps must be >= 1"):
        je.main(["--run", str(tmp_path), "--jumps", "0"])
    with pytest.raises(SystemExit, match="give --run RUN_DIR or --model EXPORT"):
        je.main([])
    with pytest.raises(SystemExit, match="no exported flow map"):
        je.main(["--run", str(tmp_path)])
