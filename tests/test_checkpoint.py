"""Checkpointer (keep last N + best, async, round trip), loading weights of every kind, preemption."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftformer_jax import checkpoint, convert

TINY = checkpoint.ModelInfo("custom", (1, 1, 1, 1), (8, 16, 16, 24), 10, True)


def tiny_variables(info=TINY, seed=0):
    model = info.create()
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map(lambda s: np.abs(rs.normal(0.5, 0.1, s.shape)).astype(s.dtype), abstract)


def fake_state(step, variables):
    """A TrainState-shaped dict (what the trainer saves), with an optimizer-like entry."""
    params, stats = variables["params"], variables["batch_stats"]
    return {
        "step": np.int32(step), "params": params, "batch_stats": stats,
        "opt_state": ({"mu": jax.tree_util.tree_map(np.zeros_like, params)}, ()),
        "ema_params": jax.tree_util.tree_map(lambda x: x * 0.5, params), "ema_batch_stats": stats,
    }


def test_model_info_round_trip_and_create():
    for info in (TINY, dataclasses.replace(TINY, attention_version=1, distillation=False)):
        assert checkpoint.ModelInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    xs = checkpoint.ModelInfo.from_variant("xs", num_classes=5, distillation=False, attention_version=1)
    assert (xs.variant, xs.depths, xs.widths) == ("XS", (3, 3, 6, 4), (48, 56, 112, 220))
    model = xs.create(dtype=jnp.bfloat16)
    assert (model.num_classes, model.distillation, model.attention_version, model.dtype) == (5, False, 1, jnp.bfloat16)
    assert TINY.create().widths == (8, 16, 16, 24)
    with pytest.raises(ValueError, match="unknown SwiftFormer variant"):
        checkpoint.ModelInfo.from_variant("M", num_classes=1, distillation=False)


def test_keeps_the_last_n_and_the_best_and_restores(tmp_path):
    variables = tiny_variables()
    manager = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="eval/accuracy", asynchronous=True)
    accuracy = {2: 0.5, 4: 0.9, 6: 0.7}
    try:
        for step in range(1, 7):
            metrics = {"eval/accuracy": accuracy[step], "eval/loss": 1.0} if step in accuracy else None
            assert manager.save(step, fake_state(step, variables), TINY, metrics=metrics)
        assert not manager.save(6, fake_state(6, variables), TINY)  # already saved
        manager.wait()
        assert list(manager.all_steps()) == [4, 5, 6]  # best (4) + last two
        assert manager.best_step() == 4 and manager.latest_step() == 6
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), fake_state(4, variables))
        restored = manager.restore(4, target)
        assert manager.model_info(4) == TINY
    finally:
        manager.close()
    assert int(restored["step"]) == 4
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(fake_state(4, variables))):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.fixture(scope="module")
def trainer_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    variables = tiny_variables()
    manager = checkpoint.Checkpointer(str(workdir), keep=3, asynchronous=False)
    try:
        manager.save(3, fake_state(3, tiny_variables(seed=1)), TINY)
        manager.save(7, fake_state(7, variables), TINY)
    finally:
        manager.close()
    return str(workdir), variables


@pytest.mark.parametrize("where", ["workdir", "checkpoints", "step"])
def test_load_variables_from_a_trainer_checkpoint(trainer_workdir, where):
    workdir, variables = trainer_workdir
    path = {"workdir": workdir, "checkpoints": os.path.join(workdir, "checkpoints"),
            "step": os.path.join(workdir, "checkpoints", "7")}[where]
    info, loaded = checkpoint.load_variables(path)  # latest step (7) unless a step dir is given
    assert info == TINY
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)
    _, ema = checkpoint.load_variables(path, ema=True)
    np.testing.assert_allclose(ema["params"]["head"]["kernel"], variables["params"]["head"]["kernel"] * 0.5)
    model, classifier_vars, _ = checkpoint.load_classifier(path)
    logits = model.apply(classifier_vars, jnp.zeros((2, 32, 32, 3)), train=False)
    assert logits.shape == (2, 10)


def test_load_variables_from_pytorch_and_imported_checkpoints(tmp_path):
    info = checkpoint.ModelInfo.from_variant("XS", num_classes=1000, distillation=True)
    variables = tiny_variables(info)
    torch_file = tmp_path / "xs.pth"
    convert.write_torch_file(convert.to_torch(variables), torch_file)
    imported = tmp_path / "imported"
    convert.import_checkpoint(torch_file, imported, attention_version=1)
    for path, version in ((torch_file, 2), (imported, 1)):
        loaded_info, loaded = checkpoint.load_variables(str(path))
        assert loaded_info == checkpoint.ModelInfo.from_variant("XS", num_classes=1000, distillation=True,
                                                                attention_version=version)
        np.testing.assert_allclose(loaded["params"]["network_6"]["block_3"]["attn"]["w_g"],
                                   variables["params"]["network_6"]["block_3"]["attn"]["w_g"])
    with pytest.raises(ValueError, match="neither a PyTorch file"):
        checkpoint.load_variables(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        checkpoint.load_variables(str(tmp_path / "missing"))


def test_merge_pretrained_reinitialises_only_heads():
    fresh = tiny_variables(checkpoint.ModelInfo("custom", (1, 1, 1, 1), (8, 16, 16, 24), 3, False), seed=1)
    source = tiny_variables(seed=2)  # 10 classes + dist_head
    merged, notes = checkpoint.merge_pretrained(fresh, source)
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    np.testing.assert_array_equal(merged["params"]["norm"]["scale"], source["params"]["norm"]["scale"])
    np.testing.assert_array_equal(merged["batch_stats"]["norm"]["var"], source["batch_stats"]["norm"]["var"])
    assert any(n.startswith("params/head/kernel re-initialised") for n in notes)
    assert any("params/dist_head" in n for n in notes if n.startswith("not used"))
    other = tiny_variables(checkpoint.ModelInfo("custom", (1, 1, 1, 1), (8, 16, 16, 32), 10, True))
    with pytest.raises(ValueError, match="does not fit the configured network"):
        checkpoint.merge_pretrained(fresh, other)


def test_sigterm_sets_the_stop_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    watcher = checkpoint.PreemptionWatcher()
    try:
        assert not watcher.should_stop(1) and not watcher.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.should_stop(2) and watcher.stop_requested()
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("remove_unfinished", [True, False])
def test_unfinished_saves_are_removed_by_the_trainer_only(tmp_path, remove_unfinished):
    # What a run killed while saving at step 37 (say, on preemption) leaves: a resumed run, saving
    # at other steps, would keep it for good. The name is orbax's temporary-directory naming.
    unfinished = tmp_path / checkpoint.CHECKPOINT_DIR / "37.orbax-checkpoint-tmp"
    (unfinished / checkpoint.STATE_ITEM).mkdir(parents=True)
    (unfinished / checkpoint.STATE_ITEM / "partial").write_text("half a checkpoint")
    checkpointer = checkpoint.Checkpointer(str(tmp_path), keep=1, asynchronous=False,
                                           remove_unfinished=remove_unfinished)
    assert checkpointer.latest_step() is None  # never a step, removed or not
    checkpointer.save(2, fake_state(2, tiny_variables()), TINY)  # orbax finishes its clean-up first
    assert checkpointer.all_steps() == [2]
    checkpointer.close()
    assert unfinished.exists() != remove_unfinished
