"""The SwiftFormer network, its description (`ModelSpec`, the variant table) and `create_model`.

Parameter tree (mirrors the official PyTorch state_dict; `layout.py` holds the exact mapping):
  patch_embed/{conv1, norm1, conv2, norm2}
  network_{0,2,4,6}/block_{j}/...   stages: ConvEncoders, then one SwiftFormerEncoder
  network_{1,3,5}/{proj, norm}      Embedding (downsampling) between stages
  norm, head, dist_head             classifier (or norm0, norm2, norm4, norm6 with features_only)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from swiftformer_jax import layers, ops


# The ImageNet mean and std the networks' inputs are normalised with (the official transforms').
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Depths and widths of the four stages, from the paper and the official code.
VARIANT_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "XS": ((3, 3, 6, 4), (48, 56, 112, 220)),
    "S": ((3, 3, 9, 6), (48, 64, 168, 224)),
    "L1": ((4, 3, 10, 5), (48, 96, 192, 384)),
    "L3": ((4, 4, 12, 6), (64, 128, 320, 512)),
}
CUSTOM = "custom"  # the variant name of a network whose sizes are in no row of the table
ARCHITECTURE = "swiftformer"  # the "architecture" of a SwiftFormer checkpoint's model JSON


def variant_name(variant: str) -> str:
    """A variant's table name from any spelling ("xs", "S", " l1 "); ValueError naming the valid ones."""
    key = str(variant).strip().upper()
    if key not in VARIANT_SIZES:
        raise ValueError(f"unknown SwiftFormer variant {variant!r}; valid names: {', '.join(VARIANT_SIZES)}")
    return key


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes a SwiftFormer network's weights and the function they compute.

    The one description of a network: `create_model`, the trainer, `convert`, `predict` and every
    checkpoint (as JSON) use it. The free choices that change neither (compute dtype, drop rates,
    ghost batch-norm groups) are `build`'s arguments. `image_size` is the resolution the weights are
    meant for (the trainer's, or 224 for imported weights): `predict` crops to it.

    `ModelSpec.named("S", num_classes=10)` takes the sizes from the variant table; `variant` is the
    table name of the sizes, or "custom". Invalid values raise ValueError naming the field.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    num_classes: int = 1000
    distillation: bool = True
    features_only: bool = False
    attention_version: int = 2
    image_size: int = 224

    def __post_init__(self):
        depths, widths = tuple(self.depths), tuple(self.widths)
        for name, sizes in (("depths", depths), ("widths", widths)):
            if len(sizes) != 4 or not all(isinstance(v, int) and v >= 1 for v in sizes):
                raise ValueError(f"{name} must be 4 positive ints (one per stage), got {sizes}")
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "widths", widths)
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: pooled features), got {self.num_classes!r}")
        if self.attention_version not in ops.ATTENTION_VERSIONS:
            raise ValueError(
                f"attention_version must be one of {ops.ATTENTION_VERSIONS}, got {self.attention_version!r}"
            )
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")

    @classmethod
    def named(cls, variant: str, **fields: Any) -> "ModelSpec":
        """The spec of a variant of the table ("XS", "S", "L1", "L3", any case)."""
        depths, widths = VARIANT_SIZES[variant_name(variant)]
        return cls(depths=depths, widths=widths, **fields)

    @property
    def variant(self) -> str:
        for name, sizes in VARIANT_SIZES.items():
            if sizes == (self.depths, self.widths):
                return name
        return CUSTOM

    @property
    def has_classifier(self) -> bool:
        return self.num_classes > 0 and not self.features_only

    def describe(self) -> str:
        """One line for logs and messages: "SwiftFormer-S (1000 classes, distillation head, attention v2)"."""
        name = f"SwiftFormer-{self.variant}"
        if self.variant == CUSTOM:
            name += f" depths {self.depths} widths {self.widths}"
        if self.features_only:
            head = "feature pyramid"
        elif self.num_classes == 0:
            head = "pooled features"
        else:
            head = f"{self.num_classes} classes" + (", distillation head" if self.distillation else "")
        return f"{name} ({head}, attention v{self.attention_version}, {self.image_size} px)"

    def build(self, *, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
              bn_group_size: int | None = None, dtype=jnp.float32, impl: str = "auto", devices=None,
              folded: bool = False) -> "SwiftFormer":
        """The linen module. `bn_group_size` None normalises over the whole (global) batch; an int
        gives ghost batch norm over groups of that many images. `dtype` is the compute dtype;
        `impl` the ops' form ("cpu" or "xla", `ops.py`; "auto": `ops.resolve_impl` for `devices`,
        default JAX's default devices), which changes neither weights nor function. `folded`: the
        eval-only network that takes `fold.fold_for_inference`'s variables."""
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= drop_rate < 1.0:
            raise ValueError(
                f"drop rates must be in [0, 1); got drop_path_rate={drop_path_rate}, drop_rate={drop_rate}"
            )
        if bn_group_size is not None and (not isinstance(bn_group_size, int) or bn_group_size < 1):
            raise ValueError(f"bn_group_size must be a positive int or None, got {bn_group_size!r}")
        return SwiftFormer(
            depths=self.depths, widths=self.widths, num_classes=self.num_classes,
            distillation=self.distillation, features_only=self.features_only,
            attention_version=self.attention_version, drop_path_rate=drop_path_rate,
            drop_rate=drop_rate, bn_group_size=bn_group_size, dtype=dtype, impl=ops.resolve_impl(impl, devices),
            folded=folded,
        )

    def abstract_variables(self) -> dict:
        """{"params", "batch_stats"} as ShapeDtypeStructs (the shapes do not depend on image size)."""
        return _abstract_variables(self.build())

    def to_json(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, "variant": self.variant, **dataclasses.asdict(self),
                "depths": list(self.depths), "widths": list(self.widths)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """The spec saved by `to_json`, or by earlier versions of this package: trainer checkpoints
        without `features_only`/`image_size`, imported checkpoints with a variant name and no sizes.
        Other keys (a checkpoint's provenance) are ignored; a missing "architecture" means SwiftFormer."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model description must be a JSON object, got {type(data).__name__}")
        if data.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"model description {dict(data)} is not a SwiftFormer's (architecture "
                             f"{data['architecture']!r}); read it with specs.spec_from_json")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        if "depths" not in values and "widths" not in values:
            if "variant" not in data:
                raise ValueError(f"model description {dict(data)} has neither depths/widths nor a variant")
            values["depths"], values["widths"] = VARIANT_SIZES[variant_name(data["variant"])]
        missing = sorted({"depths", "widths", "num_classes", "distillation"} - set(values))
        if missing:
            raise ValueError(f"model description {dict(data)} lacks {missing}")
        spec = cls(**{**values, "depths": tuple(values["depths"]), "widths": tuple(values["widths"])})
        named = str(data.get("variant", spec.variant)).upper()
        if named not in (spec.variant.upper(), CUSTOM.upper()):
            raise ValueError(f"model description names variant {data['variant']!r} but has the sizes of "
                             f"{spec.variant}: depths {spec.depths}, widths {spec.widths}")
        return spec


# Every variant with 1000 classes and the distillation head (the released ImageNet models).
VARIANTS: dict[str, ModelSpec] = {name: ModelSpec.named(name) for name in VARIANT_SIZES}


@functools.lru_cache(maxsize=None)
def _abstract_variables(model: "SwiftFormer") -> dict:
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), images)


def drop_path_rates(depths: Sequence[int], drop_path_rate: float) -> list[list[float]]:
    """Per-block stochastic-depth rates growing linearly from 0 to `drop_path_rate` over all blocks.

    Block j of stage i gets rate * (j + sum(depths[:i])) / (sum(depths) - 1), as the official Stage.
    """
    total = sum(depths)
    denominator = max(total - 1, 1)
    rates, start = [], 0
    for depth in depths:
        rates.append([drop_path_rate * (start + j) / denominator for j in range(depth)])
        start += depth
    return rates


class SwiftFormer(nn.Module):
    """SwiftFormer on NHWC images normalised with the ImageNet mean and std.

    Returns: eval logits [B, num_classes] (the mean of both heads with distillation); in training
    with distillation, (cls_logits, dist_logits); pooled features [B, C] when num_classes == 0; the
    four stage maps (strides 4, 8, 16, 32, each through its own BN) when features_only.
    Logits and features come back in float32 whatever the compute dtype.
    """

    depths: Sequence[int]
    widths: Sequence[int]
    num_classes: int = 1000
    distillation: bool = True
    features_only: bool = False
    attention_version: int = 2
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    mlp_ratio: int = 4
    layer_scale_init: float = 1e-5
    bn_group_size: int | None = None
    dtype: jnp.dtype = jnp.float32
    impl: str = "cpu"  # "cpu" or "xla": the form of the convolutions, GELU and batch norm (ops.py)
    folded: bool = False  # inference form of `fold.fold_for_inference`'s variables: no BN, no layer scales

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        self._check_images(images)
        if self.folded and (train or self.num_classes == 0 or self.features_only):
            raise ValueError("a folded SwiftFormer (fold.fold_for_inference) computes eval logits only: "
                             f"train={train}, num_classes={self.num_classes}, features_only={self.features_only}")
        bn = dict(bn_group_size=self.bn_group_size, dtype=self.dtype, impl=self.impl, folded=self.folded)
        x = layers.Stem(self.widths[0], **bn, name="patch_embed")(images.astype(self.dtype), train)

        features = []
        rates = drop_path_rates(self.depths, self.drop_path_rate)
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
            if stage > 0:
                x = layers.Embedding(width, **bn, name=f"network_{2 * stage - 1}")(x, train)
            x = self._stage(x, depth, rates[stage], train, name=f"network_{2 * stage}")
            if self.features_only:
                norm = layers.BatchNorm(self.bn_group_size, dtype=jnp.float32, impl=self.impl, name=f"norm{2 * stage}")
                features.append(norm(x, train))
        if self.features_only:
            return features

        if not self.folded:
            x = layers.BatchNorm(self.bn_group_size, dtype=jnp.float32, impl=self.impl, name="norm")(x, train)
        pooled = jnp.mean(x, axis=(1, 2))
        if self.num_classes == 0:
            return pooled
        head = layers.dense_layer(self.num_classes, jnp.float32, "head")(pooled)
        if not self.distillation:
            return head
        dist = layers.dense_layer(self.num_classes, jnp.float32, "dist_head")(pooled)
        return (head, dist) if train else (head + dist) / 2

    def _stage(self, x, depth: int, rates: Sequence[float], train: bool, name: str) -> jax.Array:
        """ConvEncoders then one SwiftFormerEncoder, under one scope named like PyTorch's `network.i`."""
        stage = layers.Stage(
            depth=depth, rates=tuple(rates), mlp_ratio=self.mlp_ratio,
            attention_version=self.attention_version, drop_rate=self.drop_rate,
            layer_scale_init=self.layer_scale_init, bn_group_size=self.bn_group_size,
            dtype=self.dtype, impl=self.impl, folded=self.folded, name=name,
        )
        return stage(x, train)

    def _check_images(self, images) -> None:
        shape = getattr(images, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(f"images must be NHWC [B, H, W, 3]; got shape {shape}")
        if shape[-1] != 3:
            raise ValueError(
                f"images must have 3 channels in the last axis (NHWC); got shape {tuple(shape)}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"images must be floating point, normalised with the ImageNet mean and std; "
                f"got dtype {images.dtype}"
            )
        if min(shape[1], shape[2]) < 1 or shape[0] < 1:
            raise ValueError(f"images must be non-empty; got shape {tuple(shape)}")


def create_model(
    variant: str,
    *,
    num_classes: int = 1000,
    distillation: bool = True,
    features_only: bool = False,
    attention_version: int = 2,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    bn_group_size: int | None = None,
    dtype=jnp.float32,
    impl: str = "auto",
) -> SwiftFormer:
    """Build SwiftFormer-XS, -S, -L1 or -L3 (any case): `ModelSpec.named(...).build(...)`.

    `attention_version` 2 is the official code since July 2023 (and timm); 1 the first release and
    Hugging Face (see `ops.additive_token_weights`). `bn_group_size` None normalises over the whole
    (global) batch; an int gives ghost batch norm over groups of that many images. `dtype` is the
    compute dtype (e.g. jnp.bfloat16); parameters stay float32. `impl` picks the ops' form: "cpu"
    (tuned on XLA:CPU), "xla" (XLA's own convolutions and GELU) or "auto" (the first on CPUs, the
    second elsewhere: `ops.resolve_impl`); same parameters, same function.
    """
    spec = ModelSpec.named(variant, num_classes=num_classes, distillation=distillation,
                           features_only=features_only, attention_version=attention_version)
    return spec.build(drop_path_rate=drop_path_rate, drop_rate=drop_rate,
                      bn_group_size=bn_group_size, dtype=dtype, impl=impl)
