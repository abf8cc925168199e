"""Pure functional ops: normalisation, the four attention mechanisms, convolutions, GELU, drop path.

Everything here is a plain jnp function of arrays: no module state, safe under `jax.jit`,
`jax.grad` and `jax.vmap`. The Flax modules in `layers.py` hold the parameters and call these.

Implementations: the convolutions, GELU and batch norm take `impl`. "cpu" is the form tuned on
XLA:CPU (shifted slices, im2col, hand-written gradients, a fusion barrier); "xla" is XLA's own
operations (grouped and strided convolutions, `jax.nn.gelu`, autodiff), the form other compilers
and exporters (ONNX, LiteRT) know. Both compute the same function (tests/test_ops.py). Models take
"auto" too, resolved once by `resolve_impl` from the devices the model will run on.

Attention functions share one calling convention, `fn(params, x, ...) -> y` with tokens
`x` of shape [B, N, D], so that `experiments/` can time them side by side. `params` is a nested
dict of arrays laid out like Flax `nn.Dense` parameters ({"kernel": [in, out], "bias": [out]});
each mechanism has an `init_*_params(key, dim)` that builds one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp

Params = Mapping[str, object]

IMPLEMENTATIONS = ("cpu", "xla")
AUTO = "auto"


def resolve_impl(impl: str, devices=None) -> str:
    """"cpu" or "xla" for `impl`: itself, or for "auto" "cpu" when every one of `devices` is a CPU
    (default: JAX's default devices) and "xla" otherwise. The trainer passes its mesh's devices,
    so an ahead-of-time compile for a TPU from a CPU host gets the TPU's choice."""
    if impl != AUTO:
        return check_impl(impl)
    devices = jax.devices() if devices is None else list(devices)
    return "cpu" if all(d.platform == "cpu" for d in devices) else "xla"


def check_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return impl


# PyTorch's F.normalize default: the norm is clamped from below, eps outside the square root.
L2_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Normalisation and small building blocks
# ----------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = L2_EPS) -> jax.Array:
    """`x / max(||x||_2, eps)` along `axis`, as PyTorch's `F.normalize`, with a finite gradient at 0.

    The naive form differentiates sqrt at 0 and gives NaN. Clamping the *squared* norm at eps**2
    before the square root is the same function (sqrt is monotonic) with a finite derivative.
    Multiplying by its reciprocal square root rather than dividing keeps a division out of
    exported graphs: TFLite's int8 division stops the interpreter when a divisor rounds to zero.
    """
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, jnp.asarray(eps, x.dtype) ** 2))


def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype=None, impl: str = "cpu"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalisation of `x` [G, N, ..., C] with its own statistics, per group and channel.

    Statistics are over every axis but the first (ghost-batch groups; 1 for plain batch norm) and
    the last (channels), in float32, two-pass: mean, then the biased variance of x - mean. Returns
    (y in `dtype`, default x's; mean; var), the statistics shaped [G, 1, ..., 1, C] for the running
    averages; they carry no gradient. The gradient is written by hand (`jax.custom_vjp`): the two sums it
    needs (of dy and of dy * x_hat) and the input gradient take two passes over the activations,
    where autodiff of the forward takes five or more; 1.8-2.4x faster on XLA:CPU. Reverse mode
    only. impl="xla": the same forward, differentiated by autodiff, no fusion barrier.
    """
    if x.ndim < 3 or scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(
            f"batch_norm_train expects x [G, N, ..., C] and scale, bias [C]; got {x.shape}, "
            f"{scale.shape} and {bias.shape}"
        )
    out_dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if check_impl(impl) == "xla":
        (y, mean, var), _ = _batch_norm_forward(x, scale, bias, epsilon, out_dtype)
        return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    # x is read by both statistics, the output and the backward; computed once, not per reader
    # (see `materialize`), and likewise its gradient.
    y, mean, var = _batch_norm_train(materialize(x), scale, bias, epsilon, out_dtype)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def materialize(x: jax.Array) -> jax.Array:
    """`x` unchanged, but computed once and stored, in both directions: a fusion barrier for XLA.

    Why: XLA fuses a cheap elementwise producer into each of its consumers rather than storing its
    result. For batch norm after the depthwise conv, that puts the conv's nine-tap forward and the
    batch norm's input gradient inside the conv's kernel-gradient reduction (recomputed per tap,
    by its timing): the 21 such reductions take 172-190 ms of the SwiftFormer-S train step on
    XLA:CPU without this barrier and 93 ms with it, and the step is 3-12% faster.
    `lax.optimization_barrier` would say this, but XLA:CPU removes it before fusion; XLA does
    not fuse across a conditional on a runtime predicate. Its transpose is again a conditional, so
    the gradient of `x` is stored too. The predicate (`x`'s first element is finite) only picks
    between two exact copies: the other branch adds zero, which XLA cannot fold away (it would turn
    -0.0 into +0.0, the only difference, and only when that first element is inf or NaN). Under
    `vmap` the conditional becomes a select: the same values, without the barrier.

    Part of the "cpu" implementation only (never decided at trace time from the default backend,
    which is the CPU while compiling for a TPU ahead of time): on GPUs and TPUs a conditional
    copies its predicate to the host and waits for it. Empty arrays pass through as they are.
    """
    if x.size == 0:
        return x
    finite = jnp.isfinite(x.reshape(-1)[0])
    return jax.lax.cond(finite, lambda v: v, lambda v: v + jnp.zeros((), v.dtype), x)


def _normalised_axes(x: jax.Array) -> tuple[tuple[int, ...], int]:
    axes = tuple(range(1, x.ndim - 1))
    count = 1
    for axis in axes:
        count *= x.shape[axis]
    return axes, count


def _batch_norm_forward(x, scale, bias, epsilon, dtype):
    axes, count = _normalised_axes(x)
    x32 = x.astype(jnp.float32)
    mean = jnp.sum(x32, axis=axes, keepdims=True) / count
    var = jnp.sum(jnp.square(x32 - mean), axis=axes, keepdims=True) / count
    inv = jax.lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * (inv * scale) + bias).astype(dtype)
    return (y, mean, var), (x, mean, inv, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, dtype):
    return _batch_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, dtype):
    return _batch_norm_forward(x, scale, bias, epsilon, dtype)


def _batch_norm_train_bwd(epsilon, dtype, residuals, cotangents):
    # The statistics' cotangents are zero: batch_norm_train stops their gradient.
    del epsilon, dtype
    x, mean, inv, scale = residuals
    axes, count = _normalised_axes(x)
    dy = cotangents[0].astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean) * inv
    sum_dy = jnp.sum(dy, axis=axes, keepdims=True)
    sum_dy_x_hat = jnp.sum(dy * x_hat, axis=axes, keepdims=True)
    grad_x = (scale * inv / count) * (count * dy - sum_dy - x_hat * sum_dy_x_hat)
    channels = x.shape[-1]
    grad_scale = jnp.sum(sum_dy_x_hat.reshape(-1, channels), axis=0)
    grad_bias = jnp.sum(sum_dy.reshape(-1, channels), axis=0)
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def dense(params: Params, x: jax.Array) -> jax.Array:
    """`x @ kernel + bias` over the last axis (a Linear layer, or a 1x1 conv on NHWC maps)."""
    return matmul_last_axis(x, params["kernel"]) + params["bias"]


def matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` for x [..., C_in] and kernel [C_in, C_out], as one 2-D matmul over all leading axes.

    The same function as `jnp.matmul(x, kernel)`. Why 2-D: for a 4-D x, XLA:CPU computes the
    kernel's gradient (contracting B, H, W) from a transposed, channel-major copy of the cotangent,
    written by a strided loop (about 15% of the SwiftFormer-S train step's thread time); with x
    flattened to [B*H*W, C_in] (a free reshape) the gradient is a plain matmul on row-major data.
    """
    flat = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel)
    return flat.reshape(x.shape[:-1] + kernel.shape[-1:])


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "cpu") -> jax.Array:
    """3x3 depthwise convolution, stride 1, padding 1, on NHWC `x`.

    `kernel` is [3, 3, 1, C] (the HWIO layout `lax.conv_general_dilated` takes with
    `feature_group_count=C`), `bias` is [C]. Written as a sum of nine shifted, per-channel scaled
    slices: the same result as the grouped convolution, and on XLA:CPU more than ten times faster
    in both directions.

    The gradient is written by hand (`jax.custom_vjp`): differentiated automatically, the nine
    shifted slices of x are kept for the kernel's gradient as nine full-size copies, the largest
    memory traffic of the SwiftFormer-S train step; here only x is kept and the backward reads
    shifted views of it. Reverse mode and vmap work; forward-mode (`jax.jvp`) does not pass
    through a custom VJP. impl="xla": the grouped convolution itself.
    """
    if x.ndim != 4 or kernel.shape != (3, 3, 1, x.shape[-1]):
        raise ValueError(
            f"depthwise_conv3x3 expects x [B, H, W, C] and kernel [3, 3, 1, C]; got {x.shape} "
            f"and {kernel.shape}"
        )
    if check_impl(impl) == "xla":
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), feature_group_count=x.shape[-1],
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(x.dtype)
    return _depthwise_conv3x3(x, kernel, bias)


def _nine_shifts(x: jax.Array) -> list[jax.Array]:
    """pad(x, 1)[:, i:i+H, j:j+W] for (i, j) in row-major order over 3 x 3: the conv's input taps."""
    height, width = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i : i + height, j : j + width, :] for i in range(3) for j in range(3)]


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """sum_ij pad(x, 1)[:, i:i+H, j:j+W] * kernel[i, j, 0]: the nine-slice correlation."""
    taps = kernel.reshape(9, -1)
    shifts = _nine_shifts(x)
    out = shifts[0] * taps[0]
    for shifted, tap in zip(shifts[1:], taps[1:]):
        out = out + shifted * tap
    return out


@jax.custom_vjp
def _depthwise_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return _shifted_sum(x, kernel) + bias.astype(x.dtype)


def _depthwise_conv3x3_fwd(x, kernel, bias):
    return _depthwise_conv3x3(x, kernel, bias), (x, kernel, bias)


def _depthwise_conv3x3_bwd(residuals, grad):
    x, kernel, bias = residuals
    # The transpose of a correlation is the correlation with the kernel flipped in both axes.
    grad_x = _shifted_sum(grad, kernel[::-1, ::-1])
    # Kernel gradient: tap (i, j) is sum_{b,h,w} pad(x)[b, h+i, w+j] * grad[b, h, w] per channel.
    # The nine products go into one variadic reduction over W, so XLA fuses the shifted reads and
    # the multiplies into a single pass over x and grad (nine separate sums wrote nine full-size
    # products first: 8x slower); the small [B, H, C] partial sums are then added up.
    grad32 = grad.astype(jnp.float32)
    products = tuple(shifted * grad32 for shifted in _nine_shifts(x.astype(jnp.float32)))
    zeros = (jnp.zeros((), jnp.float32),) * len(products)
    row_sums = jax.lax.reduce(products, zeros, _add_tuples, (2,))  # nine [B, H, C]
    taps = [jnp.sum(rows, axis=(0, 1)) for rows in row_sums]
    grad_kernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    grad_bias = jnp.sum(grad, axis=(0, 1, 2), dtype=jnp.float32).astype(bias.dtype)
    return grad_x, grad_kernel, grad_bias


def _add_tuples(a: tuple, b: tuple) -> tuple:
    return tuple(u + v for u, v in zip(a, b))


_depthwise_conv3x3.defvjp(_depthwise_conv3x3_fwd, _depthwise_conv3x3_bwd)


def conv3x3_stride2(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "cpu") -> jax.Array:
    """PyTorch's Conv2d(kernel 3, stride 2, padding 1) on NHWC `x`.

    `kernel` is HWIO [3, 3, C_in, C_out] (nn.Conv's layout), `bias` is [C_out]. Two forms of the
    same function, chosen by `jax.custom_vjp`: evaluated plainly (inference) it is XLA's
    convolution, 1.3-3x faster on XLA:CPU than im2col, which writes the nine-tap patches first;
    under differentiation the forward is im2col (nine strided slices concatenated on channels, one
    matmul with the kernel flattened to [9 C_in, C_out]), because XLA:CPU's strided-convolution
    gradients are slow: its input gradient (an lhs-dilated convolution) takes several times its
    forward and its kernel gradient transposes both operands; in the SwiftFormer stem, forward +
    backward is about 15% slower with them than with im2col. The kernel gradient is im2col's
    (patches^T @ cotangent); the input gradient is gathered by output parity
    (`_stride2_input_gradient`). Reverse mode only. impl="xla": XLA's convolution in both directions.
    """
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]) or bias.shape != kernel.shape[3:]:
        raise ValueError(
            f"conv3x3_stride2 expects x [B, H, W, C], kernel [3, 3, C, F] and bias [F]; got "
            f"{x.shape}, {kernel.shape} and {bias.shape}"
        )
    if check_impl(impl) == "xla":
        return _xla_conv3x3_stride2(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
    return _conv3x3_stride2(x, kernel.astype(x.dtype), bias.astype(x.dtype), x.shape[1], x.shape[2])


def _xla_conv3x3_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _stride2_patches(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H_out, W_out, 9 C]: the nine taps (row-major, tap (i, j) at channels
    (3 i + j) C ...) of each output pixel of the stride-2, padding-1 window."""
    out_h, out_w = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate(
        [padded[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2, :] for i in range(3) for j in range(3)],
        axis=-1,
    )


def _stride2_input_gradient(grad_patches: jax.Array, height: int, width: int) -> jax.Array:
    """The transpose of `_stride2_patches`: x's gradient [B, height, width, C] from the patches'.

    Input row 2m is read by tap row 1 of output row m; row 2m + 1 by tap row 2 of output row m and
    tap row 0 of output row m + 1 (columns alike). So each of the four parities of (row, column)
    sums one, two or four taps, and the four are interleaved. Autodiff's transpose of the nine
    slices is the same sum, but inside the train step XLA:CPU writes it as nine zero-padded
    full-size copies summed afterwards: about 12% of the SwiftFormer-S train step's memory
    traffic.
    """
    batch, out_h, out_w, nine_c = grad_patches.shape
    channels = nine_c // 9

    def tap(i, j, dm, dn):  # tap (i, j)'s gradient at output (m + dm, n + dn); zero past the edge
        t = 3 * i + j
        piece = grad_patches[:, dm:, dn:, t * channels : (t + 1) * channels]
        return jnp.pad(piece, ((0, 0), (0, dm), (0, dn), (0, 0)))

    even_even = tap(1, 1, 0, 0)
    even_odd = tap(1, 2, 0, 0) + tap(1, 0, 0, 1)
    odd_even = tap(2, 1, 0, 0) + tap(0, 1, 1, 0)
    odd_odd = tap(2, 2, 0, 0) + tap(2, 0, 0, 1) + tap(0, 2, 1, 0) + tap(0, 0, 1, 1)
    even_rows = jnp.stack([even_even, even_odd], axis=3)  # [B, H_out, W_out, column parity, C]
    odd_rows = jnp.stack([odd_even, odd_odd], axis=3)
    full = jnp.stack([even_rows, odd_rows], axis=2).reshape(batch, 2 * out_h, 2 * out_w, channels)
    return full[:, :height, :width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv3x3_stride2(x: jax.Array, kernel: jax.Array, bias: jax.Array, height: int, width: int) -> jax.Array:
    return _xla_conv3x3_stride2(x, kernel) + bias


def _conv3x3_stride2_fwd(x, kernel, bias, height, width):
    # Under differentiation the im2col form runs instead: its patches serve the kernel gradient.
    patches = _stride2_patches(x)
    out, kernel_vjp = jax.vjp(lambda k: matmul_last_axis(patches, _flat_kernel(k)), kernel)
    return out + bias, (kernel_vjp, kernel)


def _flat_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO [3, 3, C, F] -> [9 C, F], rows in `_stride2_patches`' channel order."""
    return kernel.reshape(-1, kernel.shape[-1])


def _conv3x3_stride2_bwd(height, width, residuals, grad):
    kernel_vjp, kernel = residuals
    (grad_kernel,) = kernel_vjp(grad)
    grad_x = _stride2_input_gradient(matmul_last_axis(grad, _flat_kernel(kernel).T), height, width)
    grad_bias = jnp.sum(grad, axis=(0, 1, 2), dtype=jnp.float32).astype(grad.dtype)
    return grad_x, grad_kernel, grad_bias


_conv3x3_stride2.defvjp(_conv3x3_stride2_fwd, _conv3x3_stride2_bwd)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def gelu(x: jax.Array, impl: str = "cpu") -> jax.Array:
    """Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`: PyTorch's nn.GELU() formula.

    Equal to `jax.nn.gelu(x, approximate=False)` up to rounding (that one is written with erfc,
    whose select-chain polynomials make it 2-3x slower on XLA:CPU).

    The gradient is written by hand (`jax.custom_vjp`) so that training keeps only `x`: the
    backward recomputes erf from it. Differentiated automatically, XLA shares the one erf
    between the two directions and stores it, an extra tensor of the MLP's hidden width (4x the
    block's) written once and read back twice: 2.1 GB of the S train step's 24 GB of memory
    traffic and 525 of its 3135 MB of XLA temp memory. The step takes the same time either way;
    the gain is memory. Forward-mode differentiation (`jax.jvp`) does not pass through a custom
    VJP. impl="xla": `jax.nn.gelu(x, approximate=False)`, differentiated by autodiff (inside
    `litert_gelu_form()`, the tanh form instead).
    """
    if check_impl(impl) == "xla":
        return jax.nn.gelu(x, approximate=_LITERT_GELU_FORM.get())
    return _gelu(x)


_LITERT_GELU_FORM = contextvars.ContextVar("litert_gelu_form", default=False)


@contextlib.contextmanager
def litert_gelu_form() -> Iterator[None]:
    """While active, "xla" GELU is traced in its tanh form, for the LiteRT exporter only.

    TFLite's converter cannot lower StableHLO's erf (it arrives as a composite its StableHLO
    version does not know; `jax.nn.gelu`'s erfc becomes a 30-op polynomial with selects that
    XNNPACK does not take), but it fuses the tanh form into its GELU builtin. `export.py` then
    clears that op's `approximate` option, so the runtime computes the exact GELU again, and checks
    the file against JAX's exact network.
    """
    token = _LITERT_GELU_FORM.set(True)
    try:
        yield
    finally:
        _LITERT_GELU_FORM.reset(token)


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    return _gelu_value(x)


def _gelu_value(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + _erf_of_scaled(x))


def _erf_of_scaled(x: jax.Array) -> jax.Array:
    """erf(x / sqrt 2): the normal CDF is (1 + this) / 2."""
    return jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype))


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _gelu_value(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # The barrier keeps XLA from merging this erf with the forward's (common subexpressions),
    # which would store it again.
    x = jax.lax.optimization_barrier(x)
    cdf = 0.5 * (1.0 + _erf_of_scaled(x))
    pdf = jnp.asarray(_INV_SQRT_2PI, x.dtype) * jnp.exp(-0.5 * x * x)
    return (g * (cdf + x * pdf),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None, deterministic: bool) -> jax.Array:
    """Stochastic depth: zero whole samples of a residual branch with probability `rate`.

    Kept samples are scaled by 1 / (1 - rate) so the expectation is unchanged. The identity when
    `deterministic` or `rate == 0`.
    """
    if deterministic or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path rate must be in [0, 1), got {rate}")
    if rng is None:
        raise ValueError("drop_path needs an rng when not deterministic and rate > 0")
    keep = 1.0 - rate
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rng, keep, mask_shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------------------------
# Efficient additive attention (SwiftFormer)
# ----------------------------------------------------------------------------------------------

ATTENTION_VERSIONS = (1, 2)


def additive_token_weights(query: jax.Array, w_g: jax.Array, version: int) -> jax.Array:
    """The per-token weights [B, N, 1] that pool normalised queries into the global query.

    Version 2 (official code since 2023-07-26, timm): scores `q @ w_g * D**-0.5`, L2-normalised
    over the tokens. Version 1 (first release, Hugging Face): a softmax over the trailing axis of
    size 1, so every weight is exactly 1 and `w_g` receives no gradient. Kept as written there so
    version-1 checkpoints compute their original function.
    """
    if version not in ATTENTION_VERSIONS:
        raise ValueError(f"attention version must be one of {ATTENTION_VERSIONS}, got {version!r}")
    scores = jnp.matmul(query, w_g) * (query.shape[-1] ** -0.5)  # [B, N, 1]
    if version == 1:
        return jax.nn.softmax(scores, axis=-1)
    return l2_normalize(scores, axis=1)


def efficient_additive_attention(params: Params, x: jax.Array, *, version: int = 2) -> jax.Array:
    """SwiftFormer's efficient additive attention on tokens `x` [B, N, D] -> [B, N, D].

    q, k = l2norm(Linear(x)); a = token weights (see `additive_token_weights`);
    g = sum_n a_n q_n (one global query per image); out = final(Proj(g * k) + q).
    Cost and memory are linear in N: the only interaction between tokens is the pooled g.
    `params`: to_query, to_key, Proj, final (Dense layouts) and w_g [D, 1].
    """
    _check_tokens(x)
    query = l2_normalize(dense(params["to_query"], x), axis=-1)
    key = l2_normalize(dense(params["to_key"], x), axis=-1)
    weights = additive_token_weights(query, params["w_g"], version)
    # sum_n a_n q_n as a batched [1, N] x [N, D] product: XLA:CPU runs it as a matmul, where the
    # equal jnp.sum(weights * query, axis=1) becomes a reduction 10x slower at 50k tokens.
    global_query = jnp.einsum("bnk,bnd->bkd", weights, query)  # [B, 1, D]
    # Proj(g * k) = k @ (g scaling the rows of Proj's kernel) + bias: the same function without
    # the [B, N, D] product g * k, so g's gradient is a matmul rather than a reduction over the
    # tokens, which XLA:CPU runs superlinearly in N.
    # (g as [B, D, 1] by a transpose, not an index: indexing is a gather, which LiteRT's
    # converter cannot take with a dynamic batch.)
    scaled_kernel = jnp.swapaxes(global_query, 1, 2) * params["Proj"]["kernel"]  # [B, D, D]
    out = jnp.einsum("bnd,bde->bne", key, scaled_kernel) + params["Proj"]["bias"] + query
    return dense(params["final"], out)


# ----------------------------------------------------------------------------------------------
# Baselines the paper compares with (Fig. 2 of arXiv 2303.15446)
# ----------------------------------------------------------------------------------------------


def softmax_self_attention(params: Params, x: jax.Array, *, num_heads: int = 1) -> jax.Array:
    """Multi-head softmax self-attention (ViT): softmax(q k^T / sqrt(d)) v. Quadratic in N.

    `params`: qkv (Dense D -> 3D) and proj (Dense D -> D).
    """
    _check_tokens(x)
    batch, tokens, dim = x.shape
    head_dim = _head_dim(dim, num_heads)
    qkv = dense(params["qkv"], x).reshape(batch, tokens, 3, num_heads, head_dim)
    q, k, v = (qkv[:, :, i] for i in range(3))  # [B, N, H, d]
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (head_dim**-0.5)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhnm,bmhd->bnhd", attn, v).reshape(batch, tokens, dim)
    return dense(params["proj"], out)


def transposed_attention(params: Params, x: jax.Array, *, num_heads: int = 1) -> jax.Array:
    """Transposed (channel) attention (XCiT / Restormer / EdgeNeXt): attention between channels.

    q and k are L2-normalised along the tokens; the [d, d] map softmax(q^T k * temperature) mixes
    channels, so cost is linear in N and quadratic in the channel width.
    `params`: qkv (Dense D -> 3D), proj (Dense D -> D), temperature [num_heads].
    """
    _check_tokens(x)
    batch, tokens, dim = x.shape
    head_dim = _head_dim(dim, num_heads)
    qkv = dense(params["qkv"], x).reshape(batch, tokens, 3, num_heads, head_dim)
    q, k, v = (qkv[:, :, i] for i in range(3))  # [B, N, H, d]
    q = l2_normalize(q, axis=1)
    k = l2_normalize(k, axis=1)
    logits = jnp.einsum("bnhc,bnhd->bhcd", q, k) * params["temperature"][None, :, None, None]
    attn = jax.nn.softmax(logits, axis=-1)  # [B, H, d, d]
    out = jnp.einsum("bhcd,bnhd->bnhc", attn, v).reshape(batch, tokens, dim)
    return dense(params["proj"], out)


def separable_attention(params: Params, x: jax.Array) -> jax.Array:
    """MobileViT-v2 separable self-attention: one context vector from softmax-weighted keys.

    scores = softmax_n(Linear_{D->1}(x)); context = sum_n scores_n k_n; out = proj(relu(v) * context).
    Linear in N. `params`: qkv (Dense D -> 1 + 2D) and proj (Dense D -> D).
    """
    _check_tokens(x)
    dim = x.shape[-1]
    qkv = dense(params["qkv"], x)
    scores, key, value = qkv[..., :1], qkv[..., 1 : 1 + dim], qkv[..., 1 + dim :]
    weights = jax.nn.softmax(scores, axis=1)  # over tokens
    context = jnp.einsum("bnk,bnd->bkd", weights, key)  # sum_n w_n k_n, as a matmul (see above)
    return dense(params["proj"], jax.nn.relu(value) * context)


# ----------------------------------------------------------------------------------------------
# Parameter builders (for benchmarks and tests; the Flax modules initialise their own)
# ----------------------------------------------------------------------------------------------


def init_dense_params(key: jax.Array, in_dim: int, out_dim: int, dtype=jnp.float32) -> dict:
    """Truncated-normal(0.02) kernel and zero bias, the official initialisation of Linear layers."""
    kernel = 0.02 * jax.random.truncated_normal(key, -100.0, 100.0, (in_dim, out_dim), dtype)
    return {"kernel": kernel, "bias": jnp.zeros((out_dim,), dtype)}


def init_efficient_additive_params(key: jax.Array, dim: int, dtype=jnp.float32) -> dict:
    keys = jax.random.split(key, 5)
    params = {
        name: init_dense_params(k, dim, dim, dtype)
        for name, k in zip(("to_query", "to_key", "Proj", "final"), keys[:4])
    }
    params["w_g"] = jax.random.normal(keys[4], (dim, 1), dtype)
    return params


def init_softmax_self_attention_params(key: jax.Array, dim: int, dtype=jnp.float32) -> dict:
    k1, k2 = jax.random.split(key)
    return {"qkv": init_dense_params(k1, dim, 3 * dim, dtype), "proj": init_dense_params(k2, dim, dim, dtype)}


def init_transposed_attention_params(
    key: jax.Array, dim: int, num_heads: int = 1, dtype=jnp.float32
) -> dict:
    params = init_softmax_self_attention_params(key, dim, dtype)
    params["temperature"] = jnp.ones((num_heads,), dtype)
    return params


def init_separable_attention_params(key: jax.Array, dim: int, dtype=jnp.float32) -> dict:
    k1, k2 = jax.random.split(key)
    return {"qkv": init_dense_params(k1, dim, 1 + 2 * dim, dtype), "proj": init_dense_params(k2, dim, dim, dtype)}


def _check_tokens(x: jax.Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"attention expects tokens of shape [B, N, D], got shape {x.shape}")


def _head_dim(dim: int, num_heads: int) -> int:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"width {dim} is not divisible into {num_heads} heads")
    return dim // num_heads
