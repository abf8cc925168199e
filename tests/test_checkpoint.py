"""Checkpointer (keep last N + best, async, round trip), loading weights of every kind, preemption."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftformer_jax import checkpoint, convert
from swiftformer_jax.model import ModelSpec

TINY = ModelSpec((1, 1, 1, 1), (8, 16, 16, 24), 10, True)


def tiny_variables(info=TINY, seed=0):
    model = info.build()
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


def test_the_spec_is_saved_with_the_checkpoint_and_read_back(tmp_path):
    for spec in (TINY, dataclasses.replace(TINY, attention_version=1, distillation=False, image_size=64)):
        assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    manager = checkpoint.Checkpointer(os.path.join(tmp_path, "c"), keep=1, asynchronous=False)
    try:
        manager.save(1, fake_state(1, tiny_variables()), TINY)
        assert manager.spec(1) == TINY
    finally:
        manager.close()
    assert checkpoint.read_spec(checkpoint.find_step_dir(tmp_path / "c")) == TINY


def test_keeps_the_last_n_and_the_best_and_restores(tmp_path):
    variables = tiny_variables()
    manager = checkpoint.Checkpointer(os.path.join(tmp_path, checkpoint.CHECKPOINT_DIR), keep=2, best_metric="eval/accuracy", asynchronous=True)
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
        assert manager.spec(4) == TINY
    finally:
        manager.close()
    assert int(restored["step"]) == 4
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(fake_state(4, variables))):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.fixture(scope="module")
def trainer_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    variables = tiny_variables()
    manager = checkpoint.Checkpointer(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), keep=3, asynchronous=False)
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
    model, classifier_vars, spec = checkpoint.load_checkpoint(path)
    logits = model.apply(classifier_vars, jnp.zeros((2, 32, 32, 3)), train=False)
    assert logits.shape == (2, 10) and spec == TINY


def test_load_variables_from_pytorch_and_imported_checkpoints(tmp_path):
    spec = ModelSpec.named("XS", num_classes=1000, distillation=True)
    variables = tiny_variables(spec)
    torch_file = tmp_path / "xs.pth"
    convert.write_torch_file(convert.to_torch(variables), torch_file)
    imported = tmp_path / "imported"
    convert.import_checkpoint(torch_file, imported, attention_version=1)
    # The import is a checkpoint directory like the trainer's: one step (0), its state and spec.
    assert sorted(p.name for p in imported.iterdir() if not p.name.startswith(".")) == ["0"]
    assert {checkpoint.STATE_ITEM, checkpoint.MODEL_ITEM} <= {p.name for p in (imported / "0").iterdir()}
    for path, version in ((torch_file, 2), (imported, 1), (imported / "0", 1)):
        loaded_spec, loaded = checkpoint.load_variables(str(path))
        assert loaded_spec == dataclasses.replace(spec, attention_version=version)
        np.testing.assert_allclose(loaded["params"]["network_6"]["block_3"]["attn"]["w_g"],
                                   variables["params"]["network_6"]["block_3"]["attn"]["w_g"])
    with pytest.raises(ValueError, match="no EMA weights"):
        checkpoint.load_variables(imported, ema=True)
    with pytest.raises(ValueError, match="neither a checkpoint directory of this package"):
        checkpoint.load_variables(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        checkpoint.load_variables(str(tmp_path / "missing"))


def test_directories_of_the_earlier_layouts_still_load(tmp_path):
    """What earlier versions wrote: an import as `metadata.json` + `state/`, and trainer steps
    whose model JSON has neither `features_only` nor `image_size`."""
    import orbax.checkpoint as ocp

    spec = ModelSpec.named("XS", num_classes=1000, distillation=True, attention_version=1)
    variables = tiny_variables(spec)
    legacy = tmp_path / "legacy-import"
    legacy.mkdir()
    with ocp.StandardCheckpointer() as saver:
        saver.save((legacy / "state").resolve(), variables)
    (legacy / "metadata.json").write_text(json.dumps({
        "format": "swiftformer-jax/imported-checkpoint", "format_version": 1, "variant": "XS",
        "num_classes": 1000, "distillation": True, "features_only": False, "attention_version": 1,
        "source": {"file": "/x/swiftformer_xs.pth", "sha256": "0" * 64, "naming": "official", "entry": None},
    }))
    model, loaded, loaded_spec = checkpoint.load_checkpoint(legacy)
    assert loaded_spec == spec and model.attention_version == 1
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)

    trainer = tmp_path / "trainer" / checkpoint.CHECKPOINT_DIR
    manager = checkpoint.Checkpointer(str(trainer), keep=1, asynchronous=False)
    try:
        manager.save(5, fake_state(5, tiny_variables()), TINY)
    finally:
        manager.close()
    model_json = next((trainer / "5" / checkpoint.MODEL_ITEM).iterdir())
    old = {k: v for k, v in json.loads(model_json.read_text()).items() if k not in ("features_only", "image_size")}
    model_json.write_text(json.dumps({**old, "variant": "custom"}))
    assert checkpoint.load_variables(tmp_path / "trainer")[0] == TINY


def test_merge_pretrained_reinitialises_only_heads():
    fresh = tiny_variables(ModelSpec((1, 1, 1, 1), (8, 16, 16, 24), 3, False), seed=1)
    source = tiny_variables(seed=2)  # 10 classes + dist_head
    merged, notes = checkpoint.merge_pretrained(fresh, source)
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"])
    np.testing.assert_array_equal(merged["params"]["norm"]["scale"], source["params"]["norm"]["scale"])
    np.testing.assert_array_equal(merged["batch_stats"]["norm"]["var"], source["batch_stats"]["norm"]["var"])
    assert any(n.startswith("params/head/kernel re-initialised") for n in notes)
    assert any("params/dist_head" in n for n in notes if n.startswith("not used"))
    other = tiny_variables(ModelSpec((1, 1, 1, 1), (8, 16, 16, 32), 10, True))
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
    checkpointer = checkpoint.Checkpointer(os.path.join(tmp_path, checkpoint.CHECKPOINT_DIR), keep=1, asynchronous=False,
                                           remove_unfinished=remove_unfinished)
    assert checkpointer.latest_step() is None  # never a step, removed or not
    checkpointer.save(2, fake_state(2, tiny_variables()), TINY)  # orbax finishes its clean-up first
    assert checkpointer.all_steps() == [2]
    checkpointer.close()
    assert unfinished.exists() != remove_unfinished


def test_export_and_predict_read_a_trainer_checkpoint(trainer_workdir, tmp_path, capsys):
    from PIL import Image

    from swiftformer_jax import predict

    workdir, variables = trainer_workdir
    output = tmp_path / "ema.safetensors"
    assert convert.main(["export", "--checkpoint", workdir, "--ema", "--output", str(output)]) == 0
    state = convert.read_torch_file(output)
    np.testing.assert_allclose(state["head.weight"].numpy(), variables["params"]["head"]["kernel"].T * 0.5)

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (240, 260, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    assert predict.main(["--checkpoint", workdir, "--top-k", "3", str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = TINY.build()
    probabilities = jax.nn.softmax(model.apply(variables, predict.preprocess(Image.open(image), 224)[None]))[0]
    best = int(np.argmax(probabilities))
    assert lines[0] == str(image) and len(lines) == 4 and lines[1].split()[:2] == ["1.", str(best)]


def _damage(step_dir, kind: str, every_array_file: bool = False) -> None:
    """What a failing disk or a partial copy leaves of a saved step: the largest array file
    damaged, or with `every_array_file` all of them (tensorstore spreads the arrays over its data
    files differently on each save, so only that reaches a reader of part of the state for sure)."""
    import shutil

    arrays = sorted((step_dir / checkpoint.STATE_ITEM).glob("ocdbt.process_0/d/*"), key=lambda p: -p.stat().st_size)
    if not every_array_file:
        arrays = arrays[:1]
    if kind == "truncated array file":
        for path in arrays:
            os.truncate(path, 100)
    elif kind == "deleted array file":
        for path in arrays:
            path.unlink()
    elif kind == "garbage state metadata":
        (step_dir / checkpoint.STATE_ITEM / "_METADATA").write_text("garbage{")
    elif kind == "garbage model json":
        next((step_dir / checkpoint.MODEL_ITEM).iterdir()).write_text("nope")
    elif kind == "empty directory":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    else:
        raise AssertionError(kind)


DAMAGES = ("truncated array file", "deleted array file", "garbage state metadata", "garbage model json",
           "empty directory")


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_step_is_named_by_every_reader_and_can_be_moved_aside(tmp_path, kind):
    root = tmp_path / checkpoint.CHECKPOINT_DIR
    manager = checkpoint.Checkpointer(str(root), keep=3, asynchronous=False)
    states = {step: fake_state(step, tiny_variables(seed=step)) for step in (1, 2)}
    for step, state in states.items():
        manager.save(step, state, TINY)
    manager.close()
    _damage(root / "2", kind)
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), states[2])

    manager = checkpoint.Checkpointer(str(root), keep=3, asynchronous=False)
    try:
        with pytest.raises(checkpoint.CorruptCheckpointError, match=str(root / "2")):
            manager.spec(2)
            manager.restore(2, target)
        assert manager.move_aside(2) == root / "corrupt-2"
        assert manager.latest_step() == 1 and manager.spec(1) == TINY
        restored = manager.restore(1, target)
    finally:
        manager.close()
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert (root / "corrupt-2").is_dir()  # kept, never deleted
    if kind != "empty directory":  # readers of a step directory name it and the damaged part
        _damage(root / "corrupt-2", kind, every_array_file=True)  # the weights' file among them
        with pytest.raises(checkpoint.CorruptCheckpointError, match=r"corrupt-2 is damaged: (state|model)/"):
            checkpoint.load_variables(root / "corrupt-2")


DAMAGED_RESTORE = r"""
import gc, os, pathlib, sys, time
sys.path.insert(0, REPO)
import jax, numpy as np
from swiftformer_jax import checkpoint, logs
from swiftformer_jax.model import ModelSpec

logs.setup(verbose=VERBOSE)
state = {f"a{i}": np.random.RandomState(i).standard_normal((64, 64)).astype(np.float32) for i in range(40)}
manager = checkpoint.Checkpointer(DIRECTORY, keep=1, asynchronous=False)
manager.save(1, state, ModelSpec((1, 1, 1, 1), (8, 16, 16, 24), 10, True))
step_dir = pathlib.Path(str(manager.step_dir(1)))
os.truncate(max(step_dir.glob("state/ocdbt.process_0/d/*"), key=os.path.getsize), 100)  # the largest array file
try:
    manager.restore(1, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
except checkpoint.CorruptCheckpointError as error:
    print("REASON", error.reason, flush=True)
manager.close()
time.sleep(1.0)  # the abandoned reads finish in tensorstore's threads
gc.collect()
print("DONE", flush=True)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_restore_prints_its_reason_and_none_of_orbax_abandoned_reads(tmp_path, verbose):
    """orbax leaves hundreds of tracebacks behind a restore that failed (closed read coroutines,
    callbacks into its closed event loop); `logs.setup()` drops them, `verbose` keeps them."""
    from conftest import REPO

    code = f"REPO, DIRECTORY, VERBOSE = {REPO!r}, {str(tmp_path / 'c')!r}, {verbose}\n" + DAMAGED_RESTORE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "DONE" in proc.stdout, proc.stderr[-3000:]
    reason = next(line for line in proc.stdout.splitlines() if line.startswith("REASON "))
    assert 'Error reading "a' in reason and "TensorStore" not in reason, reason  # the array and the file
    noise = ("Traceback", "Exception ignored", "Event loop is closed", "Task exception was never retrieved")
    if verbose:
        assert any(n in proc.stderr for n in noise), proc.stderr[-3000:]  # what the default drops
    else:
        assert not any(n in proc.stderr for n in noise), proc.stderr[-3000:]


def test_a_state_of_another_shape_is_refused_not_taken_for_damage(tmp_path):
    manager = checkpoint.Checkpointer(str(tmp_path / "c"), keep=1, asynchronous=False)
    try:
        manager.save(1, fake_state(1, tiny_variables()), TINY)
        other = fake_state(1, tiny_variables(ModelSpec((1, 1, 1, 1), (8, 16, 16, 32), 10, True)))
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), other)
        with pytest.raises(ValueError, match="do not match") as info:
            manager.restore(1, target)
        assert not isinstance(info.value, checkpoint.CorruptCheckpointError)
    finally:
        manager.close()
