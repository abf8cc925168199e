"""The network descriptions a checkpoint can hold, and reading one back from its JSON.

A checkpoint's model JSON names its architecture: "swiftformer" (`model.ModelSpec`, the student)
or "regnety" (`regnet.RegNetSpec`, the paper's teacher). JSON without the key was written before
there were two and is a SwiftFormer's. Both specs offer the same interface (`build`,
`abstract_variables`, `describe`, `has_classifier`, `num_classes`, `image_size`, `to_json`).
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from swiftformer_jax.model import ModelSpec
from swiftformer_jax.regnet import RegNetSpec

Spec = Union[ModelSpec, RegNetSpec]
ARCHITECTURES: dict[str, type] = {"swiftformer": ModelSpec, "regnety": RegNetSpec}


def spec_from_json(data: Mapping[str, Any]) -> Spec:
    """The spec a model JSON describes, dispatched on its "architecture" (missing: SwiftFormer)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a model description must be a JSON object, got {type(data).__name__}")
    architecture = data.get("architecture", "swiftformer")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"model description has unknown architecture {architecture!r}; known: "
                         f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture].from_json(data)
