"""The PyTorch reference stands alone: each public entry point of `torch_ref` runs in a fresh Python process
and leaves `jax` out of `sys.modules`; the specification layer `flowmap_jax.spec` imports neither jax nor
torch. (Each check is a subprocess: the test process itself has jax loaded.)
"""

import os
import subprocess
import sys
import textwrap

import pytest

from flowmap_jax.spec.time_grid import GRID_SPACINGS
from tests import export_helpers as eh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("jax", "jaxlib", "flax", "optax", "orbax", "chex")


PRELUDE = f"""
import sys


def no_framework():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})
    assert not loaded, f"loaded: {{loaded[:10]}}"
"""


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (the checkout first on the path) and returns the result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"




@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    """A tiny exported flow map (cross-attention UNet, label table, guidance input), written through the API."""
    from conversion.export import export_flow_map
    from flowmap_jax.spec.export_format import FlowMapConfig
    from flowmap_jax.spec.schedule import load_scheduler

    root = tmp_path_factory.mktemp("independence")
    teacher = eh.write_teacher(str(root / "teacher"))
    schedule, prediction_type = load_scheduler(eh.SCHEDULER_CONFIG)
    config = FlowMapConfig(schedule=schedule, prediction_type=prediction_type, scheduler_config=eh.SCHEDULER_CONFIG,
                           guidance="cfg", guidance_scale=2.0, guidance_embedding_dim=eh.GUIDANCE_DIM,
                           label_embeddings=os.path.join(teacher, "label_embeddings.safetensors"),
                           sample_shape=eh.SAMPLE_SHAPE)
    params = eh.random_params(eh.student_config())
    return str(export_flow_map(params, eh.student_config(), config, root / "export", {"note": "test"}))


def test_spec_imports_without_jax_or_torch():
    result = _run("""
        import importlib, pkgutil, sys
        import flowmap_jax.spec as spec
        names = [m.name for m in pkgutil.iter_modules(spec.__path__, "flowmap_jax.spec.")]
        assert len(names) >= 10, names
        for name in names:
            importlib.import_module(name)
        no_framework()
        assert "torch" not in sys.modules
        # the log-SNR grid (once computed through JAX) and the sampler's inputs work here too
        from flowmap_jax.spec.schedule import ScheduleConfig
        from flowmap_jax.spec.time_grid import time_grid
        grid = time_grid(ScheduleConfig.ddpm(), 2, spacing="logsnr")
        assert grid[0] == 999 and grid[-1] == -1 and 250 < grid[1] < 350, grid
        no_framework()
        assert "torch" not in sys.modules
    """)
    _check(result)


def test_torch_sample_cli_loads_no_jax(export_folder, tmp_path):
    """`python -m torch_ref.sample` (run as __main__) with every spacing, an explicit grid, and a bad model folder
    (exit code 2), all in one fresh process."""
    runs = [(["--steps", "2", "--spacing", spacing], 0, str(tmp_path / spacing)) for spacing in GRID_SPACINGS]
    runs.append((["--timesteps=999,500,-1"], 0, str(tmp_path / "explicit")))
    runs.append((["--model", str(tmp_path / "missing")], 2, str(tmp_path / "missing_out")))
    result = _run(f"""
        import runpy
        for flags, expected, out in {runs!r}:
            sys.argv = ["torch_ref.sample", "--model", {export_folder!r}, "--batch", "2", "--labels", "1,2",
                        "--guidance", "2.5", "--device", "cpu", "--out", out] + flags
            try:
                runpy.run_module("torch_ref.sample", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit:
                code = exit.code
            assert code == expected, (flags, code)
        no_framework()
    """)
    _check(result)
    for spacing in GRID_SPACINGS + ("explicit",):
        assert (tmp_path / spacing / "samples.npy").is_file() and (tmp_path / spacing / "grid.png").is_file()
    assert not (tmp_path / "missing_out").exists()


def test_torch_export_loading_and_pipeline_load_no_jax(export_folder):
    """Export loading, the conditioning of a batch, the flow-map sampler, a teacher ODE solver and an objective
    (the reference's whole pipeline, on the export and on the Gaussian closed form)."""
    result = _run(f"""
        import importlib, pkgutil, sys
        import numpy as np
        import torch
        import torch_ref
        for module in pkgutil.iter_modules(torch_ref.__path__, "torch_ref."):
            importlib.import_module(module.name)
        from torch_ref import objectives, samplers, schedules
        from torch_ref.export_loading import load_flow_map_export
        from torch_ref.flow_map import FlowMap
        from torch_ref.teacher import Teacher, gaussian_teacher_fn
        from torch_ref.train_digits_teacher import build_unet, parse_args

        loaded = load_flow_map_export({export_folder!r}, device="cpu", dtype="fp32")
        cond = loaded.cond(2, labels=[0, 10], guidance_scale=2.0)  # label 10: the null label
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        grid = schedules.time_grid(loaded.config.schedule, 2, spacing="logsnr")
        with torch.no_grad():
            out = samplers.flow_map_sample(loaded.flow_map, None, x, grid, cond)
        assert out.shape == x.shape and torch.isfinite(out).all()

        schedule = loaded.config.schedule
        teacher = Teacher.create(gaussian_teacher_fn(torch.zeros(4), torch.ones(4), schedule, "epsilon"), schedule,
                                 "epsilon")
        x0 = samplers.ddim_sample(teacher, torch.randn(3, 4), schedules.time_grid(schedule, 4))
        assert torch.isfinite(x0).all()
        net = lambda x, s, t, cond=None: torch.zeros_like(x)  # noqa: E731
        loss_fn = objectives.make_objective("pairs", FlowMap(net, schedule, "epsilon"), {{"teacher_steps": 2}})
        loss, _ = loss_fn(None, teacher, {{"x0": torch.randn(3, 4)}}, 0)
        assert torch.isfinite(loss)
        build_unet(), parse_args(["--out", "unused"])
        no_framework()
    """)
    _check(result)
