"""Checkpoints: the trainer's orbax CheckpointManager, preemption, and loading any classifier we can.

Layout of a training workdir's checkpoints (`WORKDIR/checkpoints/<step>/`):
  state/   the whole TrainState (step, params, batch_stats, opt_state, ema_params, ema_batch_stats),
           orbax's standard format, restored straight into its sharding
  model/   JSON: what builds the network again (`ModelInfo`: variant, depths, widths, classes,
           distillation head, attention version), so a checkpoint is usable without its config
  metrics/ (eval steps only) the eval accuracy orbax ranks checkpoints by
The input position is the step: the input pipeline restarts at any step exactly, so nothing else
is saved. Saves are asynchronous: `save` returns once the arrays are copied off the devices, and
the files are written in the background; `wait` blocks until they are complete.

Kept: the last `keep` checkpoints, plus the best one by `best_metric` (when set).

`load_variables(path)` reads params and batch statistics from anything this package can produce
or import, for fine-tuning (`config.init_from`) and teachers (`config.distillation.teacher`):
  - a training workdir, its `checkpoints/` directory, or one step directory of it;
  - a directory written by `python -m swiftformer_jax.convert import` (has `metadata.json`);
  - a PyTorch file (.pth/.pt/.bin/.tar/.safetensors) in official, Hugging Face or timm naming.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from swiftformer_jax.model import VARIANTS, SwiftFormer, create_model

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
MODEL_ITEM = "model"
_VARIABLE_COLLECTIONS = ("params", "batch_stats")


# ----------------------------------------------------------------------------------------------
# What a checkpoint's network is
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Everything the weights fix about the network, saved beside them as JSON.

    `variant` names a row of the variant table ("XS", "S", "L1", "L3"); `depths` and `widths` are
    the actual sizes (equal to the row, or a custom network built through `config.model.depths`
    and `config.model.widths`, whose variant is then "custom").
    """

    variant: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    num_classes: int
    distillation: bool
    attention_version: int = 2

    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> "ModelInfo":
        key = str(variant).upper()
        if key not in VARIANTS:
            raise ValueError(f"unknown SwiftFormer variant {variant!r}; valid names: {', '.join(VARIANTS)}")
        spec = VARIANTS[key]
        return cls(variant=key, depths=spec.depths, widths=spec.widths, **kwargs)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(data) - {"attention_version"}
        if missing:
            raise ValueError(f"model description {dict(data)} lacks {sorted(missing)}")
        kwargs = {k: v for k, v in data.items() if k in fields}
        return cls(**{**kwargs, "depths": tuple(kwargs["depths"]), "widths": tuple(kwargs["widths"])})

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "depths": list(self.depths), "widths": list(self.widths)}

    def create(self, **kwargs: Any) -> SwiftFormer:
        """The network; `kwargs` are the free choices (dtype, bn_group_size, drop rates)."""
        spec = VARIANTS.get(self.variant)
        common = dict(num_classes=self.num_classes, distillation=self.distillation,
                      attention_version=self.attention_version, **kwargs)
        if spec is not None and (spec.depths, spec.widths) == (self.depths, self.widths):
            return create_model(self.variant, **common)
        if len(self.depths) != 4 or len(self.widths) != 4 or min(self.depths + self.widths) < 1:
            raise ValueError(f"custom network needs 4 positive depths and widths, got {self.depths}, {self.widths}")
        return SwiftFormer(depths=tuple(self.depths), widths=tuple(self.widths), **common)


# ----------------------------------------------------------------------------------------------
# The trainer's checkpoint manager
# ----------------------------------------------------------------------------------------------


class Checkpointer:
    """orbax CheckpointManager for TrainStates in `WORKDIR/checkpoints`.

    Every process calls every method (orbax coordinates multi-process saves); only the steps the
    trainer asks for are saved (`save` at interval steps, at the end, on preemption).

    `remove_unfinished=True` (the trainer) deletes the temporary directories of saves that a killed
    run left unfinished (`<step>.orbax-checkpoint-tmp`, each up to a whole checkpoint's size)
    before its first save. Readers leave them alone: one may be a live run's save in progress.
    """

    def __init__(self, workdir: str, *, keep: int, best_metric: str | None = None,
                 asynchronous: bool = True, remove_unfinished: bool = False):
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.best_metric = best_metric or None
        policies = [checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if self.best_metric:
            metric = self.best_metric
            best_fn = lambda metrics: float(metrics[metric])  # noqa: E731
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode="max",
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=asynchronous,
            create=True,
            cleanup_tmp_directories=remove_unfinished,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, MODEL_ITEM),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def all_steps(self) -> Sequence[int]:
        return self._manager.all_steps()

    def save(self, step: int, state: Any, model_info: ModelInfo,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Start saving `state` as `step` (returns at once; arrays are copied off device first).

        `metrics` (eval steps) must hold `best_metric` for the checkpoint to compete for "best".
        Returns False when `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        if metrics is not None and self.best_metric:
            metrics = {self.best_metric: float(metrics[self.best_metric])}
        else:
            metrics = None
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            MODEL_ITEM: ocp.args.JsonSave(model_info.to_json()),
        })
        return self._manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The TrainState saved at `step`, placed as `abstract_state` says (ShapeDtypeStructs with
        shardings, e.g. `sharding.with_shardings`)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
        )
        return restored[STATE_ITEM]

    def model_info(self, step: int) -> ModelInfo:
        restored = self._manager.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))
        return ModelInfo.from_json(restored[MODEL_ITEM])

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------


class PreemptionWatcher:
    """Tells the training loop when to save and stop because the job is being preempted.

    One process: a SIGTERM handler sets a flag (the loop checks it after every step, saves and
    returns; the current step finishes first). Several processes: every process must save at the
    same step, so the decision is JAX's preemption sync point (`jax.distributed.initialize` starts
    the service, which catches SIGTERM itself; no Python handler is installed then).
    `request_stop()` does what a SIGTERM does (time-limited jobs, tests).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self._multiprocess = jax.process_count() > 1
        if self._multiprocess:
            return
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Not in the main thread: SIGTERM will not trigger a checkpoint.")
            return
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        logging.warning("Received signal %d: finishing this step, then saving a checkpoint.", signum)
        self._flag.set()

    def request_stop(self) -> None:
        self._flag.set()

    def stop_requested(self) -> bool:
        """A stop request (SIGTERM, request_stop) that may interrupt an evaluation: single process
        only, where no other process has to agree on it."""
        return not self._multiprocess and self._flag.is_set()

    def should_stop(self, step: int) -> bool:
        if self._flag.is_set():
            return True
        if self._multiprocess:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
                return False
        return False

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------------------------
# Loading weights from anything we can read (init_from, teachers)
# ----------------------------------------------------------------------------------------------


def _is_step_dir(path: Path) -> bool:
    return (path / STATE_ITEM).is_dir() and (path / MODEL_ITEM).is_dir()


def _manager_step_dir(path: Path) -> Path | None:
    """The latest step directory under a checkpoints/ dir (or a workdir holding one), if any."""
    for root in (path / CHECKPOINT_DIR, path):
        steps = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit() and _is_step_dir(p)) if root.is_dir() else []
        if steps:
            return root / str(steps[-1])
    return None


def _restore_variables_from_step_dir(step_dir: Path, ema: bool) -> tuple[ModelInfo, dict]:
    """params/batch_stats (or the EMA ones) of a trainer checkpoint, as host NumPy arrays."""
    info = ModelInfo.from_json(ocp.JsonCheckpointHandler().restore(step_dir / MODEL_ITEM))
    names = ("ema_params", "ema_batch_stats") if ema else _VARIABLE_COLLECTIONS
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(step_dir / STATE_ITEM).item_metadata.tree
        missing = [n for n in names if n not in metadata]
        if missing:
            raise ValueError(f"{step_dir} has no {missing} in its state: not a trainer checkpoint")
        item = {n: jax.tree_util.tree_map(lambda m: np.zeros((), m.dtype), metadata[n]) for n in names}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = checkpointer.restore(
            step_dir / STATE_ITEM,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    return info, {"params": restored[names[0]], "batch_stats": restored[names[1]]}


def load_variables(path: str, *, ema: bool = False) -> tuple[ModelInfo, dict]:
    """(ModelInfo, {"params", "batch_stats"}) from a checkpoint of any kind this package reads.

    `path`: a training workdir / its checkpoints dir (latest step) / one step dir; an imported
    checkpoint dir (metadata.json); or a PyTorch file. `ema` takes a trainer checkpoint's EMA
    weights (or a released PyTorch checkpoint's `model_ema` entry) instead of the raw ones.
    """
    from swiftformer_jax import convert  # imports torch lazily; only this path needs it

    source = Path(os.path.expanduser(path))
    if not source.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if source.is_file():
        state_dict = convert.read_torch_file(source)
        which = "model_ema" if ema else "model"
        spec = convert.model_spec(state_dict, which=which)
        version = convert.DEFAULT_ATTENTION_VERSION[convert.detect_naming(state_dict, which=which)]
        variables = convert.from_torch(state_dict, spec.variant, which=which)
        logging.info("Read %s (%s naming; attention version %d assumed; import it with "
                     "`python -m swiftformer_jax.convert import` to state another).",
                     source, convert.detect_naming(state_dict, which=which), version)
        info = ModelInfo.from_variant(spec.variant, num_classes=spec.num_classes,
                                      distillation=spec.distillation, attention_version=version)
        return info, _to_numpy(variables)
    if (source / convert.METADATA_FILE).is_file():
        if ema:
            raise ValueError(f"{source} is an imported checkpoint: it holds one set of weights, no EMA")
        metadata = convert.read_metadata(source)
        if metadata["features_only"]:
            raise ValueError(f"{source} holds a feature extractor (features_only): no classifier to load")
        _, variables, metadata = convert.load_checkpoint(source)
        info = ModelInfo.from_variant(metadata["variant"], num_classes=metadata["num_classes"],
                                      distillation=metadata["distillation"],
                                      attention_version=metadata["attention_version"])
        return info, _to_numpy(variables)
    step_dir = source if _is_step_dir(source) else _manager_step_dir(source)
    if step_dir is None:
        raise ValueError(
            f"{path} is neither a PyTorch file, an imported checkpoint (metadata.json), nor a "
            f"training workdir / checkpoints directory / step directory of this trainer"
        )
    logging.info("Reading %s weights from %s.", "EMA" if ema else "raw", step_dir)
    return _restore_variables_from_step_dir(step_dir, ema)


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def load_classifier(path: str, *, ema: bool = False, **model_kwargs: Any) -> tuple[SwiftFormer, dict, ModelInfo]:
    """(model, variables, info) for a frozen classifier, e.g. a distillation teacher.

    `model_kwargs` go to the network (dtype). Checkpoints without a classifier are refused.
    """
    info, variables = load_variables(path, ema=ema)
    if info.num_classes <= 0:
        raise ValueError(f"{path} holds no classifier head (num_classes={info.num_classes})")
    return info.create(**model_kwargs), variables, info


def merge_pretrained(init_variables: Mapping, pretrained: Mapping, *,
                     reinit_prefixes: Sequence[str] = ("head", "dist_head")) -> tuple[dict, list[str]]:
    """`init_variables` with every leaf taken from `pretrained` where path and shape agree.

    Leaves under `reinit_prefixes` (the classifier heads) that are missing or shaped differently
    keep their fresh initialisation (fine-tuning to another class count); any other difference is
    an error (a different network). Returns (variables, messages describing what was not loaded).
    """
    from flax import traverse_util

    target = traverse_util.flatten_dict({c: init_variables[c] for c in _VARIABLE_COLLECTIONS})
    source = traverse_util.flatten_dict({c: pretrained[c] for c in _VARIABLE_COLLECTIONS if c in pretrained})
    merged, notes, errors = {}, [], []
    for key, leaf in target.items():
        is_head = len(key) > 1 and key[1] in reinit_prefixes
        name = "/".join(key)
        if key in source and tuple(np.shape(source[key])) == tuple(leaf.shape):
            merged[key] = jnp.asarray(source[key], leaf.dtype)
        elif is_head:
            merged[key] = leaf
            got = f"shape {tuple(np.shape(source[key]))}" if key in source else "absent"
            notes.append(f"{name} re-initialised (checkpoint: {got}, model: {tuple(leaf.shape)})")
        else:
            got = f"shape {tuple(np.shape(source[key]))}" if key in source else "missing"
            errors.append(f"{name}: checkpoint {got}, model {tuple(leaf.shape)}")
    unused = sorted("/".join(k) for k in source if k not in target)
    if errors:
        raise ValueError(
            "the checkpoint does not fit the configured network (check config.model): "
            + "; ".join(errors[:8]) + (f"; ... {len(errors) - 8} more" if len(errors) > 8 else "")
        )
    if unused:
        notes.append(f"not used from the checkpoint: {', '.join(unused[:8])}"
                     + (f" ... ({len(unused)} in all)" if len(unused) > 8 else ""))
    return traverse_util.unflatten_dict(merged), notes
