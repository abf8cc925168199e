"""optim.py against NumPy references written from timm's and PyTorch's rules (not from the jnp code)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swiftformer_jax
from swiftformer_jax import layout, optim

# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------


def timm_lr(t, *, base, warmup_init, lr_min, warmup_t, t_initial):
    """timm CosineLRScheduler._get_lr: cycle_mul 1, cycle_decay 1, cycle_limit 1, warmup_prefix False."""
    if t < warmup_t:
        return warmup_init + t * (base - warmup_init) / warmup_t
    i = t // t_initial
    t_curr = t - t_initial * i
    if i < 1:
        return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t_curr / t_initial))
    return lr_min


def official_epoch_lrs(epochs, *, base, warmup_init, lr_min, warmup_t):
    """The lr each epoch trains with in the official main.py loop (scheduler stepped after each epoch)."""
    # CosineLRScheduler.__init__ sets the groups to warmup_lr_init when warmup_t > 0.
    lr, used = warmup_init, []
    for epoch in range(epochs):
        used.append(lr)  # train_one_epoch(...)
        lr = timm_lr(epoch, base=base, warmup_init=warmup_init, lr_min=lr_min, warmup_t=warmup_t,
                     t_initial=epochs)  # lr_scheduler.step(epoch)
    return used


def timm_unitwise_norm(x):
    if x.ndim <= 1:
        return np.sqrt(np.sum(x * x))
    return np.sqrt(np.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))


def timm_agc(p, g, clip_factor=0.01, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad on one PyTorch-layout tensor, in float64."""
    max_norm = np.maximum(timm_unitwise_norm(p), eps) * clip_factor
    grad_norm = timm_unitwise_norm(g)
    clipped = g * (max_norm / np.maximum(grad_norm, 1e-6))
    return np.where(grad_norm < max_norm, g, clipped), np.broadcast_to(grad_norm >= max_norm, g.shape)


def timm_no_decay(name, torch_shape):
    """timm add_weight_decay / param_groups_weight_decay rule."""
    return len(torch_shape) <= 1 or name.endswith(".bias")


def flat(tree):
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflat_like(tree, values):
    paths = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), [values[p] for p in paths])


@pytest.fixture(scope="module")
def s_param_shapes():
    model = swiftformer_jax.create_model("S")
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)), train=False)
    )
    return variables["params"]


# A small tree with every leaf kind of the real model, under real names.
MINI_SHAPES = {
    "patch_embed": {"conv1": {"kernel": (3, 3, 3, 8), "bias": (8,)}, "norm1": {"scale": (8,), "bias": (8,)}},
    "network_0": {
        "block_0": {
            "dwconv": {"kernel": (3, 3, 1, 8), "bias": (8,)},
            "pwconv1": {"kernel": (8, 32), "bias": (32,)},
            "layer_scale": (8,),
        },
        "block_1": {
            "attn": {"to_query": {"kernel": (8, 8), "bias": (8,)}, "w_g": (8, 1)},
            "layer_scale_1": (8,),
        },
    },
    "head": {"kernel": (8, 10), "bias": (10,)},
}


def mini_tree(rng, scale_fn):
    """Random float32 arrays of MINI_SHAPES, each leaf scaled by scale_fn(shape)."""
    return jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s) * scale_fn(s)).astype(np.float32), MINI_SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


# ----------------------------------------------------------------------------------------------------
# Schedule and durations
# ----------------------------------------------------------------------------------------------------

LR = dict(base=2e-3, warmup_init=1e-6, lr_min=1e-5)


def test_schedule_per_step_matches_timm():
    warmup, total = 50, 1000
    schedule = optim.learning_rate_schedule(base_lr=2e-3, warmup_steps=warmup, total_steps=total)
    steps = [0, 1, 25, warmup - 1, warmup, warmup + 1, 500, 777, total - 1, total, total + 100]
    got = np.array([float(schedule(s)) for s in steps])
    want = np.array([timm_lr(s, warmup_t=warmup, t_initial=total, **LR) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-11)
    assert got[0] == pytest.approx(1e-6, rel=1e-6)
    # Warm-up is not a prefix: the cosine starts at t = 0, so the peak is just below base_lr.
    assert got[steps.index(warmup)] < 2e-3
    assert got[steps.index(total)] == pytest.approx(1e-5, rel=1e-6)
    assert float(jax.jit(schedule)(jnp.int32(500))) == pytest.approx(want[6], rel=1e-5)


def test_schedule_without_warmup():
    schedule = optim.learning_rate_schedule(base_lr=1e-3, warmup_steps=0, total_steps=10)
    for s in (0, 3, 10):
        want = timm_lr(s, base=1e-3, warmup_init=1e-6, lr_min=1e-5, warmup_t=0, t_initial=10)
        assert float(schedule(s)) == pytest.approx(want, rel=1e-5)


def test_schedule_per_epoch_is_constant_within_an_epoch():
    spe, warmup_epochs, epochs = 7, 2, 10
    schedule = optim.learning_rate_schedule(
        base_lr=2e-3, warmup_steps=warmup_epochs * spe, total_steps=epochs * spe,
        steps_per_epoch=spe, per_epoch=True,
    )
    steps = np.arange(epochs * spe + spe)
    got = np.asarray(jax.vmap(schedule)(steps))
    want = np.array([timm_lr(s // spe, warmup_t=warmup_epochs, t_initial=epochs, **LR) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-11)
    assert len(np.unique(got[3 * spe:4 * spe])) == 1
    assert got[3 * spe] != got[4 * spe]


def test_schedule_official_epoch_lag():
    spe, epochs = 3, 12
    schedule = optim.learning_rate_schedule(
        base_lr=2e-3, warmup_steps=5 * spe, total_steps=epochs * spe, steps_per_epoch=spe,
        per_epoch=True, lag_one_epoch=True,
    )
    want = np.repeat(official_epoch_lrs(epochs, warmup_t=5, **LR), spe)
    got = np.asarray(jax.vmap(schedule)(np.arange(epochs * spe)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-11)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_steps=5, total_steps=10, steps_per_epoch=3, per_epoch=True), "whole epochs"),
        (dict(warmup_steps=6, total_steps=12, per_epoch=True), "steps_per_epoch"),
        (dict(warmup_steps=5, total_steps=10, lag_one_epoch=True), "per_epoch=True"),
        (dict(warmup_steps=11, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=0, total_steps=0), "total_steps"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.learning_rate_schedule(base_lr=1e-3, **kwargs)


def test_steps_from():
    assert optim.steps_from(300, 0, 625) == 187_500
    assert optim.steps_from(300, None, 625) == 187_500
    assert optim.steps_from(300, 1000, 625) == 1000  # steps > 0 overrides epochs
    assert optim.steps_from(0.5, -1, 7) == 4  # round(3.5) under Python's rounding is 4
    assert optim.steps_from(0, 0, 625) == 0
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.steps_from(5, 0, None)
    with pytest.raises(ValueError, match="duration"):
        optim.steps_from(None, 0, 625)


def test_scaled_learning_rate():
    assert optim.scaled_learning_rate(2e-3, 4096) == 2e-3
    assert optim.scaled_learning_rate(2e-3, 4096, scale=True) == pytest.approx(4e-3)
    assert optim.scaled_learning_rate(2e-3, 2048, scale=True) == pytest.approx(2e-3)
    assert optim.scaled_learning_rate(2e-3, 512, reference_batch=512, scale=True) == pytest.approx(2e-3)
    with pytest.raises(ValueError):
        optim.scaled_learning_rate(2e-3, 0, scale=True)


# ----------------------------------------------------------------------------------------------------
# Weight decay mask
# ----------------------------------------------------------------------------------------------------


def test_weight_decay_mask_on_swiftformer_s(s_param_shapes):
    mask = flat(optim.weight_decay_mask(s_param_shapes))
    shapes = flat(s_param_shapes)
    # Counted by hand from the official module tree of S (17 ConvEncoders, 4 SwiftFormerEncoders,
    # 3 Embeddings, stem, head): decayed = every conv / linear weight, layer scale and w_g.
    assert sum(mask.values()) == 127
    assert len(mask) - sum(mask.values()) == 156
    for path, decays in mask.items():
        name = layout.official_key("params", path)
        torch_shape = layout.torch_shape(path, shapes[path].shape)
        assert decays == (not timm_no_decay(name, torch_shape)), name
    block = ("network_4", "block_8")
    assert mask[block + ("layer_scale_1",)] and mask[block + ("layer_scale_2",)]
    assert mask[block + ("local_representation", "layer_scale")]
    assert mask[("network_0", "block_0", "layer_scale")]
    assert mask[block + ("attn", "w_g")]
    assert mask[block + ("attn", "to_query", "kernel")] and mask[block + ("linear", "fc1", "kernel")]
    assert mask[("network_0", "block_0", "dwconv", "kernel")]
    assert mask[("patch_embed", "conv1", "kernel")] and mask[("head", "kernel")]
    assert not mask[("norm", "scale")] and not mask[("norm", "bias")]
    assert not mask[block + ("linear", "norm1", "scale")]
    assert not mask[("head", "bias")] and not mask[block + ("attn", "to_query", "bias")]
    assert not mask[("network_1", "proj", "bias")]


def test_weight_decay_mask_name_rule():
    """The `.bias` rule holds whatever the shape (all biases of SwiftFormer happen to be 1-D)."""
    tree = {"proj": {"bias": np.zeros((4, 2)), "kernel": np.zeros((3, 4))}, "layer_scale": np.zeros(4)}
    assert optim.weight_decay_mask(tree) == {"proj": {"bias": False, "kernel": True}, "layer_scale": True}


def test_weight_decay_mask_rejects_full_variables(s_param_shapes):
    with pytest.raises(ValueError, match="params"):
        optim.weight_decay_mask({"params": s_param_shapes})


# ----------------------------------------------------------------------------------------------------
# AGC
# ----------------------------------------------------------------------------------------------------


def test_agc_matches_timm_on_swiftformer_s(s_param_shapes):
    rng = np.random.default_rng(0)
    shapes = flat(s_param_shapes)
    params, grads = {}, {}
    for i, (path, leaf) in enumerate(sorted(shapes.items())):
        params[path] = (rng.standard_normal(leaf.shape) * 0.05).astype(np.float32)
        if i % 11 == 0:
            params[path][:] = 0  # exercises the eps floor on the param norm
        leaf_scale = 10.0 ** rng.uniform(-5, -1)
        unit_scale = 10.0 ** rng.uniform(-1.5, 1.5, size=leaf.shape)
        grads[path] = (rng.standard_normal(leaf.shape) * leaf_scale * unit_scale).astype(np.float32)

    want, clipped_kinds = {}, {"whole": [], "unitwise": []}
    for path in shapes:
        p = layout.to_torch_layout(path, params[path]).astype(np.float64)
        g = layout.to_torch_layout(path, grads[path]).astype(np.float64)
        new_g, clipped = timm_agc(p, g)
        want[path] = layout.from_torch_layout(path, new_g, shapes[path].shape)
        clipped_kinds["whole" if p.ndim <= 1 else "unitwise"].append(clipped.mean())
    # The random draw must exercise both branches for both kinds of leaves.
    for kind, fractions in clipped_kinds.items():
        assert 0.05 < np.mean(fractions) < 0.95, kind

    clip = optim.adaptive_grad_clip(0.01)
    params_tree, grads_tree = unflat_like(s_param_shapes, params), unflat_like(s_param_shapes, grads)
    got, _ = jax.jit(clip.update)(grads_tree, clip.init(params_tree), params_tree)
    got = flat(got)
    for path in shapes:
        np.testing.assert_allclose(got[path], want[path], rtol=2e-5, atol=1e-12, err_msg=str(path))


def test_agc_reduce_axes_per_leaf_kind():
    assert optim.agc_reduce_axes(("patch_embed", "conv1", "kernel"), (3, 3, 3, 48)) == (0, 1, 2)
    assert optim.agc_reduce_axes(("b", "dwconv", "kernel"), (3, 3, 1, 48)) == (0, 1, 2)
    assert optim.agc_reduce_axes(("b", "pwconv1", "kernel"), (48, 192)) == (0,)
    assert optim.agc_reduce_axes(("attn", "to_query", "kernel"), (48, 48)) == (0,)
    assert optim.agc_reduce_axes(("b", "layer_scale_2"), (48,)) == ()
    assert optim.agc_reduce_axes(("attn", "w_g"), (48, 1)) == (1,)
    assert optim.agc_reduce_axes(("norm", "scale"), (48,)) is None
    assert optim.agc_reduce_axes(("head", "bias"), (1000,)) is None


def test_agc_needs_params():
    clip = optim.adaptive_grad_clip()
    grads = {"head": {"bias": jnp.ones(3)}}
    with pytest.raises(ValueError, match="params"):
        clip.update(grads, clip.init(grads))


# ----------------------------------------------------------------------------------------------------
# The full optimizer
# ----------------------------------------------------------------------------------------------------


def torch_adamw_steps(params, grads_per_step, lrs, *, wd, decay_mask, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW (amsgrad=False, maximize=False) after timm AGC, in float64 NumPy."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    for step, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for k in params:
            p_t = layout.to_torch_layout(k, params[k])
            g_t, _ = timm_agc(p_t, layout.to_torch_layout(k, grads[k]).astype(np.float64))
            g = layout.from_torch_layout(k, g_t, params[k].shape)
            params[k] = params[k] * (1 - lr * (wd if decay_mask[k] else 0.0))
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            bias1, bias2 = 1 - b1**step, 1 - b2**step
            denom = np.sqrt(v[k]) / math.sqrt(bias2) + eps
            params[k] = params[k] - (lr / bias1) * m[k] / denom
    return params


def test_optimizer_matches_torch_adamw_with_agc():
    rng = np.random.default_rng(1)
    params = mini_tree(rng, lambda s: 0.1)
    grads = [mini_tree(rng, lambda s: 10.0 ** rng.uniform(-5, -2)) for _ in range(3)]
    lr_kw = dict(base_lr=1e-2, warmup_lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=10)
    lrs = [timm_lr(t, base=1e-2, warmup_init=1e-3, lr_min=1e-4, warmup_t=2, t_initial=10) for t in range(3)]
    decay_mask = {
        k: not timm_no_decay(layout.official_key("params", k), layout.torch_shape(k, p.shape))
        for k, p in flat(params).items()
    }
    assert 0 < sum(decay_mask.values()) < len(decay_mask)
    want = torch_adamw_steps(flat(params), [flat(g) for g in grads], lrs, wd=0.5, decay_mask=decay_mask)

    tx = optim.create_optimizer(
        learning_rate=optim.learning_rate_schedule(**lr_kw), weight_decay=0.5, params_for_mask=params
    )

    @jax.jit
    def step(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    got = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = tx.init(got)
    for g in grads:
        got, opt_state = step(got, opt_state, g)
    got = flat(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=str(k))
        assert not np.allclose(got[k], flat(params)[k])


def test_gradient_clipping_modes():
    grads = {"head": {"bias": jnp.array([3.0, 4.0])}}
    norm = optim.gradient_clipping("norm", 1.0)
    np.testing.assert_allclose(norm.update(grads, norm.init(grads))[0]["head"]["bias"], [0.6, 0.8], rtol=1e-6)
    value = optim.gradient_clipping("value", 3.5)
    np.testing.assert_allclose(value.update(grads, value.init(grads))[0]["head"]["bias"], [3.0, 3.5])
    none = optim.gradient_clipping(None, None)
    np.testing.assert_allclose(none.update(grads, none.init(grads))[0]["head"]["bias"], [3.0, 4.0])
    with pytest.raises(ValueError, match="agc, norm, value"):
        optim.gradient_clipping("agc2", 0.01)
    with pytest.raises(ValueError, match="clip_grad"):
        optim.gradient_clipping("agc", 0.0)


def test_global_norm():
    tree = {"a": jnp.array([3.0]), "b": {"c": jnp.array([[4.0, 12.0]])}}
    assert float(optim.global_norm(tree)) == pytest.approx(13.0)


# ----------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------


def test_ema_update_matches_timm_model_ema():
    rng = np.random.default_rng(2)
    ema = {"params": {"w": rng.standard_normal((4, 3))}, "batch_stats": {"mean": rng.standard_normal(3)}}
    news = [jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape), ema) for _ in range(3)]
    decay = 0.9
    want = ema
    for new in news:  # timm ModelEma.update: ema_v * decay + (1 - decay) * model_v
        want = jax.tree_util.tree_map(lambda e, p: e * decay + (1 - decay) * p, want, new)
    got = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), ema)
    update = jax.jit(optim.ema_update)
    for new in news:
        got = update(got, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), new), decay)
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)
    assert got["params"]["w"].dtype == jnp.float32
