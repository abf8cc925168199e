"""One writer for training metrics: TensorBoard event files and `metrics.jsonl`, on process 0 only.

`workdir/metrics.jsonl` gets one JSON object per logged step, e.g.
    {"step": 1000, "train/loss": 3.21, "train/learning_rate": 0.002, "train/grad_norm": 1.7,
     "train/images_per_second": 5120.0, "eval/accuracy": 0.61, "eval/ema_accuracy": 0.55,
     "eval/loss": 1.73}
(eval keys only on eval steps). The same scalars go to TensorBoard event files in `workdir`
(`tensorboard --logdir=WORKDIR`). A resumed run first drops what the interrupted attempt logged
past the step it resumes from (`drop_records_after`), then appends: each step is logged once,
and each attempt writes a new event file whose steps continue the last one's.
Other processes get a writer that writes nothing, so callers never branch on the process index.
"""

from __future__ import annotations

import glob
import json
import math
import os
import tempfile
from typing import Mapping

import jax

METRICS_FILE = "metrics.jsonl"


def _plain(value) -> float | int:
    """A Python number for JSON; NaN and inf become strings JSON can hold ("nan", "inf")."""
    if isinstance(value, (bool, int)) and not isinstance(value, float):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _scalar_metadata():
    """TensorBoard's scalar-plugin summary metadata (tensorboard.plugins.scalar.metadata)."""
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars", content=b""),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )


class MetricWriter:
    """Writes scalars for a step to TensorBoard and to `workdir/metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._summary = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        import tensorflow as tf  # the event-file writer; imported here so readers need no TF.

        self._summary = tf.summary.create_file_writer(workdir)
        self._scalar_metadata = _scalar_metadata()
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` (name -> number) at `step`: one TensorBoard point each, one JSON line."""
        if not self.enabled:
            return
        import tensorflow as tf

        record = {"step": int(step), **{name: _plain(v) for name, v in sorted(scalars.items())}}
        with self._summary.as_default(step=int(step)):
            for name, value in scalars.items():
                # What tf.summary.scalar writes, without needing the tensorboard package.
                tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=self._scalar_metadata)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self.enabled:
            self._summary.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._jsonl is not None:
            self._summary.close()
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in file order (for tests, notebooks and scripts)."""
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def drop_records_after(workdir: str, step: int) -> int:
    """Remove the records a killed attempt wrote past `step` (the step a run resumes from): rows
    of `metrics.jsonl` and TensorBoard points with a larger step, and a last record that the kill
    cut short. Each file that changes is rewritten aside and renamed over the old one. Returns
    the number of records dropped."""
    dropped = 0
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line for line in handle if line.strip()]
        if lines and not lines[-1].endswith("\n"):  # a write the kill interrupted
            lines[-1] = "{}"  # dropped below as a line without a step
        kept = [line for line in lines if _step_of_line(line, path) <= step]
        if len(kept) != len(lines):
            dropped += len(lines) - len(kept)
            _replace(path, lambda out: out.writelines(kept), binary=False)
    for events in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        dropped += _drop_events_after(events, step)
    return dropped


def _step_of_line(line: str, path: str) -> float:
    if line == "{}":
        return math.inf
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} holds a line that is not a metrics record: {line[:80]!r}") from None


def _drop_events_after(path: str, step: int) -> int:
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    records, truncated = [], False
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(bytes(record.numpy()))
    except tf.errors.DataLossError:  # the last record was cut short by a kill
        truncated = True
    kept = []
    for record in records:
        event = event_pb2.Event.FromString(record)
        if not (event.HasField("summary") and event.step > step):
            kept.append(record)
    if len(kept) == len(records) and not truncated:
        return 0

    def write(out_path: str) -> None:
        with tf.io.TFRecordWriter(out_path) as writer:
            for record in kept:
                writer.write(record)

    _replace(path, write, binary=True, by_path=True)
    return len(records) - len(kept) + int(truncated)


def _replace(path: str, write, *, binary: bool, by_path: bool = False) -> None:
    """Write a new version of `path` to a temporary sibling, then rename it over `path`."""
    directory, name = os.path.split(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        if by_path:
            os.close(descriptor)
            write(temporary)
        else:
            with os.fdopen(descriptor, "wb" if binary else "w", encoding=None if binary else "utf-8") as out:
                write(out)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
