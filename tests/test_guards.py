"""Each guard through a fault that only that guard can see.

- the checkpoint fingerprint: a checkpoint whose arrays are valid (Orbax reads them) but are not what was
  written;
- the joint law of (t_source, t_target) from `time_pairs` (the marginals alone miss a shared random key);
- retention (`keep_checkpoints`) and `--run.resume PATH` (a given step of another run);
- "the JAX side needs no torch": conversion, export, export loading and the JAX sampler in a subprocess
  where `import torch` raises;
- the `--allow-torch-bin` flag of `python -m conversion to-flax`.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap_jax.training import checkpointing, run_record
from flowmap_jax.core import time_pairs
from flowmap_jax.training import sharding as sh
from flowmap_jax.training import train_step as ts
from flowmap_jax.training.config import OptimConfig
from flowmap_jax.spec.schedule import ScheduleConfig
from flowmap_jax.spec.time_pairs import TimePairConfig
from tests import train_support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Checkpoints.

def _state(mesh, bump=0.0, step=0):
    params = jax.tree.map(lambda x: x + bump, train_support.init_params())
    optimizer = ts.make_optimizer(OptimConfig(), 10)
    specs = sh.param_specs(params, mesh, 1)
    shardings = ts.state_shardings(params, optimizer, mesh, specs)
    state = ts.init_state(params, optimizer, mesh, specs).replace(step=jnp.int32(step))
    return state, shardings


def _save(directory, mesh, bumps_by_step, keep=5):
    with checkpointing.Checkpointer(str(directory), keep=keep, async_save=False) as ckpt:
        for step, bump in bumps_by_step.items():
            ckpt.save(_state(mesh, bump, step)[0], jax.random.key(7), data_position=step)


def test_valid_but_altered_arrays_are_caught_by_the_fingerprint_alone(tmp_path):
    """Step 3's arrays replaced by those of another (valid, same-shaped) checkpoint of step 3: Orbax reads
    them without complaint, only the fingerprint in the metadata tells; restore falls back to step 2."""
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save(tmp_path / "run", mesh, {2: 0.5, 3: 0.0})
    _save(tmp_path / "other", mesh, {3: 1.0})
    shutil.rmtree(tmp_path / "run" / "3" / "state")
    shutil.copytree(tmp_path / "other" / "3" / "state", tmp_path / "run" / "3" / "state")
    state, shardings = _state(mesh)
    abstract = checkpointing.abstract_like(state, shardings)
    with checkpointing.Checkpointer(str(tmp_path / "other")) as ckpt:  # the arrays themselves are readable
        other, _, _ = ckpt.restore(abstract, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(other.params["dense1"]["kernel"]),
                                  train_support.init_params()["dense1"]["kernel"] + 1.0)
    said = []
    with checkpointing.Checkpointer(str(tmp_path / "run")) as ckpt:
        restored, _, meta = ckpt.restore(abstract, jax.random.key(0), say=said.append)
        with pytest.raises(checkpointing.NoGoodCheckpoint, match="fingerprint mismatch"):
            ckpt.restore(abstract, jax.random.key(0), step=3, say=lambda _: None)
    assert meta["step"] == 2 and int(restored.step) == 2
    np.testing.assert_array_equal(np.asarray(restored.params["dense1"]["kernel"]),
                                  train_support.init_params()["dense1"]["kernel"] + 0.5)
    assert "step 3" in said[0] and "fingerprint mismatch" in said[0] and "falling back to step 2" in said[0]


def test_fingerprint_tells_a_changed_leaf():
    """fingerprints_match: equal trees match; one element changed by 0.1 in one leaf does not (the match is
    relative, rtol 1e-4 of the sums: it is there for corrupted data, not rounding)."""
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(5)}
    changed = {"a": tree["a"].at[1, 2].add(0.1), "b": tree["b"]}
    base = run_record.fingerprint(tree)
    assert run_record.fingerprints_match(base, run_record.fingerprint(tree))
    assert not run_record.fingerprints_match(base, run_record.fingerprint(changed))


def test_retention_keeps_the_newest(tmp_path):
    mesh = sh.make_mesh(1, 1, jax.devices()[:1])
    _save(tmp_path, mesh, {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}, keep=2)
    with checkpointing.Checkpointer(str(tmp_path), keep=2) as ckpt:
        assert ckpt.steps() == [3, 4]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]


def _env():
    flags = "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=ROOT)


def _train(run_dir, steps, *flags):
    cmd = [sys.executable, "-m", "tests.train_support", "--run.dir", str(run_dir), "--run.steps", str(steps),
           "--run.log_every", "1", "--run.checkpoint_every", "5", "--run.quality_samples", "0",
           "--run.export", "false", *flags]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_keep_checkpoints_and_resume_from_a_given_step_of_another_run(tmp_path):
    """--run.keep_checkpoints 2 leaves the two newest; --run.resume <run>/checkpoints/10 in a new folder
    continues from step 10 (not the newest, 20) with the same losses as the first run, bit for bit. A constant
    learning rate: the default cosine decay ends at --run.steps, which differs between the two runs."""
    first = tmp_path / "first"
    _train(first, 20, "--run.keep_checkpoints", "3", "--optim.schedule", "constant")
    with checkpointing.Checkpointer(str(first / "checkpoints")) as ckpt:
        assert ckpt.steps() == [10, 15, 20]
    second = tmp_path / "second"
    done = _train(second, 13, "--run.resume", str(first / "checkpoints" / "10"), "--run.keep_checkpoints", "1",
                  "--optim.schedule", "constant")
    assert "resumed from step 10" in done.stderr
    losses, reference = _losses(second), _losses(first)
    assert sorted(losses) == [11, 12, 13]
    assert all(losses[k] == reference[k] for k in losses), (losses, reference)
    with checkpointing.Checkpointer(str(second / "checkpoints")) as ckpt:
        assert ckpt.steps() == [13]


# ------------------------------------------------------------------------------------------------
# The joint law of the training time pairs.

def _p_source_above(c, length_power):
    """P(tau_s > c) for d = U^(1 / p), tau_s = d + (1 - d) U' (independent uniforms), by quadrature:
    P = int_0^c p d^(p-1) (1 - c) / (1 - d) dd + (1 - c^p)."""
    d = np.linspace(0.0, c, 200001)
    f = length_power * d ** (length_power - 1) * (1 - c) / (1 - d)
    return float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(d)) + 1 - c ** length_power)


@pytest.mark.parametrize("length_power, p_clean", [(2.0, 0.25), (1.0, 0.5)])
def test_time_pairs_clean_target_is_independent_of_the_source(length_power, p_clean):
    """The clean-end draw is independent of the jump: given t = clean, s has its unconditional law
    (P(s > 0.9) and E[s] computed here), and P(t = clean) = p_clean. A clean draw that reused the source's
    or the length's random numbers would skew s (P(s > 0.9 | t clean) 0.30 -> 0.11 for the default law)."""
    n = 200_000
    schedule = ScheduleConfig.rectified_flow()  # tau = t on [0, 1]
    config = TimePairConfig(length_power=length_power, p_clean=p_clean)
    s, t = (np.asarray(v, np.float64) for v in time_pairs.sample_time_pairs(jax.random.key(11), n, schedule, config))
    clean = t == 0.0
    m = clean.sum()
    assert abs(m / n - p_clean) < 5 * np.sqrt(p_clean * (1 - p_clean) / n)
    expected = _p_source_above(0.9, length_power)
    got = np.mean(s[clean] > 0.9)
    assert abs(got - expected) < 5 * np.sqrt(expected * (1 - expected) / m), (got, expected)
    mean_d = length_power / (length_power + 1)  # E[U^(1/p)]
    mean_s = mean_d + (1 - mean_d) / 2
    assert abs(s[clean].mean() - mean_s) < 5 * np.sqrt(np.var(s) / m), (s[clean].mean(), mean_s)
    # The jumps that are not redirected keep tau_t = tau_s - d >= 0 with d's law: E[d] = p / (p + 1).
    assert abs((s - t)[~clean].mean() - mean_d) < 5 * np.sqrt(np.var(s - t) / (n - m))


# ------------------------------------------------------------------------------------------------
# The JAX side needs no torch.

NO_TORCH_SCRIPT = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    import jax
    import numpy as np

    from conversion import load_diffusers_unet
    from conversion.export import export_flow_map
    from flowmap_jax import sample as jax_sample
    from flowmap_jax.spec.export_format import FlowMapConfig
    from flowmap_jax.spec.sampling_inputs import initial_noise
    from flowmap_jax.spec.schedule import load_scheduler
    from flowmap_jax.spec.time_grid import time_grid
    from flowmap_jax.core.flow_map import add_target_time_hook
    from tests import train_support

    tmp = sys.argv[1]
    teacher = train_support.make_tiny_teacher(tmp + "/tiny")
    config, params = load_diffusers_unet(teacher, subfolder="unet")  # conversion to Flax
    assert config["block_out_channels"] == [8, 16] and "conv_in" in params
    schedule, prediction_type = load_scheduler(teacher + "/scheduler")
    student_config, student_params = add_target_time_hook(config, params, jax.random.key(0))
    flow_map_config = FlowMapConfig(schedule=schedule, prediction_type=prediction_type, sample_shape=(16, 16, 1),
                                    label_embeddings=teacher + "/label_embeddings.safetensors")
    export_flow_map(student_params, student_config, flow_map_config, tmp + "/export")
    loaded = jax_sample.load_flow_map(tmp + "/export")  # export loading into JAX
    noise, _ = initial_noise(0, 2, (16, 16, 1))
    cond = {"encoder_hidden_states": loaded.export.label_table()[np.array([1, 10])][:, None, :]}
    x = jax_sample.sample(loaded, noise, time_grid(schedule, 2), cond)  # the JAX sampler
    assert x.shape == (2, 16, 16, 1) and np.all(np.isfinite(x))
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the torch blocker did not work")
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    print("NO_TORCH_OK")
""")


def test_conversion_export_and_jax_sampling_run_without_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(tmp_path)], check=False, cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "NO_TORCH_OK" in done.stdout, done.stderr[-4000:]


# ------------------------------------------------------------------------------------------------
# --allow-torch-bin.

def test_allow_torch_bin_cli_flag(tmp_path, capsys):
    """`to-flax` refuses a pickle-only folder (exit 2, the file named) and reads it with --allow-torch-bin."""
    pytest.importorskip("torch")
    from conversion.__main__ import main as conversion_main
    from conversion.flax_io import load_flax_params
    from tests.test_unet_parity import DIFFUSERS_TINY
    from tests.unet_helpers import make_torch_unet

    unet = make_torch_unet(DIFFUSERS_TINY)
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert conversion_main(["to-flax", str(tmp_path / "bin"), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "diffusion_pytorch_model.bin" in err
    assert not (tmp_path / "refused").exists()
    assert conversion_main(["to-flax", str(tmp_path / "bin"), str(tmp_path / "flax"), "--allow-torch-bin"]) == 0
    _, params = load_flax_params(tmp_path / "flax")
    np.testing.assert_array_equal(np.asarray(params["conv_in"]["bias"]), unet.conv_in.bias.detach().numpy())
