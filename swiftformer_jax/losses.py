"""Classification and DeiT distillation losses, as the official SwiftFormer code computes them.

Official recipe (Amshaker/SwiftFormer `main.py`, `util/losses.py`):
- With mixup/cutmix (L1, L3) the criterion is timm's SoftTargetCrossEntropy on the mixed, smoothed
  targets (`mixup.mixup_cutmix` folds the label smoothing in). Without (XS, S) it is timm's
  LabelSmoothingCrossEntropy(0.1), which equals `cross_entropy(logits, one_hot_smoothed(labels, K))`.
  Either way the batch reduction is a mean over examples.
- `DistillationLoss` (from DeiT): loss = (1 - alpha) * base + alpha * distillation, where base uses
  the class head, distillation the distillation head against a teacher (RegNetY-160) that sees the
  *same, already mixed* images. hard: `F.cross_entropy(dist, teacher.argmax(1))` (no smoothing);
  soft: `F.kl_div(log_softmax(dist / T), log_softmax(teacher / T), reduction='sum', log_target=True)
  * T * T / dist.numel()`, i.e. summed KL divided by batch * classes, not by batch alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISTILLATION_KINDS = ("none", "hard", "soft")


def one_hot_smoothed(labels: jax.Array, num_classes: int, smoothing: float = 0.1) -> jax.Array:
    """Smoothed one-hot targets [B, K] (float32): off = smoothing / K, on = 1 - smoothing + off.

    timm's `mixup_target` convention (the smoothing mass is spread over all K classes, the true one
    included), so each row sums to 1.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum_k targets_k * log_softmax(logits)_k (timm SoftTargetCrossEntropy).

    `targets` are probabilities [B, K] (one-hot, smoothed, or mixed). Computed in float32.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {logits.shape} and soft targets {targets.shape} must have the same shape")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1))


def check_distillation(kind: str, *, alpha: float, tau: float) -> None:
    """ValueError naming the bad value among `distillation_loss`'s settings."""
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}; valid: {', '.join(DISTILLATION_KINDS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def distillation_loss(
    cls_logits: jax.Array,
    dist_logits: jax.Array | None,
    targets: jax.Array,
    teacher_logits: jax.Array | None,
    *,
    kind: str,
    alpha: float = 0.5,
    tau: float = 1.0,
) -> jax.Array:
    """DeiT's DistillationLoss: (1 - alpha) * CE(cls, targets) + alpha * distillation term.

    kind "none": CE(cls_logits, targets) alone (one head; dist/teacher logits are ignored and may be
    None). "hard": CE(dist_logits, one_hot(argmax teacher)). "soft": KL(teacher/tau || dist/tau)
    summed and divided by dist_logits.size, times tau**2. The teacher gets no gradient.
    """
    check_distillation(kind, alpha=alpha, tau=tau)
    base = cross_entropy(cls_logits, targets)
    if kind == "none":
        return base
    if dist_logits is None or teacher_logits is None:
        raise ValueError(f"distillation kind {kind!r} needs dist_logits and teacher_logits")
    if dist_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"dist_logits {dist_logits.shape} and teacher_logits {teacher_logits.shape} must match"
        )
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    dist = dist_logits.astype(jnp.float32)
    if kind == "hard":
        teacher_labels = jax.nn.one_hot(jnp.argmax(teacher, axis=-1), teacher.shape[-1])
        distill = cross_entropy(dist, teacher_labels)
    else:
        student_log = jax.nn.log_softmax(dist / tau, axis=-1)
        teacher_log = jax.nn.log_softmax(teacher / tau, axis=-1)
        kl = jnp.exp(teacher_log) * (teacher_log - student_log)
        distill = jnp.sum(kl) * (tau * tau) / dist.size
    return (1.0 - alpha) * base + alpha * distill
