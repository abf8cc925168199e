"""The SwiftFormer network, its variant table and `create_model`.

Parameter tree (mirrors the official PyTorch state_dict; `layout.py` holds the exact mapping):
  patch_embed/{conv1, norm1, conv2, norm2}
  network_{0,2,4,6}/block_{j}/...   stages: ConvEncoders, then one SwiftFormerEncoder
  network_{1,3,5}/{proj, norm}      Embedding (downsampling) between stages
  norm, head, dist_head             classifier (or norm0, norm2, norm4, norm6 with features_only)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from swiftformer_jax import layers, ops


@dataclasses.dataclass(frozen=True)
class Variant:
    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]


# Depths and widths from the paper and the official code.
VARIANTS: dict[str, Variant] = {
    "XS": Variant(depths=(3, 3, 6, 4), widths=(48, 56, 112, 220)),
    "S": Variant(depths=(3, 3, 9, 6), widths=(48, 64, 168, 224)),
    "L1": Variant(depths=(4, 3, 10, 5), widths=(48, 96, 192, 384)),
    "L3": Variant(depths=(4, 4, 12, 6), widths=(64, 128, 320, 512)),
}


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

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        self._check_images(images)
        bn = dict(bn_group_size=self.bn_group_size, dtype=self.dtype)
        x = layers.Stem(self.widths[0], **bn, name="patch_embed")(images.astype(self.dtype), train)

        features = []
        rates = drop_path_rates(self.depths, self.drop_path_rate)
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
            if stage > 0:
                x = layers.Embedding(width, **bn, name=f"network_{2 * stage - 1}")(x, train)
            x = self._stage(x, depth, rates[stage], train, name=f"network_{2 * stage}")
            if self.features_only:
                norm = layers.BatchNorm(self.bn_group_size, dtype=jnp.float32, name=f"norm{2 * stage}")
                features.append(norm(x, train))
        if self.features_only:
            return features

        x = layers.BatchNorm(self.bn_group_size, dtype=jnp.float32, name="norm")(x, train)
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
            dtype=self.dtype, name=name,
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
) -> SwiftFormer:
    """Build SwiftFormer-XS, -S, -L1 or -L3 (any case).

    `attention_version` 2 is the official code since July 2023 (and timm); 1 the first release and
    Hugging Face (see `ops.additive_token_weights`). `bn_group_size` None normalises over the whole
    (global) batch; an int gives ghost batch norm over groups of that many images. `dtype` is the
    compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    """
    key = str(variant).upper()
    if key not in VARIANTS:
        raise ValueError(f"unknown SwiftFormer variant {variant!r}; valid names: {', '.join(VARIANTS)}")
    if attention_version not in ops.ATTENTION_VERSIONS:
        raise ValueError(
            f"attention_version must be one of {ops.ATTENTION_VERSIONS}, got {attention_version!r}"
        )
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop rates must be in [0, 1); got drop_path_rate={drop_path_rate}, drop_rate={drop_rate}")
    if bn_group_size is not None and bn_group_size < 1:
        raise ValueError(f"bn_group_size must be a positive int or None, got {bn_group_size}")
    spec = VARIANTS[key]
    return SwiftFormer(
        depths=spec.depths, widths=spec.widths, num_classes=num_classes, distillation=distillation,
        features_only=features_only, attention_version=attention_version,
        drop_path_rate=drop_path_rate, drop_rate=drop_rate, bn_group_size=bn_group_size, dtype=dtype,
    )
