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
    from flowmap_jax import presets

    cmd = tt.trainer_command("/tmp/x", 60, 10, ["--objective.names", "eulerian"])
    flags = cmd[cmd.index("flowmap_jax.train") + 1:]
    config = presets.parse_args(flags)
    assert config.run.steps == 60 and config.run.quality_samples == 0 and not config.run.export
    assert config.run.compilation_cache == "" and config.objective.names == ("eulerian",)
    assert config.run.checkpoint_every > config.run.steps
