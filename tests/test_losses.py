"""losses.py against NumPy transcriptions of timm's criteria and DeiT's DistillationLoss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftformer_jax import losses


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_soft_target_ce(logits, targets):
    """timm SoftTargetCrossEntropy."""
    return np.mean(np.sum(-targets * np_log_softmax(logits), axis=-1))


def np_label_smoothing_ce(logits, labels, smoothing):
    """timm LabelSmoothingCrossEntropy (the official criterion without mixup)."""
    logprobs = np_log_softmax(logits)
    nll = -logprobs[np.arange(len(labels)), labels]
    smooth = -logprobs.mean(axis=-1)
    return np.mean((1 - smoothing) * nll + smoothing * smooth)


def np_deit_loss(cls, dist, targets, teacher, kind, alpha, tau):
    """DeiT / official util/losses.py DistillationLoss.forward with SoftTargetCrossEntropy as base."""
    base = np_soft_target_ce(cls, targets)
    if kind == "none":
        return base
    if kind == "hard":
        labels = teacher.argmax(axis=1)
        distill = np.mean(-np_log_softmax(dist)[np.arange(len(labels)), labels])  # F.cross_entropy
    else:
        inp, tgt = np_log_softmax(dist / tau), np_log_softmax(teacher / tau)
        # F.kl_div(inp, tgt, reduction='sum', log_target=True) * T * T / numel
        distill = np.sum(np.exp(tgt) * (tgt - inp)) * tau * tau / dist.size
    return base * (1 - alpha) + distill * alpha


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    b, k = 6, 11
    logits = (rng.standard_normal((3, b, k)) * 3).astype(np.float32)
    labels = rng.integers(0, k, b)
    return logits, labels, k


def test_one_hot_smoothed():
    got = np.asarray(losses.one_hot_smoothed(jnp.array([2, 0]), 4, smoothing=0.1))
    off, on = 0.1 / 4, 0.9 + 0.1 / 4
    np.testing.assert_allclose(got, [[off, off, on, off], [on, off, off, off]], rtol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(losses.one_hot_smoothed(jnp.array([1]), 3, 0.0), [[0, 1, 0]])
    with pytest.raises(ValueError, match="smoothing"):
        losses.one_hot_smoothed(jnp.array([1]), 3, 1.0)


def test_cross_entropy_matches_timm(batch):
    (logits, _, _), labels, k = batch
    rng = np.random.default_rng(1)
    targets = rng.dirichlet(np.ones(k), size=len(labels)).astype(np.float32)
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    assert got == pytest.approx(np_soft_target_ce(logits, targets), rel=1e-5)
    # Without mixup the official criterion is LabelSmoothingCrossEntropy: the same number.
    smoothed = losses.one_hot_smoothed(jnp.asarray(labels), k, 0.1)
    got = float(losses.cross_entropy(jnp.asarray(logits), smoothed))
    assert got == pytest.approx(np_label_smoothing_ce(logits, labels, 0.1), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets[:, :-1]))


@pytest.mark.parametrize("kind, alpha, tau", [("none", 0.5, 1.0), ("hard", 0.5, 1.0), ("hard", 0.3, 1.0),
                                              ("soft", 0.5, 1.0), ("soft", 0.7, 3.0)])
def test_distillation_loss_matches_deit(batch, kind, alpha, tau):
    (cls, dist, teacher), labels, k = batch
    targets = np.asarray(losses.one_hot_smoothed(jnp.asarray(labels), k, 0.1))
    want = np_deit_loss(cls, dist, targets, teacher, kind, alpha, tau)
    got = losses.distillation_loss(
        jnp.asarray(cls), jnp.asarray(dist), jnp.asarray(targets), jnp.asarray(teacher),
        kind=kind, alpha=alpha, tau=tau,
    )
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_soft_distillation_divides_by_all_elements(batch):
    """Summed KL / (B * K), as DeiT's numel(): a per-example mean ("batchmean") would be K times bigger."""
    (cls, dist, teacher), labels, k = batch
    targets = jax.nn.one_hot(labels, k)
    soft = losses.distillation_loss(cls, dist, targets, teacher, kind="soft", alpha=1.0)
    log_t, log_s = np_log_softmax(teacher), np_log_softmax(dist)
    kl_rows = np.sum(np.exp(log_t) * (log_t - log_s), axis=1)
    assert float(soft) == pytest.approx(kl_rows.mean() / k, rel=1e-5)


def test_teacher_gets_no_gradient(batch):
    (cls, dist, teacher), labels, k = batch
    targets = jax.nn.one_hot(labels, k)
    for kind in ("hard", "soft"):
        grads = jax.grad(
            lambda d, t: losses.distillation_loss(cls, d, targets, t, kind=kind), argnums=(0, 1)
        )(jnp.asarray(dist), jnp.asarray(teacher))
        assert np.abs(np.asarray(grads[0])).sum() > 0
        np.testing.assert_array_equal(grads[1], 0.0)


def test_distillation_errors(batch):
    (cls, dist, teacher), labels, k = batch
    targets = jax.nn.one_hot(labels, k)
    with pytest.raises(ValueError, match="none, hard, soft"):
        losses.distillation_loss(cls, dist, targets, teacher, kind="kl")
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.distillation_loss(cls, dist, targets, None, kind="hard")
    assert float(losses.distillation_loss(cls, None, targets, None, kind="none")) == pytest.approx(
        np_soft_target_ce(cls, np.asarray(targets)), rel=1e-5
    )
