"""Flax linen building blocks of SwiftFormer, named after the paper and the official PyTorch code.

Submodule and parameter names mirror the official PyTorch tree (`dwconv`, `pwconv1`, `attn.to_query`,
`linear.fc1`, `layer_scale_1`, ...), so weight conversion is a rename table plus transposes
(`layout.py`). Modules hold parameters; the math lives in `ops.py`.

Layouts: activations are NHWC. 3x3 convs keep HWIO kernels; 1x1 convs are `Dense` on the channel
axis (kernel [in, out], nn.Dense's parameters), which is the same function and a plain matmul for XLA.

Implementations: the modules with convolutions, GELU or batch norm take `impl` ("cpu" or "xla",
see `ops.py`), passed down from `SwiftFormer`; the parameters are the same for both.

Folded form (`folded=True`, inference only): the modules skip their batch norms and layer scales,
which `fold.fold_for_inference` has moved into the adjacent convolutions and linears; the
parameter tree is the same less those leaves.

Mixed precision: every module takes `dtype` (compute) and keeps float32 parameters; batch-norm
statistics are always computed and stored in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from swiftformer_jax import ops

Dtype = Any

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute value, i.e. +-100 standard deviations:
# in effect a plain normal. Flax's bounds are in units of the standard deviation.
TRUNC_NORMAL_002 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
PYTORCH_BN_EPS = 1e-5
PYTORCH_BN_MOMENTUM = 0.9  # Flax convention: new = m * old + (1 - m) * batch; PyTorch's 0.1.


class Dense(nn.Module):
    """A Linear layer or 1x1 conv on the last axis: nn.Dense's parameters, `ops.dense`'s matmul.

    Parameters `kernel` [in, features] (truncated normal 0.02) and `bias` (zeros): the names, shapes
    and initial values nn.Dense would have. Why not nn.Dense: it contracts a 4-D map's last axis
    directly, which makes XLA:CPU's kernel gradient go through a transposed copy;
    `ops.dense` flattens the leading axes first (see `ops.matmul_last_axis`).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", TRUNC_NORMAL_002, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        params = {"kernel": kernel.astype(self.dtype), "bias": bias.astype(self.dtype)}
        return ops.dense(params, x.astype(self.dtype))


def dense_layer(features: int, dtype: Dtype, name: str) -> Dense:
    return Dense(features, dtype, name=name)


class Conv3x3Stride2(nn.Module):
    """PyTorch's Conv2d(kernel 3, stride 2, padding 1): params like nn.Conv's, `ops.conv3x3_stride2`.

    Parameters `kernel` (HWIO [3, 3, C_in, features], truncated normal 0.02) and `bias` (zeros): the
    names, shapes and initial values nn.Conv would have, so checkpoints and `layout.py` see no change.
    """

    features: int
    dtype: Dtype = jnp.float32
    impl: str = "cpu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", TRUNC_NORMAL_002, (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return ops.conv3x3_stride2(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype),
                                   self.impl)


def batch_groups(batch: int, group_size: int | None) -> int:
    """Number of ghost-batch groups for a batch: 1 for whole-batch statistics.

    A batch no larger than the group is one group. Otherwise the batch must split into groups of
    exactly `group_size`, so the statistics never depend on how the batch happens to be cut.
    """
    if group_size is None or batch <= group_size:
        return 1
    if batch % group_size:
        raise ValueError(
            f"batch of {batch} images does not split into ghost batch-norm groups of {group_size}; "
            "use a batch that is a multiple of the group size (or set bn_group_size=None)"
        )
    return batch // group_size


class BatchNorm(nn.Module):
    """Batch normalisation over N, H, W with PyTorch's semantics, optionally over ghost groups.

    Train mode normalises with the biased variance of the batch (or of each group of `group_size`
    images: ghost batch norm, the statistics the official run had with 128 images per GPU).
    Running statistics follow PyTorch: `new = 0.9 * old + 0.1 * batch`, with the *unbiased* variance
    (n / (n - 1)) when `unbiased_running_var`, the PyTorch rule (Flax's own BatchNorm uses the biased
    one). With ghost groups the running statistics take the mean of the per-group statistics.
    Under `jax.jit` over a sharded batch the statistics are those of the global batch (or group):
    they never depend on the device count.
    """

    group_size: int | None = None
    momentum: float = PYTORCH_BN_MOMENTUM
    epsilon: float = PYTORCH_BN_EPS
    unbiased_running_var: bool = True
    dtype: Dtype = jnp.float32
    impl: str = "cpu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)

        if not train:
            inv = jax.lax.rsqrt(running_var.value + self.epsilon) * scale
            return ((x.astype(jnp.float32) - running_mean.value) * inv + bias).astype(self.dtype)

        groups = batch_groups(x.shape[0], self.group_size)
        grouped = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
        y, mean, var = ops.batch_norm_train(grouped, scale, bias, self.epsilon, self.dtype, self.impl)  # biased var
        y = y.reshape(x.shape)

        if not self.is_initializing():
            count = grouped.size // (groups * channels)
            batch_var = jnp.mean(var.reshape(groups, channels), axis=0)
            if self.unbiased_running_var:
                batch_var = batch_var * (count / max(count - 1, 1))
            batch_mean = jnp.mean(mean.reshape(groups, channels), axis=0)
            m = self.momentum
            running_mean.value = m * running_mean.value + (1.0 - m) * batch_mean
            running_var.value = m * running_var.value + (1.0 - m) * batch_var
        return y


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv (PyTorch `Conv2d(C, C, 3, padding=1, groups=C)`); kernel [3, 3, 1, C]."""

    dtype: Dtype = jnp.float32
    impl: str = "cpu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", TRUNC_NORMAL_002, (3, 3, 1, channels), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        return ops.depthwise_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype),
                                     self.impl)


def _layer_scale(module: nn.Module, name: str, y: jax.Array, init_value: float) -> jax.Array:
    """`y` times a per-channel learnable scale of `module` (PyTorch shape (C, 1, 1), stored here as
    (C,)); `y` itself when the module is `folded` (the scale is in the linear before it)."""
    if module.folded:
        return y
    scale = module.param(name, nn.initializers.constant(init_value), (y.shape[-1],), jnp.float32)
    return y * scale.astype(y.dtype)


def _batch_norm(module: nn.Module, name: str, x: jax.Array, train: bool) -> jax.Array:
    """`module`'s BatchNorm `name` on `x`; `x` itself when the module is `folded` (`fold.py` moved
    the normalisation into the adjacent linear op)."""
    if module.folded:
        return x
    return BatchNorm(module.bn_group_size, dtype=module.dtype, impl=module.impl, name=name)(x, train)


class Stem(nn.Module):
    """Two stride-2 3x3 convs with BN and ReLU: [B, H, W, 3] -> [B, H/4, W/4, width]."""

    width: int
    bn_group_size: int | None = None
    dtype: Dtype = jnp.float32
    impl: str = "cpu"
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv3x3Stride2(self.width // 2, self.dtype, self.impl, name="conv1")(x)
        x = nn.relu(_batch_norm(self, "norm1", x, train))
        x = Conv3x3Stride2(self.width, self.dtype, self.impl, name="conv2")(x)
        return nn.relu(_batch_norm(self, "norm2", x, train))


class Embedding(nn.Module):
    """Downsampling between stages: 3x3 stride-2 conv then BN."""

    width: int
    bn_group_size: int | None = None
    dtype: Dtype = jnp.float32
    impl: str = "cpu"
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv3x3Stride2(self.width, self.dtype, self.impl, name="proj")(x)
        return _batch_norm(self, "norm", x, train)


class ConvEncoder(nn.Module):
    """Inverted-residual conv block: dwconv3x3 -> BN -> 1x1 (C -> hidden) -> GELU -> 1x1 -> C.

    Output `x + drop_path(layer_scale * y)` with layer scale initialised to 1. The official network
    builds every ConvEncoder with drop path 0 (only SwiftFormerEncoders get the per-block rate);
    `SwiftFormer` does the same.
    """

    hidden_dim: int
    drop_path_rate: float = 0.0
    bn_group_size: int | None = None
    dtype: Dtype = jnp.float32
    impl: str = "cpu"
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        y = DepthwiseConv3x3(self.dtype, self.impl, name="dwconv")(x)
        y = _batch_norm(self, "norm", y, train)
        y = dense_layer(self.hidden_dim, self.dtype, "pwconv1")(y)
        y = ops.gelu(y, self.impl)  # PyTorch nn.GELU() is the exact, erf form
        y = dense_layer(channels, self.dtype, "pwconv2")(y)
        y = _layer_scale(self, "layer_scale", y, 1.0)
        rng = self.make_rng("drop_path") if train and self.drop_path_rate > 0 else None
        return x + ops.drop_path(y, self.drop_path_rate, rng, deterministic=not train)


class LocalRepresentation(ConvEncoder):
    """The SwiftFormerEncoder's first step: a ConvEncoder whose hidden width equals its width."""


class EfficientAdditiveAttention(nn.Module):
    """Holds the attention's parameters and calls `ops.efficient_additive_attention`.

    Parameters: to_query, to_key, Proj, final ({"kernel": [D, D], "bias": [D]}, truncated normal
    0.02 and zeros) and w_g [D, 1] ~ N(0, 1), as in the official code.
    """

    version: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        dim = tokens.shape[-1]
        params = {name: self.param(name, ops.init_dense_params, dim, dim)
                  for name in ("to_query", "to_key", "Proj", "final")}
        params["w_g"] = self.param("w_g", nn.initializers.normal(1.0), (dim, 1), jnp.float32)
        params = jax.tree.map(lambda p: p.astype(self.dtype), params)
        return ops.efficient_additive_attention(params, tokens.astype(self.dtype), version=self.version)


class Mlp(nn.Module):
    """BN -> 1x1 (C -> hidden) -> GELU -> dropout -> 1x1 (hidden -> C) -> dropout."""

    hidden_dim: int
    drop_rate: float = 0.0
    bn_group_size: int | None = None
    dtype: Dtype = jnp.float32
    impl: str = "cpu"
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        x = _batch_norm(self, "norm1", x, train)
        x = ops.gelu(dense_layer(self.hidden_dim, self.dtype, "fc1")(x), self.impl)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        x = dense_layer(channels, self.dtype, "fc2")(x)
        return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class SwiftFormerEncoder(nn.Module):
    """Local representation, then efficient additive attention and an MLP, each residual.

    x = LocalRepresentation(x); x += drop_path(ls1 * Attn(tokens(x))); x += drop_path(ls2 * Mlp(x)),
    with layer scales ls1, ls2 initialised to 1e-5.
    """

    mlp_ratio: int = 4
    attention_version: int = 2
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    layer_scale_init: float = 1e-5
    bn_group_size: int | None = None
    dtype: Dtype = jnp.float32
    impl: str = "cpu"
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        batch, height, width, channels = x.shape
        x = LocalRepresentation(
            channels, bn_group_size=self.bn_group_size, dtype=self.dtype, impl=self.impl,
            folded=self.folded, name="local_representation",
        )(x, train)

        attn = EfficientAdditiveAttention(self.attention_version, self.dtype, name="attn")
        y = attn(x.reshape(batch, height * width, channels)).reshape(x.shape)
        y = _layer_scale(self, "layer_scale_1", y, self.layer_scale_init)
        x = x + self._drop_path(y, train)

        y = Mlp(self.mlp_ratio * channels, self.drop_rate, self.bn_group_size, self.dtype, self.impl,
                self.folded, name="linear")(x, train)
        y = _layer_scale(self, "layer_scale_2", y, self.layer_scale_init)
        return x + self._drop_path(y, train)

    def _drop_path(self, y: jax.Array, train: bool) -> jax.Array:
        rng = self.make_rng("drop_path") if train and self.drop_path_rate > 0 else None
        return ops.drop_path(y, self.drop_path_rate, rng, deterministic=not train)


class Stage(nn.Module):
    """One stage (PyTorch `network.i`): ConvEncoders, then one SwiftFormerEncoder as its last block.

    `rates` are the per-block drop-path rates; as in the official Stage, ConvEncoders are built
    without drop path and only the SwiftFormerEncoder uses its rate.
    """

    depth: int
    rates: tuple[float, ...]
    mlp_ratio: int
    attention_version: int
    drop_rate: float
    layer_scale_init: float
    bn_group_size: int | None
    dtype: Dtype
    impl: str = "cpu"
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = x.shape[-1]
        for j in range(self.depth - 1):
            x = ConvEncoder(
                self.mlp_ratio * width, drop_path_rate=0.0, bn_group_size=self.bn_group_size,
                dtype=self.dtype, impl=self.impl, folded=self.folded, name=f"block_{j}",
            )(x, train)
        return SwiftFormerEncoder(
            mlp_ratio=self.mlp_ratio, attention_version=self.attention_version,
            drop_path_rate=self.rates[-1], drop_rate=self.drop_rate,
            layer_scale_init=self.layer_scale_init, bn_group_size=self.bn_group_size,
            dtype=self.dtype, impl=self.impl, folded=self.folded, name=f"block_{self.depth - 1}",
        )(x, train)
