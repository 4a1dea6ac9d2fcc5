"""The training step: data parallel over 8 simulated devices = 1 device, FSDP, one compilation.

Stand-in network and loss (tests/train_support.py); the mechanics do not depend on the network.
Tolerance for 8 vs 1 device: float32, the gradient mean is reassociated (pmean of 8 partial means
instead of one mean), so parameters after 10 AdamW steps agree to 1e-5 absolute (measured ~1e-7).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap_jax.core import objectives
from flowmap_jax.training import sharding as sh
from flowmap_jax.training import train_step as ts
from flowmap_jax.training.config import OptimConfig
from tests import train_support

GLOBAL_BATCH = 16


def _batches(n_steps):
    data = train_support.dataset()
    out = []
    for i in range(n_steps):
        idx = (np.arange(GLOBAL_BATCH) * 7 + i * GLOBAL_BATCH) % data.num_examples
        batch = data.get(idx)
        batch["example_id"] = (np.arange(GLOBAL_BATCH) + i * GLOBAL_BATCH).astype(np.int32)
        out.append(batch)
    return out


def _train(mesh, n_steps=10, loss_fn=None, fsdp_min_size=1, microbatches=1):
    params = train_support.init_params()
    optimizer = ts.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=3, weight_decay=0.01), n_steps)
    specs = sh.param_specs(params, mesh, fsdp_min_size)
    state_sharding = ts.state_shardings(params, optimizer, mesh, specs)
    state = ts.init_state(params, optimizer, mesh, specs)
    teacher = {"A": (np.eye(16) * 0.9).astype(np.float32)}
    teacher_specs = sh.param_specs(teacher, mesh, fsdp_min_size)  # split like the student under FSDP
    step = ts.make_train_step(loss_fn or train_support.make_loss(), optimizer, mesh, specs, ema_decay=0.9,
                              state_sharding=state_sharding, teacher_specs=teacher_specs, microbatches=microbatches)
    teacher = sh.put_with_specs(mesh, teacher, teacher_specs)
    rng = jax.random.key(3)
    losses = []
    for batch in _batches(n_steps):
        state, metrics = step(state, teacher, sh.put_batch(mesh, batch), rng)
        losses.append(float(metrics["loss"]))
    return state, losses, step, teacher


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_eight_devices_equal_one_device():
    assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    one, losses_one, *_ = _train(sh.make_mesh(1, 1, jax.devices()[:1]))
    eight, losses_eight, *_ = _train(sh.make_mesh(8, 1))
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
    assert _max_diff(one.params, eight.params) < 1e-5
    assert _max_diff(one.ema_params, eight.ema_params) < 1e-5


def test_microbatches_give_the_same_step():
    """--optim.microbatches M: each device's batch as M sequential microbatches, gradients averaged. Each example
    keeps its own key, so the step is the same up to float reassociation: 1 device with 4 microbatches, 8
    devices with 2 each (per-device batch 2 as 2 x 1) and FSDP 2 x 4 with 2, against 1 device in one piece (same
    1e-5 bound as 8 vs 1 device). A per-device batch that does not divide is refused with the numbers."""
    one, losses_one, *_ = _train(sh.make_mesh(1, 1, jax.devices()[:1]))
    for mesh, m in ((sh.make_mesh(1, 1, jax.devices()[:1]), 4), (sh.make_mesh(8, 1), 2), (sh.make_mesh(2, 4), 2)):
        split, losses_split, *_ = _train(mesh, microbatches=m)
        np.testing.assert_allclose(losses_split, losses_one, rtol=1e-5)
        assert _max_diff(one.params, split.params) < 1e-5, (dict(mesh.shape), m)
        assert _max_diff(one.ema_params, split.ema_params) < 1e-5, (dict(mesh.shape), m)
    with pytest.raises(ValueError, match="per-device batch 2 is not divisible by microbatches=4"):
        _train(sh.make_mesh(8, 1), n_steps=1, microbatches=4)
    with pytest.raises(ValueError, match="microbatches must be >= 1"):
        _train(sh.make_mesh(8, 1), n_steps=1, microbatches=0)


def test_microbatch_count_from_the_size():
    """--optim.microbatch_size is the most examples a device runs at once: 0 or a size no smaller than the
    per-device batch is one pass; a smaller one must divide it."""
    assert [ts.microbatch_count(16, size) for size in (0, 16, 32, 8, 4, 1)] == [1, 1, 1, 2, 4, 16]
    with pytest.raises(ValueError, match="microbatch_size 5 does not divide the per-device batch 16"):
        ts.microbatch_count(16, 5)
    with pytest.raises(ValueError, match=">= 0"):
        ts.microbatch_count(16, -1)


def test_fsdp_shards_parameters_and_matches_data_parallel():
    dp, *_ = _train(sh.make_mesh(8, 1))
    fsdp, _, _, teacher = _train(sh.make_mesh(2, 4))
    kernel = fsdp.params["dense1"]["kernel"]  # (18, 64): split along its 64 columns
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, sh.FSDP_AXIS)
    assert kernel.addressable_shards[0].data.shape == (18, 16)
    mu = fsdp.opt_state[1][0].mu["dense1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    teacher = teacher["A"]  # the frozen teacher is split too, and gathered inside the step
    assert sh.FSDP_AXIS in tuple(teacher.sharding.spec)
    assert max(shard.data.size for shard in teacher.addressable_shards) == 16 * 16 // 4
    assert _max_diff(dp.params, fsdp.params) < 1e-5


def test_step_compiles_once():
    loss = chex.assert_max_traces(train_support.make_loss(), n=1)
    _, _, step, _ = _train(sh.make_mesh(4, 2), n_steps=5, loss_fn=loss)
    assert step._cache_size() == 1


def test_combine_objectives_weights_and_metrics():
    def constant(value):
        return lambda params, teacher, batch, rng: (jnp.float32(value), {"extra": jnp.float32(2 * value)})

    fn = objectives.combine_objectives([("a", 0.5, constant(1.0)), ("b", 2.0, constant(3.0))])
    loss, metrics = fn(None, None, {}, jax.random.key(0))
    assert float(loss) == 0.5 * 1.0 + 2.0 * 3.0
    assert set(metrics) == {"loss", "a/loss", "a/extra", "b/loss", "b/extra"}


def test_schedule_and_ema_warmup():
    schedule = ts.learning_rate_schedule(1.0, 10, 100, "cosine")
    assert float(schedule(0)) == 0.0 and abs(float(schedule(5)) - 0.5) < 1e-6
    assert abs(float(schedule(10)) - 1.0) < 1e-6 and float(schedule(100)) < 1e-6
    assert float(ts.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(ts.ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)


def test_batch_not_divisible_by_devices_is_an_error():
    with pytest.raises(ValueError, match="not divisible"):
        ts.check_batch({"x0": np.zeros((12, 4, 4, 1))}, sh.make_mesh(8, 1))


def test_mesh_sizes_must_match_devices():
    with pytest.raises(ValueError, match="devices"):
        sh.make_mesh(3, 4)
    assert sh.make_mesh(3, 1).size == 3  # one process may use a subset
    with pytest.raises(ValueError, match="--mesh.fsdp 3 does not divide"):
        sh.make_mesh(-1, 3)
