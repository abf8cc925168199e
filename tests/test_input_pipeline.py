"""Input pipeline: data sources, sharding, order, determinism, resumption, eval padding, errors.

Data: the digits builder written to a temporary directory, a tiny image folder made here (each
image one flat colour that encodes its id, so any batch can be traced back to its examples), and
`tfds.testing.mock_data` for imagenet2012-shaped runs. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from swiftformer_jax import digits, input_pipeline
from swiftformer_jax.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig

# Crops and flips only: they move the folder images' gradient but keep their id colour.
NO_COLOR_OPS = AugmentConfig(rand_augment=False, color_jitter=0.0, random_erase_prob=0.0)
IMAGE_SIZE = 16


# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.dataset_info("digits", data_dir)  # the first use writes the data set
    return data_dir


def _write_image(path: str, red: int, gradient: bool = False) -> None:
    """A 20 x 24 image whose red channel is `red` everywhere; PNGs get a green gradient, so crops
    and flips of them differ (JPEGs stay flat: their lossy colours would blur the id)."""
    image = np.zeros((20, 24, 3), np.uint8)
    image[..., 0] = red
    image[..., 1] = np.linspace(40, 160, 24).astype(np.uint8)[None, :] if gradient else 90
    image[..., 2] = 255 - red
    encode = tf.io.encode_png if path.endswith(".png") else tf.io.encode_jpeg
    tf.io.write_file(path, encode(image))


# Train: 36 images, 9 in each of 4 classes (ids 0..35, class id // 9); val: 10 images, ids 0..9,
# class j % 4. An image's id is its red level / 5. Classes c0 and c2 hold JPEGs, c1 and c3 PNGs,
# so both decoders run.
TRAIN_IDS = {f"c{c}": list(range(9 * c, 9 * c + 9)) for c in range(4)}
VAL_IDS = {f"c{c}": [j for j in range(10) if j % 4 == c] for c in range(4)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for split, ids_by_class in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        for class_name, ids in ids_by_class.items():
            os.makedirs(root / split / class_name)
            ext = ".jpg" if class_name in ("c0", "c2") else ".png"
            for i in ids:
                _write_image(str(root / split / class_name / f"img{i}{ext}"), 5 * i, gradient=ext == ".png")
    return "folder:" + str(root)


def ids_of(images: np.ndarray) -> np.ndarray:
    """Example ids from id-coloured, normalised images [B, H, W, 3]."""
    pixels = (images[:, 0, 0, :] * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255.0
    return np.round(pixels[:, 0] / 5.0).astype(int)


@contextlib.contextmanager
def mock_imagenet(tmp_path, num_examples):
    """imagenet2012 with `num_examples` random JPEGs in train and validation (TFDS's mock)."""
    meta_dir = str(tmp_path / "meta")
    builder = tfds.builder("imagenet2012", data_dir=meta_dir)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=name, shard_lengths=[num_examples], num_bytes=0)
             for name in ("train", "validation")]
        )
    )
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=meta_dir):
        yield


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def train(dataset, data_dir, **overrides):
    kwargs = dict(local_batch_size=8, image_size=IMAGE_SIZE, augment=AugmentConfig(), seed=0, process_index=0,
                  process_count=1)
    kwargs.update(overrides)
    return input_pipeline.train_dataset(dataset, data_dir, **kwargs)


# ---------------------------------------------------------------------------------------------
# Pure arithmetic.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_examples,process_count", [(10, 3), (7, 7), (1, 2), (1281167, 64)])
def test_process_ranges_are_disjoint_and_cover(num_examples, process_count):
    ranges = [input_pipeline.process_range(num_examples, p, process_count) for p in range(process_count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_examples
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_permutation_is_a_deterministic_permutation():
    p = input_pipeline.permutation(1000, 1, 2, 3)
    assert sorted(p) == list(range(1000))
    np.testing.assert_array_equal(p, input_pipeline.permutation(1000, 1, 2, 3))
    assert not np.array_equal(p, input_pipeline.permutation(1000, 1, 2, 4))
    assert not np.array_equal(p, np.arange(1000))


def test_slice_ranges():
    ranges = [(10, 15), (0, 3), (20, 30)]
    flat = [i for a, b in ranges for i in range(a, b)]
    for start, stop in [(0, 18), (4, 7), (5, 8), (8, 18), (2, 2), (17, 40)]:
        sliced = input_pipeline.slice_ranges(ranges, start, stop)
        assert [i for a, b in sliced for i in range(a, b)] == flat[start:stop]


def test_spread_copies_order_separates_copies():
    order = input_pipeline.spread_copies_order(8, 3)
    assert sorted(order) == list(range(8))
    where = np.argsort(order)  # new position of each old position
    for first in range(0, 6):  # copies sit at consecutive old positions
        thirds = {int(where[first + k]) * 3 // 8 for k in range(3)}
        assert len(thirds) == 3


def test_steps_and_eval_batches():
    assert input_pipeline.steps_per_epoch(1281167, 2048) == 625
    assert input_pipeline.num_eval_batches(10, 4, 3) == 1
    assert input_pipeline.num_eval_batches(10, 3, 3) == 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        input_pipeline.steps_per_epoch(100, 128)


# ---------------------------------------------------------------------------------------------
# Data sources.
# ---------------------------------------------------------------------------------------------


def test_digits_builder_writes_all_of_sklearn_digits(digits_dir):
    builder = digits.Digits(data_dir=digits_dir)
    assert builder.info.splits["train"].num_examples == 1497
    assert builder.info.splits["test"].num_examples == 300
    written = []
    for split in ("train", "test"):
        for ex in builder.as_dataset(split=split).as_numpy_iterator():
            assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
            written.append((ex["image"].tobytes(), int(ex["label"])))
    images, labels = digits.digits_images_and_labels()
    expected = [(image.tobytes(), int(label)) for image, label in zip(images, labels)]
    assert sorted(written) == sorted(expected)  # every digit once, with its label
    assert sorted({label for _, label in written}) == list(range(10))
    assert input_pipeline.dataset_info("digits", digits_dir) == (1497, 300, 10)


def test_digits_split_is_fixed_and_disjoint():
    split = digits.split_indices()
    assert len(split["train"]) == 1497 and len(split["test"]) == 300
    assert sorted(np.concatenate([split["train"], split["test"]])) == list(range(1797))
    np.testing.assert_array_equal(split["test"], digits.split_indices()["test"])


def test_digits_train_and_eval_batches(digits_dir):
    batch = next(train("digits", digits_dir))
    assert batch["image"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    assert np.isfinite(batch["image"]).all()
    batches = list(input_pipeline.eval_dataset("digits", digits_dir, local_batch_size=64, image_size=IMAGE_SIZE,
                                               process_index=0, process_count=1))
    assert len(batches) == 5 and sum(b["mask"].sum() for b in batches) == 300


def test_imagenet_mock_batches(tmp_path):
    lo = (0.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    hi = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    with mock_imagenet(tmp_path, num_examples=12):
        assert input_pipeline.dataset_info("imagenet2012", "/not/used/by/the/mock") == (12, 12, 1000)
        # Closed before eval_dataset: TFDS's mock redirects every file access (in all threads)
        # while a builder's as_dataset runs, so an epoch still opening in the background could
        # turn eval_dataset's read of the package's labels.txt into a missing temp file.
        with contextlib.closing(train("imagenet2012", None, local_batch_size=4, image_size=32)) as stream:
            batch = next(stream)
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and ((batch["label"] >= 0) & (batch["label"] < 1000)).all()
        batches = list(input_pipeline.eval_dataset("imagenet2012", None, local_batch_size=5, image_size=32,
                                                   process_index=0, process_count=1))
    assert [b["image"].shape for b in batches] == [(5, 32, 32, 3)] * 3
    assert [int(b["mask"].sum()) for b in batches] == [5, 5, 2]
    real = np.concatenate([b["image"][b["mask"]] for b in batches])
    assert (real >= lo - 1e-5).all() and (real <= hi + 1e-5).all()  # normalised pixels of [0, 1] images
    assert real.std() > 0.1  # not a constant


def test_closing_a_train_stream_leaves_no_background_thread(digits_dir):
    stream = train("digits", digits_dir)
    next(stream)  # the next epoch is now being opened in the background
    stream.close()
    assert [t.name for t in threading.enumerate() if t.name.startswith("next_epoch")] == []


def test_tfds_ranges_are_read_in_the_order_given_across_files(tmp_path):
    # The training order (and so resumption) relies on it; ImageNet's train split has 1024 files.
    builder = digits.Digits(data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=5))
    assert len(builder.info.splits["train"].shard_lengths) == 5
    source = input_pipeline._open("digits", str(tmp_path))
    full = [ex["image"] for ex in input_pipeline._read(source, "train", [(0, 1497)]).as_numpy_iterator()]
    ranges = [(1200, 1497), (250, 320), (0, 10), (290, 610), (700, 700)]
    got = [ex["image"] for ex in input_pipeline._read(source, "train", ranges).as_numpy_iterator()]
    assert got == [full[i] for a, b in ranges for i in range(a, b)]


def test_folder_source_info_and_labels(folder):
    assert input_pipeline.dataset_info(folder, None) == (36, 10, 4)
    batch = next(train(folder, None, augment=NO_COLOR_OPS, local_batch_size=12, repeated_aug=1))
    np.testing.assert_array_equal(batch["label"], ids_of(batch["image"]) // 9)  # label matches image


# ---------------------------------------------------------------------------------------------
# Training order: determinism, epochs, repeated augmentation, shards, resumption.
# ---------------------------------------------------------------------------------------------


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_same_seed_same_batches_other_seed_other_batches(digits_dir):
    first = take(train("digits", digits_dir), 3)
    assert_same_batches(first, take(train("digits", digits_dir), 3))
    other = take(train("digits", digits_dir, seed=1), 3)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert not np.array_equal(np.concatenate([b["label"] for b in first]), np.concatenate([b["label"] for b in other]))


@pytest.mark.parametrize("start_step,process_index,process_count", [(5, 0, 1), (44, 0, 1), (46, 0, 1), (21, 1, 2)])
def test_resume_at_step_equals_uninterrupted(digits_dir, start_step, process_index, process_count):
    # 1497 // 32 = 46 steps per epoch; a window of 100 examples; 32 * 5 is not a multiple of 3, so
    # step 5 starts inside a window and between two copies of an image; 44 runs into epoch 1; 46
    # starts it. Two processes: 1497 // 64 = 23 steps per epoch, and process 1 reads its own half.
    kwargs = dict(local_batch_size=32, shuffle_window=100, process_index=process_index, process_count=process_count)
    run = take(train("digits", digits_dir, **kwargs), start_step + 3)
    resumed = take(train("digits", digits_dir, start_step=start_step, **kwargs), 3)
    assert_same_batches(run[start_step:], resumed)


@pytest.mark.parametrize("window", [10, 4096])
def test_epochs_without_repeats_are_fresh_permutations(folder, window):
    # 36 // 12 = 3 steps per epoch: each epoch shows every image once, in a new order: a new order
    # of the blocks of `window` images, and new permutations inside the windows (4096: one window).
    stream = take(train(folder, None, augment=NO_COLOR_OPS, local_batch_size=12, repeated_aug=1,
                        shuffle_window=window), 12)
    epochs = [np.concatenate([ids_of(b["image"]) for b in stream[e * 3 : (e + 1) * 3]]) for e in range(4)]
    for ids in epochs:
        assert sorted(ids) == list(range(36))
    assert all(not np.array_equal(a, b) for i, a in enumerate(epochs) for b in epochs[i + 1 :])
    if window == 10:  # the first window holds one block of the shard, a different one in some epoch
        assert len({frozenset(ids[:10]) for ids in epochs}) > 1


def test_augmentation_depends_on_the_seed(tmp_path):
    # Twelve copies of one image: only the augmentation can tell two streams apart.
    for split, count in (("train", 12), ("val", 1)):
        os.makedirs(tmp_path / split / "only")
        for i in range(count):
            _write_image(str(tmp_path / split / "only" / f"{i}.png"), 100, gradient=True)
    same = "folder:" + str(tmp_path)
    def first_batch(seed):
        return next(train(same, None, augment=NO_COLOR_OPS, local_batch_size=12, seed=seed))["image"]

    first = {seed: first_batch(seed) for seed in (0, 1)}
    np.testing.assert_array_equal(first[0], first_batch(0))
    differ = [not np.array_equal(a, b) for a, b in zip(first[0], first[1])]
    assert sum(differ) >= 10


def test_folder_listing_mixes_classes_across_shards(folder):
    # The folder is listed in a fixed shuffled order: a process's contiguous slice is not one class.
    stream = take(train(folder, None, augment=NO_COLOR_OPS, local_batch_size=9, repeated_aug=1, process_index=0,
                        process_count=4), 1)
    assert len(set(stream[0]["label"])) > 1


def test_repeated_augmentation_shows_a_third_three_times(folder):
    # One epoch = 3 batches of 12 = 36 elements = 12 distinct images, three copies each, the copies
    # in one batch, in different thirds of it.
    stream = take(train(folder, None, augment=NO_COLOR_OPS, local_batch_size=12, repeated_aug=3), 3)
    ids = np.concatenate([ids_of(b["image"]) for b in stream])
    values, counts = np.unique(ids, return_counts=True)
    assert len(values) == 12 and (counts == 3).all()
    for batch in stream:
        batch_ids = ids_of(batch["image"])
        for i in np.unique(batch_ids):
            assert sorted(np.flatnonzero(batch_ids == i) // 4) == [0, 1, 2]


def test_repeated_copies_get_independent_augmentations(digits_dir):
    batch = next(train("digits", digits_dir, local_batch_size=12, repeated_aug=3))
    # Copies of one image: positions k, k + 4, k + 8 (12 = three groups of 4).
    for k in range(4):
        copies = batch["image"][[k, k + 4, k + 8]]
        assert len(set(batch["label"][[k, k + 4, k + 8]])) == 1
        assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])


def test_process_shards_are_disjoint_and_cover(folder):
    # 36 images, 3 processes of batch 4: shards of 12, 3 steps per epoch, so one epoch per process
    # shows exactly its shard.
    seen = []
    for p in range(3):
        stream = take(train(folder, None, augment=NO_COLOR_OPS, local_batch_size=4, repeated_aug=1, process_index=p,
                            process_count=3), 3)
        seen.append(set(np.concatenate([ids_of(b["image"]) for b in stream])))
        assert len(seen[-1]) == 12
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set.union(*seen) == set(range(36))


@pytest.mark.parametrize("batch_size", [3, 4])
def test_eval_padding_counts_every_example_once(folder, batch_size):
    # 10 examples over 3 processes: slices of 3, 3 and 4, padded to the same number of batches.
    counts = {}
    num_batches = []
    for p in range(3):
        batches = list(input_pipeline.eval_dataset(folder, None, local_batch_size=batch_size, image_size=IMAGE_SIZE,
                                                   process_index=p, process_count=3))
        num_batches.append(len(batches))
        for b in batches:
            assert b["image"].shape == (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3) and b["mask"].dtype == bool
            real = b["mask"]
            np.testing.assert_array_equal(b["label"][real], ids_of(b["image"][real]) % 4)
            assert (b["image"][~real] == 0).all()
            for i in ids_of(b["image"][real]):
                counts[int(i)] = counts.get(int(i), 0) + 1
    assert counts == {i: 1 for i in range(10)}
    assert len(set(num_batches)) == 1 and num_batches[0] == input_pipeline.num_eval_batches(10, batch_size, 3)


def test_eval_with_more_processes_than_examples(folder):
    # 10 examples over 12 processes: process 0's slice is empty, but it still runs the one batch.
    assert input_pipeline.process_range(10, 0, 12) == (0, 0)
    batches = list(input_pipeline.eval_dataset(folder, None, local_batch_size=2, image_size=IMAGE_SIZE,
                                               process_index=0, process_count=12))
    assert len(batches) == 1 and not batches[0]["mask"].any()


def test_import_runs_no_tensorflow_op():
    # The GPUs are hidden from TF at import; that only works before TF's first op, which would also
    # fix its thread pools: setting them must still be allowed after the import.
    code = ("import swiftformer_jax.input_pipeline, tensorflow as tf; "
            "tf.config.threading.set_intra_op_parallelism_threads(1)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Errors name the problem.
# ---------------------------------------------------------------------------------------------


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet2012 is not prepared") as error:
        input_pipeline.dataset_info("imagenet2012", str(tmp_path))
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "downloads/manual" in message
    assert "tfds build imagenet2012" in message
    with pytest.raises(FileNotFoundError, match="imagenet2012 is not prepared"):
        train("imagenet2012", str(tmp_path))


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet2021'.*folder:"):
        input_pipeline.dataset_info("imagenet2021", None)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        input_pipeline.dataset_info("folder:" + str(tmp_path / "nowhere"), None)
    os.makedirs(tmp_path / "train" / "a")
    _write_image(str(tmp_path / "train" / "a" / "x.png"), 7)
    with pytest.raises(FileNotFoundError, match="val does not exist"):
        input_pipeline.dataset_info("folder:" + str(tmp_path), None)
    os.makedirs(tmp_path / "val")
    _write_image(str(tmp_path / "val" / "loose.JPEG"), 7)
    with pytest.raises(ValueError, match="class folder"):
        input_pipeline.dataset_info("folder:" + str(tmp_path), None)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_image_that_does_not_decode_is_named(tmp_path, damage):
    # 20 good PNGs and JPEGs in train/ and val/, then one of each damaged: random bytes, or a JPEG cut short.
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "a")
        for i in range(20):
            _write_image(str(tmp_path / split / "a" / f"{i}.{'jpg' if i % 2 else 'png'}"), 10 * i)
        bad = tmp_path / split / "a" / "13.jpg"
        data = bad.read_bytes()
        bad.write_bytes(np.random.default_rng(0).bytes(500) if damage == "garbage" else data[: len(data) // 2])
    dataset = "folder:" + str(tmp_path)
    with pytest.raises(input_pipeline.UnreadableImageError, match=r"cannot decode image .*train/a/13\.jpg: ") as error:
        take(train(dataset, None, local_batch_size=4, repeated_aug=1, shuffle_window=8), 5)
    assert "function_node" not in str(error.value)  # TF's internal prefix is not the user's business
    with pytest.raises(input_pipeline.UnreadableImageError, match=r"cannot decode image .*val/a/13\.jpg: "):
        list(input_pipeline.eval_dataset(dataset, None, local_batch_size=4, image_size=IMAGE_SIZE,
                                         process_index=0, process_count=1))


def test_bad_arguments_fail_early(digits_dir):
    with pytest.raises(ValueError, match="process_index"):
        train("digits", digits_dir, process_index=3, process_count=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train("digits", digits_dir, local_batch_size=1024, process_count=2, process_index=1)
    with pytest.raises(ValueError, match="repeated_aug"):
        train("digits", digits_dir, repeated_aug=0)


def test_digits_prepared_by_several_processes_at_once_is_written_once(tmp_path):
    # The local multi-process run: every process opens the data set at the same moment.
    code = ("import sys; from swiftformer_jax import digits, logs; logs.setup(); "
            "b = digits.prepare(sys.argv[1]); print('SPLITS', b.info.splits['train'].num_examples, b.info.splits['test'].num_examples)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert all("SPLITS 1497 300" in out for out, _ in results)
    writes = sum("Writing the digits data set" in err for _, err in results)
    assert writes == 1, writes  # one process wrote; the others waited and read
    assert input_pipeline.dataset_info("digits", str(tmp_path)) == (1497, 300, 10)
