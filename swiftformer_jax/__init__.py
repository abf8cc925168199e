"""SwiftFormer (Shaker et al., ICCV 2023) in JAX/Flax: models, PyTorch weight conversion, training."""

from swiftformer_jax import paths  # noqa: F401 - gs:// through gcsfs, before any epath use
from swiftformer_jax.model import VARIANTS, ModelSpec, SwiftFormer, create_model

__all__ = ["VARIANTS", "ModelSpec", "SwiftFormer", "create_model"]
