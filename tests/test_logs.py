"""The project's log: libraries' chatter stays out of a run's output unless --verbose asks for it."""

from __future__ import annotations

import logging

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
