"""Checkpoints: the one on-disk layout, the trainer's orbax CheckpointManager, preemption, and
loading the weights of any checkpoint this package writes or reads.

One layout for every checkpoint this package writes, by the trainer (`WORKDIR/checkpoints`) and
by `python -m swiftformer_jax.convert import` (its `--output` directory) alike: a *checkpoint
directory* managed by orbax's CheckpointManager, holding one directory per saved step:

  <step>/state/    orbax's standard format. The trainer saves the whole TrainState (step, params,
                   batch_stats, opt_state, ema_params, ema_batch_stats); an import saves
                   {params, batch_stats} as step 0. Readers restore the part they need.
  <step>/model/    JSON: the network's spec (`ModelSpec`, or `RegNetSpec` for a RegNetY teacher,
                   told apart by its "architecture" key: `specs.spec_from_json`), so the weights
                   are usable without a config, and, for an import, `source` (the PyTorch file,
                   its sha256, naming and entry)
  <step>/metrics/  (trainer eval steps) the eval accuracy orbax ranks checkpoints by

The trainer saves asynchronously: `save` returns once the arrays are copied off the devices, and
`wait` blocks until the files are complete. The input position is the step (the input pipeline
restarts at any step exactly), so nothing else is saved.

`load_checkpoint(path)` / `load_variables(path)` read the weights of any of:
  - a workdir, a checkpoint directory (its latest step) or one step directory;
    local or `gs://` (`paths`; on GCS orbax marks a finished step with `commit_success.txt`
    instead of renaming it into place);
  - a directory written by `convert import` before the layout above (`metadata.json` + `state/`);
  - a PyTorch file (.pth/.pt/.bin/.tar/.safetensors): a SwiftFormer in official, Hugging Face or
    timm naming, or a RegNetY in timm (DeiT's release) or Hugging Face naming.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import uuid
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from swiftformer_jax import paths
from swiftformer_jax.logs import first_line, log
from swiftformer_jax.model import ModelSpec
from swiftformer_jax.specs import Spec, spec_from_json

CHECKPOINT_DIR = "checkpoints"  # a workdir's checkpoint directory
STATE_ITEM = "state"
MODEL_ITEM = "model"
_VARIABLE_COLLECTIONS = ("params", "batch_stats")
_EMA_COLLECTIONS = ("ema_params", "ema_batch_stats")
# The layout `convert import` wrote before the one above; still read.
LEGACY_METADATA_FILE = "metadata.json"
LEGACY_METADATA_FORMAT = "swiftformer-jax/imported-checkpoint"
GCS_COMMIT_FILE = "commit_success.txt"  # orbax's mark of a finished step on GCS


# ----------------------------------------------------------------------------------------------
# The checkpoint manager
# ----------------------------------------------------------------------------------------------


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, for one); the message names the last
    complete checkpoint, which is intact."""


class CorruptCheckpointError(ValueError):
    """A saved step that cannot be read back: missing or truncated files, unreadable metadata.

    `step_dir` is the damaged step; `reason` names the damaged part. A checkpoint that reads but
    does not fit the network or optimizer asked for is a plain ValueError, not this.
    """

    def __init__(self, step_dir: str | os.PathLike, reason: str):
        super().__init__(f"{step_dir} is damaged: {reason}")
        self.step_dir, self.reason = str(step_dir), reason


def read_error(error: BaseException) -> str:
    """The first line of the error underneath an array read that failed.

    orbax wraps tensorstore's error, which names the array and the file ("Error reading
    "params.head.kernel/0.0" in OCDBT database at ...: Requested byte range ... is not valid"), in
    one that names a slice and prints the whole TensorStore spec.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error)


class Checkpointer:
    """orbax CheckpointManager of a checkpoint directory (the trainer's: `WORKDIR/checkpoints`).

    Every process calls every method (orbax coordinates multi-process saves); only the steps the
    trainer asks for are saved (`save` at interval steps, at the end, on preemption).

    `remove_unfinished=True` (the trainer) deletes the temporary directories of saves that a killed
    run left unfinished (`<step>.orbax-checkpoint-tmp`, each up to a whole checkpoint's size)
    before its first save. Readers leave them alone: one may be a live run's save in progress.
    """

    def __init__(self, directory: str, *, keep: int, best_metric: str | None = None,
                 asynchronous: bool = True, remove_unfinished: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = str(paths.path(directory))
        self.best_metric = best_metric or None
        policies = [checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if self.best_metric:
            metric = self.best_metric
            best_fn = lambda metrics: float(metrics[metric])  # noqa: E731
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False,
            ))
        self._asynchronous = asynchronous
        self._failed: CheckpointWriteError | None = None
        self._pending: int | None = None  # the step of the save that may still be in the background
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

    def save(self, step: int, state: Any, spec: Spec,
             metrics: Mapping[str, float] | None = None, source: Mapping[str, Any] | None = None) -> bool:
        """Start saving `state` as `step` (returns at once; arrays are copied off device first).

        `metrics` (eval steps) must hold `best_metric` for the checkpoint to compete for "best";
        `source` (imports) is saved beside the spec. Returns False when `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        if metrics is not None and self.best_metric:
            metrics = {self.best_metric: float(metrics[self.best_metric])}
        else:
            metrics = None
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            MODEL_ITEM: ocp.args.JsonSave({**spec.to_json(), **({"source": dict(source)} if source else {})}),
        })
        try:
            saved = self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as error:  # noqa: BLE001 - this save, or the previous one in the background
            raise self._write_failure(self._pending if self._pending is not None else step, error) from None
        self._pending = step
        log.info("Checkpoint of step %d %s %s.", step,
                 "being written to" if self._asynchronous else "written to", self.directory)
        return saved

    def step_dir(self, step: int) -> paths.epath.Path:
        return paths.path(self.directory) / str(step)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The TrainState saved at `step`, placed as `abstract_state` says (ShapeDtypeStructs with
        shardings, e.g. `sharding.with_shardings`).

        Raises CorruptCheckpointError when the step's files do not read back, and ValueError when
        they do but hold arrays of other shapes than `abstract_state` (another network or
        optimizer): the saved shapes are compared before any array is read.
        """
        want = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(abstract_state))
        have = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(self._state_metadata(step)))
        if want != have:
            raise ValueError(
                f"step {step} holds {len(have)} arrays that do not match the {len(want)} of the state "
                "asked for (another network or optimizer)"
            )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
            )
        except Exception as error:  # noqa: BLE001 - tensorstore and orbax raise many types
            raise CorruptCheckpointError(self.step_dir(step), f"{STATE_ITEM}/: {read_error(error)}") from None
        return restored[STATE_ITEM]

    def _state_metadata(self, step: int) -> Any:
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                return checkpointer.metadata(self.step_dir(step) / STATE_ITEM).item_metadata.tree
        except Exception as error:  # noqa: BLE001 - a missing or garbled _METADATA, for one
            raise CorruptCheckpointError(self.step_dir(step),
                                         f"{STATE_ITEM}/ metadata: {first_line(error)}") from None

    def spec(self, step: int) -> Spec:
        """The network saved with `step` (CorruptCheckpointError when it does not read back)."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))
            return spec_from_json(restored[MODEL_ITEM])
        except Exception as error:  # noqa: BLE001 - missing item, bad JSON, bad fields
            raise CorruptCheckpointError(self.step_dir(step), f"{MODEL_ITEM}/: {first_line(error)}") from None

    def move_aside(self, step: int) -> paths.epath.Path:
        """Rename a damaged step to `corrupt-<step>` (never deleted) so no reader takes it for a
        checkpoint again; returns the new path. Process 0 renames; every process calls this."""
        source = self.step_dir(step)
        target = paths.path(self.directory) / f"corrupt-{step}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = paths.path(self.directory) / f"corrupt-{step}-{suffix}"
        if jax.process_index() == 0:
            paths.rename_dir(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"swiftformer_jax: moved aside step {step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Block until every started save is on disk (CheckpointWriteError if one failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._write_failure(self._pending, error) from None
        self._pending = None

    def close(self) -> None:
        """Wait for the last save and close; after a write failure already raised, only close."""
        try:
            if self._failed is None:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - its pending save failed, and that was reported
                if self._failed is None:
                    raise

    def _write_failure(self, step: int | None, error: BaseException) -> "CheckpointWriteError":
        complete = complete_steps(self.directory)
        last = f"step {complete[-1]}" if complete else "none"
        saving = f" (saving step {step})" if step is not None else ""
        self._failed = CheckpointWriteError(
            f"cannot write a checkpoint to {self.directory}{saving}: {first_line(error)}. The last complete "
            f"checkpoint is {last}; an unfinished save is never read as a checkpoint (it stays as "
            "<step>.orbax-checkpoint-tmp until the run resumes). Free space, then rerun the same command to resume."
        )
        return self._failed


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
            log.warning("Not in the main thread: SIGTERM will not trigger a checkpoint.")
            return
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        log.warning("Received signal %d: finishing this step, then saving a checkpoint.", signum)
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
# Writing weights alone (imports) and reading weights from any checkpoint
# ----------------------------------------------------------------------------------------------


def save_weights(output: str | os.PathLike, variables: Mapping, spec: Spec, *,
                 source: Mapping[str, Any] | None = None) -> None:
    """Write {"params", "batch_stats"} as a checkpoint directory with one step (0), atomically.

    `output` must not exist. Locally the directory is built under a temporary sibling name and
    renamed at the end; on GCS (no directory rename) orbax writes the step in place and marks it
    finished last. Either way a failure leaves nothing behind.
    """
    output = paths.path(output)
    if output.exists():
        raise FileExistsError(f"output already exists: {output}")
    if not paths.parent_exists(output):
        raise FileNotFoundError(f"output directory does not exist: {output.parent}")
    remote = paths.is_remote(output)
    temporary = output if remote else output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        manager = Checkpointer(str(temporary), keep=1, asynchronous=False)
        try:
            manager.save(0, {c: variables[c] for c in _VARIABLE_COLLECTIONS}, spec, source=source)
        finally:
            manager.close()
        if not remote:
            paths.rename_dir(temporary, output)
    except BaseException:
        if temporary.exists():
            temporary.rmtree()
        raise


def _is_step_dir(path: paths.epath.Path) -> bool:
    finished = (path / STATE_ITEM).is_dir() and (path / MODEL_ITEM).is_dir()
    return finished and (not paths.is_remote(path) or (path / GCS_COMMIT_FILE).exists())


def complete_steps(root: str | os.PathLike) -> list[int]:
    """The steps of a checkpoint directory whose saves finished, read from the directory itself."""
    root = paths.path(root)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and _is_step_dir(p)) if root.is_dir() else []


def find_step_dir(path: str | os.PathLike) -> paths.epath.Path | None:
    """The step directory `path` means: itself, or the latest step of the checkpoint directory it
    is or holds (a workdir holds one as `checkpoints/`). None when there is none."""
    path = paths.path(path)
    if _is_step_dir(path):
        return path
    for root in (path / CHECKPOINT_DIR, path):
        steps = complete_steps(root)
        if steps:
            return root / str(steps[-1])
    return None


def read_spec(step_dir: str | os.PathLike) -> Spec:
    """The spec (`ModelSpec` or `RegNetSpec`) saved in a step directory."""
    return spec_from_json(ocp.JsonCheckpointHandler().restore(paths.path(step_dir) / MODEL_ITEM))


def _restore_variables_from_step_dir(step_dir: paths.epath.Path, ema: bool) -> tuple[Spec, dict]:
    """params/batch_stats (or the EMA ones) of a step directory, as host NumPy arrays.

    CorruptCheckpointError, naming the damaged part, when a file does not read back."""
    try:
        spec = read_spec(step_dir)
    except Exception as error:  # noqa: BLE001 - missing item, bad JSON, bad fields
        raise CorruptCheckpointError(step_dir, f"{MODEL_ITEM}/: {first_line(error)}") from None
    names = _EMA_COLLECTIONS if ema else _VARIABLE_COLLECTIONS
    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(step_dir / STATE_ITEM).item_metadata.tree
        except Exception as error:  # noqa: BLE001
            raise CorruptCheckpointError(step_dir, f"{STATE_ITEM}/ metadata: {first_line(error)}") from None
        missing = [n for n in names if n not in metadata]
        if missing:
            what = "EMA weights (it holds imported weights, or weights alone)" if ema else f"{missing}"
            raise ValueError(f"{step_dir} has no {what}")
        item = {n: jax.tree_util.tree_map(lambda m: np.zeros((), m.dtype), metadata[n]) for n in names}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            restored = checkpointer.restore(
                step_dir / STATE_ITEM,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
        except Exception as error:  # noqa: BLE001 - tensorstore and orbax raise many types
            raise CorruptCheckpointError(step_dir, f"{STATE_ITEM}/: {read_error(error)}") from None
    return spec, {"params": restored[names[0]], "batch_stats": restored[names[1]]}


def _read_legacy_import(directory: paths.epath.Path, ema: bool) -> tuple[ModelSpec, dict]:
    """Weights of a directory that `convert import` wrote before the checkpoint-directory layout."""
    import json

    path = directory / LEGACY_METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != LEGACY_METADATA_FORMAT:
        raise ValueError(f"{path} is not swiftformer-jax checkpoint metadata (format != {LEGACY_METADATA_FORMAT!r})")
    if ema:
        raise ValueError(f"{directory} is an imported checkpoint: it holds one set of weights, no EMA")
    spec = ModelSpec.from_json(metadata)
    state = directory / STATE_ITEM
    if not state.is_dir():
        raise FileNotFoundError(f"{directory} has no {STATE_ITEM}/ directory")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(state, spec.abstract_variables())
    except Exception as error:  # noqa: BLE001 - orbax raises many types for a bad directory
        raise ValueError(f"cannot restore {state} as {spec.describe()} variables: {first_line(error)}") from None
    return spec, _to_numpy(variables)


def load_variables(path: str | os.PathLike, *, ema: bool = False) -> tuple[Spec, dict]:
    """(spec, {"params", "batch_stats"} as host arrays) from any checkpoint this package reads.

    `path`: a workdir / checkpoint directory (latest step) / step directory, a directory of the
    earlier import layout, or a PyTorch file. `ema` takes a trainer checkpoint's EMA weights (or a
    released PyTorch checkpoint's `model_ema` entry) instead of the raw ones.
    """
    source = paths.path(path)
    if not source.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if source.is_file():
        from swiftformer_jax import convert  # imports torch lazily; only this path needs it

        return convert.read_torch_checkpoint(source, which="model_ema" if ema else "model")
    if (source / LEGACY_METADATA_FILE).is_file():
        return _read_legacy_import(source, ema)
    step_dir = find_step_dir(source)
    if step_dir is None:
        raise ValueError(
            f"{path} is neither a checkpoint directory of this package (a workdir, its checkpoints/ "
            f"directory, one step of it, or a `convert import` output) nor a PyTorch file"
        )
    log.info("Reading %s weights from %s.", "EMA" if ema else "raw", step_dir)
    return _restore_variables_from_step_dir(step_dir, ema)


def load_checkpoint(path: str | os.PathLike, *, ema: bool = False,
                    **build_kwargs: Any) -> tuple[Any, dict, Spec]:
    """(model, variables, spec) from any checkpoint `load_variables` reads: a SwiftFormer, or a
    RegNetY (`regnet.RegNetY`) when the checkpoint holds one.

    The model is `spec.build(**build_kwargs)` (dtype, bn_group_size; drop rates for SwiftFormer);
    pass `attention_version=` to override a SwiftFormer's recorded version. Variables are host
    NumPy arrays.
    """
    spec, variables = load_variables(path, ema=ema)
    if "attention_version" in build_kwargs:
        if not isinstance(spec, ModelSpec):
            raise ValueError(f"{path} holds a {spec.describe()}, which has no attention version")
        spec = dataclasses.replace(spec, attention_version=build_kwargs.pop("attention_version"))
    return spec.build(**build_kwargs), variables, spec


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


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
