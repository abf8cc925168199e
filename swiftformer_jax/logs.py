"""The project's log: its own lines for people, and the libraries' chatter kept quiet.

Every module of the package logs through `log` (the `swiftformer_jax` logger). Entry points call
`setup()` once: the project's lines go to stderr as `HH:MM:SS message`, and the INFO lines of
orbax, absl, JAX and TensorFlow (orbax alone prints dozens per run, one a 2,000-character options
dump) stay below WARNING unless `verbose` asks for them. Used as a library, without `setup()`,
the logger follows the application's logging configuration like any other.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("swiftformer_jax")

# Loggers of the libraries whose INFO lines are chatter in a training log.
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "jax._src", "tensorflow", "etils", "tensorstore")
# Loggers whose WARNINGs are chatter too: the exporters' (jax2onnx warns, with a traceback, of each
# example plugin whose optional package is absent; onnx_ir of shape values it does not serialise).
QUIET_LOGGERS = ("jax2onnx", "onnx_ir")
# WARNINGs that are chatter, by their message's start. orbax's reader looks for a per-item metadata
# file in `<step>/state/`, which its CheckpointManager never writes there (it keeps the step's one
# level up), so every read of a checkpoint (predict, export, init_from, the teacher) warned. And
# with a best-checkpoint metric, orbax warns at each save given no metrics: the trainer's saves
# between evaluations, which by design carry none (the latest-N policy keeps them).
CHATTER = ("Metadata file does not exist", "Requested `tracked_metric`; did not provide metrics")
# What an orbax restore that failed (a damaged checkpoint, already reported as one line) leaves
# behind: its abandoned shard reads end as "unraisable" exceptions (coroutines closed mid-read, and
# tensorstore callbacks into the closed event loop: hundreds per restore, each a long traceback
# with the whole TensorStore spec), and asyncio logs each of its read tasks' errors once more.
ABANDONED_READS = ("_read_array_index_and_device_put",)  # orbax's per-shard read coroutine
ABANDONED_TASKS = ("coro=<async_deserialize()",)  # orbax's per-array read task
_FORMAT = "%(asctime)s %(message)s"
_WARNING_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CHATTER)


_DROP_CHATTER = _DropChatter()


class _DropAbandonedTasks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        abandoned = any(task in message for task in ABANDONED_TASKS)
        return not (message.startswith("Task exception was never retrieved") and abandoned)


_DROP_ABANDONED_TASKS = _DropAbandonedTasks()


class _UnraisableFilter:
    """sys.unraisablehook that drops what a failed orbax read leaves behind, and passes the rest on."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        if (code is not None and code.co_name in ABANDONED_READS) or (
                unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        self.previous(unraisable)


def _drop_abandoned_reads(drop: bool) -> None:
    previous = sys.unraisablehook
    if isinstance(previous, _UnraisableFilter):
        previous = previous.previous
    sys.unraisablehook = _UnraisableFilter(previous) if drop else previous
    asyncio_log = logging.getLogger("asyncio")
    if drop:
        asyncio_log.addFilter(_DROP_ABANDONED_TASKS)
    else:
        asyncio_log.removeFilter(_DROP_ABANDONED_TASKS)


class _Formatter(logging.Formatter):
    """Plain lines for INFO; the level named for anything worse."""

    def __init__(self):
        super().__init__(_FORMAT, "%H:%M:%S")
        self._warning = logging.Formatter(_WARNING_FORMAT, "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return self._warning.format(record) if record.levelno >= logging.WARNING else super().format(record)


def setup(*, verbose: bool = False, quiet: bool = False) -> None:
    """Send the project's lines to stderr; libraries at WARNING unless `verbose`.

    `quiet` (processes other than 0 of a multi-process run) keeps the project's lines at WARNING
    too, so a job prints one progress log. Unless `verbose`, what a failed checkpoint read leaves
    behind (`ABANDONED_READS`, `ABANDONED_TASKS`) is dropped too: the failure itself is reported.
    TensorFlow prints two oneDNN notices when it is first imported, through a C++ logger no
    setting here reaches.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    level = logging.INFO if verbose else logging.WARNING
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
        if verbose:
            logging.getLogger(name).removeFilter(_DROP_CHATTER)
        else:
            logging.getLogger(name).addFilter(_DROP_CHATTER)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    _drop_abandoned_reads(not verbose)


def first_line(error: BaseException) -> str:
    """An exception's first line (libraries' multi-line messages), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
