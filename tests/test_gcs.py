"""gs:// end to end, against a GCS API on localhost (tests/gcs.py): the trainer's workdir killed and
resumed in a bucket, imports, exports and predictions through it, and the path helpers.

The data set stays local: TFDS and tf.data read gs:// with TensorFlow's own GCS client, which
cannot be pointed at an emulator (tests/gcs.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

import gcs
from conftest import REPO, tiny_config
from swiftformer_jax import checkpoint, convert, metrics, paths, train
from swiftformer_jax.model import ModelSpec

# The tiny config (conftest.tiny_config) on main.py's command line; one evaluation, at the end.
TINY_FLAGS = ["--config.model.depths=(1,1,1,1)", "--config.model.widths=(8,16,16,24)", "--config.batch_size=16",
              "--config.eval_batch_size=64", "--config.total_steps=6", "--config.warmup_steps=2",
              "--config.log_every_steps=1", "--config.eval_every_steps=6", "--config.checkpoint_every_steps=3",
              "--config.ema_decay=0.9"]


@pytest.fixture(scope="module")
def bucket():
    with gcs.emulator() as url:
        yield url


@pytest.fixture(scope="module")
def bucket_run(bucket, digits_data_dir, tmp_path_factory):
    """A quickstart-network run with its workdir in the bucket: main.py killed (SIGKILL) once step
    3 is committed there, then resumed in this process to the end (step 6)."""
    workdir = f"{bucket}/run"
    log_path = tmp_path_factory.mktemp("bucket_run") / "killed.log"
    command = [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/quickstart.py"),
               f"--workdir={workdir}", f"--config.data_dir={digits_data_dir}", *TINY_FLAGS]
    committed = paths.path(f"{workdir}/checkpoints/3/{checkpoint.GCS_COMMIT_FILE}")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while not committed.exists():
                assert process.poll() is None, f"main.py ended before step 3 was saved:\n{log_path.read_text()[-3000:]}"
                assert time.time() < deadline, "step 3 was not committed within 10 minutes"
                time.sleep(0.5)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    killed_at = max(r["step"] for r in metrics.read_metrics(workdir))
    state = train.train_and_evaluate(tiny_config(digits_data_dir, eval_every_steps=6), workdir)
    return workdir, killed_at, state


def test_a_run_in_a_bucket_is_killed_resumed_and_finishes_there(bucket_run, tmp_path):
    workdir, killed_at, state = bucket_run
    assert killed_at >= 3 and int(state.step) == 6
    root = paths.path(workdir)
    records = metrics.read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # each step once: the killed attempt's extras dropped
    assert "eval/accuracy" in records[-1]
    assert (root / "config.json").exists()
    assert checkpoint.complete_steps(root / "checkpoints") == [3, 6]

    event_steps = []  # the TensorBoard files (one per attempt), read by TensorFlow's own reader
    files = metrics.event_files(workdir)
    assert len(files) == 2
    for i, path in enumerate(files):
        local = tmp_path / f"events{i}"
        local.write_bytes(path.read_bytes())
        for record in tf.data.TFRecordDataset(str(local)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            event_steps += [event.step for v in event.summary.value if v.tag == "train/loss"]
    assert event_steps == [1, 2, 3, 4, 5, 6]


def test_convert_and_predict_through_the_bucket(bucket_run, bucket, tmp_path):
    # convert export: the trainer's latest step, read from the bucket, written to it as PyTorch.
    workdir, _, _ = bucket_run
    spec, variables = checkpoint.load_variables(workdir)
    exported = f"{bucket}/exports/tiny.safetensors"
    convert.export_checkpoint(workdir, exported, naming="official")
    with paths.local_copy(exported) as local:
        assert set(convert.read_torch_file(local)) == set(convert.to_torch(variables))

    # convert import: a released-size PyTorch file in the bucket, imported into it, read back.
    xs = ModelSpec.named("XS", num_classes=1000, distillation=True)
    rs = np.random.RandomState(0)
    weights = jax.tree_util.tree_map(lambda s: rs.normal(0.5, 0.1, s.shape).astype(np.float32),
                                     xs.abstract_variables())
    source, imported = f"{bucket}/torch/swiftformer_xs.pth", f"{bucket}/imports/xs"
    convert.write_torch_file(convert.to_torch(weights), source)
    got_spec, provenance = convert.import_checkpoint(source, imported)
    assert got_spec.variant == "XS" and provenance["file"] == source
    spec_back, weights_back = checkpoint.load_variables(imported)
    assert spec_back == got_spec
    jax.tree_util.tree_map(np.testing.assert_array_equal, weights_back, weights)
    with pytest.raises(FileExistsError, match="already exists"):
        convert.import_checkpoint(source, imported)

    # predict: the workdir's checkpoint and the image, both in the bucket.
    image = f"{bucket}/images/digit.png"
    from PIL import Image

    local = tmp_path / "digit.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(local)
    paths.path(image).write_bytes(local.read_bytes())
    result = subprocess.run([sys.executable, "-m", "swiftformer_jax.predict", "--checkpoint", workdir,
                             "--top-k", "2", image], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == image and lines[1].startswith("  1. ") and lines[2].startswith("  2. ")


def test_path_helpers_on_gcs(bucket, tmp_path):
    target = f"{bucket}/helpers/file.bin"
    assert not paths.exists(target) and paths.parent_exists(target)
    paths.write_bytes_atomically(target, b"one")
    assert paths.path(target).read_bytes() == b"one"
    local = tmp_path / "two.bin"
    local.write_bytes(b"two")
    paths.publish(local, target)
    assert not local.exists() and paths.path(target).read_bytes() == b"two"
    with paths.local_copy(target) as copy:
        assert open(copy, "rb").read() == b"two"
    assert not os.path.exists(copy)
    for name in ("a/x", "a/b/y"):
        paths.path(f"{bucket}/helpers/dir/{name}").write_text(name)
    paths.rename_dir(f"{bucket}/helpers/dir", f"{bucket}/helpers/moved")
    assert not paths.exists(f"{bucket}/helpers/dir")
    assert paths.path(f"{bucket}/helpers/moved/a/b/y").read_text() == "a/b/y"
    with pytest.raises(ValueError, match="one is local"):
        paths.rename_dir(f"{bucket}/helpers/moved", tmp_path / "moved")
