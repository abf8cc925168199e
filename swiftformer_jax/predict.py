"""Top-k class predictions for image files with a SwiftFormer checkpoint.

    python -m swiftformer_jax.predict --checkpoint PATH [--ema] [--names FILE] [--top-k 5] IMAGE...

`PATH` is any checkpoint `checkpoint.load_checkpoint` reads: a `convert import` output, a
training workdir or one of its steps, local or `gs://` (images too). Preprocessing is the official evaluation transform
(util/datasets.py `build_transform` of Amshaker/SwiftFormer) at the checkpoint's image size S
(224 for imported weights): resize the shorter side to int(256 / 224 * S) pixels (256 at 224)
with bicubic interpolation, centre-crop S x S, scale to [0, 1] and normalise with the ImageNet
mean and std. Pillow decodes and resizes, as torchvision does for
PIL images, and the resize and crop geometry follow torchvision's rounding, so the network sees the
same pixels as in the official evaluation.

Labels: with 1000 classes, the ImageNet-1k WordNet ids in class-index order, read from the
imagenet2012 label list that tensorflow-datasets ships (the sorted synset ids, which is also the
class order of the official ImageFolder training); `--names FILE` adds readable names, one per line
in class-index order. Other class counts print class indices (with names when given).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from swiftformer_jax import logs, paths, xla_flags
from swiftformer_jax.model import IMAGENET_MEAN, IMAGENET_STD


def resize_for(crop_size: int) -> int:
    """The shorter side the official eval transform resizes to before a `crop_size` crop."""
    return int(256 / 224 * crop_size)


CROP_SIZE = 224
RESIZE_SIZE = resize_for(CROP_SIZE)  # 256
IMAGENET_CLASSES = 1000
# Inside the installed tensorflow_datasets package (found without importing it).
TFDS_IMAGENET_LABELS = ("datasets", "imagenet2012", "labels.txt")


# ----------------------------------------------------------------------------------------------
# Preprocessing (pure functions of the image)
# ----------------------------------------------------------------------------------------------


def resized_size(width: int, height: int, shorter: int = RESIZE_SIZE) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `shorter`, keeping the aspect ratio.

    torchvision's rule for `Resize(int)`: the longer side is int(shorter * long / short), truncated.
    """
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop_box(width: int, height: int, crop: int = CROP_SIZE) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's `CenterCrop(crop)`."""
    if width < crop or height < crop:
        raise ValueError(f"image of {width}x{height} is smaller than the {crop}x{crop} crop")
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return left, top, left + crop, top + crop


def preprocess(image, crop_size: int = CROP_SIZE, resize_size: int | None = None) -> np.ndarray:
    """PIL image -> float32 [crop_size, crop_size, 3] array, normalised (official eval transform)."""
    from PIL import Image

    resize_size = resize_for(crop_size) if resize_size is None else resize_size
    image = image.convert("RGB")
    image = image.resize(resized_size(*image.size, resize_size), Image.Resampling.BICUBIC)
    image = image.crop(center_crop_box(*image.size, crop_size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def load_image(path: str | os.PathLike):
    """Open and fully decode an image file as 8-bit RGB; a one-line error for a missing,
    unreadable, truncated or oversized one.

    Grayscale and palette images are expanded to RGB, an alpha channel is dropped (as
    torchvision's `convert("RGB")`), and 16-bit or float images are scaled to 8 bits by their
    full range (PIL's own conversion would clip them at 255).
    """
    from PIL import Image

    path = paths.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            image.load()
            return _to_rgb8(image)
    except Image.DecompressionBombError as error:
        raise ValueError(f"cannot read {path}: too large to decode safely ({error})") from None
    except OSError as error:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"cannot read {path} as an image: {error}") from None


def _to_rgb8(image):
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(np.round(pixels / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet WordNet ids in class-index order, from tensorflow-datasets' label list."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tensorflow-datasets is not installed; it ships the ImageNet label list")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*TFDS_IMAGENET_LABELS)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet label list not found at {path}")
    wnids = path.read_text().split()
    if len(wnids) != IMAGENET_CLASSES:
        raise ValueError(f"{path} lists {len(wnids)} classes, expected {IMAGENET_CLASSES}")
    return wnids


def read_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """One class name per line, exactly `num_classes` non-empty lines."""
    path = paths.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{path} has {len(names)} names; the checkpoint has {num_classes} classes")
    return names


def class_labels(num_classes: int, names: Sequence[str] | None) -> list[str]:
    """Printable label of every class: "wnid name", "wnid", "index name" or "index"."""
    ids = imagenet_wnids() if num_classes == IMAGENET_CLASSES else [str(i) for i in range(num_classes)]
    if names is None:
        return ids
    return [f"{i} {name}" for i, name in zip(ids, names)]


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def top_k(probabilities: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(class index, probability) of the k most probable classes, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(int(i), float(probabilities[i])) for i in order]


def make_classifier(model, variables):
    """A jitted function: normalised NHWC images -> class probabilities (eval mode)."""
    import jax

    @jax.jit
    def classify(images):
        return jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)

    return classify


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m swiftformer_jax.predict",
        description="Top-k classes of images with a SwiftFormer checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a `convert import` output, a training workdir or one of its step directories")
    parser.add_argument("--ema", action="store_true", help="use a trainer checkpoint's EMA weights")
    parser.add_argument("--names", help="class names, one per line in class-index order")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message for user errors)."""
    args = _parser().parse_args(argv)
    xla_flags.apply()  # before the first computation starts JAX's backend
    logs.setup(quiet=True)  # results on stdout, an error as one line; the libraries' chatter kept out
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        from swiftformer_jax import checkpoint

        model, variables, spec = checkpoint.load_checkpoint(args.checkpoint, ema=args.ema)
        if not spec.has_classifier:
            raise ValueError(f"{args.checkpoint} holds a backbone without a classifier head ({spec.describe()})")
        names = read_names(args.names, spec.num_classes) if args.names else None
        labels = class_labels(spec.num_classes, names)
        # Every image readable before the first is classified.
        images = [(path, preprocess(load_image(path), spec.image_size)) for path in args.images]
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    classify = make_classifier(model, variables)
    k = min(args.top_k, len(labels))
    for path, pixels in images:
        probabilities = np.asarray(classify(pixels[None]))[0]
        print(path)
        for rank, (index, probability) in enumerate(top_k(probabilities, k), start=1):
            print(f"  {rank}. {labels[index]}  {probability:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
