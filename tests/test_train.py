"""The training system end to end on the digits data set with a 4-block network and 32px images.

One uninterrupted 6-step run and one run stopped at step 4 and resumed are shared by most tests;
the compiled programs are shared through the persistent compilation cache (conftest.py), so the
other runs (non-finite loss, damaged checkpoints, a full disk, init_from) mostly reuse them. Several
processes, preempted and resumed: test_multihost.py.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, tiny_config
from swiftformer_jax import checkpoint, convert, input_pipeline, metrics, optim, sharding, train
from swiftformer_jax.model import ModelSpec


# The loop tests turn on every random path of the step: mixup/cutmix (groups of 8), ghost batch
# norm (groups of 8), drop path, repeated augmentation.
LOOP = dict(
    mixup__mixup_alpha=0.8, mixup__cutmix_alpha=1.0, mixup__group_size=8, bn_group_size=8,
    model__drop_path_rate=0.1, repeated_aug=2,
)
TRAIN_KEYS = ("train/loss", "train/learning_rate", "train/grad_norm", "train/images_per_second")
EVAL_KEYS = ("eval/accuracy", "eval/ema_accuracy", "eval/loss")


def loop_config(data_dir, **overrides):
    return tiny_config(data_dir, **{**LOOP, **overrides})


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def abstract_state(config, run):
    """The TrainState's shapes with their shardings, as `train_and_evaluate` restores into."""
    return train.abstract_train_state(run.model, run.tx, config, run.mesh, jax.random.key(0))[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_data_dir):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    state = train.train_and_evaluate(loop_config(digits_data_dir, profile_steps=(2, 2)), workdir)
    return workdir, host(state)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, digits_data_dir):
    workdir = str(tmp_path_factory.mktemp("resumed"))
    first = train.train_and_evaluate(loop_config(digits_data_dir), workdir, stop_at_step=4)
    first_step = int(first.step)
    state = train.train_and_evaluate(loop_config(digits_data_dir), workdir)
    return workdir, first_step, host(state)


# ---------------------------------------------------------------------------------------------
# The loop: metrics, schedule, EMA, checkpoints
# ---------------------------------------------------------------------------------------------


def test_metrics_jsonl_every_logged_step_and_eval_on_eval_steps(uninterrupted):
    workdir, _ = uninterrupted
    records = metrics.read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert all(np.isfinite(record[key]) for key in TRAIN_KEYS), record
        has_eval = record["step"] in (3, 6)
        assert all((key in record) == has_eval for key in EVAL_KEYS), record
        if has_eval:
            # Every one of the 300 test images counted once: 5 batches of 64, the last one padded.
            assert record["eval/num_examples"] == 300
            assert 0.0 <= record["eval/accuracy"] <= 1.0 and 0.0 <= record["eval/ema_accuracy"] <= 1.0


def test_tensorboard_event_files_hold_the_scalars(uninterrupted):
    workdir, _ = uninterrupted
    files = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert files
    tags = set()
    for record in tf.data.TFRecordDataset(files):
        event = tf.compat.v1.Event.FromString(record.numpy())
        tags.update(value.tag for value in event.summary.value)
    assert set(TRAIN_KEYS + EVAL_KEYS) <= tags


def test_profile_steps_write_a_trace_of_those_steps(uninterrupted):
    workdir, _ = uninterrupted
    (trace,) = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    profile = jax.profiler.ProfileData.from_file(trace)
    events = [event for plane in profile.planes for line in plane.lines for event in line.events]
    steps = sorted({dict(event.stats).get("step_num") for event in events if event.name == "train"})
    assert steps == [2, 3]  # the step annotations of the traced steps, and only those
    assert any("train_step" in event.name for event in events)  # the jitted step ran inside


def test_learning_rate_follows_the_configured_schedule(uninterrupted, digits_data_dir):
    workdir, _ = uninterrupted
    config = loop_config(digits_data_dir)
    steps = train.durations(config, 1497)
    assert (steps.total_steps, steps.warmup_steps, steps.eval_every, steps.checkpoint_every) == (6, 2, 3, 3)
    schedule = optim.learning_rate_schedule(base_lr=2e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=2, total_steps=6)
    for record in metrics.read_metrics(workdir):  # the lr of the update that made step s: schedule(s - 1)
        assert record["train/learning_rate"] == pytest.approx(float(schedule(record["step"] - 1)), rel=1e-6)


def test_durations_convert_epochs_and_steps_in_one_place(digits_data_dir):
    config = tiny_config(digits_data_dir, total_steps=-1, num_epochs=3.0, warmup_steps=-1, warmup_epochs=0.5,
                         eval_every_steps=-1, eval_every_epochs=1.0, checkpoint_every_steps=10)
    steps = train.durations(config, 1497)  # 1497 // 16 = 93 steps per epoch
    assert steps == train.Durations(93, 279, 46, 93, 10, 1)
    config.warmup_steps = 500
    with pytest.raises(train.ConfigError, match="warm-up .* is longer than the run"):
        train.durations(config, 1497)


def test_official_per_epoch_schedule_with_its_lag(digits_data_dir):
    config = tiny_config(digits_data_dir, total_steps=-1, num_epochs=4.0, warmup_steps=-1, warmup_epochs=1.0,
                         lr_per_epoch=True, lr_lag_one_epoch=True)
    steps = train.durations(config, 1497)
    _, schedule = train.build_optimizer(config, steps, {"head": {"kernel": jnp.zeros((2, 2))}})
    lrs = [float(schedule(s)) for s in range(0, 4 * 93, 93 // 3)]
    epoch_of = [s // 93 for s in range(0, 4 * 93, 93 // 3)]
    for epoch in range(4):  # constant within an epoch
        assert len({lr for lr, e in zip(lrs, epoch_of) if e == epoch}) == 1
    assert float(schedule(0)) == float(schedule(93)) == pytest.approx(1e-6)  # the lag: epoch 1 = epoch 0
    expected = 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + np.cos(np.pi * 1 / 4))  # timm's cosine at epoch index 1
    assert float(schedule(2 * 93)) == pytest.approx(expected, rel=1e-5)


def test_ema_decay_warm_up_is_optional_and_official_off(digits_data_dir):
    from configs import default

    assert train.ema_decay_at(default.get_config(), 0) == 0.99996  # official: constant from step 0
    config = tiny_config(digits_data_dir, ema_decay=0.99, ema_warmup=True)
    assert [float(train.ema_decay_at(config, t)) for t in (0, 10, 890, 5000)] == pytest.approx(
        [0.1, 11 / 20, 0.99, 0.99])


def test_ema_is_in_the_state_saved_and_differs_from_the_raw_model(uninterrupted):
    workdir, state = uninterrupted
    assert int(state.step) == 6
    raw = jax.tree_util.tree_leaves(state.params)
    ema = jax.tree_util.tree_leaves(state.ema_params)
    assert len(raw) == len(ema) and any(not np.allclose(a, b) for a, b in zip(raw, ema))
    assert jax.tree_util.tree_structure(state.ema_batch_stats) == jax.tree_util.tree_structure(state.batch_stats)
    _, saved_ema = checkpoint.load_variables(workdir, ema=True)
    for a, b in zip(jax.tree_util.tree_leaves(saved_ema["params"]), ema):
        np.testing.assert_array_equal(a, b)


def test_eval_evaluates_raw_and_ema_models(uninterrupted, digits_data_dir):
    workdir, state = uninterrupted
    config = loop_config(digits_data_dir)
    run = train.setup(config)
    shardings = sharding.tree_shardings(state, run.mesh, config.mesh.fsdp_min_size_mb)
    _, eval_step = train.jit_steps(config, run.model, run.tx, run.schedule, 10, None, run.mesh, shardings)
    batch_sharding = sharding.batch_sharding(run.mesh)
    put = lambda s: jax.device_put(s, shardings)  # noqa: E731
    recorded = metrics.read_metrics(workdir)[-1]
    both = train.evaluate(config, eval_step, put(state), batch_sharding, 300)
    assert both["eval/accuracy"] == pytest.approx(recorded["eval/accuracy"])
    assert both["eval/ema_accuracy"] == pytest.approx(recorded["eval/ema_accuracy"])
    # The EMA slot evaluates the EMA weights: put the raw weights there and the two agree.
    swapped = state.replace(ema_params=state.params, ema_batch_stats=state.batch_stats)
    same = train.evaluate(config, eval_step, put(swapped), batch_sharding, 300)
    assert same["eval/ema_accuracy"] == same["eval/accuracy"] == both["eval/accuracy"]
    assert same["eval/ema_loss"] == pytest.approx(same["eval/loss"])
    assert both["eval/ema_loss"] != pytest.approx(both["eval/loss"])


def test_each_step_draws_fresh_randomness(digits_data_dir):
    # The step number is folded into the run's key: the same state and key give the same loss;
    # other step numbers give other mixup pairs, drop-path masks and dropout draws.
    config = loop_config(digits_data_dir)
    run = train.setup(config)
    state, _ = train.create_train_state(run.model, run.tx, config, run.mesh, jax.random.key(0))
    step = jax.jit(train.make_train_step(config, run.model, run.tx, run.schedule, run.data.num_classes))
    rs = np.random.RandomState(0)
    batch = {"image": rs.randn(16, 32, 32, 3).astype(np.float32), "label": rs.randint(0, 10, 16).astype(np.int32)}

    def loss_at(step_number):
        _, step_metrics = step(state.replace(step=jnp.asarray(step_number, jnp.int32)), batch, jax.random.key(5), None)
        return float(step_metrics["loss"])

    assert loss_at(3) == loss_at(3)
    losses = [loss_at(n) for n in range(3)]
    assert len(set(losses)) == 3, losses


def test_checkpoints_round_trip_the_whole_state(uninterrupted, digits_data_dir):
    workdir, state = uninterrupted
    config = loop_config(digits_data_dir)
    manager = checkpoint.Checkpointer(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), keep=3, best_metric="eval/accuracy")
    try:
        assert list(manager.all_steps()) == [3, 6]
        restored = host(manager.restore(6, abstract_state(config, train.setup(config))))
        assert manager.spec(6) == train.model_spec(config, 10)
    finally:
        manager.close()
    assert isinstance(restored, train.TrainState)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_resume_continues_at_the_right_step_with_the_same_data(uninterrupted, resumed):
    workdir_a, state_a = uninterrupted
    workdir_b, first_step, state_b = resumed
    assert first_step == 4  # stopped (with a checkpoint) at step 4, not at a checkpoint interval
    records_a = {r["step"]: r for r in metrics.read_metrics(workdir_a)}
    records_b = metrics.read_metrics(workdir_b)
    assert [r["step"] for r in records_b] == [1, 2, 3, 4, 5, 6]
    for record in records_b:  # same batches, same mixup/drop-path draws, same state: same losses
        assert record["train/loss"] == pytest.approx(records_a[record["step"]]["train/loss"], rel=1e-5)
    for name in ("params", "batch_stats", "ema_params", "ema_batch_stats", "opt_state"):
        for a, b in zip(jax.tree_util.tree_leaves(getattr(state_a, name)), jax.tree_util.tree_leaves(getattr(state_b, name))):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=name)
    manager = checkpoint.Checkpointer(os.path.join(workdir_b, checkpoint.CHECKPOINT_DIR), keep=3)
    try:
        assert list(manager.all_steps()) == [3, 4, 6]
    finally:
        manager.close()


# ---------------------------------------------------------------------------------------------
# Stopping: non-finite loss
# ---------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, digits_data_dir, monkeypatch):
    original = input_pipeline.train_dataset

    def poisoned(*args, start_step=0, **kwargs):
        for step, batch in enumerate(original(*args, start_step=start_step, **kwargs), start=start_step):
            if step == 4:  # the batch of step 5 (steps count from 1 once done)
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(input_pipeline, "train_dataset", poisoned)
    workdir = str(tmp_path)
    with pytest.raises(train.NonFiniteLossError, match=r"step 5 .*last good checkpoint \(step 3\).*intact"):
        train.train_and_evaluate(loop_config(digits_data_dir), workdir)
    assert max(r["step"] for r in metrics.read_metrics(workdir)) < 5
    _, variables = checkpoint.load_variables(workdir)
    manager = checkpoint.Checkpointer(os.path.join(workdir, checkpoint.CHECKPOINT_DIR), keep=3)
    try:
        assert list(manager.all_steps()) == [3]
    finally:
        manager.close()
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))


# ---------------------------------------------------------------------------------------------
# Fine-tuning and teachers
# ---------------------------------------------------------------------------------------------


def test_init_from_a_checkpoint_of_ours_loads_weights_and_starts_fresh(uninterrupted, tmp_path, digits_data_dir):
    source, trained = uninterrupted
    config = loop_config(digits_data_dir, init_from=source)
    run = train.setup(config)
    manager = checkpoint.Checkpointer(os.path.join(tmp_path, checkpoint.CHECKPOINT_DIR), keep=1)
    try:
        state, _ = train.initial_state(config, run, jax.random.key(0), manager)
    finally:
        manager.close()
    state = host(state)
    assert int(state.step) == 0
    for name, ema_name in (("params", "ema_params"), ("batch_stats", "ema_batch_stats")):
        for got, ema, want in zip(jax.tree_util.tree_leaves(getattr(state, name)),
                                  jax.tree_util.tree_leaves(getattr(state, ema_name)),
                                  jax.tree_util.tree_leaves(getattr(trained, name))):
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(ema, want)
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(state.opt_state) if x.dtype != np.int32)


@pytest.fixture(scope="module")
def xs_pytorch_file(tmp_path_factory):
    """A SwiftFormer-XS PyTorch state dict (1000 classes, distillation head), as released."""
    model = ModelSpec.named("XS", num_classes=1000, distillation=True).build()
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))
    rs = np.random.RandomState(0)
    variables = jax.tree_util.tree_map(lambda s: np.abs(rs.normal(0.5, 0.1, s.shape)).astype(np.float32), abstract)
    path = tmp_path_factory.mktemp("torch") / "swiftformer_xs.pth"
    convert.write_torch_file(convert.to_torch(variables), path)
    return str(path), variables


def test_init_from_a_pytorch_checkpoint_reinitialises_the_head(xs_pytorch_file, digits_data_dir):
    path, torch_variables = xs_pytorch_file
    config = tiny_config(digits_data_dir, init_from=path)
    config.model.depths, config.model.widths = (), ()
    config.model.variant = "XS"
    train.check_config(config)
    spec = train.model_spec(config, 10)
    model = train.build_model(config, spec)
    fresh = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))
    fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), fresh)
    source_info, pretrained = checkpoint.load_variables(path)
    assert (source_info.variant, source_info.num_classes, source_info.distillation) == ("XS", 1000, True)
    merged, notes = checkpoint.merge_pretrained(fresh, pretrained)
    assert any("head/kernel re-initialised" in n for n in notes) and any("dist_head" in n for n in notes)
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], np.zeros((220, 10)))
    np.testing.assert_allclose(merged["params"]["network_0"]["block_0"]["pwconv1"]["kernel"],
                               torch_variables["params"]["network_0"]["block_0"]["pwconv1"]["kernel"])
    np.testing.assert_allclose(merged["batch_stats"]["norm"]["var"], torch_variables["batch_stats"]["norm"]["var"])


def test_teacher_loads_from_our_workdir_and_refuses_other_classes(uninterrupted, xs_pytorch_file, digits_data_dir):
    workdir, state = uninterrupted
    config = tiny_config(digits_data_dir, distillation__kind="hard", distillation__teacher=workdir)
    teacher, variables = train.load_teacher(config, 10)
    assert teacher.depths == (1, 1, 1, 1) and teacher.num_classes == 10
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], state.params["head"]["kernel"])
    config.distillation.teacher = xs_pytorch_file[0]
    with pytest.raises(train.ConfigError, match="predicts 1000 classes but digits has 10"):
        train.load_teacher(config, 10)


# ---------------------------------------------------------------------------------------------
# Bad configs fail before training starts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["xs", "s", "l1", "l3"])
def test_official_configs_name_the_official_teacher_or_kind_none(variant, tmp_path, monkeypatch):
    import re
    from importlib import import_module

    monkeypatch.chdir(tmp_path)  # the official teacher's default path is relative: absent here
    config = import_module(f"configs.{variant}").get_config()
    assert config.distillation.teacher == "checkpoints/regnety_160"
    message = ".*".join(map(re.escape, [
        "config.distillation.teacher='checkpoints/regnety_160' does not exist",
        "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth",
        "`python -m swiftformer_jax.convert import --checkpoint regnety_160-a5fe301d.pth --output "
        "checkpoints/regnety_160`", "--config.distillation.kind=none"]))
    with pytest.raises(train.ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.listdir(tmp_path)  # nothing was written


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(dataset="imagenet2012"), FileNotFoundError, "imagenet2012 is not prepared"),
        (dict(dataset="no_such_dataset"), ValueError, "unknown dataset 'no_such_dataset'"),
        (dict(distillation__kind="hard", distillation__teacher="/no/such/teacher"), train.ConfigError, "does not exist"),
        (dict(init_from="/no/such/checkpoint"), train.ConfigError, "init_from.*does not exist"),
        (dict(dtype="float16"), train.ConfigError, "config.dtype must be one of"),
        (dict(bn_group_size=6), train.ConfigError, "ghost batch-norm groups of config.bn_group_size=6"),
        (dict(mixup__mixup_alpha=0.8, mixup__group_size=6), train.ConfigError, "even divisor of config.batch_size=16"),
        (dict(model__depths=(1, 1, 1)), train.ConfigError, "4 positive ints"),
        (dict(warmup_steps=100), train.ConfigError, "warm-up .* longer than the run"),
        (dict(clip_mode="adaptive"), train.ConfigError, "config.clip_mode.*unknown clip_mode 'adaptive'"),
        (dict(best_metric="eval/acc"), train.ConfigError, "config.best_metric must be one of"),
        # The components' own checks, named by config key.
        (dict(model__depths=(), model__widths=(), model__variant="M"), train.ConfigError,
         r"config.model.variant.*unknown SwiftFormer variant 'M'"),
        (dict(model__attention_version=3), train.ConfigError, "config.model.*attention_version must be one of"),
        (dict(bn_group_size=-2), train.ConfigError, "config.bn_group_size.*must be a positive int"),
        (dict(augment__crop_scale=(0.5, 0.2)), train.ConfigError, "config.augment: crop_scale"),
        (dict(mixup__mode="row"), train.ConfigError, "config.mixup: unknown mixup mode 'row'"),
        (dict(distillation__alpha=1.5), train.ConfigError, r"config.distillation: alpha must be in \[0, 1\]"),
        (dict(lr_lag_one_epoch=True), train.ConfigError, "learning rate schedule: lag_one_epoch"),
        (dict(profile_steps=(0, 2)), train.ConfigError, r"config.profile_steps: must be \(start >= 1"),
        (dict(microbatch_size=6), train.ConfigError, "does not split into micro-batches of config.microbatch_size=6"),
    ],
)
def test_bad_configs_fail_clearly_before_training(overrides, error, message, tmp_path, digits_data_dir):
    data_dir = str(tmp_path / "empty_tfds") if overrides.get("dataset") == "imagenet2012" else digits_data_dir
    config = tiny_config(data_dir, **overrides)
    workdir = tmp_path / "work"
    lowered = []  # every jit lowers its program (to MLIR) before compiling or reading the cache

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        with pytest.raises(error, match=message):
            train.train_and_evaluate(config, str(workdir))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert not workdir.exists()  # failed before writing anything
    assert lowered == []  # and before compiling anything


def test_unknown_config_key_on_the_command_line_fails_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/quickstart.py"),
         f"--workdir={tmp_path}", "--config.model.variantt=S"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert '--config.model.variantt: the config has no such key (did you mean "variant"?)' in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--coordinator_address=localhost:1", "--num_processes=2"], "go together"),
    (["--distributed", "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=0"],
     "--distributed auto-detects"),
])
def test_multi_process_flags_are_checked_before_anything_starts(flags, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/quickstart.py"),
         f"--workdir={tmp_path / 'work'}", *flags],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "work").exists()  # nothing written


def test_variant_configs_override_only_what_differs():
    from configs import default, l1, l3, quickstart, s, xs

    base = default.get_config()
    assert base.model.variant == "S" and base.batch_size == 2048 and base.learning_rate == 2e-3
    assert base.weight_decay == 0.025 and base.ema_decay == 0.99996 and base.clip_mode == "agc"
    assert base.distillation.kind == "hard" and base.distillation.alpha == 0.5 and base.bn_group_size == 128
    assert base.model.drop_path_rate == 0.0  # the official main.py never sets it
    # The shared recipe is complete: every key maps onto AugmentConfig, nothing is missing.
    assert train.augment_config(base) == train.augment_lib.AugmentConfig()

    def diff(config):
        flat = lambda c, p="": {k2: v2 for k, v in c.items() for k2, v2 in (flat(v, p + k + ".").items() if hasattr(v, "items") else {p + k: v}.items())}  # noqa: E731
        a, b = flat(base), flat(config)
        return {k for k in a if a[k] != b[k]}

    assert diff(xs.get_config()) == {"model.variant", "augment.rand_augment", "augment.color_jitter",
                                     "mixup.mixup_alpha", "mixup.cutmix_alpha"}
    assert diff(s.get_config()) == {"mixup.mixup_alpha", "mixup.cutmix_alpha"}
    assert diff(l1.get_config()) == {"model.variant"} and diff(l3.get_config()) == {"model.variant"}
    assert xs.get_config().augment.color_jitter == 0.4
    for module in (xs, s, l1, l3, quickstart):
        assert "python main.py --config=configs/" in module.__doc__
    with pytest.raises(AttributeError):
        base.no_such_key = 1  # locked: new keys are refused


# ---------------------------------------------------------------------------------------------
# Damage: a corrupt latest checkpoint is moved aside; a killed attempt's records are dropped
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated array file", "garbage model json"])
def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_ends_as_if_it_resumed_there(
        uninterrupted, kind, tmp_path, digits_data_dir, caplog):
    from test_checkpoint import _damage

    workdir_a, state_a = uninterrupted
    workdir = tmp_path / "work"
    shutil.copytree(workdir_a, workdir)  # metrics and events up to step 6, checkpoints 3 and 6
    _damage(workdir / checkpoint.CHECKPOINT_DIR / "6", kind)
    with caplog.at_level("WARNING", logger="swiftformer_jax"):
        state = host(train.train_and_evaluate(loop_config(digits_data_dir), str(workdir)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step 6 does not restore" in w and "corrupt-6" in w for w in warnings), warnings
    assert (workdir / checkpoint.CHECKPOINT_DIR / "corrupt-6").is_dir()
    for name in ("step", "params", "batch_stats", "opt_state", "ema_params", "ema_batch_stats"):
        for a, b in zip(jax.tree_util.tree_leaves(getattr(state_a, name)), jax.tree_util.tree_leaves(getattr(state, name))):
            np.testing.assert_array_equal(b, a, err_msg=name)
    # Steps 4-6 were logged by the first run and again after resuming at 3: each appears once.
    assert [r["step"] for r in metrics.read_metrics(str(workdir))] == [1, 2, 3, 4, 5, 6]
    losses = collections.Counter()
    for record in tf.data.TFRecordDataset(sorted(glob.glob(str(workdir / "events.out.tfevents.*")))):
        event = tf.compat.v1.Event.FromString(record.numpy())
        losses.update(event.step for value in event.summary.value if value.tag == "train/loss")
    assert losses == {step: 1 for step in range(1, 7)}


def test_a_run_whose_every_checkpoint_is_damaged_stops_before_training(uninterrupted, tmp_path, digits_data_dir):
    from test_checkpoint import _damage

    workdir = tmp_path / "work"
    shutil.copytree(uninterrupted[0], workdir)
    for step in ("3", "6"):
        _damage(workdir / checkpoint.CHECKPOINT_DIR / step, "garbage state metadata")
    with pytest.raises(train.ConfigError, match="no checkpoint in .* restores"):
        train.train_and_evaluate(loop_config(digits_data_dir), str(workdir))
    assert [r["step"] for r in metrics.read_metrics(str(workdir))] == [1, 2, 3, 4, 5, 6]  # untouched


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 64 MiB tmpfs mounted for the test (None where mounting needs root)."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                             capture_output=True, text=True).returncode == 0
    yield path if mounted else None
    if mounted:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_stops_the_run_with_the_last_good_checkpoint_intact(
        uninterrupted, small_disk, digits_data_dir, tmp_path):
    """Step 3 is saved; then the disk is filled to within half a checkpoint (or, where no tmpfs can be
    mounted, the checkpoint directory made read-only), so the step-6 save fails."""
    if small_disk is None and os.geteuid() == 0:
        pytest.skip("no tmpfs could be mounted and root ignores a read-only directory")
    workdir = (small_disk or tmp_path) / "work"
    train.train_and_evaluate(loop_config(digits_data_dir), str(workdir), stop_at_step=3)
    assert checkpoint.complete_steps(workdir / "checkpoints") == [3]
    if small_disk is not None:
        step_bytes = sum(p.stat().st_size for p in (workdir / "checkpoints" / "3").rglob("*") if p.is_file())
        fs = os.statvfs(small_disk)
        (small_disk / "filler").write_bytes(b"\0" * (fs.f_bavail * fs.f_frsize - step_bytes // 2))
    else:
        (workdir / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(checkpoint.CheckpointWriteError, match=r"saving step 6.*last complete checkpoint is step 3"):
            train.train_and_evaluate(loop_config(digits_data_dir), str(workdir))
    finally:
        (workdir / "checkpoints").chmod(0o755)
    spec, variables = checkpoint.load_variables(workdir)  # step 3, whole; the failed save is not a step
    assert checkpoint.find_step_dir(workdir).name == "3" and spec == train.model_spec(loop_config(digits_data_dir), 10)
    _, reference = checkpoint.load_variables(pathlib.Path(uninterrupted[0]) / "checkpoints" / "3")
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(a, b)
