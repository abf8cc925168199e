"""Mixup and CutMix on device, with timm's `Mixup` semantics (the official L1/L3 recipe).

timm (`timm/data/mixup.py`, used by the official main.py with mixup 0.8, cutmix 1.0, switch 0.5,
prob 1.0, mode "batch", label smoothing 0.1, correct_lam True):
- per batch, with probability `prob`, mix; when both alphas are > 0, CutMix with probability
  `switch_prob`, else Mixup; lam ~ Beta(alpha, alpha) of the chosen method;
- Mixup: x * lam + x.flip(0) * (1 - lam);
- CutMix: `rand_bbox`: cut = int(size * sqrt(1 - lam)) per side, centre uniform over the integer
  pixels, box [c - cut // 2, c + cut // 2) clipped to the image; the box is pasted from x.flip(0),
  and lam is corrected to 1 - box_area / image_area;
- targets = lam * smooth(y) + (1 - lam) * smooth(y.flip(0)).
Here the box is a mask built from iota comparisons, so shapes are static and the whole thing jits;
both methods reduce to one per-pixel weight: mixed = x * w + partner * (1 - w), with w = lam (Mixup)
or w = 0 inside the box and 1 outside (CutMix, exact for finite inputs).

`group_size`: the official run mixed on each GPU separately: each of 16 processes drew its own lam and
flipped its own 128 images. `group_size=128` reproduces that (each group of consecutive images is a
timm batch; on a batch sharded along `data`, groups that do not straddle devices need no
communication). None treats the whole global batch as one timm batch (single-process timm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from swiftformer_jax import losses

MODES = ("batch", "pair", "elem")


def cutmix_box(lam, center_y, center_x, height: int, width: int):
    """timm's `rand_bbox` for a given centre: (y_lo, y_hi, x_lo, x_hi), half-open, clipped.

    cut = int(size * sqrt(1 - lam)); [centre - cut // 2, centre + cut // 2) clipped to [0, size].
    Works elementwise on arrays of lam and centres.
    """
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    y_lo = jnp.clip(center_y - cut_h // 2, 0, height)
    y_hi = jnp.clip(center_y + cut_h // 2, 0, height)
    x_lo = jnp.clip(center_x - cut_w // 2, 0, width)
    x_hi = jnp.clip(center_x + cut_w // 2, 0, width)
    return y_lo, y_hi, x_lo, x_hi


def _draw(rng, n: int, *, mixup_alpha, cutmix_alpha, switch_prob, prob):
    """n independent timm draws: (lam [n], use_cutmix [n]); lam = 1 where no mixing happens."""
    k_apply, k_switch, k_beta = jax.random.split(rng, 3)
    apply = jax.random.uniform(k_apply, (n,)) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch, (n,)) < switch_prob
    else:
        use_cutmix = jnp.full((n,), cutmix_alpha > 0)
    # One Beta draw with the chosen method's alpha (a disabled method is never chosen, so its alpha
    # of 0 is never used); one sampler instead of two also halves the compile time on CPU.
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam_mix = jax.random.beta(k_beta, alpha, alpha, (n,))
    lam = jnp.where(apply, lam_mix, 1.0).astype(jnp.float32)
    return lam, use_cutmix & apply


def _expand(values, mode: str, group: int):
    """Per-draw values [G, n] -> per-image values [G, group] for the mode's sharing pattern."""
    if mode == "batch":
        return jnp.broadcast_to(values, (values.shape[0], group))
    if mode == "pair":  # image i and its partner group - 1 - i share a draw
        return jnp.concatenate([values, values[:, ::-1]], axis=1)
    return values


def check_settings(*, mixup_alpha: float, cutmix_alpha: float, switch_prob: float, prob: float,
                   mode: str) -> None:
    """ValueError naming the bad value among `mixup_cutmix`'s settings (not its arrays)."""
    if mode not in MODES:
        raise ValueError(f"unknown mixup mode {mode!r}; valid: {', '.join(MODES)}")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"alphas must be >= 0, got mixup_alpha {mixup_alpha}, cutmix_alpha {cutmix_alpha}")
    if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0):
        raise ValueError(f"prob and switch_prob must be in [0, 1], got {prob} and {switch_prob}")


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.1,
    mode: str = "batch",
    group_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mix `images` [B, H, W, C] (float) and int `labels` [B] -> (mixed images, soft targets [B, K]).

    Each image is mixed with its partner in reversed order within its group (timm's x.flip(0)).
    `mode`: "batch" one draw per group (timm's default), "pair" one per mirrored pair, "elem" one per
    image. With both alphas 0 or prob 0 the images are returned unchanged with smoothed targets.
    """
    check_settings(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                   prob=prob, mode=mode)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [B, H, W, C], got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point to be mixed, got {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [B] = {images.shape[:1]}, got {labels.shape}")
    batch, height, width, _ = images.shape
    group = batch if group_size is None else group_size
    if group <= 0 or batch % group or group % 2:
        raise ValueError(
            f"group_size must be an even divisor of the batch (timm needs even batches); "
            f"got batch {batch}, group_size {group_size}"
        )

    smooth = losses.one_hot_smoothed(labels, num_classes, label_smoothing)
    if prob == 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
        return images, smooth

    groups = batch // group
    draws = {"batch": 1, "pair": group // 2, "elem": group}[mode]
    k_draw, k_y, k_x = jax.random.split(rng, 3)
    lam, use_cutmix = _draw(
        k_draw, groups * draws, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        switch_prob=switch_prob, prob=prob,
    )
    center_y = jax.random.randint(k_y, (groups * draws,), 0, height)
    center_x = jax.random.randint(k_x, (groups * draws,), 0, width)
    y_lo, y_hi, x_lo, x_hi = cutmix_box(lam, center_y, center_x, height, width)
    box_area = ((y_hi - y_lo) * (x_hi - x_lo)).astype(jnp.float32)
    lam = jnp.where(use_cutmix, 1.0 - box_area / (height * width), lam)

    def per_image(values):
        return _expand(values.reshape(groups, draws), mode, group).reshape(batch)

    lam, use_cutmix = per_image(lam), per_image(use_cutmix)
    y_lo, y_hi, x_lo, x_hi = (per_image(v) for v in (y_lo, y_hi, x_lo, x_hi))

    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= y_lo[:, None]) & (rows < y_hi[:, None])  # [B, H]
    in_cols = (cols >= x_lo[:, None]) & (cols < x_hi[:, None])  # [B, W]
    in_box = in_rows[:, :, None] & in_cols[:, None, :]  # [B, H, W]
    weight = jnp.where(use_cutmix[:, None, None], jnp.where(in_box, 0.0, 1.0), lam[:, None, None])
    weight = weight[..., None].astype(images.dtype)

    def partner(x):
        return x.reshape(groups, group, *x.shape[1:])[:, ::-1].reshape(x.shape)

    mixed = images * weight + partner(images) * (1 - weight)
    targets = lam[:, None] * smooth + (1.0 - lam[:, None]) * partner(smooth)
    return mixed, targets
