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

The workdir may be local or `gs://` (`paths`). The event files are TFRecord files of `Event`
protos written here (framing in `_frame`), not by `tf.summary`, whose file system is TensorFlow's
own; a GCS object cannot be appended to, so there a log file is rewritten whole on each write
(a run logs kilobytes to a few megabytes).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Mapping

import jax

from swiftformer_jax import paths

METRICS_FILE = "metrics.jsonl"
EVENTS_PREFIX = "events.out.tfevents."


def _plain(value) -> float | int:
    """A Python number for JSON; NaN and inf become strings JSON can hold ("nan", "inf")."""
    if isinstance(value, (bool, int)) and not isinstance(value, float):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else str(value)


# -- TFRecord framing: uint64 length, masked crc32c of it, data, masked crc32c of the data.


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record))


def _unframe(data: bytes) -> tuple[list[bytes], bool]:
    """(the records, whether the file ends in a record cut short or damaged)."""
    records, offset = [], 0
    while offset < len(data):
        header = data[offset:offset + 12]
        if len(header) < 12 or struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
            return records, True
        (length,) = struct.unpack("<Q", header[:8])
        end = offset + 12 + length
        body, crc = data[offset + 12:end], data[end:end + 4]
        if len(crc) < 4 or struct.unpack("<I", crc)[0] != _masked_crc(body):
            return records, True
        records.append(body)
        offset = end + 4
    return records, False


class _GrowingFile:
    """A file written by appending: a local append-mode file, or on GCS an object rewritten whole
    (starting from its current content) on every flush."""

    def __init__(self, destination):
        self._path = paths.path(destination)
        if paths.is_remote(destination):
            self._local = None
            self._content = self._path.read_bytes() if self._path.exists() else b""
        else:
            self._local = open(self._path, "ab")
        self._dirty = False

    def append(self, data: bytes) -> None:
        if self._local is not None:
            self._local.write(data)
        else:
            self._content += data
        self._dirty = True

    def flush(self) -> None:
        if self._local is not None:
            self._local.flush()
        elif self._dirty:
            self._path.write_bytes(self._content)
        self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._local is not None:
            self._local.close()


def _events_name() -> str:
    return f"{EVENTS_PREFIX}{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2"


class MetricWriter:
    """Writes scalars for a step to TensorBoard and to `workdir/metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if not self.enabled:
            return
        from tensorflow.core.framework import summary_pb2
        from tensorflow.core.util import event_pb2

        self._summary_pb2, self._event_pb2 = summary_pb2, event_pb2
        # TensorBoard's scalar-plugin metadata, as tf.summary.scalar writes it.
        self._scalar_metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars", content=b""),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        paths.mkdir(workdir)
        root = paths.path(workdir)
        self._jsonl = _GrowingFile(root / METRICS_FILE)
        self._events = _GrowingFile(root / _events_name())
        self._events.append(_frame(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()))
        self._events.flush()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` (name -> number) at `step`: one TensorBoard point each, one JSON line."""
        if not self.enabled:
            return
        from tensorflow.core.framework import tensor_pb2, types_pb2

        record = {"step": int(step), **{name: _plain(v) for name, v in sorted(scalars.items())}}
        values = [
            self._summary_pb2.Summary.Value(
                tag=name, metadata=self._scalar_metadata,
                tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)]),
            )
            for name, value in scalars.items()
        ]
        event = self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=self._summary_pb2.Summary(value=values))
        self._events.append(_frame(event.SerializeToString()))
        self._jsonl.append((json.dumps(record) + "\n").encode("utf-8"))
        self.flush()

    def flush(self) -> None:
        if self.enabled:
            self._events.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._jsonl is not None:
            self._events.close()
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl`, in file order (for tests, notebooks and scripts)."""
    text = (paths.path(workdir) / METRICS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def event_files(workdir: str) -> list:
    """The TensorBoard event files of `workdir`, oldest first."""
    root = paths.path(workdir)
    return sorted(root.glob(EVENTS_PREFIX + "*")) if root.exists() else []


def drop_records_after(workdir: str, step: int) -> int:
    """Remove the records a killed attempt wrote past `step` (the step a run resumes from): rows
    of `metrics.jsonl` and TensorBoard points with a larger step, and a last record that the kill
    cut short. Each file that changes is replaced whole (`paths.write_bytes_atomically`). Returns
    the number of records dropped."""
    dropped = 0
    path = paths.path(workdir) / METRICS_FILE
    if path.exists():
        lines = [line for line in path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
                 if line.strip()]
        if lines and not lines[-1].endswith("\n"):  # a write the kill interrupted
            lines[-1] = "{}"  # dropped below as a line without a step
        kept = [line for line in lines if _step_of_line(line, path) <= step]
        if len(kept) != len(lines):
            dropped += len(lines) - len(kept)
            paths.write_bytes_atomically(path, "".join(kept).encode("utf-8"))
    for events in event_files(workdir):
        dropped += _drop_events_after(events, step)
    return dropped


def _step_of_line(line: str, path) -> float:
    if line == "{}":
        return math.inf
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} holds a line that is not a metrics record: {line[:80]!r}") from None


def _drop_events_after(path, step: int) -> int:
    from tensorflow.core.util import event_pb2

    records, truncated = _unframe(path.read_bytes())
    kept = [r for r in records
            if not ((event := event_pb2.Event.FromString(r)).HasField("summary") and event.step > step)]
    if len(kept) == len(records) and not truncated:
        return 0
    paths.write_bytes_atomically(path, b"".join(_frame(r) for r in kept))
    return len(records) - len(kept) + int(truncated)
