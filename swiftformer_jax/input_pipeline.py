"""Training and evaluation input: TFDS (or an image folder) -> tf.data -> NumPy batches for one process.

API (the trainer passes config values as keyword arguments):

    info = dataset_info(dataset, data_dir)
        # DatasetInfo(num_train_examples, num_eval_examples, num_classes)
    steps = steps_per_epoch(info.num_train_examples, global_batch_size)
    train = train_dataset(dataset, data_dir, local_batch_size=B, image_size=224, augment=AugmentConfig(),
                          seed=0, process_index=jax.process_index(), process_count=jax.process_count(),
                          repeated_aug=3, start_step=step)
    batch = next(train)                 # {"image": float32 [B, S, S, 3], "label": int32 [B]}
    for batch in eval_dataset(dataset, data_dir, local_batch_size=B, image_size=224, crop_pct=0.875,
                              process_index=..., process_count=...):
        ...                             # adds "mask": bool [B]; False marks padding

Images are normalised with the ImageNet mean and std; mixup/cutmix run later, on device. Every
function checks its arguments and opens the data set before returning, so a missing or misnamed
data set fails before training starts, with a message that says what to do.

Data sets (`dataset`, `data_dir`):
  - "imagenet2012": TFDS's ImageNet-1k in `data_dir` (None: TFDS's default, ~/tensorflow_datasets);
    train 1,281,167 / validation 50,000, 1000 classes in sorted-synset order (the official
    checkpoints' order). TFDS cannot download it; see `_IMAGENET_HELP` for the one-time preparation.
  - "digits": scikit-learn's digits written as a TFDS data set into `data_dir` on first use
    (`digits.py`; 1,497 train / 300 test, 32x32 RGB, 10 classes). For the quickstart and tests.
  - "folder:/path/to/root": the official repository's layout, `root/train/<class>/<image>` and
    `root/val/<class>/<image>` (JPEG, PNG, BMP or GIF). Classes are the sorted names of the folders
    in train/, as torchvision's ImageFolder numbers them. `data_dir` is not used. The folder is
    listed once per process and put in a fixed pseudo-random order, so that contiguous shards and
    blocks mix classes.
All three are read through the same code below; each yields encoded images, decoded in `augment`.

Sharding: a process reads only its own contiguous slice of each split (`process_range`, sizes
differing by at most one, as `tfds.even_splits`), through TFDS sub-splits ("train[a:b]"), so it
opens only the files it needs.

Training order and repeated augmentation (DeiT/SwiftFormer's RASampler, per process):
  - An epoch is `steps_per_epoch(N, global_batch)` = N // global_batch steps, the whole-batch part
    of one pass, as the official loader's drop_last.
  - Each epoch visits the process's examples in a fresh order: the shard is cut into blocks of
    `shuffle_window` consecutive examples, the blocks are taken in a random order, and each run of
    `shuffle_window` examples in that order is shuffled (a window as large as the shard gives a
    uniform permutation per epoch). (TFDS writes ImageNet in a shuffled order
    and the folder listing is shuffled, so blocks are random subsets; the window bounds memory to
    `shuffle_window` encoded images, like a shuffle buffer, but unlike a shuffle buffer it lets a
    resumed run jump straight to its position.)
  - With `repeated_aug=r`, each example of that order is emitted r times in a row, each copy with its
    own augmentation, and the epoch stops after steps * B elements: as RASampler, an epoch has the
    usual length and shows about N / r distinct images, r times each. The copies of one image go to
    the same batch (as RASampler puts them in one step), about B / r positions apart (copy k in the
    k-th r-th of the batch), so that they fall on different devices or BN groups whenever those hold
    at most B / r examples each, as RASampler sends them to different GPUs.
  - Randomness: block order and windows from (seed, process, epoch); each image's augmentation from
    (seed, process, its position in the process's stream) through stateless ops. No state anywhere.

Resumption: the stream is a pure function of (seed, process, step). `train_dataset(start_step=k)`
yields exactly the batches k, k+1, ... of an uninterrupted run: it starts at epoch k // steps,
reads only from the window that holds its first example (so it reads at most `shuffle_window`
examples it then discards), and gives each image the augmentation it would have had. The checkpoint
needs only the step. (It is exact for the same seed, process count, batch size, window and library
versions.)

Evaluation: every process gets its own slice, in order, preprocessed deterministically; each is
padded (mask False) to `num_eval_batches(N, B, P)` batches, the same on every process so collective
eval steps line up, and every example counts exactly once across processes.

TensorFlow is hidden from the GPUs at import (in `augment`, which this module imports): it only
reads and augments images on the host, and would otherwise reserve accelerator memory that JAX needs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from swiftformer_jax import augment as augment_lib
from swiftformer_jax import digits, logs
from swiftformer_jax.paths import is_remote

AUTOTUNE = tf.data.AUTOTUNE
FOLDER_PREFIX = "folder:"
DEFAULT_SHUFFLE_WINDOW = 4096  # about 0.5 GB of encoded ImageNet JPEGs
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_IMAGENET_HELP = """\
imagenet2012 is not prepared in {data_dir} (TFDS looked for {path}).
TFDS cannot download ImageNet; prepare it once:
  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/download-images
     (free registration).
  2. Put both files in {data_dir}/downloads/manual/
  3. Run: tfds build imagenet2012 --data_dir={data_dir}
     (about 150 GB of disk and a few hours; the tars can be deleted afterwards).
Or train from an image folder: dataset='folder:/path/to/root' with root/train/<class>/*.JPEG and
root/val/<class>/*.JPEG."""


class UnreadableImageError(ValueError):
    """An image file of a folder data set that does not decode; the message names the file."""


class DatasetInfo(NamedTuple):
    num_train_examples: int
    num_eval_examples: int
    num_classes: int


# ---------------------------------------------------------------------------------------------
# Pure arithmetic: shards, epochs, orders. No TensorFlow.
# ---------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays: a fixed bijection that scrambles bits.

    Orders derived from it never change with a numpy or TensorFlow release, so a checkpoint's
    step always means the same examples.
    """
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_words(*words: int) -> int:
    """A 63-bit hash of a tuple of integers (non-negative; fits a tf.int64 seed)."""
    h = np.zeros([1], np.uint64)
    with np.errstate(over="ignore"):
        for word in words:
            h = _mix64(h ^ (np.array([word & _MASK64], np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return int(h[0]) & ((1 << 63) - 1)


def permutation(n: int, *words: int) -> np.ndarray:
    """A pseudo-random permutation of range(n), a pure function of `words`."""
    with np.errstate(over="ignore"):
        spread = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        keys = _mix64(spread ^ np.uint64(hash_words(*words)))
    return np.argsort(keys, kind="stable")


def _check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The slice [start, stop) of a split that one process reads: contiguous, disjoint, covering."""
    _check_process(process_index, process_count)
    return (num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count)


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
    """Training steps in one epoch: whole global batches only (the official loader drops the rest)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    steps = num_train_examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"the training split has {num_train_examples} examples, fewer than one global batch of "
            f"{global_batch_size}: lower the batch size"
        )
    return steps


def num_eval_batches(num_eval_examples: int, local_batch_size: int, process_count: int) -> int:
    """Eval batches per process: enough for the largest process slice, so every process runs as many."""
    largest = -(-num_eval_examples // process_count)
    return max(1, -(-largest // local_batch_size))


def epoch_ranges(
    shard: tuple[int, int], block_size: int, seed: int, process_index: int, epoch: int
) -> list[tuple[int, int]]:
    """The shard's blocks of `block_size` consecutive examples, in this epoch's random order."""
    start, stop = shard
    starts = np.arange(start, stop, block_size)
    order = permutation(len(starts), seed, process_index, epoch)
    return [(int(starts[i]), int(min(starts[i] + block_size, stop))) for i in order]


def slice_ranges(ranges: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """Elements [start, stop) of the concatenation of `ranges`, as ranges."""
    out, offset = [], 0
    for a, b in ranges:
        lo, hi = max(start - offset, 0), min(stop - offset, b - a)
        if lo < hi:
            out.append((a + lo, a + hi))
        offset += b - a
    return out


def spread_copies_order(batch_size: int, repeats: int) -> np.ndarray:
    """Batch positions regrouped by position mod `repeats`: r consecutive copies of one image end up
    in r different r-ths of the batch."""
    return np.concatenate([np.arange(k, batch_size, repeats) for k in range(repeats)])


# ---------------------------------------------------------------------------------------------
# Sources: a data set as two parts, "train" and "eval", each a fixed sequence of encoded examples.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    info: DatasetInfo
    # (part, ranges) -> tf.data.Dataset of {"image": encoded bytes, "label": int32}, the examples of
    # the ranges in the order given. part is "train" or "eval".
    read: Callable[[str, Sequence[tuple[int, int]]], tf.data.Dataset]
    # part -> the image file of each example, for sources that are files (a folder); None for TFDS,
    # whose records were checked when the data set was prepared.
    paths: dict[str, np.ndarray] | None = None


def _read(source: _Source, part: str, ranges: Sequence[tuple[int, int]]) -> tf.data.Dataset:
    ranges = [(a, b) for a, b in ranges if b > a]
    if not ranges:
        return tf.data.Dataset.from_tensor_slices(
            {"image": tf.constant([], tf.string), "label": tf.constant([], tf.int32)}
        )
    return source.read(part, ranges)


def _tfds_source(builder: tfds.core.DatasetBuilder, eval_split: str) -> _Source:
    splits = {"train": "train", "eval": eval_split}
    for split in splits.values():
        if split not in builder.info.splits:
            raise FileNotFoundError(
                f"{builder.name} in {builder.data_dir} has no '{split}' split "
                f"(found {sorted(builder.info.splits)}): prepare it again"
            )
    info = DatasetInfo(
        num_train_examples=builder.info.splits["train"].num_examples,
        num_eval_examples=builder.info.splits[eval_split].num_examples,
        num_classes=builder.info.features["label"].num_classes,
    )
    # Ranges are read one after another, in the order given (interleave_cycle_length=1): the
    # training order relies on it. Images stay encoded; `augment` decodes them.
    read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)

    def read(part, ranges):
        split = "+".join(f"{splits[part]}[{a}:{b}]" for a, b in ranges)
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})

    return _Source(info=info, read=read)


def _list_images(directory: str) -> list[str]:
    return sorted(f for f in tf.io.gfile.listdir(directory) if f.lower().endswith(_IMAGE_EXTENSIONS))


@functools.lru_cache(maxsize=4)
def _scan_folder(root: str) -> tuple[tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(class names, {part: (paths, labels)}) of an image folder; listing ImageNet takes a while, so once."""
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (dataset='folder:{root}')")
    parts = {}
    classes: tuple[str, ...] = ()
    for part, name in (("train", "train"), ("eval", "val")):
        split_dir = os.path.join(root, name)
        if not tf.io.gfile.isdir(split_dir):
            raise FileNotFoundError(f"{split_dir} does not exist: expected {root}/{{train,val}}/<class>/<image>")
        entries = [e.rstrip("/") for e in tf.io.gfile.listdir(split_dir)]
        loose = [e for e in entries if e.lower().endswith(_IMAGE_EXTENSIONS)]
        if loose:
            raise ValueError(
                f"{split_dir} holds images directly (e.g. {loose[0]}); each image must be in a class "
                f"folder, {split_dir}/<class>/<image>, as torchvision's ImageFolder expects"
            )
        found = sorted(e for e in entries if tf.io.gfile.isdir(os.path.join(split_dir, e)))
        if part == "train":
            classes = tuple(found)
        elif set(found) - set(classes):
            raise ValueError(f"{split_dir} has classes that train/ lacks: {sorted(set(found) - set(classes))[:5]}")
        paths, labels = [], []
        for label, class_name in enumerate(classes):
            class_dir = os.path.join(split_dir, class_name)
            if class_name in found:
                files = _list_images(class_dir)
                paths += [os.path.join(class_dir, f) for f in files]
                labels += [label] * len(files)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(_IMAGE_EXTENSIONS)}) under {split_dir}/<class>/")
        order = permutation(len(paths), len(paths))  # fixed: mixes classes within every slice
        parts[part] = (np.asarray(paths, dtype=object)[order], np.asarray(labels, dtype=np.int32)[order])
    return classes, parts


def _folder_source(root: str) -> _Source:
    # gs:// folders are read by TensorFlow's own GCS client (tf.io.gfile, tf.io.read_file).
    classes, parts = _scan_folder(root if is_remote(root) else os.path.abspath(os.path.expanduser(root)))
    info = DatasetInfo(len(parts["train"][0]), len(parts["eval"][0]), len(classes))

    def read(part, ranges):
        paths, labels = parts[part]
        index = np.concatenate([np.arange(a, b) for a, b in ranges])
        ds = tf.data.Dataset.from_tensor_slices({"path": paths[index].tolist(), "label": labels[index]})
        return ds.map(
            lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"]},
            num_parallel_calls=AUTOTUNE,
        )

    return _Source(info=info, read=read, paths={part: paths for part, (paths, _) in parts.items()})


def _open(dataset: str, data_dir: str | None) -> _Source:
    """The source for a dataset name; fails with instructions when it is unknown or not prepared."""
    if dataset.startswith(FOLDER_PREFIX):
        root = dataset[len(FOLDER_PREFIX) :]
        if not root:
            raise ValueError("dataset='folder:' needs a path: 'folder:/path/to/root'")
        return _folder_source(root)
    if dataset == "digits":
        return _tfds_source(digits.prepare(data_dir), eval_split="test")
    if dataset == "imagenet2012":
        builder = tfds.builder("imagenet2012", data_dir=data_dir)
        if not builder.is_prepared():
            data_dir_shown = data_dir if data_dir is not None else builder.data_dir_root
            raise FileNotFoundError(_IMAGENET_HELP.format(data_dir=data_dir_shown, path=builder.data_dir))
        return _tfds_source(builder, eval_split="validation")
    raise ValueError(
        f"unknown dataset {dataset!r}: use 'imagenet2012' (TFDS, in data_dir), 'digits' (the "
        f"quickstart set, written into data_dir) or 'folder:/path/to/root' (root/train/<class>/, "
        f"root/val/<class>/)"
    )


def dataset_info(dataset: str, data_dir: str | None) -> DatasetInfo:
    """(num_train_examples, num_eval_examples, num_classes) of a data set; fails if it is missing."""
    return _open(dataset, data_dir).info


# ---------------------------------------------------------------------------------------------
# tf.data pipelines.
# ---------------------------------------------------------------------------------------------


def _unreadable_image(source: _Source, part: str, ranges: Sequence[tuple[int, int]]) -> str | None:
    """'path: reason' of the first image of `ranges` (in order) that does not decode, or None.

    tf.data's decode error does not say which file failed; a failing batch lies at or after the
    position the stream reached, so the files from there on are decoded one by one until one fails.
    """
    if source.paths is None:
        return None
    logs.log.warning("An image of the %s data does not decode; looking for it.", part)
    for a, b in ranges:
        for path in source.paths[part][a:b]:
            try:
                augment_lib.decode_image(tf.io.read_file(path))
            except tf.errors.OpError as error:  # eager errors start with TF's "{{function_node ...}} "
                return f"{path}: {re.sub(r'^[{][{]function_node [^}]*[}][}] *', '', logs.first_line(error))}"
    return None


def _naming_unreadable_images(batches: Iterator, source: _Source, part: str, ranges_from: Callable[[int], list]):
    """`batches`, with a decode failure raised as UnreadableImageError naming the file (`_unreadable_image`).
    `ranges_from(k)` gives the example ranges that batches k, k+1, ... are made from."""
    done = 0
    try:
        for batch in batches:
            yield batch
            done += 1
    except tf.errors.InvalidArgumentError as error:
        found = _unreadable_image(source, part, ranges_from(done))
        if found is None:
            raise
        raise UnreadableImageError(f"cannot decode image {found}. Remove or replace the file, then rerun.") from error


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep their order: same seed, same batches
    options.threading.max_intra_op_parallelism = 1  # parallelism across images, not inside one
    return options


@functools.lru_cache(maxsize=8)
def _train_image_fn(image_size: int, augment: augment_lib.AugmentConfig) -> tf.types.experimental.GenericFunction:
    """`augment.train_image` as one traced function, reused by every epoch's pipeline (tracing the
    RandAugment graph takes seconds; a call to an already traced function does not)."""
    signature = [tf.TensorSpec([2], tf.int64), tf.TensorSpec([], tf.string)]
    return tf.function(lambda key, encoded: augment_lib.train_image(key, encoded, image_size, augment),
                       input_signature=signature)


@functools.lru_cache(maxsize=8)
def _eval_image_fn(image_size: int, crop_pct: float) -> tf.types.experimental.GenericFunction:
    """`augment.eval_image` as one traced function, reused by every evaluation."""
    return tf.function(lambda encoded: augment_lib.eval_image(encoded, image_size, crop_pct),
                       input_signature=[tf.TensorSpec([], tf.string)])


def _permute_window(window_key: tf.Tensor, window: dict) -> dict:
    size = tf.shape(window["label"])[0]
    order = tf.argsort(tf.random.stateless_uniform([size], seed=window_key))
    return tf.nest.map_structure(lambda t: tf.gather(t, order), window)


def _epoch_windows(*, shard, epoch, first_step, steps, batch_size, repeats, window, seed, process_index):
    """The example ranges steps [first_step, steps) of an epoch draw from: the epoch's distinct
    examples, windows in random order, from the window that holds step `first_step`'s first example."""
    unique = -(-steps * batch_size // repeats)  # distinct examples the epoch uses
    first_window = first_step * batch_size // repeats // window
    return slice_ranges(epoch_ranges(shard, window, seed, process_index, epoch), first_window * window, unique)


def _train_epoch(
    source: _Source,
    *,
    shard: tuple[int, int],
    epoch: int,
    first_step: int,
    steps: int,
    batch_size: int,
    repeats: int,
    window: int,
    seed: int,
    process_index: int,
    image_size: int,
    augment: augment_lib.AugmentConfig,
) -> tf.data.Dataset:
    """Steps [first_step, steps) of one epoch for one process, as a tf.data pipeline."""
    elements = steps * batch_size  # stream elements (augmented images) per epoch
    start = first_step * batch_size
    first_example, first_copy = divmod(start, repeats)
    first_window = first_example // window
    ranges = _epoch_windows(shard=shard, epoch=epoch, first_step=first_step, steps=steps, batch_size=batch_size,
                            repeats=repeats, window=window, seed=seed, process_index=process_index)
    window_seed = hash_words(seed, process_index, epoch, 1)
    ds = _read(source, "train", ranges)
    ds = ds.batch(window).enumerate(start=first_window)
    ds = ds.map(lambda i, w: _permute_window(tf.stack([tf.constant(window_seed, tf.int64), i]), w))
    ds = ds.unbatch().skip(first_example - first_window * window)

    # Repeated augmentation: each example `repeats` times in a row.
    if repeats > 1:
        ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats)).skip(first_copy)
    ds = ds.take(elements - start)

    # Position in this process's stream: the augmentation key of each element.
    ds = ds.enumerate(start=epoch * elements + start)
    if repeats > 1:
        order = tf.constant(spread_copies_order(batch_size, repeats))
        ds = ds.batch(batch_size).map(lambda *b: tf.nest.map_structure(lambda t: tf.gather(t, order), b)).unbatch()

    key_base = tf.constant(hash_words(seed, process_index, 2), tf.int64)
    train_image = _train_image_fn(image_size, augment)

    def preprocess(position, ex):
        return {"image": train_image(tf.stack([key_base, position]), ex["image"]), "label": ex["label"]}

    ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    return ds.with_options(_options())


def train_dataset(
    dataset: str,
    data_dir: str | None,
    *,
    local_batch_size: int,
    image_size: int,
    augment: augment_lib.AugmentConfig,
    seed: int,
    process_index: int,
    process_count: int,
    repeated_aug: int = 3,
    start_step: int = 0,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's endless stream of training batches, starting at global step `start_step`.

    Yields {"image": float32 [local_batch_size, S, S, 3], "label": int32 [local_batch_size]}. Batch
    k of the stream is the process's part of global step k: a pure function of (seed, process, k).
    """
    _check_process(process_index, process_count)
    for name, value in (("local_batch_size", local_batch_size), ("image_size", image_size),
                        ("repeated_aug", repeated_aug), ("shuffle_window", shuffle_window)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    source = _open(dataset, data_dir)
    steps = steps_per_epoch(source.info.num_train_examples, local_batch_size * process_count)
    shard = process_range(source.info.num_train_examples, process_index, process_count)
    epoch_pipeline = functools.partial(
        _train_epoch, source, shard=shard, steps=steps, batch_size=local_batch_size, repeats=repeated_aug,
        window=shuffle_window, seed=seed, process_index=process_index, image_size=image_size, augment=augment,
    )

    def epoch_iterator(epoch: int, first_step: int):
        windows = functools.partial(
            _epoch_windows, shard=shard, epoch=epoch, steps=steps, batch_size=local_batch_size,
            repeats=repeated_aug, window=shuffle_window, seed=seed, process_index=process_index,
        )
        return _naming_unreadable_images(epoch_pipeline(epoch=epoch, first_step=first_step).as_numpy_iterator(),
                                         source, "train", lambda done: windows(first_step=first_step + done))

    # Creating an epoch's iterator takes a second or more (TF instantiates the augmentation graph),
    # so it happens in the background: the first while the caller compiles its step, each next one
    # while the previous epoch runs.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="next_epoch")
    epoch, first_step = divmod(start_step, steps)
    upcoming = pool.submit(epoch_iterator, epoch, first_step)

    def batches(epoch, upcoming):
        try:
            while True:
                current = upcoming.result()
                upcoming = pool.submit(epoch_iterator, epoch + 1, 0)
                yield from current
                epoch += 1
        finally:
            # Closing the stream waits for an epoch being opened in the background: no thread
            # outlives the stream, still reading the dataset after its user has moved on.
            pool.shutdown(wait=True, cancel_futures=True)

    return batches(epoch, upcoming)


def eval_dataset(
    dataset: str,
    data_dir: str | None,
    *,
    local_batch_size: int,
    image_size: int,
    crop_pct: float = 0.875,
    process_index: int,
    process_count: int,
    part: str = "eval",
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's slice of the eval split, padded to `num_eval_batches` batches.

    Yields {"image": float32 [B, S, S, 3], "label": int32 [B], "mask": bool [B]}; padding has mask
    False, label 0 and a zero image. Call again for the next evaluation. `part="train"` reads the
    train split the same way (eval transform, no augmentation), e.g. to calibrate a quantised export.
    """
    _check_process(process_index, process_count)
    if local_batch_size < 1 or image_size < 1:
        raise ValueError(f"local_batch_size and image_size must be >= 1, got {local_batch_size}, {image_size}")
    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train' or 'eval', got {part!r}")
    source = _open(dataset, data_dir)
    total = source.info.num_eval_examples if part == "eval" else source.info.num_train_examples
    start, stop = process_range(total, process_index, process_count)
    padding = num_eval_batches(total, local_batch_size, process_count) * local_batch_size - (stop - start)

    eval_image = _eval_image_fn(image_size, crop_pct)

    def preprocess(ex):
        return {"image": eval_image(ex["image"]), "label": ex["label"], "mask": tf.constant(True)}

    real = _read(source, part, [(start, stop)]).map(preprocess, num_parallel_calls=AUTOTUNE)
    pad = tf.data.Dataset.from_tensors(
        {"image": tf.zeros([image_size, image_size, 3]), "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}
    ).repeat(padding)
    ds = real.concatenate(pad).batch(local_batch_size, drop_remainder=True).prefetch(AUTOTUNE)
    return _naming_unreadable_images(ds.with_options(_options()).as_numpy_iterator(), source, part,
                                     lambda done: [(min(start + done * local_batch_size, stop), stop)])
