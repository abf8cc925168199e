"""RegNetY in Flax: the paper's teacher (RegNetY-160, DeiT's `regnety_160-a5fe301d.pth`).

RegNet (Radosavovic et al., *Designing Network Design Spaces*, CVPR 2020) is a stem, four stages
of residual blocks and a head. A Y block is an X block (1x1 conv, grouped 3x3 conv, 1x1 conv, each
with batch norm) with squeeze-excitation after the grouped conv:

  stem     3x3 conv stride 2 (3 -> stem_width, no bias), BN, ReLU
  block    conv1 1x1 (C_in -> W), BN, ReLU
           conv2 3x3 grouped (W / group_width groups; stride 2 in each stage's first block), BN, ReLU
           se    mean over H, W; 1x1 (W -> round(se_ratio * C_in)), ReLU; 1x1 (-> W); sigmoid; scale
           conv3 1x1 (W -> W), BN
           shortcut: identity, or 1x1 conv with the block's stride + BN where the shape changes
           out = ReLU(conv3 + shortcut)
  head     global average pool, Linear (omitted with num_classes=0: pooled features)

Every conv has padding k // 2 on both sides (PyTorch's `padding=1` for 3x3, not XLA's 'SAME'),
no bias except the squeeze-excitation's; batch norm has eps 1e-5 and PyTorch's running statistics
(`layers.BatchNorm`). The SE width is `int(round(se_ratio * C_in))` (Python's rounding) with C_in
the block's *input* width, as timm and Hugging Face compute it.

Parameter tree (`regnet_convert.py` maps it to timm's and Hugging Face's names):
  stem/{conv, bn}
  stage{i}/block{j}/{conv1, conv2, conv3, shortcut}/{conv, bn}, stage{i}/block{j}/se/{fc1, fc2}
  head                                 {kernel [C, num_classes], bias}
Stages and blocks count from 1, like timm's `s1.b1`. 3x3 kernels are HWIO ([3, 3, W / groups, W]
for the grouped conv, `lax.conv_general_dilated` with `feature_group_count`); 1x1 kernels are
[C_in, C_out] matmuls (`ops.matmul_last_axis`), strided 1x1 convs a strided slice first.

`dtype` is the compute dtype: float32 parameters and batch-norm statistics, float32 pooling and
logits whatever it is. Inputs are NHWC images normalised with the ImageNet mean and std
(`model.IMAGENET_MEAN` / `IMAGENET_STD`), as DeiT's teacher expects (224 px, bicubic).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from swiftformer_jax import layers, ops

ARCHITECTURE = "regnety"  # the "architecture" of a RegNetY checkpoint's model JSON
CUSTOM = "custom"

# Sizes of the named networks. regnety_160 is timm's `regnety_160` (w0=200, wa=106.23, wm=2.48,
# group 112, depth 18, SE 0.25) and Hugging Face's `facebook/regnet-y-160` written out per stage.
REGNET_SIZES: dict[str, dict[str, Any]] = {
    "regnety_160": dict(stem_width=32, depths=(2, 4, 11, 1), widths=(224, 448, 1232, 3024),
                        group_width=112, se_ratio=0.25),
}
DISPLAY_NAMES = {"regnety_160": "RegNetY-160"}

# Where DeiT publishes the teacher SwiftFormer's official recipe distils from (timm naming,
# {"model": state_dict}; 83,590,140 parameters, 1000 classes).
DEIT_TEACHER_URL = "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"


def variant_name(variant: str) -> str:
    """A table name from any spelling ("regnety_160", "RegNetY-160"); ValueError naming the valid ones."""
    key = str(variant).strip().lower().replace("-", "_")
    if key not in REGNET_SIZES:
        raise ValueError(f"unknown RegNet {variant!r}; valid names: {', '.join(REGNET_SIZES)}")
    return key


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One Y block's sizes: stage and block (from 1), input and output width, stride, groups, SE width."""

    stage: int
    block: int
    in_width: int
    width: int
    stride: int
    groups: int
    se_width: int

    @property
    def has_shortcut_conv(self) -> bool:
        return self.stride != 1 or self.in_width != self.width


def block_plan(stem_width: int, depths: Sequence[int], widths: Sequence[int], group_width: int,
               se_ratio: float) -> list[BlockPlan]:
    """Every block of the network in order: stride 2 in each stage's first block."""
    plan, in_width = [], stem_width
    for stage, (depth, width) in enumerate(zip(depths, widths), start=1):
        for block in range(1, depth + 1):
            plan.append(BlockPlan(stage, block, in_width, width, 2 if block == 1 else 1,
                                  width // group_width, int(round(in_width * se_ratio))))
            in_width = width
    return plan


@dataclasses.dataclass(frozen=True)
class RegNetSpec:
    """Everything that fixes a RegNetY's weights and the function they compute.

    The RegNetY counterpart of `model.ModelSpec`, with the same interface: `RegNetSpec.named(
    "regnety_160", num_classes=...)`, `.variant` ("regnety_160" or "custom"), `.build(dtype=...)`,
    `.abstract_variables()`, `.describe()`, `.has_classifier`, `.to_json()` / `from_json()` (with
    `"architecture": "regnety"`). `image_size` is the resolution the weights are meant for.
    Invalid values raise ValueError naming the field.
    """

    stem_width: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    group_width: int
    se_ratio: float = 0.25
    num_classes: int = 1000
    image_size: int = 224

    def __post_init__(self):
        depths, widths = tuple(self.depths), tuple(self.widths)
        for name, sizes in (("depths", depths), ("widths", widths)):
            if not sizes or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes):
                raise ValueError(f"{name} must be positive ints (one per stage), got {sizes}")
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} must have one entry per stage each")
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "widths", widths)
        for name in ("stem_width", "group_width", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        bad = [w for w in widths if w % self.group_width]
        if bad:
            raise ValueError(f"widths {bad} are not multiples of group_width={self.group_width}")
        if not isinstance(self.se_ratio, (int, float)) or not 0.0 < self.se_ratio <= 1.0:
            raise ValueError(f"se_ratio must be in (0, 1] (RegNetY has squeeze-excitation), got {self.se_ratio!r}")
        object.__setattr__(self, "se_ratio", float(self.se_ratio))
        if any(b.se_width < 1 for b in self.blocks()):
            raise ValueError(f"se_ratio={self.se_ratio} gives a squeeze-excitation width of 0 for some block")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: pooled features), got {self.num_classes!r}")

    @classmethod
    def named(cls, variant: str, **fields: Any) -> "RegNetSpec":
        """The spec of a network of the size table ("regnety_160", any case, '-' or '_')."""
        return cls(**{**REGNET_SIZES[variant_name(variant)], **fields})

    @property
    def architecture(self) -> str:
        return ARCHITECTURE

    @property
    def variant(self) -> str:
        sizes = dict(stem_width=self.stem_width, depths=self.depths, widths=self.widths,
                     group_width=self.group_width, se_ratio=self.se_ratio)
        for name, table in REGNET_SIZES.items():
            if table == sizes:
                return name
        return CUSTOM

    @property
    def has_classifier(self) -> bool:
        return self.num_classes > 0

    def blocks(self) -> list[BlockPlan]:
        return block_plan(self.stem_width, self.depths, self.widths, self.group_width, self.se_ratio)

    def describe(self) -> str:
        """One line for logs and messages: "RegNetY-160 (1000 classes, 224 px)"."""
        name = DISPLAY_NAMES.get(self.variant)
        if name is None:
            name = (f"RegNetY stem {self.stem_width} depths {self.depths} widths {self.widths} "
                    f"group width {self.group_width} SE {self.se_ratio:g}")
        head = f"{self.num_classes} classes" if self.num_classes else "pooled features"
        return f"{name} ({head}, {self.image_size} px)"

    def build(self, *, bn_group_size: int | None = None, dtype=jnp.float32) -> "RegNetY":
        """The linen module. `bn_group_size` None normalises over the whole batch in training (an
        int: ghost batch norm); `dtype` is the compute dtype."""
        if bn_group_size is not None and (not isinstance(bn_group_size, int) or bn_group_size < 1):
            raise ValueError(f"bn_group_size must be a positive int or None, got {bn_group_size!r}")
        return RegNetY(stem_width=self.stem_width, depths=self.depths, widths=self.widths,
                       group_width=self.group_width, se_ratio=self.se_ratio, num_classes=self.num_classes,
                       bn_group_size=bn_group_size, dtype=dtype)

    def abstract_variables(self) -> dict:
        """{"params", "batch_stats"} as ShapeDtypeStructs (the shapes do not depend on image size)."""
        return _abstract_variables(self.build())

    def to_json(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, "variant": self.variant, **dataclasses.asdict(self),
                "depths": list(self.depths), "widths": list(self.widths)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RegNetSpec":
        """The spec saved by `to_json` (other keys, such as a checkpoint's source, are ignored)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model description must be a JSON object, got {type(data).__name__}")
        if data.get("architecture") != ARCHITECTURE:
            raise ValueError(f"model description {dict(data)} is not a RegNetY's (architecture != {ARCHITECTURE!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        if "depths" not in values and data.get("variant", CUSTOM) != CUSTOM:
            values = {**REGNET_SIZES[variant_name(data["variant"])], **values}
        missing = sorted({"stem_width", "depths", "widths", "group_width"} - set(values))
        if missing:
            raise ValueError(f"model description {dict(data)} lacks {missing}")
        spec = cls(**{**values, "depths": tuple(values["depths"]), "widths": tuple(values["widths"])})
        named = str(data.get("variant", spec.variant))
        if named not in (spec.variant, CUSTOM):
            raise ValueError(f"model description names {named!r} but has the sizes of {spec.variant}")
        return spec


@functools.lru_cache(maxsize=None)
def _abstract_variables(model: "RegNetY") -> dict:
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), images)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def _fan_out_normal(kernel_size: int, features: int, groups: int = 1):
    """Kaiming normal, fan-out mode (timm's and Hugging Face's RegNet conv init)."""
    return nn.initializers.normal(math.sqrt(2.0 * groups / (kernel_size * kernel_size * features)))


class Conv(nn.Module):
    """PyTorch's Conv2d(kernel 1 or 3, padding kernel // 2, groups) on NHWC; no bias unless `use_bias`.

    1x1: kernel [C_in, features], a strided slice then one matmul (also on [B, C] vectors, as the
    squeeze-excitation uses it). 3x3: HWIO kernel [3, 3, C_in / groups, features] and
    `lax.conv_general_dilated` with padding (1, 1) on both sides and `feature_group_count`.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        init = _fan_out_normal(self.kernel_size, self.features, self.groups)
        x = x.astype(self.dtype)
        if self.kernel_size == 1:
            kernel = self.param("kernel", init, (channels, self.features), jnp.float32)
            if self.stride > 1:
                x = x[:, :: self.stride, :: self.stride, :]
            y = ops.matmul_last_axis(x, kernel.astype(self.dtype))
        elif self.kernel_size == 3:
            kernel = self.param("kernel", init, (3, 3, channels // self.groups, self.features), jnp.float32)
            y = jax.lax.conv_general_dilated(
                x, kernel.astype(self.dtype), (self.stride, self.stride), ((1, 1), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
            )
        else:
            raise ValueError(f"kernel_size must be 1 or 3, got {self.kernel_size}")
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class ConvBN(nn.Module):
    """A conv without bias, batch norm, and optionally ReLU: timm's ConvNormAct (`conv`, `bn`)."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    relu: bool = True
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, self.kernel_size, self.stride, self.groups, dtype=self.dtype, name="conv")(x)
        x = layers.BatchNorm(self.bn_group_size, dtype=self.dtype, name="bn")(x, train)
        return nn.relu(x) if self.relu else x


class SqueezeExcitation(nn.Module):
    """Channel gates from the spatial mean: 1x1 (C -> width), ReLU, 1x1 (-> C), sigmoid, times x."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        s = nn.relu(Conv(self.width, use_bias=True, dtype=self.dtype, name="fc1")(pooled))
        s = Conv(x.shape[-1], use_bias=True, dtype=self.dtype, name="fc2")(s)
        return x * jax.nn.sigmoid(s)[:, None, None, :].astype(x.dtype)


class YBlock(nn.Module):
    """RegNet's Y block: 1x1, grouped 3x3 (the block's stride), squeeze-excitation, 1x1; residual; ReLU."""

    width: int
    stride: int
    groups: int
    se_width: int
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = dict(bn_group_size=self.bn_group_size, dtype=self.dtype)
        y = ConvBN(self.width, 1, **bn, name="conv1")(x, train)
        y = ConvBN(self.width, 3, self.stride, self.groups, **bn, name="conv2")(y, train)
        y = SqueezeExcitation(self.se_width, self.dtype, name="se")(y)
        y = ConvBN(self.width, 1, relu=False, **bn, name="conv3")(y, train)
        shortcut = x.astype(self.dtype)
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = ConvBN(self.width, 1, self.stride, relu=False, **bn, name="shortcut")(x, train)
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """One stage (timm's `s{i}`): Y blocks of one width, the first with stride 2."""

    blocks: tuple[BlockPlan, ...]
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for b in self.blocks:
            x = YBlock(b.width, b.stride, b.groups, b.se_width, self.bn_group_size, self.dtype,
                       name=f"block{b.block}")(x, train)
        return x


class RegNetY(nn.Module):
    """RegNetY on NHWC images normalised with the ImageNet mean and std.

    Returns float32 logits [B, num_classes], or pooled features [B, C] when num_classes == 0, in
    eval and train mode alike (train mode uses and, with `mutable=["batch_stats"]`, updates the
    batch statistics). No dropout or drop path: the teacher's recipe has none.
    """

    stem_width: int
    depths: Sequence[int]
    widths: Sequence[int]
    group_width: int
    se_ratio: float = 0.25
    num_classes: int = 1000
    bn_group_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        shape = getattr(images, "shape", None)
        if shape is None or len(shape) != 4 or shape[-1] != 3 or not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                "images must be float NHWC [B, H, W, 3], normalised with the ImageNet mean and std; "
                f"got shape {shape} and dtype {getattr(images, 'dtype', None)}"
            )
        bn = dict(bn_group_size=self.bn_group_size, dtype=self.dtype)
        x = ConvBN(self.stem_width, 3, 2, **bn, name="stem")(images.astype(self.dtype), train)
        plan = block_plan(self.stem_width, self.depths, self.widths, self.group_width, self.se_ratio)
        for stage in range(1, len(self.depths) + 1):
            blocks = tuple(b for b in plan if b.stage == stage)
            x = Stage(blocks, **bn, name=f"stage{stage}")(x, train)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return pooled
        return layers.dense_layer(self.num_classes, jnp.float32, "head")(pooled)
