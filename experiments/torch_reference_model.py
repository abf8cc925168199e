"""The PyTorch side of the benchmark: HF SwiftFormer with version-2 attention, and its train step.

Built on `tests/torch_reference.py` (the parity tests' reference: HF `SwiftFormerForImageClassification`
plus a patch that swaps only the token weighting for version 2, the official code's compute), so the
benchmark times exactly the network the parity tests compare against. What this file adds is what
a benchmark needs and the tests do not: a module that returns both heads in training (HF averages
them before any loss), the version-2 patch applied permanently (torch.compile must trace it), and
one AdamW train step shaped like the JAX one.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys

import torch
import torch.nn.functional as F

_TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import torch_reference  # noqa: E402  (tests/torch_reference.py, found through the path above)


class TwoHeadSwiftFormer(torch.nn.Module):
    """HF SwiftFormer whose forward returns (cls, dist) logits in train mode and their mean in eval.

    The same outputs as our Flax model, so both frameworks compute the same loss on the same heads.
    """

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, images: torch.Tensor):
        hidden = self.hf.swiftformer(images).last_hidden_state
        pooled = self.hf.norm(hidden).flatten(2).mean(-1)
        cls_logits, dist_logits = self.hf.head(pooled), self.hf.dist_head(pooled)
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2


def build(variant: str, *, num_classes: int = 1000, seed: int = 0) -> TwoHeadSwiftFormer:
    """A randomised HF SwiftFormer-`variant` with version-2 attention, in eval mode.

    The version-2 context is entered once and never left: its exit would restore HF's method, so
    the context object is kept alive in `_ACTIVE_PATCHES` (a generator that is garbage collected
    runs its `finally`). The patched forward is a bound method in each attention module's
    `__dict__`, so `copy.deepcopy` of the model keeps version 2.
    """
    hf_model = torch_reference.build(variant, num_classes=num_classes, seed=seed)
    patch = torch_reference.attention_version(hf_model, 2)
    patch.__enter__()
    _ACTIVE_PATCHES.append(patch)
    return TwoHeadSwiftFormer(hf_model).eval()


_ACTIVE_PATCHES: list = []


def loss_fn(outputs, labels: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Mean of label-smoothed cross-entropy on both heads: the loss the JAX benchmark step uses."""
    cls_logits, dist_logits = outputs
    return 0.5 * (F.cross_entropy(cls_logits, labels, label_smoothing=smoothing)
                  + F.cross_entropy(dist_logits, labels, label_smoothing=smoothing))


def autocast(dtype: str, device_type: str = "cpu"):
    """bfloat16 autocast on `device_type` ("cpu" or "cuda") for "bfloat16", nothing for "float32"."""
    if dtype == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if dtype == "float32":
        return contextlib.nullcontext()
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


def make_train_step(model: torch.nn.Module, forward, dtype: str, lr: float = 1e-3, weight_decay: float = 0.025,
                    device_type: str = "cpu"):
    """A closure running forward, loss, backward and an AdamW step on (images, labels).

    `forward` is `model` itself (eager) or `torch.compile(model)`; the optimizer stays eager in
    both (its foreach implementation), as in a usual compiled training loop.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(dtype, device_type):
            loss = loss_fn(forward(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step
