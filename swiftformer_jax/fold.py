"""SwiftFormer for inference with its batch norms and layer scales folded into the linear ops.

In eval mode a batch norm is a per-channel affine map, `x * inv + shift` with
`inv = scale / sqrt(var + eps)` and `shift = bias - mean * inv`, and a layer scale is a per-channel
factor. Each sits beside a convolution or a linear and folds into its weights:

- after a conv (stem, embeddings, the ConvEncoders' depthwise conv): the kernel's output channels
  times `inv`, the bias `bias * inv + shift`;
- before a linear (the MLP's `norm1` before `fc1`; the final `norm` before the mean pool and the
  heads, which commutes with the mean): the kernel's rows times `inv`, the bias `+ shift @ kernel`;
- a layer scale after a linear (`pwconv2`, the attention's `final`, the MLP's `fc2`): the kernel's
  columns and the bias times the scale.

`fold_for_inference(variables)` gives the parameters of `ModelSpec.build(folded=True)`, which
computes the same eval logits without those ops (float32 rounding apart). Why: exported graphs keep
every elementwise op the trace had, and onnxruntime runs the unfolded SwiftFormer-S about a quarter
slower (`python experiments/deploy_latency.py`); XLA fuses them either way.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from swiftformer_jax.layers import PYTORCH_BN_EPS

Tree = Mapping[str, Any]


def fold_for_inference(variables: Tree, epsilon: float = PYTORCH_BN_EPS) -> dict:
    """{"params", "batch_stats"} of a SwiftFormer classifier -> {"params"} of its folded form.

    Raises ValueError naming the first module whose parameters are not those of a SwiftFormer
    classifier (a feature extractor has nothing after its last norms to fold them into).
    """
    if "params" not in variables or "batch_stats" not in variables:
        raise ValueError(f"variables need 'params' and 'batch_stats'; got {sorted(variables)}")
    params = _to_numpy(variables["params"])
    stats = _to_numpy(variables["batch_stats"])
    for name in ("patch_embed", "norm", "head"):
        if name not in params:
            raise ValueError(f"not the variables of a SwiftFormer classifier: no params[{name!r}]")

    def affine(path: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The eval batch norm at `path` as (inv, shift), and its leaves removed."""
        norm, stat = _pop(params, path), _pop(stats, path)
        inv = norm["scale"] / np.sqrt(stat["var"] + epsilon)
        return inv, norm["bias"] - stat["mean"] * inv

    def layer_scale(path: tuple[str, ...]) -> np.ndarray:
        return _pop(params, path)

    stem = params["patch_embed"]
    _scale_outputs(stem["conv1"], *affine(("patch_embed", "norm1")))
    _scale_outputs(stem["conv2"], *affine(("patch_embed", "norm2")))
    for name in sorted(params):
        module = params[name]
        if not isinstance(module, dict) or not name.startswith("network_"):
            continue
        if "proj" in module:  # an Embedding
            _scale_outputs(module["proj"], *affine((name, "norm")))
            continue
        for block_name in sorted(module):
            block, path = module[block_name], (name, block_name)
            if "local_representation" in block:  # a SwiftFormerEncoder
                _fold_conv_encoder(block["local_representation"], path + ("local_representation",),
                                   affine, layer_scale)
                _scale_outputs(block["attn"]["final"], layer_scale(path + ("layer_scale_1",)))
                _scale_inputs(block["linear"]["fc1"], *affine(path + ("linear", "norm1")))
                _scale_outputs(block["linear"]["fc2"], layer_scale(path + ("layer_scale_2",)))
            else:
                _fold_conv_encoder(block, path, affine, layer_scale)
    inv, shift = affine(("norm",))
    for head in ("head", "dist_head"):
        if head in params:
            _scale_inputs(params[head], inv, shift)
    leftover = ["/".join(path) for path in traverse_util.flatten_dict(stats)]  # empty dicts dropped
    if leftover:
        raise ValueError(f"batch statistics with no batch norm to fold into: {leftover[:3]}")
    return {"params": params}


def _fold_conv_encoder(block: dict, path: tuple[str, ...], affine, layer_scale) -> None:
    _scale_outputs(block["dwconv"], *affine(path + ("norm",)))
    _scale_outputs(block["pwconv2"], layer_scale(path + ("layer_scale",)))


def _scale_outputs(layer: dict, inv: np.ndarray, shift: np.ndarray | None = None) -> None:
    """y = layer(x) * inv + shift, in place: the kernel's last (output) axis and the bias."""
    _check_channels(layer, inv, axis=-1)
    layer["kernel"] = layer["kernel"] * inv
    layer["bias"] = layer["bias"] * inv + (0.0 if shift is None else shift)


def _scale_inputs(layer: dict, inv: np.ndarray, shift: np.ndarray) -> None:
    """y = layer(x * inv + shift), in place, for a linear (kernel [in, out])."""
    _check_channels(layer, inv, axis=0)
    layer["bias"] = layer["bias"] + shift @ layer["kernel"]
    layer["kernel"] = layer["kernel"] * inv[:, None]


def _check_channels(layer: dict, inv: np.ndarray, axis: int) -> None:
    if layer["kernel"].shape[axis] != inv.shape[0]:
        raise ValueError(f"a per-channel factor of {inv.shape[0]} channels next to a kernel of shape "
                         f"{layer['kernel'].shape}: not a SwiftFormer's parameters")


def _pop(tree: dict, path: tuple[str, ...]):
    node = tree
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or path[-1] not in node:
        raise ValueError(f"not the variables of a SwiftFormer classifier: no {'/'.join(path)}")
    return node.pop(path[-1])


def _to_numpy(tree):
    """A mutable float32 copy (numpy: the folding is done once, on the host)."""
    if isinstance(tree, Mapping):
        return {key: _to_numpy(value) for key, value in tree.items()}
    return np.asarray(tree, dtype=np.float32).copy()
