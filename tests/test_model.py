"""SwiftFormer modules: every variant's parameter counts and feature maps; heads, modes, initialisation
and errors on small networks. Each variant's logits and gradients against PyTorch: test_parity.py."""

import functools
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftformer_jax import VARIANTS, create_model, layers, ops
from swiftformer_jax.model import ModelSpec, SwiftFormer, drop_path_rates

# Trainable parameters of the PyTorch reference, 1000 classes, with the distillation head.
PYTORCH_PARAMETER_COUNTS = {"XS": 3_475_360, "S": 6_092_128, "L1": 12_057_920, "L3": 28_494_736}
TINY = dict(depths=(2, 1, 1, 2), widths=(8, 16, 16, 24))  # a miniature for fast behaviour tests


def images(batch, height, width, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, height, width, 3))


@functools.lru_cache(maxsize=None)
def initial_variables(variant):
    """Initialised once per variant; parameters do not depend on the image size."""
    model = create_model(variant)
    return jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x))(images(1, 32, 32))


def initial_shapes(variant):
    """The variables' shapes, without computing them."""
    model = create_model(variant)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), images(1, 32, 32))


def count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# Every variant: parameter counts and feature maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_equal_pytorch_reference(variant):
    params = initial_shapes(variant)["params"]
    assert count(params) == PYTORCH_PARAMETER_COUNTS[variant]


# Each variant's train-mode forward and backward (every running statistic updated, every
# gradient) is compared with PyTorch's in test_parity.py, at the odd size; its eval logits at both.


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_features_only_gives_four_stage_maps(variant):
    model = create_model(variant, features_only=True)
    x = jnp.zeros((2, 193, 225, 3))
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x))
    maps = jax.eval_shape(lambda v: model.apply(v, x), variables)
    widths = VARIANTS[variant].widths
    expected_hw = [(49, 57), (25, 29), (13, 15), (7, 8)]  # ceil division by 4, 8, 16, 32
    assert [m.shape for m in maps] == [(2, h, w, c) for (h, w), c in zip(expected_hw, widths)]
    # Each map has its own BN (the official fork_feat norm0, norm2, norm4, norm6), no classifier.
    assert {"norm0", "norm2", "norm4", "norm6"} <= set(variables["params"])
    assert not {"head", "dist_head", "norm"} & set(variables["params"])


# ---------------------------------------------------------------------------------------------
# Heads, modes, determinism, drop path
# ---------------------------------------------------------------------------------------------


def tiny(**kwargs):
    return SwiftFormer(**TINY, **{"num_classes": 7, **kwargs})


@functools.lru_cache(maxsize=None)
def tiny_variables():
    return tiny().init({"params": jax.random.key(0)}, images(4, 33, 31))


def test_eval_returns_mean_of_both_heads():
    model, variables = tiny(), tiny_variables()
    x = images(4, 33, 31, seed=1)
    eval_logits = jax.jit(model.apply)(variables, x)  # compiled: op-by-op it takes longer than compiling
    # In eval mode BN uses running statistics, so train=False applies the heads to the same features.
    pooled = jax.jit(tiny(num_classes=0).apply)(
        {"params": {k: v for k, v in variables["params"].items() if k not in ("head", "dist_head")},
         "batch_stats": variables["batch_stats"]}, x)
    head = pooled @ variables["params"]["head"]["kernel"] + variables["params"]["head"]["bias"]
    dist = pooled @ variables["params"]["dist_head"]["kernel"] + variables["params"]["dist_head"]["bias"]
    np.testing.assert_allclose(eval_logits, (head + dist) / 2, rtol=1e-5, atol=1e-6)
    assert pooled.shape == (4, TINY["widths"][-1])


def test_single_head_without_distillation():
    model = tiny(distillation=False)
    variables = model.init({"params": jax.random.key(0)}, images(2, 32, 32))
    assert "dist_head" not in variables["params"]
    logits, _ = model.apply(variables, images(2, 32, 32), train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 7)


def test_eval_is_deterministic_and_ignores_rngs():
    model = tiny(drop_path_rate=0.5, drop_rate=0.5)
    variables, x = tiny_variables(), images(4, 33, 31, seed=2)
    a = model.apply(variables, x)
    b = model.apply(variables, x, rngs={"dropout": jax.random.key(1), "drop_path": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, tiny().apply(variables, x))  # drop rates change nothing in eval


def test_train_mode_drop_path_depends_on_its_rng():
    # Layer scales of 1: the default 1e-5 would hide what drop path does to the branches.
    model = tiny(drop_path_rate=0.5, layer_scale_init=1.0)
    x = images(4, 33, 31, seed=3)
    variables = model.init({"params": jax.random.key(0)}, x)

    def train(seed):
        (cls, _), _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"drop_path": jax.random.key(seed)})
        return cls

    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(train(0), train(0))
    with pytest.raises(Exception, match="drop_path"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])


def test_drop_path_rates_grow_linearly_as_the_official_stage_computes():
    rates = drop_path_rates((3, 3, 9, 6), 0.1)
    flat = [r for stage in rates for r in stage]
    np.testing.assert_allclose(flat, [0.1 * j / 20 for j in range(21)])
    # Each stage's last block, the SwiftFormerEncoder that uses its rate, for the tiny (2, 1, 1, 2).
    assert [r[-1] for r in drop_path_rates(TINY["depths"], 0.1)] == pytest.approx([0.02, 0.04, 0.06, 0.1])


def test_official_initialisation():
    params = flax.traverse_util.flatten_dict(initial_variables("XS")["params"])
    by_leaf = lambda name: [v for k, v in params.items() if k[-1] == name]
    for scale in by_leaf("layer_scale"):
        np.testing.assert_array_equal(scale, 1.0)
    for scale in by_leaf("layer_scale_1") + by_leaf("layer_scale_2"):
        np.testing.assert_allclose(scale, 1e-5)
    for bias in by_leaf("bias"):
        np.testing.assert_array_equal(bias, 0.0)
    w_g = np.concatenate([np.ravel(w) for w in by_leaf("w_g")])
    assert abs(w_g.std() - 1.0) < 0.1 and abs(w_g.mean()) < 0.1
    kernels = np.concatenate([np.ravel(k) for k in by_leaf("kernel")])
    assert abs(kernels.std() - 0.02) < 0.001
    bn_scales = [v for k, v in params.items() if k[-1] == "scale"]
    assert bn_scales and all(np.all(s == 1.0) for s in bn_scales)
    stats = flax.traverse_util.flatten_dict(initial_variables("XS")["batch_stats"])
    assert all(np.all(v == (1.0 if k[-1] == "var" else 0.0)) for k, v in stats.items())


# ---------------------------------------------------------------------------------------------
# Batch norm: PyTorch semantics and ghost groups
# ---------------------------------------------------------------------------------------------


def np_batch_norm_train(x, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + eps), mean, var


@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_whole_batch_matches_pytorch_rule(unbiased):
    x = np.random.RandomState(0).randn(6, 5, 4, 3).astype(np.float64) * 2 + 1
    bn = layers.BatchNorm(unbiased_running_var=unbiased)
    variables = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
    y, state = bn.apply(variables, jnp.asarray(x, jnp.float32), train=True, mutable=["batch_stats"])
    want, mean, var = np_batch_norm_train(x)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    n = 6 * 5 * 4
    running_var = var * n / (n - 1) if unbiased else var
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * running_var, rtol=1e-5)


def test_ghost_batch_norm_normalises_each_group_on_its_own():
    x = np.random.RandomState(1).randn(8, 3, 3, 2)
    x[4:] = x[4:] * 5 + 3  # the second group has other statistics
    bn = layers.BatchNorm(group_size=4)
    variables = bn.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
    y, state = bn.apply(variables, jnp.asarray(x, jnp.float32), train=True, mutable=["batch_stats"])
    first, m1, v1 = np_batch_norm_train(x[:4])
    second, m2, v2 = np_batch_norm_train(x[4:])
    np.testing.assert_allclose(y, np.concatenate([first, second]), rtol=1e-4, atol=1e-4)
    n = 4 * 3 * 3
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * (m1 + m2) / 2, rtol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * (v1 + v2) / 2 * n / (n - 1), rtol=1e-5)
    # Whole-batch statistics would differ.
    whole, _, _ = np_batch_norm_train(x)
    assert not np.allclose(y, whole, atol=1e-2)


def test_ghost_batch_norm_rejects_batches_that_do_not_split():
    bn = layers.BatchNorm(group_size=4)
    x = jnp.ones((6, 2, 2, 3))
    variables = bn.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="6 images.*groups of 4"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])


def test_model_with_ghost_groups_trains_and_matches_whole_batch_when_one_group():
    x = images(4, 32, 32, seed=4)
    variables = tiny_variables()
    out_ghost, _ = tiny(bn_group_size=4).apply(variables, x, train=True, mutable=["batch_stats"])
    out_whole, _ = tiny().apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out_ghost[0], out_whole[0], rtol=1e-5, atol=1e-6)
    out_two, _ = tiny(bn_group_size=2).apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(out_two[0], out_whole[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    """bfloat16 compute, float32 parameters and BN statistics; logits within 5% of their scale.

    bfloat16 rounds to about 3 significant digits at each of ~20 blocks; measured error here is
    about 1% of the logit range, so 5% leaves room without hiding a broken cast (which gives 100%).
    """
    variables = initial_variables("XS")
    x = images(2, 96, 96, seed=5)
    # Random head weights give logits of a meaningful scale (the 0.02 init makes them tiny).
    params = flax.core.unfreeze(variables["params"])
    params["head"]["kernel"] = jax.random.normal(jax.random.key(7), params["head"]["kernel"].shape)
    params["dist_head"]["kernel"] = jax.random.normal(jax.random.key(8), params["dist_head"]["kernel"].shape)
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    f32 = jax.jit(create_model("XS").apply)(variables, x)
    model_bf16 = create_model("XS", dtype=jnp.bfloat16)
    bf16 = jax.jit(model_bf16.apply)(variables, x)
    assert bf16.dtype == jnp.float32  # logits are returned in float32
    err = float(jnp.max(jnp.abs(bf16 - f32)))
    assert 0 < err <= 0.05 * float(jnp.max(jnp.abs(f32)))
    fresh = jax.eval_shape(lambda: model_bf16.init({"params": jax.random.key(0)}, x))
    assert {leaf.dtype for leaf in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_variant_lists_the_valid_names():
    with pytest.raises(ValueError, match="'M'.*XS, S, L1, L3"):
        create_model("M")


def test_variant_names_are_case_insensitive():
    assert create_model("l1").widths == VARIANTS["L1"].widths


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((32, 32, 3), jnp.float32, r"NHWC.*\(32, 32, 3\)"),
        ((1, 3, 32, 32), jnp.float32, r"3 channels.*\(1, 3, 32, 32\)"),
        ((1, 32, 32, 1), jnp.float32, r"3 channels.*\(1, 32, 32, 1\)"),
        ((1, 32, 32, 3), jnp.uint8, "floating point"),
    ],
)
def test_malformed_images_raise_value_error(shape, dtype, message):
    model, variables = tiny(), tiny_variables()
    with pytest.raises(ValueError, match=message):
        model.apply(variables, jnp.zeros(shape, dtype))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_version=3), "attention_version"),
        (dict(num_classes=-1), "num_classes"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(bn_group_size=0), "bn_group_size"),
        (dict(impl="gpu"), "impl must be one of"),
    ],
)
def test_bad_model_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("S", **kwargs)


def test_auto_impl_is_decided_by_the_devices_the_model_runs_on():
    cpu, tpu, gpu = (types.SimpleNamespace(platform=p) for p in ("cpu", "tpu", "gpu"))
    assert ops.resolve_impl("auto", [cpu, cpu]) == "cpu"
    assert ops.resolve_impl("auto", [tpu, tpu]) == "xla" and ops.resolve_impl("auto", [gpu]) == "xla"
    assert ops.resolve_impl("xla", [cpu]) == "xla" and ops.resolve_impl("cpu", [tpu]) == "cpu"
    assert create_model("XS").impl == "cpu"  # this machine's default devices
    assert ModelSpec.named("XS").build(devices=[tpu]).impl == "xla"  # e.g. a TPU mesh compiled from here


# ---------------------------------------------------------------------------------------------
# Our layers keep Flax's parameters (checkpoints and layout.py depend on it)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours, flax_layer, shape", [
    (layers.dense_layer(6, jnp.float32, "fc"),
     flax.linen.Dense(6, kernel_init=layers.TRUNC_NORMAL_002, name="fc"), (2, 5, 3, 4)),
    (layers.Conv3x3Stride2(6, name="proj"),
     flax.linen.Conv(6, (3, 3), strides=2, padding=1, kernel_init=layers.TRUNC_NORMAL_002, name="proj"),
     (2, 7, 6, 4)),
])
def test_layers_have_flax_parameters_initial_values_and_outputs(ours, flax_layer, shape):
    x = jax.random.normal(jax.random.key(3), shape)
    key = jax.random.key(7)
    mine, theirs = ours.init(key, x), flax_layer.init(key, x)
    assert jax.tree.structure(mine) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(ours.apply(mine, x)), np.asarray(flax_layer.apply(theirs, x)),
                                   rtol=1e-5, atol=1e-5)
