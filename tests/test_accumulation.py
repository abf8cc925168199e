"""Gradient accumulation: the update over micro-batches equals the one-shot update with ghost batch
norm over groups of the micro-batch, and the compiled step holds one micro-batch's activations."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from swiftformer_jax import sharding, train

BATCH, MICRO = 16, 4


def compiled_step(config, run, state, batch):
    step = jax.jit(train.make_train_step(config, run.model, run.tx, run.schedule, run.data.num_classes),
                   donate_argnums=0)
    return step.lower(state, batch, jax.random.key(1), None).compile()


@pytest.fixture(scope="module")
def steps(digits_data_dir):
    """{name: (config, compiled step, memory analysis)} for the one-shot and accumulated steps, and
    the inputs they share."""
    # Mixup/cutmix on (drawn on the whole batch either way), no drop path (drawn per micro-batch).
    common = dict(batch_size=BATCH, bn_group_size=MICRO, mixup__mixup_alpha=0.8, mixup__cutmix_alpha=1.0,
                  mixup__group_size=MICRO)
    configs = {"one-shot": tiny_config(digits_data_dir, **common),
               "accumulated": tiny_config(digits_data_dir, microbatch_size=MICRO, **common),
               "one micro-batch": tiny_config(digits_data_dir, **{**common, "batch_size": MICRO})}
    run = train.setup(configs["one-shot"])
    rng = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.randint(0, 10, BATCH), jnp.int32)}
    small = {k: v[:MICRO] for k, v in batch.items()}
    out = {}
    for name, config in configs.items():
        state, _ = train.create_train_state(run.model, run.tx, config, run.mesh, jax.random.key(0))
        compiled = compiled_step(config, train.setup(config), state, small if name == "one micro-batch" else batch)
        out[name] = (config, compiled, compiled.memory_analysis())
    return run, batch, out


def test_microbatches_take_each_shards_slice():
    x = jnp.arange(16)
    np.testing.assert_array_equal(train.microbatches(x, 4, 1), np.arange(16).reshape(4, 4))
    # Two shards ([0..7], [8..15]): micro-batch k holds each shard's k-th pair.
    np.testing.assert_array_equal(train.microbatches(x, 4, 2)[1], [2, 3, 10, 11])


def test_accumulated_update_equals_the_one_shot_update(steps):
    run, batch, compiled = steps
    results = {}
    for name in ("one-shot", "accumulated"):
        config, step, _ = compiled[name]
        state, _ = train.create_train_state(run.model, run.tx, config, run.mesh, jax.random.key(0))
        new_state, metrics = step(state, batch, jax.random.key(1), None)
        results[name] = jax.device_get((new_state, metrics))
    (one, one_metrics), (acc, acc_metrics) = results["one-shot"], results["accumulated"]
    np.testing.assert_allclose(acc_metrics["loss"], one_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc_metrics["grad_norm"], one_metrics["grad_norm"], rtol=1e-5)
    # Adam's first moment is (1 - b1) * gradient: the gradients agree to float32 rounding.
    mu_one = jax.tree_util.tree_leaves(one.opt_state)
    mu_acc = jax.tree_util.tree_leaves(acc.opt_state)
    scale = max(float(np.max(np.abs(x))) for x in mu_one if np.ndim(x))
    for a, b in zip(mu_acc, mu_one):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)  # biases before a BN: 0 up to rounding
    for a, b in zip(jax.tree_util.tree_leaves(acc.batch_stats), jax.tree_util.tree_leaves(one.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The parameters follow from these through the same optimizer. (Compared directly they differ
    # by up to the learning rate where a gradient is 0 up to rounding: Adam's first step is
    # lr * sign(g).)


def test_accumulated_step_holds_one_micro_batch_of_activations(steps):
    _, _, compiled = steps
    temp = {name: memory.temp_size_in_bytes for name, (_, _, memory) in compiled.items()}
    # The whole batch at once needs about BATCH / MICRO times one micro-batch's temporaries;
    # accumulating keeps close to one micro-batch's (plus the gradient sums).
    assert temp["one-shot"] > 2.5 * temp["one micro-batch"], temp
    assert temp["accumulated"] < 1.5 * temp["one micro-batch"], temp


@pytest.mark.parametrize("overrides, message", [
    (dict(microbatch_size=5), "does not split into micro-batches"),
    (dict(microbatch_size=4, bn_group_size=0), "set config.bn_group_size to 4"),
    (dict(microbatch_size=4, bn_group_size=8), "set config.bn_group_size to 4"),
    (dict(microbatch_size=-1), "config.microbatch_size must be >= 0"),
])
def test_bad_micro_batches_fail_clearly(overrides, message, digits_data_dir):
    config = tiny_config(digits_data_dir, **overrides)
    with pytest.raises(train.ConfigError, match=message):
        run = train.setup(config)
        train.check_batch_sizes(config, run.mesh, 1)


def test_micro_batches_must_split_over_the_batch_devices(digits_data_dir):
    eight_devices = types.SimpleNamespace(devices=np.empty(8), shape={"data": 4, "fsdp": 2})  # what the check reads
    assert sharding.batch_shards(eight_devices) == 8
    config = tiny_config(digits_data_dir, batch_size=64, microbatch_size=4, bn_group_size=4)
    with pytest.raises(train.ConfigError, match="microbatch_size=4 does not split over the 8 devices"):
        train.check_batch_sizes(config, eight_devices, 1)
    train.check_batch_sizes(tiny_config(digits_data_dir, batch_size=64, microbatch_size=16, bn_group_size=8),
                            eight_devices, 1)
