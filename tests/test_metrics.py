"""The metric writer and what a resumed run does to the records of the attempt it replaces."""

from __future__ import annotations

import glob
import os

import tensorflow as tf

from swiftformer_jax import metrics


def event_steps(workdir) -> list[int]:
    steps = []
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            steps += [event.step for value in event.summary.value if value.tag == "train/loss"]
    return steps


def test_records_past_the_resume_step_are_dropped_and_a_cut_record_too(tmp_path):
    workdir = str(tmp_path)
    with metrics.MetricWriter(workdir, enabled=True) as writer:
        for step in range(1, 6):
            writer.write(step, {"train/loss": 1.0 / step})
    with open(os.path.join(workdir, metrics.METRICS_FILE), "a") as handle:
        handle.write('{"step": 6, "train/lo')  # a kill in the middle of a write
    (event_file,) = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    with open(event_file, "ab") as handle:
        handle.write((32).to_bytes(8, "little") + b"\x00" * 4 + b"event")  # and of an event record

    assert metrics.drop_records_after(workdir, 3) == 2 + 2 + 1 + 1  # 2 rows, 2 events, 2 cut records
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2, 3]
    assert event_steps(workdir) == [1, 2, 3]
    assert metrics.drop_records_after(workdir, 3) == 0  # nothing left to drop; files untouched
    with metrics.MetricWriter(workdir, enabled=True) as writer:  # the resumed attempt continues
        writer.write(4, {"train/loss": 0.25})
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2, 3, 4]
    assert event_steps(workdir) == [1, 2, 3, 4]
    assert not [p for p in os.listdir(workdir) if p.endswith(".tmp")]
