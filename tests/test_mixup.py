"""mixup.py against timm's Mixup semantics (checked from outputs, and timm's rand_bbox in NumPy)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftformer_jax import losses, mixup

K = 10


@functools.lru_cache(maxsize=None)
def _compiled(items):
    return jax.jit(functools.partial(mixup.mixup_cutmix, **dict(items)))


def mix(rng, images, labels, **kwargs):
    """mixup.mixup_cutmix under jit (op-by-op dispatch is far slower on CPU), one compile per config."""
    return _compiled(tuple(sorted(dict(num_classes=K, **kwargs).items())))(rng, images, labels)


def make_batch(batch=8, height=12, width=10, seed=0):
    """Images whose every value is unique (so a pixel's source is identifiable); labels all distinct."""
    rng = np.random.default_rng(seed)
    images = rng.permutation(batch * height * width * 3).reshape(batch, height, width, 3).astype(np.float32)
    labels = rng.permutation(K)[:batch]
    return jnp.asarray(images), jnp.asarray(labels)


def lam_from_targets(targets, labels):
    """With smoothing 0 and distinct labels, target[i, y_i] = lam_i."""
    return np.asarray(targets)[np.arange(len(labels)), np.asarray(labels)]


def np_rand_bbox(img_h, img_w, lam, cy, cx):
    """timm rand_bbox with the random centre given."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
    xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


def check_mixed_image(mixed, image, partner, lam):
    """One mixed image against timm's two rules; returns "cutmix" (with its box) or "mixup".

    CutMix: every pixel is exactly the image's or its partner's, the partner's pixels form one
    filled rectangle (all channels alike), and their share is 1 - lam. Mixup: lam * x + (1 - lam) * x'.
    """
    from_self, from_partner = mixed == image, mixed == partner
    if np.all(from_self | from_partner):
        region = from_partner[..., 0]
        assert np.all(from_partner == region[..., None])
        assert region.mean() == pytest.approx(1 - lam, abs=1e-6)
        rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
        if not rows.size:
            return "cutmix", None
        box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
        assert region.sum() == (box[1] - box[0]) * (box[3] - box[2])  # filled, so a rectangle
        return "cutmix", box
    np.testing.assert_allclose(mixed, image * lam + partner * (1 - lam), rtol=1e-5)
    return "mixup", None


def check_batch(mixed, targets, images, labels, partner_index):
    """Checks every image and its soft targets; returns per-image (method, box) and lam."""
    mixed, targets, images, labels = (np.asarray(a) for a in (mixed, targets, images, labels))
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)
    lam = targets[np.arange(len(labels)), labels]  # smoothing 0 and distinct labels
    np.testing.assert_allclose(targets[np.arange(len(labels)), labels[partner_index]], 1 - lam, atol=1e-6)
    results = [
        check_mixed_image(mixed[i], images[i], images[partner_index[i]], lam[i]) for i in range(len(labels))
    ]
    return results, lam


@pytest.mark.parametrize("mode", mixup.MODES)
def test_mix_follows_timm(mode):
    images, labels = make_batch()
    flip = np.arange(8)[::-1]
    methods = []
    for seed in range(8):
        mixed, targets = mix(jax.random.key(seed), images, labels, label_smoothing=0.0, mode=mode)
        results, lam = check_batch(mixed, targets, images, labels, flip)
        methods += [method for method, _ in results]
        if mode == "batch":  # one draw: one method, one lam, one box
            assert len(set(results)) == 1 and np.ptp(lam) < 1e-6
        if mode == "pair":  # image i and 7 - i share the draw
            assert results == results[::-1]
            np.testing.assert_allclose(lam, lam[::-1], rtol=1e-6)
        if mode == "elem":
            assert np.ptp(lam) > 1e-3
    assert 0 < methods.count("cutmix") < len(methods)


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_single_method_and_groups(method):
    """One method enabled; group_size=4 mixes within each group of 4, each group with its own draw."""
    images, labels = make_batch()
    alphas = dict(cutmix_alpha=0.0) if method == "mixup" else dict(mixup_alpha=0.0)
    within_groups = np.array([3, 2, 1, 0, 7, 6, 5, 4])
    for seed in range(3):
        mixed, targets = mix(
            jax.random.key(seed), images, labels, label_smoothing=0.0, group_size=4, **alphas
        )
        results, lam = check_batch(mixed, targets, images, labels, within_groups)
        assert {m for m, _ in results} == {method}
        assert np.ptp(lam[:4]) < 1e-6 and np.ptp(lam[4:]) < 1e-6 and abs(lam[0] - lam[4]) > 1e-4


def test_cutmix_box_matches_timm_rand_bbox():
    lams = np.linspace(0.0, 1.0, 23)
    for height, width in [(224, 224), (12, 10), (7, 9)]:
        for lam in lams:
            for cy, cx in [(0, 0), (height // 2, width // 3), (height - 1, width - 1), (3, 1)]:
                got = [int(v) for v in mixup.cutmix_box(jnp.float32(lam), cy, cx, height, width)]
                want = [int(v) for v in np_rand_bbox(height, width, np.float32(lam), cy, cx)]
                assert got == want, (height, width, lam, cy, cx)


@pytest.mark.parametrize(
    "kwargs", [dict(mixup_alpha=0.0, cutmix_alpha=0.0), dict(prob=0.0)], ids=["alphas_zero", "prob_zero"]
)
def test_disabled_mixing_is_identity_with_smoothed_targets(kwargs):
    images, labels = make_batch()
    mixed, targets = mix(jax.random.key(0), images, labels, **kwargs)
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_allclose(targets, losses.one_hot_smoothed(labels, K, 0.1), rtol=1e-6)


def test_default_targets_and_determinism():
    images, labels = make_batch()
    a = mix(jax.random.key(3), images, labels)  # `mix` jits: jit works
    b = mix(jax.random.key(3), images, labels)
    d = mix(jax.random.key(4), images, labels)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[1], d[1])
    targets = np.asarray(a[1])
    assert targets.shape == (8, K)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(targets >= 0.1 / K - 1e-7)  # label smoothing 0.1 leaves no class below 0.1 / K


def np_timm_cutmix_lams(height, width, n, seed=0):
    """timm's corrected CutMix lam (alpha 1) by Monte Carlo, with NumPy's RNG as timm draws it."""
    rng = np.random.default_rng(seed)
    lams = []
    for lam in rng.beta(1.0, 1.0, n):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        yl, yh, xl, xh = np_rand_bbox(height, width, lam, cy, cx)
        lams.append(1 - (yh - yl) * (xh - xl) / (height * width))
    return np.array(lams)


def test_draw_statistics():
    """1000 independent timm batch draws (groups of 2): switch share, Beta lam, corrected CutMix lam."""
    draws = 1000
    images = np.random.default_rng(0).permutation(2 * draws * 12 * 10 * 3).astype(np.float32)
    images = images.reshape(2 * draws, 12, 10, 3)
    labels = np.tile([0, 1], draws)
    mixed, targets = mix(jax.random.key(0), jnp.asarray(images), jnp.asarray(labels), group_size=2)
    mixed, targets = np.asarray(mixed), np.asarray(targets)
    partner = images.reshape(draws, 2, -1)[:, ::-1].reshape(images.shape)
    exact = np.all((mixed == images) | (mixed == partner), axis=(1, 2, 3)).reshape(draws, 2).all(axis=1)
    lam = (targets[0::2, 0] - 0.1 / K) / 0.9  # smoothing 0.1 folded in: t = lam * on + (1 - lam) * off
    assert 0.44 < exact.mean() < 0.56  # cutmix share; mixup is never pixel-exact on these images
    mixup_lam = lam[~exact]  # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2a + 1))
    assert 0.46 < mixup_lam.mean() < 0.54
    assert np.var(mixup_lam) == pytest.approx(1 / (4 * (2 * 0.8 + 1)), rel=0.15)
    # Clipping at the borders only shrinks boxes, so corrected CutMix lam sits above 1/2, as timm's.
    reference = np_timm_cutmix_lams(12, 10, 5_000)
    assert lam[exact].mean() == pytest.approx(reference.mean(), abs=0.03)
    assert np.quantile(lam[exact], 0.25) == pytest.approx(np.quantile(reference, 0.25), abs=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="half"), "batch, pair, elem"),
        (dict(group_size=3), "group_size"),
        (dict(prob=1.5), "prob"),
        (dict(mixup_alpha=-1.0), "alphas"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    images, labels = make_batch()
    with pytest.raises(ValueError, match=match):
        mixup.mixup_cutmix(jax.random.key(0), images, labels, num_classes=K, **kwargs)


def test_rejects_odd_batch_and_integer_images():
    images, labels = make_batch(batch=8)
    with pytest.raises(ValueError, match="even"):
        mixup.mixup_cutmix(jax.random.key(0), images[:7], labels[:7], num_classes=K)
    with pytest.raises(ValueError, match="floating"):
        mixup.mixup_cutmix(jax.random.key(0), images.astype(jnp.uint8), labels, num_classes=K)
