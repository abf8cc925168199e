"""The SwiftFormer augmentation recipe for one image, as TensorFlow functions that run in tf.data.

The official code trains with DeiT's `build_transform`, that is timm's `create_transform` on PIL
images. In order:

  train: decode -> RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip (0.5)
         -> RandAugment `rand-m9-mstd0.5-inc1` *or* ColorJitter 0.4 -> normalise (ImageNet mean/std)
         -> random erasing (0.25, 'pixel' mode)
  eval:  decode -> resize the shorter side to floor(image_size / crop_pct) (bicubic) -> center crop
         image_size -> normalise

`train_image(key, encoded, image_size, config)` and `eval_image(encoded, image_size, crop_pct)` are
the entry points; the pieces below them are public so tests (and people) can check each alone.
Mixup and cutmix are batch operations and run on device in JAX (`mixup.py`), not here.

Randomness: every random choice is a stateless TF op whose seed is split from one per-example `key`
(int64 [2]). The augmentation of an image is therefore a pure function of (key, image bytes): the
input pipeline derives the key from (seed, process, position in the stream), which is what makes
the training stream reproducible and resumable.

Fidelity to timm/PIL (the ops work on uint8 images, as PIL does):
  - RandomResizedCrop: timm's algorithm exactly (10 attempts at a random area and log-uniform
    aspect ratio, then a center-crop fallback clamped to the ratio range). JPEGs are decoded only
    inside the crop window, which is much less work; the pixels are those of a full decode except
    in the window's first and last columns, where libjpeg upsamples chroma without the neighbours
    outside the window (a test pins this down). The resize is TF's antialiased bicubic, which
    approximates PIL's bicubic resampling to within a few grey levels; results are rounded to uint8
    as PIL's are. JPEGs are decoded with the accurate integer DCT, as PIL does.
  - RandAugment: timm's semantics: `num_layers` ops drawn uniformly with replacement from the 15-op
    list, each applied with probability 0.5, each with its own magnitude ~ N(m, std) clipped to
    [0, 10]; signed ops flip sign with probability 0.5; 'inc1' selects the increasing-severity
    variants (Posterize, Solarize, Color, Contrast, Brightness, Sharpness). The colour ops
    reproduce PIL's integer arithmetic (tests compare them with PIL pixel for pixel). The
    geometric ops (Rotate, ShearX/Y, TranslateX/YRel) use PIL's affine maps and PIL's rule for which
    pixels get the fill colour (124, 116, 104), but interpolate bilinearly: TF's image transform has
    no bicubic mode, and timm asked PIL for bicubic here. That is the one known difference.
  - ColorJitter: torchvision's on PIL images: brightness, contrast and saturation factors uniform in
    [1 - s, 1 + s], applied in a random order, through the same PIL-exact enhance ops. As in timm,
    it is the alternative to RandAugment (the official XS run); asking for both is an error.
  - Random erasing: timm's `RandomErasing(mode='pixel', max_count=1)`: with probability p, up to 10
    attempts at a rectangle of area 2%-1/3 of the image and log-uniform aspect ratio 0.3-3.33 that
    fits strictly inside; its pixels become N(0, 1) noise, after normalisation.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from swiftformer_jax.logs import log
from swiftformer_jax import model as model_lib


def _hide_gpus_from_tensorflow() -> None:
    """TF here only decodes and augments images on the host; seeing a GPU, it would reserve memory
    that JAX needs. This must run before TF's first op: this module and `input_pipeline` (which
    imports it) create no tensors at import, and this runs when either is first imported."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF ran an op before this module was imported.
        if tf.config.get_visible_devices("GPU"):
            log.warning(
                "TensorFlow was used before swiftformer_jax.augment was imported and can see GPUs: "
                "it may reserve accelerator memory. Import swiftformer_jax.input_pipeline first."
            )


_hide_gpus_from_tensorflow()

IMAGENET_MEAN, IMAGENET_STD = model_lib.IMAGENET_MEAN, model_lib.IMAGENET_STD
# timm's `img_mean` hparam: the fill colour of RandAugment's geometric ops.
FILL_COLOR = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

_CROP_ATTEMPTS = 10  # timm's RandomResizedCrop and RandomErasing both try 10 times
_ERASE_AREA = (0.02, 1.0 / 3.0)
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))
_LEVEL_DENOM = 10.0  # timm: magnitudes live on a 0..10 scale
_OP_PROB = 0.5  # timm's RandAugment applies each drawn op with this probability
_TRANSLATE_PCT = 0.45  # timm's TranslateXRel/YRel range at magnitude 10
_JPEG_DCT = "INTEGER_ACCURATE"  # libjpeg's ISLOW, PIL's default


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation knobs. Defaults are the official SwiftFormer-S recipe.

    XS: `AugmentConfig(rand_augment=False, color_jitter=0.4)`. L1/L3: the defaults (their mixup and
    cutmix run on device, elsewhere).
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (fraction)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect range (w/h)
    hflip_prob: float = 0.5  # horizontal flip probability
    rand_augment: bool = True  # timm RandAugment on/off
    rand_augment_layers: int = 2  # ops per image ('n')
    rand_augment_magnitude: float = 9.0  # 'm', on timm's 0..10 scale
    rand_augment_magnitude_std: float = 0.5  # 'mstd': per-op Gaussian noise on the magnitude
    rand_augment_increasing: bool = True  # 'inc1': increasing-severity op variants
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 is off (XS uses 0.4)
    random_erase_prob: float = 0.25  # timm random erasing, 'pixel' mode; 0 is off

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        for name in ("hflip_prob", "random_erase_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if not 0.0 <= self.rand_augment_magnitude <= _LEVEL_DENOM:
            raise ValueError(f"rand_augment_magnitude must be in [0, 10], got {self.rand_augment_magnitude}")
        if self.rand_augment_magnitude_std < 0 or self.rand_augment_layers < 0 or self.color_jitter < 0:
            raise ValueError("rand_augment_magnitude_std, rand_augment_layers and color_jitter must be >= 0")
        if self.rand_augment and self.color_jitter > 0:
            raise ValueError(
                "rand_augment and color_jitter are alternatives (timm applies ColorJitter only without "
                "RandAugment; the official XS run uses ColorJitter 0.4, the others RandAugment): "
                f"set color_jitter=0 or rand_augment=False (got color_jitter={self.color_jitter})"
            )


# ---------------------------------------------------------------------------------------------
# Random numbers from a per-example key.
# ---------------------------------------------------------------------------------------------


def _split(key: tf.Tensor, num: int) -> tf.Tensor:
    """`num` independent keys [num, 2] from one key: each random choice gets its own."""
    return tf.random.experimental.stateless_split(key, num=num)


def _uniform(key: tf.Tensor, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=key, minval=minval, maxval=maxval, dtype=tf.float32)


def _randint(u: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """Integers uniform in [low, high] (inclusive, as Python's `random.randint`) from uniforms u in [0, 1)."""
    low = tf.cast(low, tf.float32)
    high = tf.cast(high, tf.float32)
    return tf.cast(tf.floor(low + u * (high - low + 1.0)), tf.int32)


# ---------------------------------------------------------------------------------------------
# Decoding, cropping, resizing, normalising.
# ---------------------------------------------------------------------------------------------


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes a JPEG/PNG/GIF/BMP to uint8 [H, W, 3] (greyscale is copied to three channels)."""

    def jpeg():
        return tf.io.decode_jpeg(encoded, channels=3, dct_method=_JPEG_DCT)

    def other():
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, size) -> tf.Tensor:
    """Bicubic resize of uint8 [H, W, 3] to `size` (height, width), antialiased and rounded to uint8 like PIL."""
    resized = tf.image.resize(image, size, method="bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] -> float32, (x / 255 - mean) / std with the ImageNet statistics."""
    x = tf.cast(image, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def random_resized_crop_window(key, height, width, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """timm's `RandomResizedCropAndInterpolation.get_params`: the crop [top, left, h, w] (int32 [4]).

    Up to 10 attempts: area ~ U(scale) * H * W, aspect w/h ~ exp(U(log ratio)), w and h rounded; the
    first attempt that fits (w <= W and h <= H) wins and its corner is uniform. If none fits, the
    whole image, cut to the nearest allowed aspect ratio, centred.
    """
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    k_area, k_ratio, k_top, k_left = tf.unstack(_split(key, 4))
    area = h_f * w_f * _uniform(k_area, [_CROP_ATTEMPTS], scale[0], scale[1])
    aspect = tf.exp(_uniform(k_ratio, [_CROP_ATTEMPTS], math.log(ratio[0]), math.log(ratio[1])))
    crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (crop_w <= width) & (crop_h <= height)
    top = _randint(_uniform(k_top, [_CROP_ATTEMPTS]), 0, height - crop_h)
    left = _randint(_uniform(k_left, [_CROP_ATTEMPTS]), 0, width - crop_w)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first fitting attempt (0 if none)

    in_ratio = w_f / h_f
    fallback_w = tf.where(
        in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), tf.cast(width, tf.int32)
    )
    fallback_h = tf.where(
        in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), tf.cast(height, tf.int32)
    )
    fallback = tf.stack(
        [(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w]
    )
    chosen = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])
    return tf.where(tf.reduce_any(fits), chosen, tf.cast(fallback, tf.int32))


def random_resized_crop(key, encoded, image_size: int, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """Decode the timm RandomResizedCrop window of an encoded image and resize it to uint8 [S, S, 3].

    A JPEG is decoded only inside the window (its header gives the size); other formats are decoded
    whole and sliced. Both paths draw the same window from `key`.
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        window = random_resized_crop_window(key, shape[0], shape[1], scale, ratio)
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=_JPEG_DCT)

    def other():
        full = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        shape = tf.shape(full)
        top, left, h, w = tf.unstack(random_resized_crop_window(key, shape[0], shape[1], scale, ratio))
        return full[top : top + h, left : left + w]

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    crop.set_shape([None, None, 3])
    image = resize(crop, [image_size, image_size])
    image.set_shape([image_size, image_size, 3])
    return image


def random_flip(key, image, prob: float = 0.5):
    """Left-right flip with probability `prob`."""
    return tf.cond(_uniform(key) < prob, lambda: image[:, ::-1], lambda: image)


def center_crop(image, size: int):
    """torchvision's CenterCrop: the size x size box at offsets round((H - size) / 2), round((W - size) / 2)."""
    shape = tf.shape(image)
    top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
    return image[top : top + size, left : left + size]


def resize_shorter_side(image, size):
    """torchvision's Resize(int): shorter side to `size`, longer side int(size * long / short), bicubic."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]

    def long_side(long, short):  # int(size * long / short): truncation, as torchvision
        ratio = tf.cast(long, tf.float64) / tf.cast(short, tf.float64)
        return tf.cast(tf.math.floor(size * ratio), tf.int32)

    new_h = tf.where(h <= w, size, long_side(h, w))
    new_w = tf.where(h <= w, long_side(w, h), size)
    return resize(image, tf.stack([new_h, new_w]))


def eval_image(encoded, image_size: int, crop_pct: float = 0.875):
    """Evaluation preprocessing: float32 [S, S, 3] normalised.

    Shorter side to floor(S / crop_pct) (256 for 224 at 0.875), center crop S, normalise.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    scale_size = int(math.floor(image_size / crop_pct))
    image = center_crop(resize_shorter_side(decode_image(encoded), scale_size), image_size)
    image.set_shape([image_size, image_size, 3])
    return normalize(image)


# ---------------------------------------------------------------------------------------------
# PIL-exact pixel ops on uint8 [H, W, 3]. Each mirrors the PIL call timm makes. They come in three
# families that share their expensive step, so RandAugment's graph holds each step once:
#   lookup tables [3, 256] (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd),
#   blends with a "degenerate" image (Color, Contrast, Brightness, Sharpness: PIL's ImageEnhance),
#   affine maps (Rotate, ShearX/Y, TranslateX/Y).
# ---------------------------------------------------------------------------------------------

_LEVELS = np.arange(256, dtype=np.int32)  # NumPy: no TF op may run at import (see above)


def apply_lut(image, lut):
    """Applies per-channel lookup tables lut [3, 256] (PIL's `Image.point`)."""
    idx = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), idx), tf.uint8)


def auto_contrast_lut(image):
    """PIL `ImageOps.autocontrast`: stretch each channel's [min, max] to [0, 255] (identity if flat)."""
    x = tf.cast(image, tf.float64)
    lo = tf.reduce_min(x, axis=[0, 1])[:, None]
    hi = tf.reduce_max(x, axis=[0, 1])[:, None]
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    levels = tf.cast(_LEVELS, tf.float64)[None, :]
    lut = tf.clip_by_value(tf.floor(levels * scale - lo * scale), 0.0, 255.0)  # PIL: int(ix * scale + offset)
    return tf.cast(tf.where(hi > lo, lut, tf.broadcast_to(levels, [3, 256])), tf.int32)


def equalize_lut(image):
    """PIL `ImageOps.equalize`: per-channel histogram equalisation with PIL's integer steps."""
    idx = tf.reshape(tf.cast(image, tf.int32) + tf.constant([0, 256, 512]), [-1])
    hist = tf.reshape(tf.math.bincount(idx, minlength=768, maxlength=768), [3, 256])
    # PIL: step = (total - count of the last non-empty bin) // 255; identity when step is 0.
    last_nonempty = 255 - tf.argmax(tf.cast(hist[:, ::-1] > 0, tf.int32), axis=1, output_type=tf.int32)
    last_count = tf.gather(hist, last_nonempty, batch_dims=1)
    step = ((tf.reduce_sum(hist, axis=1) - last_count) // 255)[:, None]
    cumulative = tf.cumsum(hist, axis=1, exclusive=True)
    lut = tf.clip_by_value((step // 2 + cumulative) // tf.maximum(step, 1), 0, 255)
    return tf.where(step > 0, lut, tf.broadcast_to(_LEVELS, [3, 256]))


def invert_lut():
    """PIL `ImageOps.invert`."""
    return tf.broadcast_to(255 - _LEVELS, [3, 256])


def posterize_lut(bits):
    """PIL `ImageOps.posterize`: keep the `bits` most significant bits (0 gives black; 8 is a no-op)."""
    mask = tf.bitwise.bitwise_and(tf.bitwise.left_shift(255, 8 - tf.cast(bits, tf.int32)), 255)
    return tf.broadcast_to(tf.bitwise.bitwise_and(_LEVELS, mask), [3, 256])


def solarize_lut(threshold):
    """PIL `ImageOps.solarize`: invert the levels >= threshold (256 leaves the image as is)."""
    return tf.broadcast_to(tf.where(_LEVELS < tf.cast(threshold, tf.int32), _LEVELS, 255 - _LEVELS), [3, 256])


def solarize_add_lut(addition, threshold=128):
    """timm's `solarize_add`: add `addition` (capped at 255) to the levels below the threshold."""
    added = tf.minimum(_LEVELS + tf.cast(addition, tf.int32), 255)
    return tf.broadcast_to(tf.where(_LEVELS < threshold, added, _LEVELS), [3, 256])


def auto_contrast(image):
    return apply_lut(image, auto_contrast_lut(image))


def equalize(image):
    return apply_lut(image, equalize_lut(image))


def invert(image):
    return apply_lut(image, invert_lut())


def posterize(image, bits):
    return apply_lut(image, posterize_lut(bits))


def solarize(image, threshold):
    return apply_lut(image, solarize_lut(threshold))


def solarize_add(image, addition):
    return apply_lut(image, solarize_add_lut(addition))


def blend(degenerate, image, factor):
    """PIL `Image.blend(degenerate, image, factor)`, as ImageEnhance uses it: clip, then truncate to uint8."""
    d = tf.cast(degenerate, tf.float32)
    out = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
    return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def grayscale(image):
    """PIL's `convert('L')`: (R*19595 + G*38470 + B*7471 + 2**15) >> 16, as int32 [H, W]."""
    x = tf.cast(image, tf.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def color_degenerate(image):
    """ImageEnhance.Color's: the greyscale image, in three channels."""
    return tf.repeat(tf.cast(grayscale(image), tf.float32)[..., None], 3, axis=-1)


def contrast_degenerate(image):
    """ImageEnhance.Contrast's: a flat image at the mean grey level, rounded half up."""
    mean = tf.floor(tf.reduce_mean(tf.cast(grayscale(image), tf.float64)) + 0.5)
    return tf.fill(tf.shape(image), tf.cast(mean, tf.float32))


def brightness_degenerate(image):
    """ImageEnhance.Brightness's: black."""
    return tf.zeros(tf.shape(image), tf.float32)


def sharpness_degenerate(image):
    """ImageEnhance.Sharpness's: ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13, rounded);
    PIL's filter leaves the one-pixel border as it was."""
    x = tf.cast(image, tf.float32)
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.pad(tf.floor(smooth + 0.5), [[1, 1], [1, 1], [0, 0]])
    shape = tf.shape(image)
    rows = tf.range(shape[0])[:, None]
    cols = tf.range(shape[1])[None, :]
    interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
    return tf.where(interior[..., None], smooth, x)


def color(image, factor):
    """PIL `ImageEnhance.Color` (saturation)."""
    return blend(color_degenerate(image), image, factor)


def contrast(image, factor):
    """PIL `ImageEnhance.Contrast`."""
    return blend(contrast_degenerate(image), image, factor)


def brightness(image, factor):
    """PIL `ImageEnhance.Brightness`."""
    return blend(brightness_degenerate(image), image, factor)


def sharpness(image, factor):
    """PIL `ImageEnhance.Sharpness`."""
    return blend(sharpness_degenerate(image), image, factor)


def affine(image, coeffs, fill=FILL_COLOR):
    """PIL `Image.transform(size, AFFINE, coeffs, fillcolor=fill)` with bilinear sampling.

    PIL maps each output pixel centre (x + 0.5, y + 0.5) to the input point (a x + b y + c, d x + e y + f)
    in continuous coordinates; points outside the image take the fill colour, points inside are
    interpolated with edge clamping. TF's transform works in pixel-index coordinates, hence the
    half-pixel shifts; the fill mask comes from a nearest-neighbour pass, which is PIL's inside test.
    """
    a, b, c, d, e, f = tf.unstack(tf.cast(tf.stack(coeffs), tf.float32))
    tf_coeffs = tf.stack([a, b, 0.5 * (a + b) + c - 0.5, d, e, 0.5 * (d + e) + f - 0.5, 0.0, 0.0])[None]
    size = tf.shape(image)[:2]
    x = tf.cast(image, tf.float32)[None]
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=tf_coeffs, output_shape=size, fill_value=0.0,
        interpolation="BILINEAR", fill_mode="NEAREST",
    )[0]
    inside = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.ones_like(x[..., :1]), transforms=tf_coeffs, output_shape=size, fill_value=0.0,
        interpolation="NEAREST", fill_mode="CONSTANT",
    )[0]
    out = tf.where(inside > 0.5, moved, tf.constant(fill, tf.float32))
    return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def rotate_coeffs(image, degrees):
    """PIL `Image.rotate(degrees)`'s affine map: counter-clockwise about the image centre."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cx, cy = shape[1] / 2.0, shape[0] / 2.0
    angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


def shear_x_coeffs(factor):
    """timm `shear_x`: (1, factor, 0, 0, 1, 0)."""
    return (1.0, factor, 0.0, 0.0, 1.0, 0.0)


def shear_y_coeffs(factor):
    """timm `shear_y`: (1, 0, 0, factor, 1, 0)."""
    return (1.0, 0.0, 0.0, factor, 1.0, 0.0)


def translate_x_coeffs(image, fraction):
    """timm `translate_x_rel`: the content moves left by fraction * width (right when negative)."""
    pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
    return (1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def translate_y_coeffs(image, fraction):
    """timm `translate_y_rel`: the content moves up by fraction * height (down when negative)."""
    pixels = tf.cast(fraction, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
    return (1.0, 0.0, 0.0, 0.0, 1.0, pixels)


def rotate(image, degrees, fill=FILL_COLOR):
    return affine(image, rotate_coeffs(image, degrees), fill)


def shear_x(image, factor, fill=FILL_COLOR):
    return affine(image, shear_x_coeffs(factor), fill)


def shear_y(image, factor, fill=FILL_COLOR):
    return affine(image, shear_y_coeffs(factor), fill)


def translate_x(image, fraction, fill=FILL_COLOR):
    return affine(image, translate_x_coeffs(image, fraction), fill)


def translate_y(image, fraction, fill=FILL_COLOR):
    return affine(image, translate_y_coeffs(image, fraction), fill)


# ---------------------------------------------------------------------------------------------
# RandAugment and ColorJitter.
# ---------------------------------------------------------------------------------------------

# timm's `_RAND_INCREASING_TRANSFORMS` ('inc1'); `_RAND_TRANSFORMS` differs only in the names (and
# level -> argument maps) of Posterize, Solarize, Color, Contrast, Brightness and Sharpness.
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
_LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd")
_BLEND_OPS = ("Color", "Contrast", "Brightness", "Sharpness")
_AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# For op i: its family (0 lut, 1 blend, 2 affine) and its index inside the family.
_FAMILIES = (_LUT_OPS, _BLEND_OPS, _AFFINE_OPS)
_FAMILY = np.array([next(f for f, ops in enumerate(_FAMILIES) if n in ops) for n in RAND_AUGMENT_OPS], np.int32)
_MEMBER = np.array([_FAMILIES[f].index(n) for f, n in zip(_FAMILY, RAND_AUGMENT_OPS)], np.int32)


def apply_rand_augment_op(image, op_index, level, negate, increasing: bool = True, fill=FILL_COLOR):
    """Applies op `op_index` of `RAND_AUGMENT_OPS` at `level` = magnitude / 10, with timm's level ->
    argument maps. `negate` is the random sign of the signed ops (ignored by the others)."""
    level = tf.cast(level, tf.float32)
    signed = lambda value: tf.where(negate, -value, value)  # noqa: E731
    member = tf.gather(_MEMBER, op_index)

    def lut_family():
        bits = tf.cast(tf.floor(level * 4.0), tf.int32)  # int(m / 10 * 4)
        threshold = tf.cast(tf.floor(level * 256.0), tf.int32)
        luts = [
            lambda: auto_contrast_lut(image),
            lambda: equalize_lut(image),
            invert_lut,
            lambda: posterize_lut(4 - bits if increasing else bits),
            lambda: solarize_lut(256 - threshold if increasing else threshold),
            lambda: solarize_add_lut(tf.floor(level * 110.0)),
        ]
        return apply_lut(image, tf.switch_case(member, luts))

    def blend_family():
        if increasing:  # 1 +/- 0.9 level, at least 0.1: the distance from 1 grows with magnitude
            factor = tf.maximum(0.1, 1.0 + signed(level * 0.9))
        else:
            factor = level * 1.8 + 0.1
        degenerates = [
            lambda: color_degenerate(image),
            lambda: contrast_degenerate(image),
            lambda: brightness_degenerate(image),
            lambda: sharpness_degenerate(image),
        ]
        return blend(tf.switch_case(member, degenerates), image, factor)

    def affine_family():
        coeffs = [
            lambda: tf.stack(rotate_coeffs(image, signed(level * 30.0))),
            lambda: tf.stack(shear_x_coeffs(signed(level * 0.3))),
            lambda: tf.stack(shear_y_coeffs(signed(level * 0.3))),
            lambda: tf.stack(translate_x_coeffs(image, signed(level * _TRANSLATE_PCT))),
            lambda: tf.stack(translate_y_coeffs(image, signed(level * _TRANSLATE_PCT))),
        ]
        return affine(image, tf.unstack(tf.switch_case(member, coeffs), num=6), fill)

    out = tf.switch_case(tf.gather(_FAMILY, op_index), [lut_family, blend_family, affine_family])
    out.set_shape(image.shape)
    return out


def rand_augment(key, image, num_layers=2, magnitude=9.0, magnitude_std=0.5, increasing=True, fill=FILL_COLOR):
    """timm RandAugment on uint8 [H, W, 3]: `num_layers` ops drawn uniformly with replacement, each
    applied with probability 0.5 at magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]."""
    if num_layers == 0:
        return image
    keys = _split(key, num_layers)
    num_ops = len(RAND_AUGMENT_OPS)

    def layer(i, image):
        k_op, k_apply, k_mag, k_sign = tf.unstack(_split(keys[i], 4))
        op_index = tf.minimum(tf.cast(tf.floor(_uniform(k_op) * num_ops), tf.int32), num_ops - 1)
        noise = tf.random.stateless_normal([], seed=k_mag) * magnitude_std
        level = tf.clip_by_value(magnitude + noise, 0.0, _LEVEL_DENOM) / _LEVEL_DENOM
        negate = _uniform(k_sign) < 0.5
        image = tf.cond(
            _uniform(k_apply) < _OP_PROB,
            lambda: apply_rand_augment_op(image, op_index, level, negate, increasing, fill),
            lambda: image,
        )
        return i + 1, image

    # A loop, not a Python unroll: the op graph exists once, which keeps pipelines quick to build.
    _, image = tf.while_loop(lambda i, _: i < num_layers, layer, [tf.constant(0), image])
    return image


def color_jitter(key, image, strength: float):
    """torchvision ColorJitter(strength, strength, strength) on a PIL image: brightness, contrast and
    saturation with factors ~ U[max(0, 1 - s), 1 + s], applied in a random order."""
    k_order, k_factors = tf.unstack(_split(key, 2))
    factors = _uniform(k_factors, [3], max(0.0, 1.0 - strength), 1.0 + strength)
    order = tf.argsort(_uniform(k_order, [3]))

    def step(i, image):
        which = order[i]
        degenerates = [
            lambda: brightness_degenerate(image),
            lambda: contrast_degenerate(image),
            lambda: color_degenerate(image),
        ]
        return i + 1, blend(tf.switch_case(which, degenerates), image, factors[which])

    _, image = tf.while_loop(lambda i, _: i < 3, step, [tf.constant(0), image])
    return image


def random_erasing(key, image, prob: float = 0.25):
    """timm RandomErasing(mode='pixel'), on a normalised float image [H, W, C]."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    area = tf.cast(height * width, tf.float32)
    k_apply, k_area, k_aspect, k_top, k_left, k_noise = tf.unstack(_split(key, 6))
    target = area * _uniform(k_area, [_CROP_ATTEMPTS], *_ERASE_AREA)
    aspect = tf.exp(_uniform(k_aspect, [_CROP_ATTEMPTS], *_ERASE_LOG_ASPECT))
    h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (w < width) & (h < height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    top = _randint(_uniform(k_top, [_CROP_ATTEMPTS]), 0, height - h)[first]
    left = _randint(_uniform(k_left, [_CROP_ATTEMPTS]), 0, width - w)[first]
    h, w = h[first], w[first]
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = (_uniform(k_apply) < prob) & tf.reduce_any(fits)
    noise = tf.random.stateless_normal(shape, seed=k_noise, dtype=image.dtype)
    return tf.where(box[..., None] & erase, noise, image)


def train_image(key, encoded, image_size: int, config: AugmentConfig):
    """The whole training transform of one encoded image: float32 [S, S, 3] normalised (then erased)."""
    k_crop, k_flip, k_color, k_erase = tf.unstack(_split(key, 4))
    image = random_resized_crop(k_crop, encoded, image_size, config.crop_scale, config.crop_ratio)
    if config.hflip_prob > 0:
        image = random_flip(k_flip, image, config.hflip_prob)
    if config.rand_augment:
        image = rand_augment(
            k_color,
            image,
            num_layers=config.rand_augment_layers,
            magnitude=config.rand_augment_magnitude,
            magnitude_std=config.rand_augment_magnitude_std,
            increasing=config.rand_augment_increasing,
        )
    elif config.color_jitter > 0:
        image = color_jitter(k_color, image, config.color_jitter)
    out = normalize(image)
    if config.random_erase_prob > 0:
        out = random_erasing(k_erase, out, config.random_erase_prob)
    return out
