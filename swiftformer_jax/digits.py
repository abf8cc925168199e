"""`digits`: scikit-learn's 8x8 handwritten digits as a TFDS dataset, for the quickstart.

Why it exists: a training run that needs no download and finishes in minutes on a laptop CPU, yet
goes through exactly the input pipeline that ImageNet goes through (TFDS files on disk, per-process
shards, the same augmentation and evaluation code). The 1,797 images ship inside scikit-learn
(`sklearn.datasets.load_digits`), so preparing the data set reads no network.

What is written (once, by `prepare(data_dir)`, which `input_pipeline` calls for you the first time
`dataset="digits"` is used with a `data_dir`):
  - image: uint8 [32, 32, 3], PNG-encoded. Each 8x8 image (ink levels 0..16) is scaled to 0..255
    (bright ink on a black background), enlarged 4x by pixel replication and copied to three
    channels, so RandomResizedCrop, RandAugment and the ImageNet normalisation apply unchanged.
  - label: 0..9.
  - splits: `train` 1,497 and `test` 300, from one fixed permutation (seed 0) of the 1,797 images,
    so every machine writes the same split.
Several processes sharing a data dir (the local multi-process run) may all ask at once:
`prepare` holds an exclusive file lock while it writes, so one process writes and the others wait
and then read.
"""

from __future__ import annotations

import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from swiftformer_jax.logs import log

NUM_EXAMPLES = 1797
NUM_TEST = 300
IMAGE_SIZE = 32
_UPSCALE = IMAGE_SIZE // 8
_SPLIT_SEED = 0


def digits_images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, 32, 32, 3] images and int64 [N] labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits  # Imported here: only preparation needs scikit-learn.

    bunch = load_digits()
    ink = np.asarray(bunch.images, dtype=np.float64)  # [N, 8, 8], ink levels 0..16
    gray = np.round(ink * (255.0 / 16.0)).astype(np.uint8)
    gray = gray.repeat(_UPSCALE, axis=1).repeat(_UPSCALE, axis=2)
    images = np.repeat(gray[..., None], 3, axis=-1)
    return images, np.asarray(bunch.target, dtype=np.int64)


def split_indices() -> dict[str, np.ndarray]:
    """The fixed train/test split: indices into scikit-learn's order, from one seeded permutation."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(NUM_EXAMPLES)
    return {"train": np.sort(order[NUM_TEST:]), "test": np.sort(order[:NUM_TEST])}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits, 32x32 RGB, split 1,497 train / 300 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # TFDS finds a builder's source file through `importlib_resources`, a module that
    # tensorflow-datasets 4.9.10 imports but does not declare as a dependency. Naming the file here
    # keeps preparation working without it.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ship with scikit-learn.
        images, labels = digits_images_and_labels()
        return {
            name: self._generate_examples(images, labels, indices)
            for name, indices in split_indices().items()
        }

    def _generate_examples(self, images, labels, indices):
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}


def prepare(data_dir: str | None) -> Digits:
    """The digits builder for `data_dir` (None: TFDS's default), written first if it is not yet.

    The check and the write happen under an exclusive lock on `<data dir>/digits.lock`, so
    concurrent processes never write the same files twice; TFDS itself only renames a finished
    version into place, which leaves nothing half-written if a writer dies.
    """
    builder = Digits(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "digits.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        builder = Digits(data_dir=data_dir)  # look again: another process may have written it meanwhile
        if not builder.is_prepared():
            log.info("Writing the digits data set to %s (once).", builder.data_dir)
            builder.download_and_prepare()
    return Digits(data_dir=data_dir)
