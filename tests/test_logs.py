"""The project's log: libraries' chatter stays out of a run's output unless --verbose asks for it."""

from __future__ import annotations

import logging
import sys
import types

from absl import logging as absl_logging

from swiftformer_jax import logs


def test_orbax_warnings_about_our_checkpoint_layout_are_dropped_unless_verbose(caplog):
    caplog.set_level(logging.WARNING)
    try:
        logs.setup()
        absl_logging.warning("Metadata file does not exist: %s", "/ckpt/0/state/_CHECKPOINT_METADATA")
        absl_logging.warning("Requested `tracked_metric`; did not provide metrics.")
        absl_logging.warning("a real warning: %s", "kept")
        assert [r.getMessage() for r in caplog.records] == ["a real warning: kept"]
        caplog.clear()
        logs.setup(verbose=True)
        absl_logging.warning("Metadata file does not exist: %s", "/ckpt/0/state/_CHECKPOINT_METADATA")
        assert [r.getMessage() for r in caplog.records] == [
            "Metadata file does not exist: /ckpt/0/state/_CHECKPOINT_METADATA"]
    finally:
        logs.setup(verbose=True)  # leave the libraries' loggers as a plain process has them
        absl_logging.set_verbosity(absl_logging.WARNING)


def test_the_unraisable_hook_drops_only_what_failed_checkpoint_reads_leave_behind():
    seen = []
    logs.setup(verbose=True)  # the hook unwrapped
    original = sys.unraisablehook
    try:
        sys.unraisablehook = seen.append
        logs.setup()

        async def _read_array_index_and_device_put():  # named as orbax's shard read
            pass

        coroutine = _read_array_index_and_device_put()
        for obj, error in ((coroutine, Exception("Encountered error while reading array index")),
                           (None, RuntimeError("Event loop is closed")),
                           (None, RuntimeError("another error")),
                           ("some object", RuntimeError("Event loop is closed"))):
            sys.unraisablehook(types.SimpleNamespace(object=obj, exc_value=error))
        coroutine.close()
        assert [(u.object, str(u.exc_value)) for u in seen] == [
            (None, "another error"), ("some object", "Event loop is closed")]
        logs.setup(verbose=True)
        assert sys.unraisablehook == seen.append  # verbose: the hook as it was
    finally:
        sys.unraisablehook = original
