"""Per-example keys (`flowmap_jax.core.example_keys`): an objective given a (B,) batch of keys, one per example,
computes on the whole batch what each example would give alone with its own key, and the training step's
compiled program runs the UNet on the device's whole batch, so the attention takes its blocked path where the
logits are large (issue 24: a per-example vmap chose the unblocked path for a batch of 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowmap_jax.core import example_keys
from flowmap_jax.core import flow_map as jf
from flowmap_jax.core import objectives as jo
from flowmap_jax.core import teacher as jt
from flowmap_jax.spec.schedule import ScheduleConfig
from tests import flow_map_helpers as H

SD = ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012)


def test_draw_from_a_key_batch_is_each_example_alone():
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(5))
    together = example_keys.draw(keys, 5, lambda key, n: jax.random.normal(key, (n, 3)))
    alone = np.stack([np.asarray(jax.random.normal(keys[i], (1, 3)))[0] for i in range(5)])
    np.testing.assert_array_equal(np.asarray(together), alone)
    # one key: plain jax.random; split and fold_in per example
    one = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(example_keys.draw(one, 4, lambda k, n: jax.random.uniform(k, (n,)))),
                                  np.asarray(jax.random.uniform(one, (4,))))
    first, second = example_keys.split(keys, 2)
    assert first.shape == (5,) and jnp.all(jax.random.key_data(second[2]) == jax.random.key_data(
        jax.random.split(keys[2], 2)[1]))
    folded = example_keys.fold_in(keys, 4)
    assert jnp.all(jax.random.key_data(folded[1]) == jax.random.key_data(jax.random.fold_in(keys[1], 4)))
    raw = jax.random.split(jax.random.PRNGKey(0), 3)  # raw uint32 keys (3, 2) count as a batch too
    assert example_keys.is_key_batch(raw) and not example_keys.is_key_batch(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="3 per-example keys for a batch of 4"):
        example_keys.draw(raw, 4, lambda k, n: jax.random.uniform(k, (n,)))


@pytest.mark.parametrize("name", ["pairs", "eulerian", "lagrangian", "progressive"])
def test_objective_on_a_key_batch_is_the_mean_of_each_example_alone(name):
    """Times, noise, mid-points and guidance scales all drawn (nothing fixed in the batch): the batched loss with
    per-example keys equals the mean of the single-example losses, each with its own key, and so does its
    gradient. This is the trainer's device-split invariance without a per-example network call."""
    module = H.TorchMLP((2, 2, 2), unit=1000.0, seed=3, context_dim=3)
    net, params = H.jax_mlp(1000.0, context_dim=3), H.mlp_params_to_jax(module)
    fmap = jf.FlowMap(net, SD, "epsilon")
    teacher = jt.Teacher.create(lambda p, x, t, c: net(p, x, t, t, c), params, SD, "epsilon", guidance_scale=2.0,
                                uncond={"context": jnp.zeros((1, 3))})
    options = {"teacher_steps": 3, "guidance_scale_range": (1.0, 3.0)}
    loss = jo.combine_objectives([(name, 1.0, jo.make_objective(name, fmap, options))])
    b = 6
    rng = np.random.default_rng(2)
    batch = {"x0": jnp.asarray(rng.standard_normal((b, 2, 2, 2)), jnp.float32),
             "cond": {"context": jnp.asarray(rng.standard_normal((b, 3)), jnp.float32)}}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(11), i))(jnp.arange(b) + 100)

    def batched(p):
        return loss(p, teacher, batch, keys)[0]

    def alone(p):
        losses = [loss(p, teacher, jax.tree.map(lambda v: v[i:i + 1], batch), keys[i])[0] for i in range(b)]
        return jnp.mean(jnp.stack(losses))

    value, grad = jax.jit(jax.value_and_grad(batched))(params)
    value_alone, grad_alone = jax.jit(jax.value_and_grad(alone))(params)
    # Measured (float reassociation of the batched matmuls): loss relative difference <= 1.3e-7 (lagrangian), 0
    # for pairs; gradient entries within the bounds below (relative to entries of 1e-6 and up, up to 1.1e-3 on
    # near-zero entries, hence the atol).
    np.testing.assert_allclose(float(value), float(value_alone), rtol=1.5e-6)
    for a, c in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_alone)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-6)
    # ... and the keys matter: another set of keys gives another loss.
    other = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(12), i))(jnp.arange(b))
    assert float(loss(params, teacher, batch, other)[0]) != float(value)


def _logit_sizes(jaxpr, tokens: int) -> list[int]:
    """Element counts of every attention-logits product (a dot_general of rank >= 4 whose last axis is the `tokens`
    keys) in a jaxpr and the jaxprs inside it (scan bodies, jit, checkpoint, custom derivatives)."""
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shape = eqn.outvars[0].aval.shape
            if len(shape) >= 4 and shape[-1] == tokens:  # (B, H, T, S), or (vmapped, B, H, T, S)
                sizes.append(int(np.prod(shape)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes += _logit_sizes(inner, tokens)
    return sizes


def test_the_training_loss_takes_the_blocked_attention_for_the_real_batch(monkeypatch):
    """The trainer's loss (`train_step.per_example_loss` over the `pairs` objective, flow map and teacher on the
    embedded digits UNet) with the attention's block size shrunk so that one example's logits stay under the
    blocking threshold and the device's batch of 4 goes over it: no logits product in the program is larger than
    the threshold (the blocked path), where the per-example vmap the step used before computed the whole
    (4, heads, 64, 64) logits at once. Read from the traced program, not from a timing."""
    from flowmap_jax.core import flow_map
    from flowmap_jax.data.teacher_folder import EMBEDDED_DIGITS_TEACHER, load_schedule, resolve_teacher_path
    from flowmap_jax.training import train_step
    from flowmap_jax.training.assembly import load_teacher_unet
    from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig
    from flowmap_jax.unet import attention_kernels as ak

    path = resolve_teacher_path(EMBEDDED_DIGITS_TEACHER)
    unet_config, teacher_params = load_teacher_unet(path, "unet")
    schedule, prediction_type = load_schedule(path, "scheduler")
    config = UNetConfig.from_dict(unet_config)
    heads = unet_config["block_out_channels"][1] // unet_config["attention_head_dim"]  # at the 8x8 level
    tokens = 8 * 8
    monkeypatch.setattr(ak, "block_elements", lambda backend=None: heads * tokens * tokens // ak.CHUNK_WHEN_BLOCKS)
    threshold = ak.CHUNK_WHEN_BLOCKS * ak.block_elements()  # one example's self-attention logits, exactly
    teacher = jt.Teacher.create(jt.unet_teacher_fn(FlaxUNet2DConditionModel(config)), teacher_params, schedule,
                                prediction_type)
    flow_config, params = flow_map.add_target_time_hook(unet_config, teacher_params, jax.random.key(0))
    student = FlaxUNet2DConditionModel(UNetConfig.from_dict(flow_config))
    fmap = jf.FlowMap(flow_map.unet_network(student), schedule, prediction_type)
    objective = jo.make_objective("pairs", fmap, {"teacher_steps": 1})
    b = 4
    batch = {"x0": jnp.zeros((b, 16, 16, 1)), "cond": {"encoder_hidden_states": jnp.zeros((b, 1, 32))},
             "example_id": jnp.arange(b, dtype=jnp.int32)}
    key = jax.random.key(0)

    loss = train_step.per_example_loss(objective)
    sizes = _logit_sizes(jax.make_jaxpr(jax.grad(lambda p: loss(p, teacher, batch, key)[0]))(params).jaxpr, tokens)
    assert sizes and max(sizes) <= threshold, (max(sizes), threshold)

    def vmapped(p):  # the step's loss before: each example alone, under vmap
        inputs = {k: v for k, v in batch.items() if k != "example_id"}
        one = lambda example, i: objective(p, teacher, jax.tree.map(lambda v: v[None], example),
                                           jax.random.fold_in(key, i))[0]
        return jnp.mean(jax.vmap(one)(inputs, batch["example_id"]))

    before = _logit_sizes(jax.make_jaxpr(jax.grad(vmapped))(params).jaxpr, tokens)
    assert max(before) == b * threshold  # the unblocked (4, heads, 64, 64) logits
