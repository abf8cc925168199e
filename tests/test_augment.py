"""Augmentation: each piece of the recipe alone, against PIL (what timm runs) where PIL defines it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from swiftformer_jax import augment
from swiftformer_jax.augment import FILL_COLOR, IMAGENET_MEAN, IMAGENET_STD, AugmentConfig


def keys(n, base=0):
    return [tf.constant([base, i], tf.int64) for i in range(n)]


def random_image(shape=(40, 48, 3), low=0, high=256, seed=0):
    return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


def pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image))


def normalized(image: np.ndarray) -> np.ndarray:
    return (image / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# RandomResizedCrop and flip.
# ---------------------------------------------------------------------------------------------

window_fn = tf.function(lambda key, h, w: augment.random_resized_crop_window(key, h, w))


@pytest.mark.parametrize("height,width,max_area", [(300, 400, 1.0), (224, 224, 1.0), (500, 120, 0.32)])
def test_random_resized_crop_window_follows_timm(height, width, max_area):
    windows = np.stack([window_fn(k, height, width).numpy() for k in keys(300)])
    top, left, h, w = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    aspect = w / h
    # Rounding w and h moves area and aspect a little off the sampled values.
    # A tall 500 x 120 image holds at most a 160 x 120 crop at ratio 3/4: area 0.32.
    assert area.min() >= 0.08 * 0.9 and area.max() <= max_area
    assert aspect.min() >= 0.75 * 0.95 and aspect.max() <= 4 / 3 * 1.05
    assert area.min() < 0.15 and area.max() > 0.7 * max_area  # the whole range is used
    assert len({tuple(x) for x in windows}) > 250
    np.testing.assert_array_equal(windows[7], window_fn(keys(8)[7], height, width).numpy())  # a pure function


def test_random_resized_crop_falls_back_to_a_centred_crop():
    # A 10 x 1000 strip: no attempt fits, so timm takes the full height at the widest allowed ratio.
    window = window_fn(keys(1)[0], 10, 1000).numpy()
    w = round(10 * 4 / 3)
    np.testing.assert_array_equal(window, [0, (1000 - w) // 2, 10, w])
    window = window_fn(keys(1)[0], 1000, 10).numpy()
    h = round(10 / (3 / 4))
    np.testing.assert_array_equal(window, [(1000 - h) // 2, 0, h, 10])


def test_random_resized_crop_is_the_window_resized():
    image = random_image((60, 80, 3))
    jpeg, png = tf.io.encode_jpeg(image), tf.io.encode_png(image)
    for key in keys(5):
        top, left, h, w = window = window_fn(key, 60, 80).numpy()
        out = augment.random_resized_crop(key, png, 32).numpy()
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, augment.resize(image[top : top + h, left : left + w], [32, 32]).numpy())
        # A JPEG is decoded inside the window only.
        crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3, dct_method="INTEGER_ACCURATE")
        np.testing.assert_array_equal(augment.random_resized_crop(key, jpeg, 32), augment.resize(crop, [32, 32]))


def test_jpeg_window_decoding_differs_from_full_decoding_only_at_its_side_columns():
    # libjpeg's cropped decode upsamples chroma at the window's left and right edges without the
    # pixels outside it: the one documented difference from decoding the whole image, as timm does.
    jpeg = tf.io.encode_jpeg(random_image((60, 80, 3), seed=2))
    full = augment.decode_image(jpeg).numpy()
    for top, left, h, w in [(13, 21, 17, 33), (16, 16, 32, 32), (0, 0, 60, 80)]:
        crop = tf.image.decode_and_crop_jpeg(jpeg, [top, left, h, w], channels=3, dct_method="INTEGER_ACCURATE")
        reference = full[top : top + h, left : left + w]
        np.testing.assert_array_equal(crop.numpy()[:, 1:-1], reference[:, 1:-1])


def test_jpeg_decoding_matches_pil():
    import io

    encoded = tf.io.encode_jpeg(random_image((37, 53, 3), seed=9), quality=90)
    reference = np.asarray(Image.open(io.BytesIO(encoded.numpy())).convert("RGB"))
    diff = np.abs(augment.decode_image(encoded).numpy().astype(int) - reference)
    assert diff.max() <= 1 and diff.mean() < 0.05  # same accurate DCT as PIL (libjpeg builds may round apart)


def test_flip():
    image = tf.constant(random_image())
    np.testing.assert_array_equal(augment.random_flip(keys(1)[0], image, 1.0), image.numpy()[:, ::-1])
    np.testing.assert_array_equal(augment.random_flip(keys(1)[0], image, 0.0), image.numpy())
    flipped = [not np.array_equal(augment.random_flip(k, image, 0.5), image) for k in keys(200)]
    assert 0.38 < np.mean(flipped) < 0.62


# ---------------------------------------------------------------------------------------------
# Random erasing.
# ---------------------------------------------------------------------------------------------


def test_random_erasing_hits_a_quarter_of_images_in_one_rectangle():
    image = tf.zeros([32, 40, 3])
    erase = tf.function(lambda key: augment.random_erasing(key, image, 0.25))
    erased, noise = 0, []
    for key in keys(400):
        out = erase(key).numpy()
        changed = (out != 0).any(axis=-1)
        if not changed.any():
            continue
        erased += 1
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        box = np.zeros_like(changed)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        np.testing.assert_array_equal(changed, box)  # exactly one filled rectangle
        assert len(rows) < 32 and len(cols) < 40  # strictly smaller than the image, as timm
        assert 0.02 * 0.7 <= box.mean() <= 1 / 3 * 1.3
        noise.append(out[box])
    assert 0.18 < erased / 400 < 0.32  # probability 0.25
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05  # per-pixel N(0, 1)


def test_random_erasing_rectangle_fits_strictly_inside():
    # On a 2 x 2 image the sampled sides round to 0, 1 or 2; timm rejects sides equal to the image's.
    image = tf.zeros([2, 2, 1])
    erase = tf.function(lambda key: augment.random_erasing(key, image, 1.0))
    erased = [(erase(k).numpy() != 0).sum() for k in keys(200)]
    assert max(erased) == 1 and min(erased) == 0


# ---------------------------------------------------------------------------------------------
# RandAugment ops against PIL with timm's arguments.
# ---------------------------------------------------------------------------------------------

# (op, level, negate) -> the PIL call timm makes at magnitude level * 10 with 'inc1'.
def timm_reference(name, img: Image.Image, level, negate):
    sign = -1 if negate else 1
    enhance_factor = max(0.1, 1.0 + sign * level * 0.9)
    affine = lambda coeffs: img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR,  # noqa: E731
                                          fillcolor=FILL_COLOR)
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Invert": lambda: ImageOps.invert(img),
        "Rotate": lambda: img.rotate(sign * level * 30, resample=Image.BILINEAR, fillcolor=FILL_COLOR),
        "Posterize": lambda: ImageOps.posterize(img, 4 - int(level * 4)),
        "Solarize": lambda: ImageOps.solarize(img, 256 - int(level * 256)),
        "SolarizeAdd": lambda: img.point([min(255, i + int(level * 110)) if i < 128 else i for i in range(256)] * 3),
        "Color": lambda: ImageEnhance.Color(img).enhance(enhance_factor),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(enhance_factor),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(enhance_factor),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(enhance_factor),
        "ShearX": lambda: affine((1, sign * level * 0.3, 0, 0, 1, 0)),
        "ShearY": lambda: affine((1, 0, 0, sign * level * 0.3, 1, 0)),
        "TranslateXRel": lambda: affine((1, 0, sign * level * 0.45 * img.size[0], 0, 1, 0)),
        "TranslateYRel": lambda: affine((1, 0, 0, 0, 1, sign * level * 0.45 * img.size[1])),
    }[name]()


GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.mark.parametrize("name", augment.RAND_AUGMENT_OPS)
@pytest.mark.parametrize("level,negate", [(0.9, False), (0.63, True)])
def test_rand_augment_op_matches_pil(name, level, negate):
    image = random_image((36, 44, 3), low=30, high=220)  # not full range, so AutoContrast acts
    index = augment.RAND_AUGMENT_OPS.index(name)
    out = augment.apply_rand_augment_op(tf.constant(image), index, level, negate).numpy()
    assert out.shape == image.shape and out.dtype == np.uint8
    expected = np.asarray(timm_reference(name, pil(image), level, negate))
    assert not np.array_equal(out, image)
    if name in GEOMETRIC:
        # Same map, same fill rule, both bilinear: rounding and the fill boundary may differ.
        diff = np.abs(out.astype(int) - expected.astype(int))
        assert (diff > 1).mean() < 0.02, f"{name}: {(diff > 1).mean():.3f} of pixels differ"
    else:
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("factor", [0.0, 0.3, 1.7, 2.5])
@pytest.mark.parametrize("op,reference", [
    (augment.color, ImageEnhance.Color), (augment.contrast, ImageEnhance.Contrast),
    (augment.brightness, ImageEnhance.Brightness), (augment.sharpness, ImageEnhance.Sharpness),
])
def test_enhance_ops_match_pil_beyond_rand_augment_factors(op, reference, factor):
    image = random_image((17, 23, 3), seed=3)
    expected = np.asarray(reference(pil(image)).enhance(factor))
    np.testing.assert_array_equal(op(tf.constant(image), factor).numpy(), expected)


@pytest.mark.parametrize("bits", [0, 1, 4, 8])
def test_posterize_and_solarize_extremes(bits):
    image = random_image(seed=4)
    # Posterize at magnitude 10 keeps 0 bits: black, as PIL gave before Pillow 10 refused bits=0.
    expected = np.zeros_like(image) if bits == 0 else np.asarray(ImageOps.posterize(pil(image), bits))
    np.testing.assert_array_equal(augment.posterize(tf.constant(image), bits), expected)
    threshold = [0, 26, 128, 256][[0, 1, 4, 8].index(bits)]
    np.testing.assert_array_equal(augment.solarize(tf.constant(image), threshold),
                                  np.asarray(ImageOps.solarize(pil(image), threshold)))


def test_equalize_and_autocontrast_edge_cases_match_pil():
    flat = np.full((8, 8, 3), 77, np.uint8)
    sparse = (random_image((9, 11, 3), 0, 4, seed=5) * 60).astype(np.uint8)
    for image in (flat, sparse):
        np.testing.assert_array_equal(augment.equalize(tf.constant(image)), np.asarray(ImageOps.equalize(pil(image))))
        np.testing.assert_array_equal(augment.auto_contrast(tf.constant(image)),
                                      np.asarray(ImageOps.autocontrast(pil(image))))


def test_rand_augment_keeps_shape_and_dtype_and_varies():
    image = tf.constant(random_image((32, 32, 3), 30, 220))
    ra = tf.function(lambda key: augment.rand_augment(key, image))
    outs = [ra(k).numpy() for k in keys(60)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    unchanged = np.mean([np.array_equal(o, image.numpy()) for o in outs])
    assert 0.1 < unchanged < 0.45  # both ops skipped with probability 0.25
    assert len({o.tobytes() for o in outs}) > 30
    np.testing.assert_array_equal(outs[3], ra(keys(4)[3]).numpy())
    np.testing.assert_array_equal(augment.rand_augment(keys(1)[0], image, num_layers=0), image)


def test_color_jitter_factors_stay_in_range():
    # On a flat grey image only brightness acts: the output is the input times U[0.6, 1.4].
    image = tf.fill([8, 8, 3], tf.constant(100, tf.uint8))
    jitter = tf.function(lambda key: augment.color_jitter(key, image, 0.4))
    values = np.array([jitter(k).numpy()[0, 0, 0] for k in keys(100)])
    assert values.min() >= 60 and values.max() <= 140 and values.std() > 10
    colourful = tf.constant(random_image(seed=6))
    assert not np.array_equal(augment.color_jitter(keys(1)[0], colourful, 0.4), colourful)
    np.testing.assert_array_equal(augment.color_jitter(keys(1)[0], colourful, 0.0), colourful)


# ---------------------------------------------------------------------------------------------
# Whole transforms and config.
# ---------------------------------------------------------------------------------------------


def test_eval_image_is_the_centre_region():
    # A 256 x 320 image needs no resize for 224 / 0.875: the output is its centre 224 x 224.
    image = random_image((256, 320, 3), seed=7)
    out = augment.eval_image(tf.io.encode_png(image), 224).numpy()
    top, left = 16, 48
    np.testing.assert_allclose(out, normalized(image[top : top + 224, left : left + 224]), atol=1e-5)


def test_eval_image_matches_torchvision_resize_and_center_crop():
    # Resize(64) then CenterCrop(56), as DeiT's eval transform does it on a PIL image.
    image = np.asarray(pil(random_image((30, 40, 3), seed=8)).resize((160, 120), Image.BILINEAR))  # smooth content
    out = augment.eval_image(tf.io.encode_png(image), 56, crop_pct=0.875).numpy()
    resized = np.asarray(pil(image).resize((int(64 * 160 / 120), 64), Image.BICUBIC))  # (85, 64)
    top, left = int(round((64 - 56) / 2)), int(round((85 - 56) / 2))
    expected = normalized(resized[top : top + 56, left : left + 56])
    pixels_off = np.abs(out - expected) * np.asarray(IMAGENET_STD) * 255
    assert np.median(pixels_off) <= 1.0 and pixels_off.max() <= 8  # TF's bicubic vs PIL's


def test_train_image_output():
    encoded = tf.io.encode_jpeg(random_image((50, 70, 3)))
    cfg = AugmentConfig(random_erase_prob=0.0)
    fn = tf.function(lambda key: augment.train_image(key, encoded, 24, cfg))
    outs = [fn(k).numpy() for k in keys(4)]
    lo = (0.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    hi = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    for out in outs:
        assert out.shape == (24, 24, 3) and out.dtype == np.float32
        assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()
    assert not np.array_equal(outs[0], outs[1])


def test_config_defaults_are_the_s_recipe_and_bad_configs_fail():
    cfg = AugmentConfig()
    assert (cfg.rand_augment, cfg.rand_augment_layers, cfg.rand_augment_magnitude, cfg.rand_augment_magnitude_std,
            cfg.rand_augment_increasing) == (True, 2, 9.0, 0.5, True)
    assert cfg.crop_scale == (0.08, 1.0) and cfg.random_erase_prob == 0.25 and cfg.color_jitter == 0.0
    assert FILL_COLOR == (124, 116, 104)
    AugmentConfig(rand_augment=False, color_jitter=0.4)  # XS
    with pytest.raises(ValueError, match="alternatives"):
        AugmentConfig(color_jitter=0.4)
    with pytest.raises(ValueError, match="random_erase_prob"):
        AugmentConfig(random_erase_prob=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 0.1))
    assert math.isclose(augment.AugmentConfig().crop_ratio[1], 4 / 3)
