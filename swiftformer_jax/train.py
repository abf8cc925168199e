"""SwiftFormer training and evaluation: one sharded, jitted train step and the loop around it.

Reads top to bottom:
  1. Config checks and durations: everything that can be wrong with a config fails here, before
     any data is read or any model is compiled.
  2. Model, teacher and optimizer, gathered by `setup(config)`.
  3. TrainState, created directly in its sharding.
  4. The train and eval steps: pure functions, jitted with shardings; the state is donated.
  5. Where the state comes from: the workdir's latest checkpoint, else `config.init_from`, else
     a fresh initialisation.
  6. The loop: input, steps, logging, evaluation, checkpoints, preemption, non-finite losses.

Parallelism (see `sharding.py`): a (`data`, `fsdp`) mesh from `config.mesh`; batches split over
every device, state replicated or fsdp-sharded by size. There is no per-device code: batch-norm
statistics, mixup groups and losses are those of the global batch, whatever the device count.

Randomness: one key from `config.seed`, split once into init and training keys; the training key
is folded with the step inside the step, so a resumed run draws exactly what an uninterrupted one
would (the input pipeline is a pure function of the step too).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import itertools
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from swiftformer_jax import augment as augment_lib
from swiftformer_jax import checkpoint as checkpoint_lib
from swiftformer_jax import input_pipeline, losses, metrics as metrics_lib, mixup, multihost, optim, paths, profiling
from swiftformer_jax import sharding as sharding_lib
from swiftformer_jax.logs import log
from swiftformer_jax.model import ModelSpec, SwiftFormer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BEST_METRICS = ("eval/accuracy", "eval/ema_accuracy", "")  # higher is better


class ConfigError(ValueError):
    """A config that cannot train; raised before any data is read or model compiled."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN or infinite; the run stopped without saving it."""


# ==============================================================================================
# 1. Config checks and durations
# ==============================================================================================


@contextlib.contextmanager
def config_keys(keys: str):
    """Re-raise a component's ValueError (which names the bad value) as a ConfigError naming the
    config keys it came from."""
    try:
        yield
    except ValueError as error:
        raise ConfigError(f"{keys}: {error}") from None


def check_config(config: ml_collections.ConfigDict, *, teacher_given: bool = False) -> None:
    """Every check that needs neither data nor devices. Raises ConfigError naming the key.
    `teacher_given`: the caller supplies the teacher, so config.distillation.teacher is not read.

    The components check their own settings (the model spec, augmentation, mixup, clipping, the
    distillation loss): here they are built once from the config, so their errors come before any
    data is read, translated to config keys. What is checked here directly belongs to the trainer.
    """

    def fail(message: str) -> None:
        raise ConfigError(message)

    if config.dtype not in DTYPES:
        fail(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    spec = model_spec(config, num_classes=1)  # the class count comes from the data set
    with config_keys("config.bn_group_size (0: whole global batch) / config.model.drop_*rate / config.model.impl"):
        build_model(config, spec)
    with config_keys("config.augment"):
        augment_config(config)
    m = config.mixup
    with config_keys("config.mixup"):
        mixup.check_settings(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha,
                             switch_prob=m.switch_prob, prob=m.prob, mode=m.mode)
    with config_keys("config.profile_steps"):
        profiling.check(config.profile_steps)
    if config.microbatch_size < 0:
        fail(f"config.microbatch_size must be >= 0 (0: no gradient accumulation), got {config.microbatch_size}")
    if m.group_size < 0:
        fail(f"config.mixup.group_size must be >= 0 (0: whole global batch), got {m.group_size}")
    with config_keys("config.clip_mode / config.clip_grad"):
        optim.gradient_clipping(config.clip_mode, config.clip_grad)
    d = config.distillation
    with config_keys("config.distillation"):
        losses.check_distillation(d.kind, alpha=d.alpha, tau=d.tau)
    if d.kind != "none" and not d.teacher and not teacher_given:
        fail(
            f"config.distillation.kind={d.kind!r} needs a teacher, and config.distillation.teacher is "
            "empty. The official recipe distils from DeiT's RegNetY-160: download "
            "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth, import it with `python -m "
            "swiftformer_jax.convert import --checkpoint regnety_160-a5fe301d.pth --output "
            "checkpoints/regnety_160` and pass --config.distillation.teacher=checkpoints/regnety_160 "
            "(a PyTorch file, another imported directory or a workdir of this trainer is a teacher too), "
            "or train without distillation (--config.distillation.kind=none)"
        )
    if d.kind != "none" and not teacher_given and not paths.exists(d.teacher):
        fail(
            f"config.distillation.teacher={d.teacher!r} does not exist. The official teacher is DeiT's "
            "RegNetY-160: download https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth and "
            "import it with `python -m swiftformer_jax.convert import --checkpoint "
            f"regnety_160-a5fe301d.pth --output {d.teacher}` (or point the key at another teacher: a "
            "PyTorch file, an imported directory, a workdir of this trainer), or train without "
            "distillation (--config.distillation.kind=none)"
        )
    if config.init_from and not paths.exists(config.init_from):
        fail(f"config.init_from={config.init_from!r} does not exist")
    if not 0.0 <= config.ema_decay <= 1.0:
        fail(f"config.ema_decay must be in [0, 1], got {config.ema_decay}")
    for key in ("batch_size", "eval_batch_size", "image_size", "log_every_steps", "keep_checkpoints",
                "repeated_aug", "shuffle_window"):
        if config[key] < 1:
            fail(f"config.{key} must be >= 1, got {config[key]}")
    if config.best_metric not in BEST_METRICS:
        fail(f"config.best_metric must be one of {BEST_METRICS} ('' keeps no best checkpoint), "
             f"got {config.best_metric!r}")


def check_batch_sizes(config: ml_collections.ConfigDict, mesh, process_count: int) -> None:
    """The global batches must split over devices and processes, and into BN and mixup groups."""
    try:
        sharding_lib.check_batch_size("config.batch_size", config.batch_size, mesh, process_count)
        sharding_lib.check_batch_size("config.eval_batch_size", config.eval_batch_size, mesh, process_count)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    batch, group = config.batch_size, config.bn_group_size
    if group and batch > group and batch % group:
        raise ConfigError(
            f"config.batch_size={batch} does not split into ghost batch-norm groups of "
            f"config.bn_group_size={group}: use a multiple of {group}, or bn_group_size=0"
        )
    micro = config.microbatch_size
    if micro:
        if batch % micro:
            raise ConfigError(f"config.batch_size={batch} does not split into micro-batches of "
                              f"config.microbatch_size={micro}: use a divisor of {batch}, or 0 for none")
        shards = sharding_lib.batch_shards(mesh)
        if micro < batch and micro % shards:
            raise ConfigError(f"config.microbatch_size={micro} does not split over the {shards} devices "
                              f"the batch is split over: use a multiple of {shards}")
        if micro < batch and (not group or micro % group):
            raise ConfigError(
                f"with micro-batches (config.microbatch_size={micro}) batch norm normalises within each: "
                f"set config.bn_group_size to {micro} or a divisor of it (got {group}; 0 means the whole "
                "global batch, which no micro-batch holds)")
    if _mixup_enabled(config):
        mix_group = config.mixup.group_size or batch
        if batch % mix_group or mix_group % 2:
            raise ConfigError(
                f"mixup/cutmix groups of config.mixup.group_size={config.mixup.group_size} must be an even "
                f"divisor of config.batch_size={batch} (0 = the whole batch, which must then be even)"
            )


@dataclasses.dataclass(frozen=True)
class Durations:
    """Every interval of the run in optimizer steps (`optim.steps_from` converts epochs)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int


def durations(config: ml_collections.ConfigDict, num_train_examples: int) -> Durations:
    steps_per_epoch = input_pipeline.steps_per_epoch(num_train_examples, config.batch_size)

    def steps(epochs_key: str, steps_key: str) -> int:
        try:
            return optim.steps_from(config[epochs_key], config[steps_key], steps_per_epoch)
        except ValueError as error:
            raise ConfigError(f"config.{epochs_key} / config.{steps_key}: {error}") from None

    total = steps("num_epochs", "total_steps")
    if total < 1:
        raise ConfigError(f"the run is {total} steps long: set config.num_epochs or config.total_steps")
    warmup = steps("warmup_epochs", "warmup_steps")
    if warmup > total:
        raise ConfigError(
            f"warm-up ({warmup} steps, config.warmup_epochs={config.warmup_epochs} / "
            f"config.warmup_steps={config.warmup_steps}) is longer than the run ({total} steps): "
            "shorten it, e.g. --config.warmup_steps=N"
        )
    every = {}
    for name in ("eval", "checkpoint"):
        value = steps(f"{name}_every_epochs", f"{name}_every_steps")
        every[name] = max(1, min(value, total))
    return Durations(steps_per_epoch, total, warmup, every["eval"], every["checkpoint"], config.log_every_steps)


def accumulation_steps(config: ml_collections.ConfigDict) -> int:
    """Micro-batches per update: batch_size / microbatch_size (1 without accumulation)."""
    micro = config.microbatch_size
    return config.batch_size // micro if micro and micro < config.batch_size else 1


def augment_config(config: ml_collections.ConfigDict) -> augment_lib.AugmentConfig:
    values = config.augment.to_dict()
    return augment_lib.AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _mixup_enabled(config: ml_collections.ConfigDict) -> bool:
    m = config.mixup
    return m.prob > 0 and (m.mixup_alpha > 0 or m.cutmix_alpha > 0)


# ==============================================================================================
# 2. Model, teacher and optimizer
# ==============================================================================================


def model_spec(config: ml_collections.ConfigDict, num_classes: int) -> ModelSpec:
    """The config's network (saved with every checkpoint): the variant's sizes, or the explicit
    `config.model.depths` and `widths`."""
    depths, widths = tuple(config.model.depths), tuple(config.model.widths)
    if bool(depths) != bool(widths):
        raise ConfigError("config.model.depths and config.model.widths must be set together (or both left empty)")
    heads = dict(num_classes=num_classes, distillation=config.distillation.kind != "none",
                 attention_version=config.model.attention_version, image_size=config.image_size)
    with config_keys("config.model" if depths else "config.model.variant / config.model"):
        if depths:
            return ModelSpec(depths=depths, widths=widths, **heads)
        return ModelSpec.named(config.model.variant, **heads)


def build_model(config: ml_collections.ConfigDict, spec: ModelSpec, devices=None) -> SwiftFormer:
    """The network to train; `config.model.impl` "auto" picks the ops for `devices` (the mesh's)."""
    return spec.build(
        dtype=DTYPES[config.dtype], bn_group_size=config.bn_group_size or None,
        drop_path_rate=config.model.drop_path_rate, drop_rate=config.model.drop_rate,
        impl=config.model.impl, devices=devices,
    )


def teacher_dtype(config: ml_collections.ConfigDict):
    """The teacher's compute dtype: `config.distillation.teacher_dtype`, '' meaning `config.dtype`."""
    name = config.distillation.teacher_dtype or config.dtype
    if name not in DTYPES:
        raise ConfigError(f"config.distillation.teacher_dtype must be '' (config.dtype) or one of "
                          f"{sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_teacher(config: ml_collections.ConfigDict, num_classes: int):
    """(teacher model, its variables on the host) or (None, None) without distillation.

    The teacher is any classifier checkpoint `checkpoint.load_checkpoint` reads: a SwiftFormer or
    a RegNetY (DeiT's RegNetY-160 release file, or its import). It runs frozen, in eval mode, in
    `config.distillation.teacher_dtype` ('' = `config.dtype`).
    """
    if config.distillation.kind == "none":
        return None, None
    path = config.distillation.teacher
    dtype = teacher_dtype(config)
    try:
        teacher, variables, spec = checkpoint_lib.load_checkpoint(
            path, ema=config.distillation.teacher_ema, dtype=dtype)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.distillation.teacher={path!r} cannot be loaded: {error}") from None
    if not spec.has_classifier:
        raise ConfigError(f"config.distillation.teacher={path!r} holds no classifier ({spec.describe()})")
    if spec.num_classes != num_classes:
        raise ConfigError(
            f"the teacher ({path}) predicts {spec.num_classes} classes but {config.dataset} has "
            f"{num_classes}: use a teacher trained on the same classes"
        )
    log.info("Teacher: %s, from %s, compute dtype %s.", spec.describe(), path, dtype)
    return teacher, variables


def build_optimizer(config: ml_collections.ConfigDict, steps: Durations, abstract_params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    base_lr = optim.scaled_learning_rate(config.learning_rate, config.batch_size, scale=config.scale_learning_rate)
    try:
        schedule = optim.learning_rate_schedule(
            base_lr=base_lr, warmup_lr=config.warmup_lr, min_lr=config.min_lr,
            warmup_steps=steps.warmup_steps, total_steps=steps.total_steps,
            steps_per_epoch=steps.steps_per_epoch, per_epoch=config.lr_per_epoch,
            lag_one_epoch=config.lr_lag_one_epoch,
        )
    except ValueError as error:
        raise ConfigError(f"learning rate schedule: {error}") from None
    tx = optim.create_optimizer(
        learning_rate=schedule, params_for_mask=abstract_params, weight_decay=config.weight_decay,
        b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
        clip_mode=config.clip_mode, clip_grad=config.clip_grad,
    )
    return tx, schedule


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run is made of, built and checked before any state exists."""

    mesh: Any
    data: input_pipeline.DatasetInfo
    steps: Durations
    spec: ModelSpec
    model: SwiftFormer
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    teacher: SwiftFormer | None
    teacher_variables: Any  # on the host; None without distillation


def setup(config: ml_collections.ConfigDict, devices=None, process_count: int | None = None,
          data: input_pipeline.DatasetInfo | None = None, teacher: tuple | None = None) -> Setup:
    """Check the config and build mesh, durations, model, teacher and optimizer.

    Everything that can be wrong with a config fails here, with a message naming the key: the
    config itself, the batch sizes against the devices, the data set, the teacher. `devices`
    (default: every device of every process), `process_count` (default: this job's) and `data`
    (default: read from the data set) are for compiling ahead of time for other machines (`aot.py`),
    as is `teacher`, a (model, variables) pair used instead of loading `config.distillation.teacher`.
    """
    check_config(config, teacher_given=teacher is not None)
    mesh = sharding_lib.create_mesh(config.mesh.data, config.mesh.fsdp, devices)
    check_batch_sizes(config, mesh, jax.process_count() if process_count is None else process_count)
    if data is None:
        data = input_pipeline.dataset_info(config.dataset, config.data_dir)
    steps = durations(config, data.num_train_examples)
    if teacher is None or config.distillation.kind == "none":
        teacher, teacher_variables = load_teacher(config, data.num_classes)
    else:
        teacher, teacher_variables = teacher
    spec = model_spec(config, data.num_classes)
    model = build_model(config, spec, mesh.devices.flat)
    tx, schedule = build_optimizer(config, steps, abstract_params(model, config.image_size))
    return Setup(mesh, data, steps, spec, model, tx, schedule, teacher, teacher_variables)


# ==============================================================================================
# 3. TrainState, born sharded
# ==============================================================================================


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any


def _init_fn(model: SwiftFormer, tx: optax.GradientTransformation, image_size: int) -> Callable[[jax.Array], TrainState]:
    def init(rng):
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        variables = model.init({"params": rng}, images, train=False)
        params, batch_stats = variables["params"], variables["batch_stats"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
            opt_state=tx.init(params),
            # Copies (not aliases) so that donating the state never donates a buffer twice.
            ema_params=jax.tree_util.tree_map(jnp.copy, params),
            ema_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats),
        )
    return init


def abstract_params(model: SwiftFormer, image_size: int):
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), images)["params"]


def abstract_train_state(model, tx, config, mesh, rng) -> tuple[TrainState, Any]:
    """(shapes as ShapeDtypeStructs carrying their shardings, the shardings): no computation."""
    abstract = jax.eval_shape(_init_fn(model, tx, config.image_size), rng)
    shardings = sharding_lib.tree_shardings(abstract, mesh, config.mesh.fsdp_min_size_mb)
    return sharding_lib.with_shardings(abstract, shardings), shardings


def create_train_state(model, tx, config, mesh, rng) -> tuple[TrainState, Any]:
    """(state, its shardings): shapes from `jax.eval_shape`, then `init` jitted straight into place,
    so no array ever exists whole on one device first."""
    _, shardings = abstract_train_state(model, tx, config, mesh, rng)
    state = jax.jit(_init_fn(model, tx, config.image_size), out_shardings=shardings)(rng)
    return state, shardings


# ==============================================================================================
# 4. Train and eval steps
# ==============================================================================================


def ema_decay_at(config, step):
    """The EMA decay of the update at `step` (0-based): `config.ema_decay`, or with
    `config.ema_warmup` min(ema_decay, (1 + step) / (10 + step)), which forgets the random init
    (and the initial BN variances of 1) within a few hundred steps. The official run has no warm-up."""
    if not config.ema_warmup:
        return config.ema_decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


def microbatches(x: jax.Array, count: int, shards: int) -> jax.Array:
    """[B, ...] -> [count, B / count, ...], micro-batch k made of every batch shard's k-th slice.

    The batch is split over `shards` devices in contiguous blocks; taking each block's k-th slice
    keeps every micro-batch spread over every device (no data moves). On one shard, micro-batch k
    is rows [k*M, (k+1)*M): the one-shot step's ghost batch-norm groups of M."""
    b = x.shape[0]
    blocks = x.reshape((shards, count, b // (shards * count)) + x.shape[1:])
    return jnp.swapaxes(blocks, 0, 1).reshape((count, b // count) + x.shape[1:])


def make_train_step(config, model: SwiftFormer, tx, schedule, num_classes: int, teacher: SwiftFormer | None = None,
                    batch_shards: int = 1):
    """`train_step(state, batch, rng, teacher_variables) -> (state, metrics)`, a pure function.

    batch: {"image": float [B, S, S, 3], "label": int [B]} (global). Metrics: loss, grad_norm
    (before clipping), learning_rate (used by this update), finite (loss and gradient finite).

    With `config.microbatch_size` M < B the gradient is accumulated over B / M micro-batches
    (`lax.scan`, so activations are those of one micro-batch) and one update is applied: the
    mean of the micro-batch gradients and losses, and the mean of their batch-norm statistics
    updates, which is the one-shot step's with ghost batch norm over groups of M (or a divisor).
    Mixup/cutmix is drawn on the whole batch first; drop path and dropout per micro-batch.
    `batch_shards` is the number of devices the batch is split over (see `microbatches`).
    """
    kind = config.distillation.kind
    use_mixup = _mixup_enabled(config)
    m = config.mixup
    mixup_args = dict(
        num_classes=num_classes, mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha,
        switch_prob=m.switch_prob, prob=m.prob, label_smoothing=config.label_smoothing, mode=m.mode,
        group_size=m.group_size or None,
    )
    smoothing, alpha, tau = config.label_smoothing, config.distillation.alpha, config.distillation.tau
    accumulation = accumulation_steps(config)

    def train_step(state: TrainState, batch, rng, teacher_variables):
        rng = jax.random.fold_in(rng, state.step)
        mix_rng, drop_path_rng, dropout_rng = jax.random.split(rng, 3)
        images, labels = batch["image"], batch["label"]
        if use_mixup:
            images, targets = mixup.mixup_cutmix(mix_rng, images, labels, **mixup_args)
        else:
            targets = losses.one_hot_smoothed(labels, num_classes, smoothing)

        def micro_step(images, targets, drop_path_rng, dropout_rng):
            """(loss, updated batch_stats, gradient) of one (micro-)batch."""
            # The teacher sees the same (mixed) images, in inference mode, and gets no gradient.
            teacher_logits = None if kind == "none" else teacher.apply(teacher_variables, images, train=False)

            def loss_fn(params):
                outputs, updates = model.apply(
                    {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                    mutable=["batch_stats"], rngs={"dropout": dropout_rng, "drop_path": drop_path_rng},
                )
                cls_logits, dist_logits = (outputs, None) if kind == "none" else outputs
                loss = losses.distillation_loss(cls_logits, dist_logits, targets, teacher_logits,
                                                kind=kind, alpha=alpha, tau=tau)
                return loss, updates["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return loss, batch_stats, grads

        if accumulation == 1:
            loss, batch_stats, grads = micro_step(images, targets, drop_path_rng, dropout_rng)
        else:
            split = lambda x: microbatches(x, accumulation, batch_shards)  # noqa: E731

            def accumulate(total, inputs):
                micro_images, micro_targets, k = inputs
                out = micro_step(micro_images, micro_targets, jax.random.fold_in(drop_path_rng, k),
                                 jax.random.fold_in(dropout_rng, k))
                return jax.tree_util.tree_map(jnp.add, total, out), None

            inputs = (split(images), split(targets), jnp.arange(accumulation))
            shapes = jax.eval_shape(micro_step, inputs[0][0], inputs[1][0], drop_path_rng, dropout_rng)
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            total, _ = jax.lax.scan(accumulate, zeros, inputs)
            loss, batch_stats, grads = jax.tree_util.tree_map(lambda x: x / accumulation, total)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optim.global_norm(grads)
        ema_decay = ema_decay_at(config, state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
            ema_params=optim.ema_update(state.ema_params, params, ema_decay),
            ema_batch_stats=optim.ema_update(state.ema_batch_stats, batch_stats, ema_decay),
        )
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: SwiftFormer, num_classes: int):
    """`eval_step(state, batch) -> sums` over the real (mask True) examples, raw and EMA models."""

    def evaluate(params, batch_stats, batch):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
        logits = logits.astype(jnp.float32)
        mask = batch["mask"].astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]).astype(jnp.float32)
        return jnp.sum(correct * mask), jnp.sum(nll * mask)

    def eval_step(state: TrainState, batch):
        correct, loss = evaluate(state.params, state.batch_stats, batch)
        ema_correct, ema_loss = evaluate(state.ema_params, state.ema_batch_stats, batch)
        return {"correct": correct, "loss": loss, "ema_correct": ema_correct, "ema_loss": ema_loss,
                "count": jnp.sum(batch["mask"].astype(jnp.float32))}

    return eval_step


def jit_steps(config, model, tx, schedule, num_classes, teacher, mesh, state_shardings, teacher_shardings=None):
    """(train_step, eval_step) jitted over `mesh`: batches split over every device, the state in
    `state_shardings` and donated by the train step, metrics replicated."""
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    train_step = jax.jit(
        make_train_step(config, model, tx, schedule, num_classes, teacher,
                        batch_shards=sharding_lib.batch_shards(mesh)),
        in_shardings=(state_shardings, batch_sharding, replicated, teacher_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(model, num_classes), in_shardings=(state_shardings, batch_sharding),
                        out_shardings=replicated)
    return train_step, eval_step


def _prefetch(batches: Iterator[dict], sharding, size: int = 2) -> Iterator[dict]:
    """Global device arrays, `size` batches ahead (the transfers overlap the running step)."""
    queue = collections.deque()

    def enqueue(n):
        for batch in itertools.islice(batches, n):
            queue.append(sharding_lib.global_batch(batch, sharding))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def evaluate(config, eval_step, state, sharding, num_examples: int,
             abort: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
    """One pass over the whole eval split (padding masked out): accuracy and loss, raw and EMA.

    Checks that every one of the `num_examples` eval examples counted exactly once. Returns None
    when `abort()` turns true between batches (a preemption notice: the checkpoint comes first).
    """
    batches = input_pipeline.eval_dataset(
        config.dataset, config.data_dir, local_batch_size=config.eval_batch_size // jax.process_count(),
        image_size=config.image_size, crop_pct=config.eval_crop_pct,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    sums = None
    for batch in _prefetch(batches, sharding):
        if abort():
            return None
        out = eval_step(state, batch)
        sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    if count != num_examples:
        raise RuntimeError(f"evaluation saw {count:.0f} examples, the eval split has {num_examples}")
    return {
        "eval/accuracy": float(sums["correct"]) / count,
        "eval/ema_accuracy": float(sums["ema_correct"]) / count,
        "eval/loss": float(sums["loss"]) / count,
        "eval/ema_loss": float(sums["ema_loss"]) / count,
        "eval/num_examples": float(sums["count"]),
    }


# ==============================================================================================
# 5. Where the state comes from: resume, init_from, scratch
# ==============================================================================================


def initial_state(config, run: Setup, init_rng, checkpointer) -> tuple[TrainState, Any]:
    """(state, shardings): the workdir's latest checkpoint, else `config.init_from`, else fresh.

    A latest step whose files do not read back (a failing disk, a partial copy) is moved aside as
    `corrupt-<step>` and the one before it is tried; a step that reads but belongs to another
    network or optimizer is a ConfigError, and nothing is moved.
    """
    moved = []
    while (latest := checkpointer.latest_step()) is not None:
        # Resume: the whole state, restored straight into its sharding. The config must describe
        # the same network and optimizer as the run that wrote it.
        abstract, shardings = abstract_train_state(run.model, run.tx, config, run.mesh, init_rng)
        try:
            saved = checkpointer.spec(latest)
            if saved != run.spec:
                raise ValueError(f"the checkpoint's network is {saved}, the config's is {run.spec}")
            restored = checkpointer.restore(latest, abstract)
        except checkpoint_lib.CorruptCheckpointError as error:
            where = checkpointer.move_aside(latest)
            moved.append(str(where))
            log.warning("Checkpoint step %d does not restore (%s); moved aside to %s.", latest, error.reason, where)
            continue
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"cannot resume from {checkpointer.directory} (step {latest}) with this config: "
                f"{str(error).splitlines()[0]}. Use a new workdir, or the config of that run."
            ) from None
        log.info("Resuming from %s at step %d.", checkpointer.directory, latest)
        return restored, shardings
    if moved:
        raise ConfigError(
            f"no checkpoint in {checkpointer.directory} restores (moved aside: {', '.join(moved)}); "
            "remove the workdir's checkpoints/ to start afresh, or restore them from a copy"
        )
    state, shardings = create_train_state(run.model, run.tx, config, run.mesh, init_rng)
    if config.init_from:
        # Fine-tune: params and batch statistics only; optimizer, EMA (= the loaded weights) and
        # step start afresh. The classifier heads are re-initialised when their shape differs.
        try:
            source_spec, pretrained = checkpoint_lib.load_variables(config.init_from, ema=config.init_from_ema)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"config.init_from={config.init_from!r} cannot be loaded: {error}") from None
        fresh = {"params": state.params, "batch_stats": state.batch_stats}
        try:
            merged, notes = checkpoint_lib.merge_pretrained(fresh, pretrained)
        except ValueError as error:
            raise ConfigError(f"config.init_from={config.init_from!r}: {error}") from None
        log.info("Initialised from %s: %s.", config.init_from, source_spec.describe())
        for note in notes:
            log.info("init_from: %s", note)
        # Through the host: every process holds the whole checkpoint, and the raw and EMA copies
        # must be distinct buffers (the train step donates both).
        merged = jax.device_get(merged)
        put = sharding_lib.put
        state = state.replace(
            params=put(merged["params"], shardings.params),
            batch_stats=put(merged["batch_stats"], shardings.batch_stats),
            ema_params=put(merged["params"], shardings.ema_params),
            ema_batch_stats=put(merged["batch_stats"], shardings.ema_batch_stats),
        )
        return state, shardings
    log.info("Training from scratch.")
    return state, shardings


# ==============================================================================================
# 6. The loop
# ==============================================================================================


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> TrainState:
    """Train and evaluate as `config` says, checkpointing into `workdir`; returns the final state.

    Resumes from `workdir` when it holds checkpoints. `stop_at_step` stops (with a checkpoint, as
    on preemption) once that many steps are done: for time-limited jobs and tests.
    """
    run = setup(config)  # every config error is raised here, before any state or data exists
    mesh, steps, spec = run.mesh, run.steps, run.spec
    process_count, process_index = jax.process_count(), jax.process_index()
    log.info("Mesh %s over %d devices, %d process(es).", dict(mesh.shape), mesh.devices.size, process_count)
    log.info("%s: %d train / %d eval examples, %d classes; %d steps/epoch, %d steps (%d warm-up), "
                 "eval every %d, checkpoint every %d.", config.dataset, run.data.num_train_examples,
                 run.data.num_eval_examples, run.data.num_classes, steps.steps_per_epoch,
                 steps.total_steps, steps.warmup_steps, steps.eval_every, steps.checkpoint_every)
    if process_index == 0:
        paths.mkdir(workdir)
        paths.write_bytes_atomically(paths.path(workdir) / "config.json",
                                     (config.to_json_best_effort(indent=2) + "\n").encode("utf-8"))

    # -- State (restored, fine-tuned or fresh), born in its sharding; jitted steps.
    # The keys are made on the devices, replicated (a host key could not reach other processes'
    # devices): one for the init, one that the train step folds with the step number.
    init_rng, train_rng = jax.jit(lambda: tuple(jax.random.split(jax.random.key(config.seed))),
                                  out_shardings=sharding_lib.replicated(mesh))()
    checkpointer = checkpoint_lib.Checkpointer(
        paths.path(workdir) / checkpoint_lib.CHECKPOINT_DIR, keep=config.keep_checkpoints, best_metric=config.best_metric,
        asynchronous=config.async_checkpointing, remove_unfinished=True,
    )
    writer = None
    watcher = checkpoint_lib.PreemptionWatcher()
    profiler = profiling.StepProfiler(workdir, config.profile_steps)
    try:
        state, state_shardings = initial_state(config, run, init_rng, checkpointer)
        start_step = int(jax.device_get(state.step))
        if process_index == 0:  # a killed attempt's records past the step this run starts from
            dropped = metrics_lib.drop_records_after(workdir, start_step)
            if dropped:
                log.info("Dropped %d metric records the interrupted run logged after step %d.", dropped, start_step)
        writer = metrics_lib.MetricWriter(workdir)
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
        log.info("Model: %s, %s parameters, compute dtype %s, %s ops.", spec.describe(), f"{num_params:,}",
                 config.dtype, run.model.impl)
        teacher_variables, teacher_shardings = None, None
        if run.teacher is not None:
            teacher_shardings = sharding_lib.tree_shardings(run.teacher_variables, mesh, config.mesh.fsdp_min_size_mb)
            teacher_variables = sharding_lib.put(run.teacher_variables, teacher_shardings)
        train_step, eval_step = jit_steps(config, run.model, run.tx, run.schedule, run.data.num_classes,
                                          run.teacher, mesh, state_shardings, teacher_shardings)
        # With several processes, each step's first run waits until every process has compiled it.
        train_step = multihost.compile_then_meet(train_step, "train_step")
        eval_step = multihost.compile_then_meet(eval_step, "eval_step")
        if start_step >= steps.total_steps:
            log.info("Nothing to do: the checkpoint is at step %d of %d.", start_step, steps.total_steps)
            return state

        # -- The input: this process's slice of each global batch, from the state's step on.
        batch_sharding = sharding_lib.batch_sharding(mesh)
        batches = _prefetch(
            input_pipeline.train_dataset(
                config.dataset, config.data_dir, local_batch_size=config.batch_size // process_count,
                image_size=config.image_size, augment=augment_config(config), seed=config.seed,
                process_index=process_index, process_count=process_count,
                repeated_aug=config.repeated_aug, start_step=start_step,
                shuffle_window=config.shuffle_window,
            ),
            batch_sharding,
        )
        return _loop(config, steps, state, batches, train_step, eval_step, train_rng, teacher_variables,
                     batch_sharding, checkpointer, writer, watcher, profiler, spec, start_step, stop_at_step,
                     run.data.num_eval_examples)
    finally:
        profiler.close()
        watcher.close()
        if writer is not None:
            writer.close()
        checkpointer.close()  # waits for the last asynchronous save


def _loop(config, steps: Durations, state, batches, train_step, eval_step, rng,
          teacher_variables, batch_sharding, checkpointer, writer, watcher, profiler, spec, start_step,
          stop_at_step, num_eval_examples) -> TrainState:
    """Steps from `start_step` to the end (or a stop). Each step's metrics are read while the next
    step runs, so the device never idles waiting for the host; every step is checked for a
    non-finite loss, and the step about to be logged or saved is checked before it is."""
    pending: collections.deque = collections.deque()  # (step, device metrics) not yet read
    window = {"loss": 0.0, "grad_norm": 0.0, "count": 0, "learning_rate": float("nan")}
    interval_start, interval_steps = time.time(), 0
    run_start = time.time()

    def read_metrics(keep_last: bool) -> None:
        """Read finished steps' metrics; stop on the first non-finite one."""
        while len(pending) > (1 if keep_last else 0):
            done_step, values = pending.popleft()
            values = jax.device_get(values)
            if not values["finite"]:
                good = checkpointer.latest_step()
                where = f"the last good checkpoint (step {good}) in {checkpointer.directory} is intact" if good is not None else "no checkpoint had been saved"
                raise NonFiniteLossError(
                    f"non-finite training loss at step {done_step} (loss={float(values['loss'])}, "
                    f"grad_norm={float(values['grad_norm'])}, lr={float(values['learning_rate']):.3g}): "
                    f"stopping without saving this state; {where}. Lower config.learning_rate, "
                    "check the data, or use config.dtype='float32', then rerun to resume."
                )
            window["loss"] += float(values["loss"])
            window["grad_norm"] += float(values["grad_norm"])
            window["learning_rate"] = float(values["learning_rate"])
            window["count"] += 1

    for step in range(start_step, steps.total_steps):
        batch = next(batches)
        done = step + 1
        result = []
        with profiler.step(done, result):
            state, step_metrics = train_step(state, batch, rng, teacher_variables)
            result.append(state)
        pending.append((done, step_metrics))
        read_metrics(keep_last=True)
        interval_steps += 1

        if stop_at_step is not None and done >= stop_at_step:
            watcher.request_stop()
        is_last = done == steps.total_steps
        stopping = not is_last and watcher.should_stop(done)
        do_eval = done % steps.eval_every == 0 or is_last
        do_save = done % steps.checkpoint_every == 0 or is_last or stopping
        do_log = done % steps.log_every == 0 or do_eval or is_last
        if not (do_log or do_save):
            continue

        read_metrics(keep_last=False)  # step `done` is finite before anything is logged or saved
        record = {}
        if do_log:
            elapsed = max(time.time() - interval_start, 1e-9)
            rate = interval_steps * config.batch_size / elapsed
            record.update({
                "train/loss": window["loss"] / max(window["count"], 1),
                "train/grad_norm": window["grad_norm"] / max(window["count"], 1),
                "train/learning_rate": window["learning_rate"],
                "train/images_per_second": rate,
            })
            seconds_per_step = elapsed / max(interval_steps, 1)  # recent pace, compile excluded after the first log
            log.info(
                "step %d/%d (%.1f%%) | loss %.4f | lr %.3g | %.0f img/s | elapsed %s | ETA %s",
                done, steps.total_steps, 100.0 * done / steps.total_steps, record["train/loss"],
                record["train/learning_rate"], rate, _format_duration(time.time() - run_start),
                _format_duration(seconds_per_step * (steps.total_steps - done)),
            )
            window.update(loss=0.0, grad_norm=0.0, count=0)
        eval_metrics = None
        if do_eval:
            eval_start = time.time()
            eval_metrics = evaluate(config, eval_step, state, batch_sharding, num_eval_examples,
                                    abort=watcher.stop_requested)
            if eval_metrics is None:  # preempted during evaluation: save first
                stopping, do_save = True, True
        if eval_metrics is not None:
            record.update(eval_metrics)
            log.info("step %d eval: accuracy %.4f | EMA accuracy %.4f | loss %.4f (%d examples, %.1fs)",
                         done, eval_metrics["eval/accuracy"], eval_metrics["eval/ema_accuracy"],
                         eval_metrics["eval/loss"], eval_metrics["eval/num_examples"], time.time() - eval_start)
        if record:
            writer.write(done, record)
        if do_save:
            checkpointer.save(done, state, spec, metrics=eval_metrics)
        if do_log or do_save:
            interval_start, interval_steps = time.time(), 0
        if stopping:
            checkpointer.wait()
            log.warning("Stopped at step %d with a checkpoint in %s; run the same command to resume.",
                            done, checkpointer.directory)
            return state
    log.info("Done: %d steps.", steps.total_steps)
    return state
