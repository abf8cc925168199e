"""Where each Flax leaf lives in the official PyTorch state_dict, and in which layout.

One source of truth for the PyTorch side of every parameter: `convert.py` uses it to move weights,
`optim.py` uses `torch_shape` to apply the official recipe's rules (weight decay skips tensors that
are 1-D *in PyTorch*; timm's AGC takes norms over all PyTorch dims but the first).

Flax path (collection first)                    official PyTorch name            layout change
params/patch_embed/conv1/kernel  [3,3,I,O]      patch_embed.0.weight [O,I,3,3]   HWIO -> OIHW
params/network_0/block_1/dwconv/kernel [3,3,1,C] network.0.1.dwconv.weight [C,1,3,3]
params/.../pwconv1/kernel [I,O] (1x1 conv)      ...pwconv1.weight [O,I,1,1]
params/.../attn/to_query/kernel [I,O] (Linear)  ...attn.to_query.weight [O,I]
params/.../layer_scale [C]                      ...layer_scale [C,1,1]
params/.../attn/w_g [D,1]                       ...attn.w_g [D,1]            unchanged
params/.../norm/scale, bias                     ...norm.weight, bias
batch_stats/.../norm/mean, var                  ...norm.running_mean, running_var
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# Flax names of 1x1 convolutions, which are nn.Dense here and Conv2d (weight [O, I, 1, 1]) in PyTorch.
POINTWISE_CONVS = frozenset({"pwconv1", "pwconv2", "fc1", "fc2"})
LAYER_SCALES = frozenset({"layer_scale", "layer_scale_1", "layer_scale_2"})
# The stem is an nn.Sequential in PyTorch: conv, BN, ReLU, conv, BN, ReLU.
STEM_INDEX = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}
LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

Path = Sequence[str]


def official_key(collection: str, path: Path) -> str:
    """The official state_dict key of the Flax leaf `variables[collection][path[0]]...[path[-1]]`."""
    *modules, leaf = path
    parts = []
    for i, name in enumerate(modules):
        if match := re.fullmatch(r"network_(\d+)", name):
            parts.append(f"network.{match.group(1)}")
        elif match := re.fullmatch(r"block_(\d+)", name):
            parts.append(match.group(1))
        elif i > 0 and modules[i - 1] == "patch_embed" and name in STEM_INDEX:
            parts.append(STEM_INDEX[name])
        else:
            parts.append(name)
    if leaf in LAYER_SCALES or leaf == "w_g":
        parts.append(leaf)
    elif (collection, leaf) in LEAF_NAMES:
        parts.append(LEAF_NAMES[(collection, leaf)])
    else:
        raise KeyError(f"no PyTorch name for Flax leaf {collection}/{'/'.join(path)}")
    return ".".join(parts)


def torch_shape(path: Path, shape: Sequence[int]) -> tuple[int, ...]:
    """The PyTorch shape of the parameter at Flax `path` (collection excluded) with Flax `shape`."""
    *modules, leaf = path
    shape = tuple(shape)
    if leaf in LAYER_SCALES:
        return shape + (1, 1)
    if leaf == "kernel" and len(shape) == 4:
        height, width, in_dim, out_dim = shape
        return (out_dim, in_dim, height, width)
    if leaf == "kernel" and len(shape) == 2:
        in_dim, out_dim = shape
        if modules and modules[-1] in POINTWISE_CONVS:
            return (out_dim, in_dim, 1, 1)
        return (out_dim, in_dim)
    return shape


def to_torch_layout(path: Path, array) -> np.ndarray:
    """Flax leaf at `path` (collection excluded) -> a contiguous NumPy array in the PyTorch layout."""
    array = np.asarray(array)
    target = torch_shape(path, array.shape)
    if path[-1] == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    elif path[-1] == "kernel" and array.ndim == 2:
        array = array.T
    return np.ascontiguousarray(array.reshape(target))


def from_torch_layout(path: Path, tensor, flax_shape: Sequence[int]) -> np.ndarray:
    """PyTorch tensor -> Flax leaf of `flax_shape`. Raises ValueError if the shapes disagree."""
    array = np.asarray(tensor)
    expected = torch_shape(path, flax_shape)
    if array.shape != expected:
        raise ValueError(
            f"shape mismatch for {'/'.join(path)}: PyTorch tensor {array.shape}, expected {expected}"
        )
    leaf = path[-1]
    if leaf == "kernel" and len(flax_shape) == 4:
        array = array.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and len(flax_shape) == 2:
        array = array.reshape(array.shape[:2]).T
    return np.ascontiguousarray(array.reshape(tuple(flax_shape)))
