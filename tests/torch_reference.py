"""The independent PyTorch reference for the parity and conversion tests.

The reference network is Hugging Face transformers' `SwiftFormerForImageClassification`: another
team's implementation of the official model, which we do not control. It implements attention
version 1 only. `attention_version(model, 2)` swaps, on that one model instance, only the
token weighting for version 2: the scores `q @ w_g * D**-0.5` are L2-normalised over the tokens
(the official code's `F.normalize(A, dim=1)` since 2023-07-26, and timm's) instead of a softmax
over a trailing axis of size 1. The rest of HF's forward (projections, normalisation of q and k,
Proj, final) is written out again here unchanged.

`randomize_` replaces every parameter and buffer with random values: the default initialisation
hides mistakes (layer scales of 1e-5 hide the attention branch; BN running statistics of 0 and 1
hide a swapped mean and variance).

`official_to_hf` and `official_to_timm` restate the published key maps of the two other
implementations (transformers' `convert_swiftformer_original_to_hf.create_rename_keys` and timm's
`swiftformer.checkpoint_filter_fn`), so the tests check our names against theirs rather than
against our own code.
"""

from __future__ import annotations

import contextlib
import re
import types

import torch
import torch.nn.functional as F
from transformers import SwiftFormerConfig, SwiftFormerForImageClassification, SwiftFormerModel
from transformers.models.swiftformer import modeling_swiftformer

from swiftformer_jax.model import VARIANTS


def build(variant: str, *, num_classes: int = 1000, seed: int = 0) -> SwiftFormerForImageClassification:
    """A randomised Hugging Face SwiftFormer classifier in eval mode (attention version 1)."""
    spec = VARIANTS[variant]
    config = SwiftFormerConfig(depths=list(spec.depths), embed_dims=list(spec.widths), num_labels=num_classes)
    model = SwiftFormerForImageClassification(config)
    randomize_(model, seed)
    return model.eval()


def base_model(model: SwiftFormerForImageClassification) -> SwiftFormerModel:
    return model.swiftformer


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and floating buffer random values of sensible scale, in place.

    Conv and Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the depth; biases,
    BN affine parameters, running means ~ N(0, 0.2) or around 1; running variances in [0.5, 2];
    layer scales uniform in [-1, 1] (so no branch is negligible); w_g ~ N(0, 1).
    Raises if any floating tensor was left untouched.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    touched = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if not tensor.dtype.is_floating_point:
                    continue
                shape = tensor.shape
                if isinstance(module, torch.nn.BatchNorm2d):
                    value = {
                        "weight": lambda: uniform(shape, 0.5, 1.5),
                        "bias": lambda: normal(shape, 0.2),
                        "running_mean": lambda: normal(shape, 0.2),
                        "running_var": lambda: uniform(shape, 0.5, 2.0),
                    }[name]()
                elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name == "weight":
                    value = normal(shape, shape[1:].numel() ** -0.5)
                elif name == "bias":
                    value = normal(shape, 0.2)
                elif name.startswith("layer_scale"):
                    value = uniform(shape, -1.0, 1.0)
                elif name == "w_g":
                    value = normal(shape, 1.0)
                else:
                    raise AssertionError(f"randomize_ does not know {prefix}{name}")
                tensor.copy_(value)
                touched.add(prefix + name)
    floating = {k for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    assert floating == touched, f"left untouched: {sorted(floating - touched)}"


def _attention_version_2_forward(self, x: torch.Tensor) -> torch.Tensor:
    """HF's attention forward with the version-2 token weighting (L2-normalised over tokens)."""
    query = F.normalize(self.to_query(x), dim=-1)
    key = F.normalize(self.to_key(x), dim=-1)
    weights = F.normalize(query @ self.w_g * self.scale_factor, dim=1)  # [B, N, 1], over tokens
    global_query = torch.sum(weights * query, dim=1, keepdim=True)  # [B, 1, D]
    return self.final(self.proj(global_query * key) + query)


@contextlib.contextmanager
def attention_version(model: torch.nn.Module, version: int):
    """Within the block, `model` computes attention `version` (1: HF as shipped; 2: patched)."""
    modules = [m for m in model.modules() if isinstance(m, modeling_swiftformer.SwiftFormerEfficientAdditiveAttention)]
    assert modules, "no attention modules found"
    if version == 2:
        for module in modules:
            module.forward = types.MethodType(_attention_version_2_forward, module)
    elif version != 1:
        raise ValueError(version)
    try:
        yield model
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


def nchw(images_nhwc) -> torch.Tensor:
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()


def nhwc(tensor: torch.Tensor):
    return tensor.detach().permute(0, 2, 3, 1).numpy()


def logits_and_stages(model: SwiftFormerForImageClassification, images: torch.Tensor):
    """(logits, the four stage outputs before any feature norm) from one forward pass.

    The stage outputs are HF's hidden states after encoder.network.0/2/4/6 (hidden[0] is the stem
    output; hidden[i + 1] follows encoder.network[i]).
    """
    output = model(images, output_hidden_states=True)
    return output.logits, [output.hidden_states[i + 1] for i in (0, 2, 4, 6)]


def stage_outputs(model: SwiftFormerForImageClassification, images: torch.Tensor) -> list[torch.Tensor]:
    return logits_and_stages(model, images)[1]


# --- The published key maps of the other implementations, restated -----------------------------


def official_to_hf(key: str) -> str:
    """transformers' convert_swiftformer_original_to_hf rename rule, restated."""
    new = key.replace(".pwconv", ".point_wise_conv").replace(".dwconv", ".depth_wise_conv")
    new = new.replace(".Proj.", ".proj.")
    new = new.replace("patch_embed", "swiftformer.patch_embed.patch_embedding")
    if "network" in new:
        parts = new.split(".")
        if parts[2].isdigit():
            new = "swiftformer.encoder.network." + parts[1] + ".blocks." + parts[2] + "." + ".".join(parts[3:])
        else:
            new = new.replace("network", "swiftformer.encoder.network")
    return new


def official_to_timm(key: str) -> str:
    """timm's swiftformer.checkpoint_filter_fn rename rule, restated."""
    key = key.replace("patch_embed.", "stem.").replace("dist_head.", "head_dist.")
    key = key.replace("attn.Proj.", "attn.proj.")
    key = key.replace(".layer_scale_1", ".layer_scale_1.gamma").replace(".layer_scale_2", ".layer_scale_2.gamma")
    key = re.sub(r"\.layer_scale(?=$|\.)", ".layer_scale.gamma", key)
    match = re.match(r"^network\.(\d+)\.(.*)", key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index % 2 == 0:
            key = f"stages.{index // 2}.blocks.{rest}"
        else:
            key = f"stages.{index // 2 + 1}.downsample.{rest}"
    return key
