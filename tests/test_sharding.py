"""Mesh and sharding rules; the jitted train step on 8 simulated devices against 1 device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from swiftformer_jax import sharding

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


# ---------------------------------------------------------------------------------------------
# Pure rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, fsdp, devices, expected",
    [(-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4)), (8, 1, 8, (8, 1)), (-1, 1, 1, (1, 1))],
)
def test_mesh_shape_resolves_minus_one(data, fsdp, devices, expected):
    assert sharding.mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize(
    "data, fsdp, devices, message",
    [(-1, -1, 8, "at most one"), (3, -1, 8, "does not divide"), (2, 2, 8, "must use them all"),
     (0, 1, 8, "positive size"), (-1, -2, 8, "positive size")],
)
def test_mesh_shape_errors(data, fsdp, devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(data, fsdp, devices)


def test_leaf_spec_replicates_small_and_shards_largest_divisible_dim():
    mb = 2**20
    # Small (under the threshold) or fsdp == 1: replicated.
    assert sharding.leaf_spec((256, 1024), 4, 4, min_size_mb=4.0) == PartitionSpec()
    assert sharding.leaf_spec((2048, 1024), 4, 1, min_size_mb=0.0) == PartitionSpec()
    # Large: the largest dim divisible by the fsdp size.
    assert sharding.leaf_spec((1024, 2048), 4, 4, min_size_mb=4.0) == PartitionSpec(None, "fsdp")
    assert sharding.leaf_spec((3, 3, 512, 1022), 4, 4, min_size_mb=0.0) == PartitionSpec(None, None, "fsdp", None)
    # Nothing divisible, or a scalar: replicated.
    assert sharding.leaf_spec((3, 5, 7), 4, 2, min_size_mb=0.0) == PartitionSpec()
    assert sharding.leaf_spec((), 4, 2, min_size_mb=0.0) == PartitionSpec()
    assert 1024 * 2048 * 4 / mb == 8.0  # the sizes above straddle the 4 MB threshold as intended


def test_tree_shardings_on_one_device_are_replicated():
    mesh = sharding.create_mesh()
    tree = {"a": jax.ShapeDtypeStruct((8, 4), np.float32), "b": np.zeros((3,), np.int32)}
    shardings = sharding.tree_shardings(tree, mesh, min_size_mb=0.0)
    assert all(s.spec == PartitionSpec() for s in jax.tree_util.tree_leaves(shardings))
    abstract = sharding.with_shardings({"a": tree["a"]}, {"a": shardings["a"]})
    assert abstract["a"].sharding == shardings["a"] and abstract["a"].shape == (8, 4)


def test_global_batch_and_batch_size_checks_on_one_device():
    mesh = sharding.create_mesh()
    batch = sharding.global_batch({"image": np.ones((4, 2, 2, 3), np.float32), "mask": np.ones(4, bool)},
                                  sharding.batch_sharding(mesh))
    assert batch["image"].shape == (4, 2, 2, 3) and batch["mask"].dtype == np.bool_
    sharding.check_batch_size("config.batch_size", 3, mesh, 1)
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        sharding.check_batch_size("config.batch_size", 3, mesh, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        sharding.check_batch_size("config.batch_size", 0, mesh, 1)


# ---------------------------------------------------------------------------------------------
# 8 simulated devices (a subprocess: the device count is fixed when JAX starts)
# ---------------------------------------------------------------------------------------------

EIGHT_DEVICES = textwrap.dedent(r"""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path[:0] = [REPO, TESTS]
    import jax, numpy as np
    from conftest import tiny_config
    from swiftformer_jax import checkpoint, sharding, train

    STEPS = 12
    config = tiny_config(None, bn_group_size=8, distillation__kind="hard", model__drop_path_rate=0.1)
    config.mesh.fsdp_min_size_mb = 0.0  # shard every leaf that has an even dim over fsdp
    out = {"devices": jax.device_count()}

    info = train.model_info(config, 10)
    model = train.build_model(config, info)
    steps = train.Durations(93, 100, 2, 50, 50, 1)
    tx, schedule = train.build_optimizer(config, steps, train.abstract_params(model, 32))
    teacher = checkpoint.ModelInfo("custom", (1, 1, 1, 1), (8, 8, 8, 8), 10, False).create()
    rs = np.random.RandomState(0)
    abstract = jax.eval_shape(lambda: teacher.init({"params": jax.random.key(7)}, np.zeros((1, 32, 32, 3), np.float32)))
    teacher_vars = jax.tree_util.tree_map(lambda s: rs.normal(0.0, 0.3, s.shape).astype(s.dtype), abstract)
    teacher_vars["batch_stats"] = jax.tree_util.tree_map(np.abs, teacher_vars["batch_stats"])  # variances > 0
    batch_np = {"image": rs.randn(16, 32, 32, 3).astype(np.float32), "label": rs.randint(0, 10, 16).astype(np.int32)}

    for name, mesh in (("one", sharding.create_mesh(devices=jax.devices()[:1])), ("eight", sharding.create_mesh(4, 2))):
        state, state_sh = train.create_train_state(model, tx, config, mesh, jax.random.key(1))
        teacher_sh = sharding.tree_shardings(teacher_vars, mesh, config.mesh.fsdp_min_size_mb)
        train_step, _ = train.jit_steps(config, model, tx, schedule, 10, teacher, mesh, state_sh, teacher_sh)
        batch = sharding.global_batch(batch_np, sharding.batch_sharding(mesh))
        tv = jax.device_put(teacher_vars, teacher_sh)
        init_kernel = np.asarray(state.params["head"]["kernel"])
        np.savez(os.path.join(OUT, name + "_init.npz"), *[np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)])
        losses = []
        for i in range(STEPS):
            state, metrics = train_step(state, batch, jax.random.key(2), tv)
            losses.append(float(metrics["loss"]))
            if i == 0:  # EMA after one step: init + (1 - decay) * (params - init), in the state
                p1 = np.asarray(state.params["head"]["kernel"])
                ema1 = np.asarray(state.ema_params["head"]["kernel"])
                decay = float(train.ema_decay_at(config, 0))
                out[name + "_ema_error"] = float(np.abs(ema1 - (init_kernel + (1 - decay) * (p1 - init_kernel))).max())
                out["ema_decay_0"] = decay
        out[name + "_losses"] = losses
        out[name + "_batch_rows"] = sorted({shard.data.shape[0] for shard in batch["image"].addressable_shards})
        out[name + "_sharded_leaves"] = sum(
            "fsdp" in tuple(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.params))
        out[name + "_num_leaves"] = len(jax.tree_util.tree_leaves(state.params))
        for part in ("params", "batch_stats", "ema_params"):
            np.savez(os.path.join(OUT, f"{name}_{part}.npz"), *[np.asarray(x) for x in jax.tree_util.tree_leaves(getattr(state, part))])

    mesh = sharding.create_mesh(-1, 1)
    for key, kwargs in (("batch_error", dict(batch_size=12, bn_group_size=0)),
                        ("eval_batch_error", dict(eval_batch_size=300)),
                        ("ghost_error", dict(batch_size=24, bn_group_size=16))):
        try:
            train.check_batch_sizes(tiny_config(None, mixup__mixup_alpha=0.0, mixup__cutmix_alpha=0.0, **kwargs), mesh, 1)
            out[key] = None
        except train.ConfigError as error:
            out[key] = str(error)
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight")
    code = f"REPO, TESTS, OUT = {REPO!r}, {TESTS!r}, {str(out)!r}\n" + EIGHT_DEVICES
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for name in ("one", "eight"):
        for part in ("init", "params", "batch_stats", "ema_params"):
            with np.load(out / f"{name}_{part}.npz") as arrays:
                result[f"{name}_{part}"] = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return result


def test_eight_devices_really_split_batch_and_state(eight_devices):
    r = eight_devices
    assert r["devices"] == 8
    assert r["one_batch_rows"] == [16] and r["eight_batch_rows"] == [2]  # 16 images, 2 per device
    assert r["one_sharded_leaves"] == 0
    assert r["eight_sharded_leaves"] > r["eight_num_leaves"] // 2  # fsdp took most leaves


def test_eight_devices_give_the_loss_of_one_device(eight_devices):
    # Same init, same batch, same rng: ghost BN groups, drop path, the teacher and the loss are
    # global-batch computations, so the device count changes only the float summation order.
    r = eight_devices
    np.testing.assert_allclose(r["eight_losses"], r["one_losses"], rtol=1e-5)  # measured: 1e-7
    for one, eight in zip(r["one_init"], r["eight_init"]):  # the init does not depend on the sharding
        np.testing.assert_array_equal(eight, one)
    # Parameters after 12 AdamW steps: Adam divides by sqrt(v), so a leaf whose gradient is at
    # rounding level (biases behind a 1e-5 layer scale) moves by +-lr in a direction the summation
    # order decides. Compare the whole update instead: its difference is a small part of it.
    def relative_gap(part, reference):
        gap = sum(np.sum((eight - one) ** 2) for one, eight in zip(r["one_" + part], r["eight_" + part]))
        return np.sqrt(gap / sum(np.sum(x ** 2) for x in reference))

    for part in ("params", "ema_params"):
        moved = [one - init for one, init in zip(r["one_" + part], r["one_init"])]
        assert relative_gap(part, moved) < 0.05, (part, relative_gap(part, moved))  # measured: 0.02
    assert relative_gap("batch_stats", r["one_batch_stats"]) < 5e-3  # measured: 1e-3


def test_loss_falls_on_a_repeated_batch_with_hard_distillation(eight_devices):
    losses = eight_devices["one_losses"]
    assert losses[-1] < 0.85 * losses[0], losses


def test_ema_update_is_in_the_train_step(eight_devices):
    assert eight_devices["ema_decay_0"] == pytest.approx(0.1)  # tiny config: warm-up on, 1/10 at step 0
    assert eight_devices["one_ema_error"] < 1e-7
    assert eight_devices["eight_ema_error"] < 1e-7


def test_batch_not_divisible_by_devices_fails_clearly(eight_devices):
    assert "config.batch_size=12 is not divisible by the 8 devices" in eight_devices["batch_error"]
    assert "config.eval_batch_size=300 is not divisible by the 8 devices" in eight_devices["eval_batch_error"]
    assert "bn_group_size=16" in eight_devices["ghost_error"]
