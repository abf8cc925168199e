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

from conftest import device_flags
from swiftformer_jax import sharding, xla_flags


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
# Simulated devices (subprocesses: the device count is fixed when JAX starts). One program trains
# the same tiny network from the same init on 1 device and on the meshes data=4 x fsdp=2
# and fsdp=8, saves the fsdp=8 state, and trains on; a 4-device program restores that checkpoint
# onto data=2 x fsdp=2 and must continue exactly as the 8-device run did.
# ---------------------------------------------------------------------------------------------

MESHES = {"one": None, "data4_fsdp2": (4, 2), "fsdp8": (1, 8)}
STEPS, SAVED_STEP, MORE_STEPS = 8, 8, 3

COMMON = textwrap.dedent(r"""
    import json, os, sys
    sys.path[:0] = [REPO, TESTS]
    import jax, numpy as np
    from conftest import tiny_config
    from swiftformer_jax import checkpoint, sharding, train
    from swiftformer_jax.model import ModelSpec

    config = tiny_config(None, bn_group_size=8, distillation__kind="hard", model__drop_path_rate=0.1)
    config.mesh.fsdp_min_size_mb = 0.0  # shard every leaf that has a dim the fsdp size divides
    spec = train.model_spec(config, 10)
    model = train.build_model(config, spec)
    tx, schedule = train.build_optimizer(config, train.Durations(93, 100, 2, 50, 50, 1), train.abstract_params(model, 32))
    teacher = ModelSpec((1, 1, 1, 1), (8, 8, 8, 8), 10, False).build()
    rs = np.random.RandomState(0)
    abstract = jax.eval_shape(lambda: teacher.init({"params": jax.random.key(7)}, np.zeros((1, 32, 32, 3), np.float32)))
    teacher_vars = jax.tree_util.tree_map(lambda s: rs.normal(0.0, 0.3, s.shape).astype(s.dtype), abstract)
    teacher_vars["batch_stats"] = jax.tree_util.tree_map(np.abs, teacher_vars["batch_stats"])  # variances > 0
    batch_np = {"image": rs.randn(16, 32, 32, 3).astype(np.float32), "label": rs.randint(0, 10, 16).astype(np.int32)}
    out = {"devices": jax.device_count()}

    def save_leaves(name, tree):
        np.savez(os.path.join(OUT, name + ".npz"), *[np.asarray(x) for x in jax.tree_util.tree_leaves(tree)])

    def layout(tree):
        # Per leaf: path, shape, the mesh axis of each dim, the shapes of the device shards, how many devices.
        rows = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            spec = list(leaf.sharding.spec) + [None] * (leaf.ndim - len(leaf.sharding.spec))
            rows.append({"path": jax.tree_util.keystr(path), "shape": list(leaf.shape), "spec": spec,
                         "shards": sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
                         "devices": len(leaf.sharding.device_set)})
        return rows

    def trainer(mesh, state_sh):
        # A function running n train steps on `mesh` on the fixed batch; returns (state, losses).
        teacher_sh = sharding.tree_shardings(teacher_vars, mesh, config.mesh.fsdp_min_size_mb)
        train_step, _ = train.jit_steps(config, model, tx, schedule, 10, teacher, mesh, state_sh, teacher_sh)
        batch = sharding.global_batch(batch_np, sharding.batch_sharding(mesh))
        tv = sharding.put(teacher_vars, teacher_sh)
        out["batch_rows"] = sorted({shard.data.shape[0] for shard in batch["image"].addressable_shards})

        def run(state, n):
            losses = []
            for _ in range(n):
                state, metrics = train_step(state, batch, jax.random.key(2), tv)
                losses.append(float(metrics["loss"]))
            return state, losses
        return run
""")

EIGHT_DEVICES = COMMON + textwrap.dedent(r"""
    for name, shape in MESHES.items():
        mesh = sharding.create_mesh(devices=jax.devices()[:1]) if shape is None else sharding.create_mesh(*shape)
        state, state_sh = train.create_train_state(model, tx, config, mesh, jax.random.key(1))
        save_leaves(name + "_init", state.params)
        init_kernel = np.asarray(state.params["head"]["kernel"])
        run = trainer(mesh, state_sh)
        state, losses = run(state, 1)
        # EMA after one step: init + (1 - decay) * (params - init), in the state.
        p1, ema1 = np.asarray(state.params["head"]["kernel"]), np.asarray(state.ema_params["head"]["kernel"])
        out["ema_decay_0"] = decay = float(train.ema_decay_at(config, 0))
        out[name + "_ema_error"] = float(np.abs(ema1 - (init_kernel + (1 - decay) * (p1 - init_kernel))).max())
        state, more = run(state, STEPS - 1)
        out[name + "_losses"] = losses + more
        out[name + "_batch_rows"] = out.pop("batch_rows")
        out[name + "_layout"] = layout(state)
        for part in ("params", "batch_stats", "ema_params"):
            save_leaves(f"{name}_{part}", getattr(state, part))
        if name == "fsdp8":  # save, then train on: the 4-device program must continue identically
            checkpointer = checkpoint.Checkpointer(os.path.join(OUT, "work"), keep=1, asynchronous=False)
            checkpointer.save(SAVED_STEP, state, spec)
            checkpointer.close()
            save_leaves("saved_state", state)
            save_leaves("saved_params", state.params)
            state, out["continued_losses"] = run(state, MORE_STEPS)
            save_leaves("continued_params", state.params)

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

FOUR_DEVICES = COMMON + textwrap.dedent(r"""
    mesh = sharding.create_mesh(2, 2)
    abstract_state, state_sh = train.abstract_train_state(model, tx, config, mesh, jax.random.key(1))
    checkpointer = checkpoint.Checkpointer(os.path.join(OUT, "work"), keep=1)
    out["latest_step"] = checkpointer.latest_step()
    state = checkpointer.restore(checkpointer.latest_step(), abstract_state)  # the trainer's resume path
    checkpointer.close()
    out["layout"] = layout(state)
    save_leaves("restored_state", state)
    state, out["continued_losses"] = trainer(mesh, state_sh)(state, MORE_STEPS)
    save_leaves("restored_continued_params", state.params)
    print("RESULT " + json.dumps(out))
""")


def _run_devices(program: str, devices: int, out) -> dict:
    code = (f"REPO, TESTS, OUT = {REPO!r}, {TESTS!r}, {str(out)!r}\n"
            f"MESHES, STEPS, SAVED_STEP, MORE_STEPS = {MESHES!r}, {STEPS}, {SAVED_STEP}, {MORE_STEPS}\n" + program)
    env = {**os.environ, "XLA_FLAGS": device_flags(devices)}
    xla_flags.apply(env)  # and the project's XLA:CPU settings, as main.py runs
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _load(path) -> list[np.ndarray]:
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("devices")
    result = _run_devices(EIGHT_DEVICES, 8, out)
    for name in MESHES:
        for part in ("init", "params", "batch_stats", "ema_params"):
            result[f"{name}_{part}"] = _load(out / f"{name}_{part}.npz")
    result["out"] = out
    return result


@pytest.fixture(scope="module")
def restored_on_four(eight_devices):
    out = eight_devices["out"]
    result = _run_devices(FOUR_DEVICES, 4, out)
    for name in ("saved_state", "saved_params", "restored_state", "continued_params", "restored_continued_params"):
        result[name] = _load(out / f"{name}.npz")
    result["eight_continued_losses"] = eight_devices["continued_losses"]
    return result


def expected_spec(shape: list[int], fsdp: int) -> list[str | None]:
    """The documented rule, written out again independently of sharding.leaf_spec (threshold 0 MB
    here): replicated unless fsdp > 1; else the largest dim fsdp divides (the last of equal ones)."""
    spec = [None] * len(shape)
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if fsdp > 1 and divisible:
        spec[max(divisible, key=lambda axis: (shape[axis], axis))] = "fsdp"
    return spec


def check_layout(rows: list[dict], data: int, fsdp: int) -> None:
    assert rows
    for row in rows:
        spec = expected_spec(row["shape"], fsdp)
        assert row["spec"] == spec, row
        shard = [size // fsdp if axis == "fsdp" else size for size, axis in zip(row["shape"], spec)]
        assert row["shards"] == [shard], row  # every device holds exactly its slice
        assert row["devices"] == data * fsdp, row


def test_every_mesh_uses_all_eight_devices_and_splits_the_batch(eight_devices):
    r = eight_devices
    assert r["devices"] == 8
    assert r["one_batch_rows"] == [16]  # 16 images on one device
    for name in ("data4_fsdp2", "fsdp8"):
        assert r[name + "_batch_rows"] == [2], name  # 2 per device, whatever the mesh shape


@pytest.mark.parametrize("name", list(MESHES))
def test_state_shardings_are_what_the_rules_say(eight_devices, name):
    data, fsdp = MESHES[name] or (1, 1)
    rows = eight_devices[name + "_layout"]
    check_layout(rows, data, fsdp)  # params, batch stats, both Adam moments, EMA: every leaf
    by_path = {row["path"]: row for row in rows}
    head = by_path[".params['head']['kernel']"]  # [24, 10], written out by hand
    bias = by_path[".params['head']['bias']"]  # [10]
    expected = {"one": ([None, None], [None]),
                "data4_fsdp2": (["fsdp", None], ["fsdp"]), "fsdp8": (["fsdp", None], [None])}[name]
    assert (head["spec"], bias["spec"]) == expected
    assert head["shards"] == [[24 // fsdp, 10]]
    sharded = sum("fsdp" in row["spec"] for row in rows)
    assert (sharded > len(rows) // 2) if fsdp > 1 else sharded == 0  # fsdp takes most leaves


@pytest.mark.parametrize("name", ["data4_fsdp2", "fsdp8"])
def test_every_mesh_gives_the_loss_and_parameters_of_one_device(eight_devices, name):
    # Same init, same batch, same rng: ghost BN groups (fixed size 8), drop path, the teacher and
    # the loss are global-batch computations, so the mesh changes only the float summation order.
    r = eight_devices
    np.testing.assert_allclose(r[name + "_losses"], r["one_losses"], rtol=1e-5)  # measured: <= 1.2e-7
    for one, other in zip(r["one_init"], r[name + "_init"]):  # the init does not depend on the sharding
        np.testing.assert_array_equal(other, one)
    # Parameters after 8 AdamW steps: Adam divides by sqrt(v), so a leaf whose gradient is at
    # rounding level (biases behind a 1e-5 layer scale) moves by +-lr in a direction the summation
    # order decides. Compare the whole update instead: its difference is a small part of it.
    def relative_gap(part, reference):
        gap = sum(np.sum((other - one) ** 2) for one, other in zip(r["one_" + part], r[name + "_" + part]))
        return np.sqrt(gap / sum(np.sum(x ** 2) for x in reference))

    for part in ("params", "ema_params"):
        moved = [one - init for one, init in zip(r["one_" + part], r["one_init"])]
        assert relative_gap(part, moved) < 0.05, (part, relative_gap(part, moved))  # measured: <= 0.02
    assert relative_gap("batch_stats", r["one_batch_stats"]) < 5e-3  # measured: <= 1e-3


def test_loss_falls_on_a_repeated_batch_with_hard_distillation(eight_devices):
    losses = eight_devices["one_losses"]
    assert losses[-1] < 0.9 * losses[0], losses  # measured: 0.86 after 8 steps


def test_ema_update_is_in_the_train_step(eight_devices):
    assert eight_devices["ema_decay_0"] == pytest.approx(0.1)  # tiny config: warm-up on, 1/10 at step 0
    for name in MESHES:
        assert eight_devices[name + "_ema_error"] < 1e-7, name


def test_checkpoint_from_eight_devices_restores_on_four_with_the_same_values(restored_on_four):
    r = restored_on_four
    assert r["devices"] == 4 and r["latest_step"] == SAVED_STEP
    check_layout(r["layout"], 2, 2)  # resharded on restore: fsdp=8 slices -> data=2 x fsdp=2 slices
    assert len(r["restored_state"]) == len(r["saved_state"])
    for saved, restored in zip(r["saved_state"], r["restored_state"]):  # step, params, moments, EMA
        assert saved.dtype == restored.dtype
        np.testing.assert_array_equal(restored, saved)


def test_training_resumed_on_four_devices_continues_as_on_eight(restored_on_four):
    r = restored_on_four
    np.testing.assert_allclose(r["continued_losses"], r["eight_continued_losses"], rtol=1e-5)  # measured: 1.2e-7
    # The parameters' further movement agrees up to the summation order (see above).
    gap = sum(np.sum((four - eight) ** 2) for four, eight in zip(r["restored_continued_params"], r["continued_params"]))
    moved = sum(np.sum((eight - saved) ** 2) for eight, saved in zip(r["continued_params"], r["saved_params"]))
    assert moved > 0 and np.sqrt(gap / moved) < 0.05, np.sqrt(gap / moved)


def test_batch_not_divisible_by_devices_fails_clearly(eight_devices):
    assert "config.batch_size=12 is not divisible by the 8 devices" in eight_devices["batch_error"]
    assert "config.eval_batch_size=300 is not divisible by the 8 devices" in eight_devices["eval_batch_error"]
    assert "bn_group_size=16" in eight_devices["ghost_error"]
