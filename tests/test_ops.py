"""The pure ops against float64 NumPy references written from the paper's formulas."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftformer_jax import ops

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------------------------
# NumPy float64 references
# ---------------------------------------------------------------------------------------------


def np_l2norm(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_additive_attention(p, x, version):
    q = np_l2norm(np_dense(p["to_query"], x), -1)
    k = np_l2norm(np_dense(p["to_key"], x), -1)
    d = x.shape[-1]
    if version == 1:
        a = np.ones(q.shape[:2] + (1,))  # softmax over a single element
    else:
        a = np_l2norm(q @ np.asarray(p["w_g"], np.float64) * d**-0.5, 1)
    g = (a * q).sum(axis=1, keepdims=True)
    return np_dense(p["final"], np_dense(p["Proj"], g * k) + q)


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_softmax_attention(p, x, heads):
    b, n, d = x.shape
    qkv = np_dense(p["qkv"], x).reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv  # [B, H, N, d]
    attn = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), -1)
    return np_dense(p["proj"], (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d))


def np_transposed_attention(p, x, heads):
    b, n, d = x.shape
    qkv = np_dense(p["qkv"], x).reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 4, 1)
    q, k, v = qkv  # [B, H, d, N]
    q, k = np_l2norm(q, -1), np_l2norm(k, -1)
    temp = np.asarray(p["temperature"], np.float64)[None, :, None, None]
    attn = np_softmax(q @ k.transpose(0, 1, 3, 2) * temp, -1)  # [B, H, d, d]
    out = (attn @ v).transpose(0, 3, 1, 2).reshape(b, n, d)
    return np_dense(p["proj"], out)


def np_separable_attention(p, x):
    d = x.shape[-1]
    qkv = np_dense(p["qkv"], x)
    i, k, v = qkv[..., :1], qkv[..., 1 : 1 + d], qkv[..., 1 + d :]
    context = (np_softmax(i, 1) * k).sum(axis=1, keepdims=True)
    return np_dense(p["proj"], np.maximum(v, 0) * context)


def randomised(params, key, scale=0.3):
    """Random values everywhere: default init (zero biases) would hide bias mistakes."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def tokens(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# L2 normalisation
# ---------------------------------------------------------------------------------------------


def test_l2_normalize_matches_pytorch_formula():
    x = tokens((4, 5, 7))
    x[0, 0] = 0.0  # a zero vector stays zero (norm clamped at eps)
    x[1, 1] = 1e-14  # below eps: divided by eps, not by its norm
    for axis in (-1, 1):
        got = np.asarray(ops.l2_normalize(jnp.asarray(x), axis=axis))
        np.testing.assert_allclose(got, np_l2norm(x.astype(np.float64), axis), rtol=1e-6, atol=1e-7)


def test_l2_normalize_gradient_is_finite_at_zero():
    grad = jax.grad(lambda v: jnp.sum(ops.l2_normalize(v) * jnp.arange(3.0)))(jnp.zeros(3))
    assert np.all(np.isfinite(grad))
    # At zero the function is x / eps: its gradient is the upstream gradient / eps.
    np.testing.assert_allclose(grad, np.arange(3.0) / 1e-12, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Efficient additive attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_efficient_additive_attention_matches_numpy(version):
    params = randomised(ops.init_efficient_additive_params(jax.random.key(0), 16), jax.random.key(1))
    x = tokens((3, 20, 16))
    got = ops.efficient_additive_attention(params, jnp.asarray(x), version=version)
    want = np_additive_attention(params, x.astype(np.float64), version)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_versions_compute_different_functions():
    params = randomised(ops.init_efficient_additive_params(jax.random.key(0), 16), jax.random.key(1))
    x = jnp.asarray(tokens((2, 20, 16)))
    v1 = ops.efficient_additive_attention(params, x, version=1)
    v2 = ops.efficient_additive_attention(params, x, version=2)
    assert float(jnp.max(jnp.abs(v1 - v2))) > 1e-3


def test_version_1_gives_every_token_weight_one_and_w_g_no_gradient():
    params = randomised(ops.init_efficient_additive_params(jax.random.key(0), 8), jax.random.key(1))
    q = ops.l2_normalize(jnp.asarray(tokens((2, 11, 8))))
    weights = ops.additive_token_weights(q, params["w_g"], version=1)
    assert weights.shape == (2, 11, 1)
    np.testing.assert_array_equal(np.asarray(weights), 1.0)

    x = jnp.asarray(tokens((2, 11, 8)))
    def loss(p, version):
        return jnp.sum(ops.efficient_additive_attention(p, x, version=version) ** 2)
    assert float(jnp.abs(jax.grad(loss)(params, 1)["w_g"]).max()) == 0.0
    assert float(jnp.abs(jax.grad(loss)(params, 2)["w_g"]).max()) > 0.0


def test_version_2_token_weights_have_unit_norm_over_tokens():
    params = randomised(ops.init_efficient_additive_params(jax.random.key(0), 8), jax.random.key(1))
    q = ops.l2_normalize(jnp.asarray(tokens((2, 11, 8))))
    weights = ops.additive_token_weights(q, params["w_g"], version=2)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(weights), axis=1), 1.0, rtol=1e-5)


def test_unknown_attention_version_is_rejected():
    params = ops.init_efficient_additive_params(jax.random.key(0), 8)
    with pytest.raises(ValueError, match="version"):
        ops.efficient_additive_attention(params, jnp.ones((1, 4, 8)), version=3)


def _array_shapes_in(fn, *args):
    """Every intermediate shape in the jaxpr (including sub-jaxprs) and in the optimised HLO."""
    jaxpr_text = str(jax.make_jaxpr(fn)(*args))
    hlo_text = jax.jit(fn).lower(*args).compile().as_text()
    return jaxpr_text + hlo_text


@pytest.mark.parametrize("with_grad", [False, True])
def test_additive_attention_holds_no_n_by_n_array(with_grad):
    n, d = 3136, 64  # 56 x 56 tokens, stage-1 resolution at 224 px
    params = ops.init_efficient_additive_params(jax.random.key(0), d)
    x = jnp.ones((1, n, d))

    def forward(p, x):
        return ops.efficient_additive_attention(p, x)

    fn = jax.grad(lambda p, x: jnp.sum(forward(p, x))) if with_grad else forward
    text = _array_shapes_in(fn, params, x)
    assert re.search(r"\b3136,\s*3136\b|\b3136\]\[3136\b", text) is None

    # The check can fail: softmax self-attention at the same size does build N x N.
    sa_params = ops.init_softmax_self_attention_params(jax.random.key(0), d)
    sa_text = str(jax.make_jaxpr(ops.softmax_self_attention)(sa_params, x))
    assert re.search(r"\b3136,3136\b", sa_text) is not None


def test_additive_attention_under_vmap_and_jit():
    params = ops.init_efficient_additive_params(jax.random.key(0), 8)
    x = jnp.asarray(tokens((5, 2, 6, 8)))
    batched = jax.jit(jax.vmap(lambda xi: ops.efficient_additive_attention(params, xi)))(x)
    direct = ops.efficient_additive_attention(params, x.reshape(10, 6, 8)).reshape(5, 2, 6, 8)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(direct), rtol=1e-6, atol=1e-6)


def test_additive_attention_bfloat16_within_tolerance_of_float32():
    """bfloat16 has an 8-bit mantissa (relative step 2**-8 = 0.4%); we allow 3% of the output scale."""
    params = randomised(ops.init_efficient_additive_params(jax.random.key(0), 64), jax.random.key(1))
    x = jnp.asarray(tokens((2, 196, 64)))
    f32 = ops.efficient_additive_attention(params, x)
    bf16 = ops.efficient_additive_attention(
        jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), x.astype(jnp.bfloat16)
    )
    assert bf16.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - f32)))
    assert err <= 0.03 * float(jnp.max(jnp.abs(f32)))


def test_attention_rejects_non_token_input():
    params = ops.init_efficient_additive_params(jax.random.key(0), 8)
    with pytest.raises(ValueError, match=r"\[B, N, D\].*\(2, 8\)"):
        ops.efficient_additive_attention(params, jnp.ones((2, 8)))


# ---------------------------------------------------------------------------------------------
# Baseline attention mechanisms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 4])
def test_softmax_self_attention_matches_numpy(heads):
    params = randomised(ops.init_softmax_self_attention_params(jax.random.key(0), 16), jax.random.key(2))
    x = tokens((2, 9, 16))
    got = ops.softmax_self_attention(params, jnp.asarray(x), num_heads=heads)
    np.testing.assert_allclose(np.asarray(got), np_softmax_attention(params, x.astype(np.float64), heads),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_transposed_attention_matches_numpy(heads):
    params = randomised(ops.init_transposed_attention_params(jax.random.key(0), 16, heads), jax.random.key(3))
    x = tokens((2, 9, 16))
    got = ops.transposed_attention(params, jnp.asarray(x), num_heads=heads)
    np.testing.assert_allclose(np.asarray(got), np_transposed_attention(params, x.astype(np.float64), heads),
                               rtol=2e-5, atol=2e-5)


def test_separable_attention_matches_numpy():
    params = randomised(ops.init_separable_attention_params(jax.random.key(0), 16), jax.random.key(4))
    x = tokens((2, 9, 16))
    got = ops.separable_attention(params, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), np_separable_attention(params, x.astype(np.float64)),
                               rtol=2e-5, atol=2e-5)


def test_heads_must_divide_width():
    params = ops.init_softmax_self_attention_params(jax.random.key(0), 10)
    with pytest.raises(ValueError, match="10.*3 heads"):
        ops.softmax_self_attention(params, jnp.ones((1, 4, 10)), num_heads=3)


# ---------------------------------------------------------------------------------------------
# Depthwise conv and drop path
# ---------------------------------------------------------------------------------------------


def test_depthwise_conv_matches_grouped_convolution():
    x = jnp.asarray(tokens((2, 9, 8, 5)))
    kernel = jnp.asarray(tokens((3, 3, 1, 5), seed=1))
    bias = jnp.asarray(tokens((5,), seed=2))
    want = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=5, precision="highest",
    ) + bias
    np.testing.assert_allclose(np.asarray(ops.depthwise_conv3x3(x, kernel, bias)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_depthwise_conv_hand_written_gradient_matches_grouped_convolution(dtype, tol):
    """The custom VJP (input gradient, nine kernel taps, bias) against XLA's own grouped conv."""
    x = jnp.asarray(tokens((3, 7, 5, 4)))
    kernel = jnp.asarray(tokens((3, 3, 1, 4), seed=1))
    bias = jnp.asarray(tokens((4,), seed=2))
    weight = jnp.asarray(tokens((3, 7, 5, 4), seed=3))

    def reference(x, kernel, bias):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=4, precision="highest") + bias

    def grads(fn, *args):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weight), argnums=(0, 1, 2)))(*args)

    cast = [a.astype(dtype) for a in (x, kernel, bias)]
    got = grads(ops.depthwise_conv3x3, *cast)
    want = grads(reference, x, kernel, bias)
    for name, g, w in zip(("x", "kernel", "bias"), got, want):
        assert g.dtype == dtype, name
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), rtol=0, atol=tol * scale, err_msg=name)


def test_depthwise_conv_gradient_under_vmap():
    x = jnp.asarray(tokens((2, 1, 4, 4, 3)))
    kernel = jnp.asarray(tokens((3, 3, 1, 3), seed=1))
    loss = lambda x, k: jnp.sum(jnp.square(ops.depthwise_conv3x3(x, k, jnp.zeros(3))))  # noqa: E731
    per_sample = jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(x, kernel)
    one_by_one = jnp.stack([jax.grad(loss, argnums=1)(x[i], kernel) for i in range(2)])
    np.testing.assert_allclose(np.asarray(per_sample), np.asarray(one_by_one), rtol=1e-5, atol=1e-6)


def test_dense_on_maps_is_the_plain_matmul_with_its_gradient():
    x = jnp.asarray(tokens((2, 3, 5, 4)))
    params = {"kernel": jnp.asarray(tokens((4, 6), seed=1)), "bias": jnp.asarray(tokens((6,), seed=2))}
    plain = lambda p, x: jnp.matmul(x, p["kernel"]) + p["bias"]  # noqa: E731
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(ops.dense(params, x)), np.asarray(plain(params, x)), rtol=1e-6)
        got = jax.grad(lambda p, x: jnp.sum(jnp.sin(ops.dense(p, x))), argnums=(0, 1))(params, x)
        want = jax.grad(lambda p, x: jnp.sum(jnp.sin(plain(p, x))), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def _autodiff_batch_norm(x, scale, bias, epsilon=1e-5):
    """The plain formula, differentiated by JAX: the reference for the hand-written gradient."""
    axes = tuple(range(1, x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(x.dtype)


@pytest.mark.parametrize("shape", [(1, 6, 5, 4, 3), (2, 3, 4, 5, 7), (1, 4, 9)])
def test_batch_norm_hand_written_gradient_matches_autodiff(shape):
    x = jnp.asarray(tokens(shape)) * 3.0 + 1.0
    scale = jnp.asarray(tokens(shape[-1:], seed=1)) + 1.5
    bias = jnp.asarray(tokens(shape[-1:], seed=2))
    weight = jnp.asarray(tokens(shape, seed=3))

    def loss(fn):  # relu makes the cotangent uneven across elements
        return lambda *a: jnp.sum(jax.nn.relu(fn(*a)) * weight)

    y, mean, var = ops.batch_norm_train(x, scale, bias, 1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_autodiff_batch_norm(x, scale, bias)), rtol=1e-5, atol=1e-5)
    axes = tuple(range(1, x.ndim - 1))
    np.testing.assert_allclose(np.asarray(mean), np.asarray(x).mean(axis=axes, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), np.asarray(x).var(axis=axes, keepdims=True), rtol=1e-5)
    got = jax.grad(loss(lambda *a: ops.batch_norm_train(*a, 1e-5)[0]), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(_autodiff_batch_norm), argnums=(0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_batch_norm_statistics_carry_no_gradient_and_bfloat16_works():
    x = jnp.asarray(tokens((1, 4, 3, 3, 5)))
    scale, bias = jnp.ones(5), jnp.zeros(5)
    stats_grad = jax.grad(lambda x: jnp.sum(ops.batch_norm_train(x, scale, bias, 1e-5)[2]))(x)
    assert not np.any(np.asarray(stats_grad))

    weight = jnp.asarray(tokens(x.shape, seed=3))
    low = x.astype(jnp.bfloat16)
    y, _, _ = ops.batch_norm_train(low, scale, bias, 1e-5)
    assert y.dtype == jnp.bfloat16
    for out_dtype in (jnp.float32, jnp.dtype("float32"), "float32"):
        assert ops.batch_norm_train(low, scale, bias, 1e-5, out_dtype)[0].dtype == jnp.float32
    got = jax.grad(lambda x: jnp.sum(ops.batch_norm_train(x, scale, bias, 1e-5)[0].astype(jnp.float32) * weight))(low)
    want = jax.grad(lambda x: jnp.sum(_autodiff_batch_norm(x, scale, bias) * weight))(low.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    scale_of_grad = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0, atol=0.02 * scale_of_grad)


def test_batch_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[G, N, ..., C\]"):
        ops.batch_norm_train(jnp.ones((4, 5)), jnp.ones(5), jnp.zeros(5), 1e-5)
    with pytest.raises(ValueError, match="scale, bias"):
        ops.batch_norm_train(jnp.ones((1, 4, 5)), jnp.ones(4), jnp.zeros(5), 1e-5)


def test_materialize_is_the_identity_in_value_and_gradient():
    x = jnp.asarray(tokens((2, 3, 4, 5))).at[0, 0, 1, 2].set(-0.0)
    weight = jnp.asarray(tokens(x.shape, seed=1))
    for value in (x, x.astype(jnp.bfloat16)):
        got = jax.jit(ops.materialize)(value)
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(value, np.float32))
    assert np.signbit(np.asarray(jax.jit(ops.materialize)(x))[0, 0, 1, 2])  # -0.0 stays -0.0
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ops.materialize(jnp.sin(x)) * weight)))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jnp.cos(x) * weight), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax.vmap(ops.materialize)(x)), np.asarray(x))
    # A non-finite first element takes the other branch: the same values (zeros may lose their sign).
    bad = x.at[0, 0, 0, 0].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(jax.jit(ops.materialize)(bad)), np.asarray(bad))
    assert ops.materialize(jnp.zeros((0, 3))).shape == (0, 3)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="materialize is a barrier on the CPU only")
def test_materialize_survives_compilation_as_a_fusion_barrier():
    # If a future XLA simplified the conditional away, the barrier (and its speed-up) would vanish
    # silently: the compiled program must still hold it, in the forward and in the backward.
    x = jnp.ones((4, 8, 8, 3))
    forward = jax.jit(lambda x: jnp.sum(ops.materialize(x * 2.0 + 1.0) ** 2)).lower(x).compile().as_text()
    assert forward.count("conditional(") == 1
    backward = jax.jit(jax.grad(lambda x: jnp.sum(ops.materialize(x * 2.0 + 1.0) ** 2))).lower(x).compile()
    assert backward.as_text().count("conditional(") == 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="materialize is a barrier on the CPU only")
def test_batch_norm_train_stores_its_input_and_its_input_gradient():
    # The barrier at the batch-norm input is what keeps XLA from recomputing a depthwise conv's
    # output inside its kernel-gradient reduction (see `ops.materialize`).
    x, scale, bias = jnp.ones((1, 2, 4, 4, 3)), jnp.ones(3), jnp.zeros(3)
    loss = lambda x: jnp.sum(ops.batch_norm_train(x * 2.0, scale, bias, 1e-5)[0] ** 2)
    assert jax.jit(jax.grad(loss)).lower(x).compile().as_text().count("conditional(") == 2


def test_depthwise_conv_rejects_wrong_kernel():
    with pytest.raises(ValueError, match=r"\[3, 3, 1, C\]"):
        ops.depthwise_conv3x3(jnp.ones((1, 4, 4, 5)), jnp.ones((3, 3, 5, 5)), jnp.ones(5))


def _numpy_conv3x3_stride2(x, kernel, bias):
    """PyTorch's Conv2d(3, stride 2, padding 1) as loops over taps, in float64: the reference."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    batch, height, width, _ = x.shape
    out_h, out_w = (height + 1) // 2, (width + 1) // 2
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((batch, out_h, out_w, kernel.shape[-1])) + np.asarray(bias, np.float64)
    for i in range(3):
        for j in range(3):
            taps = padded[:, i : i + 2 * out_h : 2, j : j + 2 * out_w : 2, :]
            out += taps @ kernel[i, j]
    return out


@pytest.mark.parametrize("height, width", [(9, 6), (8, 8), (1, 2)])
def test_strided_conv_matches_pytorch_padding_with_gradients(height, width):
    x = jnp.asarray(tokens((2, height, width, 4)))
    kernel = jnp.asarray(tokens((3, 3, 4, 5), seed=1))
    bias = jnp.asarray(tokens((5,), seed=2))
    weight = jnp.asarray(tokens((2, (height + 1) // 2, (width + 1) // 2, 5), seed=3))
    want = _numpy_conv3x3_stride2(x, kernel, bias)

    def xla_conv(x, kernel, bias):  # XLA's convolution, differentiated by JAX's own rules
        return jax.lax.conv_general_dilated(
            x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision="highest") + bias

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * weight), argnums=(0, 1, 2))(x, kernel, bias)

    with jax.default_matmul_precision("highest"):
        # Inference runs XLA's convolution, differentiation the im2col form: both are checked.
        primal = ops.conv3x3_stride2(x, kernel, bias)
        differentiated, _ = jax.vjp(ops.conv3x3_stride2, x, kernel, bias)
        for got in (primal, differentiated):
            assert got.shape == weight.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        for new, old in zip(grads(ops.conv3x3_stride2), grads(xla_conv)):
            np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-5, atol=1e-5)


def test_strided_conv_gradient_under_vmap_and_in_bfloat16():
    x = jnp.asarray(tokens((3, 2, 8, 6, 4)))
    kernel = jnp.asarray(tokens((3, 3, 4, 5), seed=1))
    bias = jnp.asarray(tokens((5,), seed=2))

    def loss(x, kernel, bias):
        return jnp.sum(jnp.sin(ops.conv3x3_stride2(x, kernel, bias).astype(jnp.float32)))

    batched = jax.vmap(jax.grad(loss), in_axes=(0, None, None))(x, kernel, bias)
    one_by_one = jnp.stack([jax.grad(loss)(x[i], kernel, bias) for i in range(3)])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(one_by_one), rtol=1e-5, atol=1e-6)

    # bfloat16: a linear loss, so the gradients' error is the products' rounding alone.
    weight = jnp.asarray(tokens((2, 4, 3, 5), seed=3))

    def linear(x, kernel, bias):
        return jnp.sum(ops.conv3x3_stride2(x, kernel, bias).astype(jnp.float32) * weight)

    low = [x[0].astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), bias.astype(jnp.bfloat16)]
    got = jax.grad(linear, argnums=(0, 1, 2))(*low)
    want = jax.grad(linear, argnums=(0, 1, 2))(*[a.astype(jnp.float32) for a in low])
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), rtol=0, atol=0.02 * scale)


def test_strided_conv_input_gradient_pads_no_holes():
    # Autodiff's transpose of the nine strided slices scatters through pads with holes (interior
    # padding); inside the train step XLA:CPU writes those as nine full-size copies (see
    # `ops._stride2_input_gradient`). The hand-written gradient gathers by parity: its pads only
    # add an edge.
    x, kernel, bias = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5)), jnp.ones(5)
    text = jax.jit(jax.grad(lambda x: jnp.sum(ops.conv3x3_stride2(x, kernel, bias)))).lower(x).as_text()
    interiors = re.findall(r"stablehlo\.pad .*interior = \[([0-9, ]+)\]", text)
    assert interiors, "no pad left: the test no longer looks at the right thing"
    assert all(set(i.replace(" ", "").split(",")) == {"0"} for i in interiors), interiors


def test_strided_conv_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"kernel \[3, 3, C, F\]"):
        ops.conv3x3_stride2(jnp.ones((1, 4, 4, 5)), jnp.ones((3, 3, 4, 6)), jnp.ones(6))
    with pytest.raises(ValueError, match="bias"):
        ops.conv3x3_stride2(jnp.ones((1, 4, 4, 5)), jnp.ones((3, 3, 5, 6)), jnp.ones(5))


def test_gelu_is_the_exact_erf_form_with_its_gradient():
    x = jnp.linspace(-8.0, 8.0, 2001)
    want = 0.5 * np.asarray(x, np.float64) * (1 + np.vectorize(math.erf)(np.asarray(x, np.float64) / math.sqrt(2)))
    # In float32, 1 + erf(x / sqrt 2) loses its digits to cancellation for x < -4 (measured error
    # up to 6.5e-7 absolute, where the true value is under 1e-6): PyTorch's CPU kernel uses this
    # same formula and rounds the same way.
    np.testing.assert_allclose(np.asarray(ops.gelu(x)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ops.gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(ops.gelu))(x)),
                               np.asarray(jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)),
                               rtol=1e-5, atol=1e-6)
    assert ops.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_gelu_gradient_recomputes_erf_rather_than_storing_it():
    # In a train step the GELU's output feeds the next layer's kernel gradient, so its forward
    # is kept. Differentiated automatically, XLA computes erf once and stores it for the backward
    # (one erf in the program); the hand-written gradient computes it again from x (two).
    def loss(weights, x, gelu):
        return jnp.sum(gelu(x @ weights[0]) @ weights[1])

    weights, x = (jnp.ones((8, 32)), jnp.ones((32, 8))), jnp.ones((4, 8))
    for gelu, erfs in ((ops.gelu, 2), (ops._gelu_value, 1)):
        step = jax.jit(jax.grad(loss), static_argnums=2).lower(weights, x, gelu).compile()
        assert step.as_text().count(" erf(") == erfs, gelu
    second = jax.vmap(jax.grad(jax.grad(ops.gelu)))(jnp.linspace(-5.0, 5.0, 11))
    want = jax.vmap(jax.grad(jax.grad(lambda v: jax.nn.gelu(v, approximate=False))))(jnp.linspace(-5.0, 5.0, 11))
    np.testing.assert_allclose(np.asarray(second), np.asarray(want), rtol=1e-5, atol=1e-7)
    assert jax.grad(ops.gelu)(jnp.bfloat16(1.0)).dtype == jnp.bfloat16


def test_drop_path_is_identity_when_deterministic():
    x = jnp.asarray(tokens((8, 4, 4, 3)))
    np.testing.assert_array_equal(ops.drop_path(x, 0.5, jax.random.key(0), deterministic=True), x)
    np.testing.assert_array_equal(ops.drop_path(x, 0.0, None, deterministic=False), x)


def test_drop_path_keeps_the_expectation_and_drops_whole_samples():
    rate = 0.3
    x = jnp.ones((20000, 2, 2, 3))
    y = np.asarray(ops.drop_path(x, rate, jax.random.key(0), deterministic=False))
    per_sample = y.reshape(20000, -1)
    # Whole samples are dropped or kept, kept ones scaled by 1 / (1 - rate).
    kept_value = 1 / (1 - rate)
    assert np.all(np.isclose(per_sample, 0.0) | np.isclose(per_sample, kept_value, rtol=1e-6))
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    dropped = np.mean(per_sample[:, 0] == 0)
    assert abs(dropped - rate) < 0.015  # binomial std ~0.0032
    assert abs(y.mean() - 1.0) < 0.02


def test_drop_path_needs_rng_and_valid_rate():
    with pytest.raises(ValueError, match="rng"):
        ops.drop_path(jnp.ones((2, 3)), 0.1, None, deterministic=False)
    with pytest.raises(ValueError, match="rate"):
        ops.drop_path(jnp.ones((2, 3)), 1.0, jax.random.key(0), deterministic=False)


# ---------------------------------------------------------------------------------------------
# The two implementations: the same function, value and gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["depthwise_conv3x3", "conv3x3_stride2", "gelu", "batch_norm_train"])
def test_xla_and_cpu_implementations_agree_in_value_and_gradient(op):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, 9, 7, 6).astype(np.float32))
    args = {
        "depthwise_conv3x3": (rs.randn(3, 3, 1, 6), rs.randn(6)),
        "conv3x3_stride2": (rs.randn(3, 3, 6, 4), rs.randn(4)),
        "gelu": (),
        "batch_norm_train": (rs.randn(6), rs.randn(6)),
    }[op]
    args = tuple(jnp.asarray(a, jnp.float32) for a in args)

    def f(impl, x, *args):  # (output, statistics)
        if op == "batch_norm_train":
            y, mean, var = ops.batch_norm_train(x[None], *args, 1e-5, impl=impl)
            return y[0], (mean, var)
        return getattr(ops, op)(x, *args, impl=impl), ()

    def run(impl):
        # The gradient of sum(y * cos(y)) with the cotangent cos(y) fixed: every output weighted differently.
        loss = lambda *a: jnp.sum(f(impl, *a)[0] * jax.lax.stop_gradient(jnp.cos(f(impl, *a)[0])))
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(1 + len(args)))))(x, *args)
        return jax.jit(functools.partial(f, impl))(x, *args), grads

    (cpu, cpu_stats), cpu_grads = run("cpu")
    (xla, xla_stats), xla_grads = run("xla")
    np.testing.assert_allclose(xla, cpu, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(xla_stats), jax.tree.leaves(cpu_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(xla_grads, cpu_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.gelu(jnp.ones(3), impl="tpu")
