"""Batch norms and layer scales folded into the linear ops: the same eval logits, without them."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from swiftformer_jax import fold
from swiftformer_jax.model import ModelSpec

# One ConvEncoder (stage 4) and every other kind of block, at a size that compiles in seconds.
TINY = dict(depths=(1, 1, 1, 2), widths=(8, 16, 16, 24), num_classes=5)


def random_variables(spec: ModelSpec, seed: int = 0) -> dict:
    """Every leaf random (BN variances positive, scales of both signs): an init's zero biases, unit
    statistics and 1e-5 layer scales would let a wrong fold pass."""
    rs = np.random.RandomState(seed)

    def leaf(path, shape):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return rs.uniform(0.3, 2.0, shape.shape).astype(np.float32)
        return rs.normal(0.0, 0.5, shape.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, spec.abstract_variables())


@pytest.mark.parametrize("version,distillation", [(2, True), (1, False)])
def test_folded_network_computes_the_same_logits(version, distillation):
    spec = ModelSpec(**TINY, attention_version=version, distillation=distillation)
    variables = random_variables(spec)
    images = np.random.RandomState(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    want = np.asarray(spec.build().apply(variables, images))
    folded = fold.fold_for_inference(variables)
    model = spec.build(folded=True)
    assert jax.tree.structure(folded) == jax.tree.structure(model.init(jax.random.PRNGKey(0), images))
    got = np.asarray(model.apply(folded, images))
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    # The input is not touched.
    np.testing.assert_array_equal(spec.build().apply(variables, images), want)


def test_folded_parameters_have_no_norms_or_layer_scales():
    folded = fold.fold_for_inference(random_variables(ModelSpec(**TINY)))
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(folded)[0]]
    assert not [n for n in names if "norm" in n or "layer_scale" in n]
    assert list(folded) == ["params"]


def test_what_cannot_be_folded_is_refused():
    spec = ModelSpec(**TINY)
    variables = random_variables(spec)
    with pytest.raises(ValueError, match="batch_stats"):
        fold.fold_for_inference({"params": variables["params"]})
    broken = jax.tree.map(lambda a: a, variables)
    del broken["params"]["network_6"]["block_1"]["layer_scale_2"]
    with pytest.raises(ValueError, match="network_6/block_1/layer_scale_2"):
        fold.fold_for_inference(broken)
    backbone = ModelSpec(**{**TINY, "num_classes": 0})
    with pytest.raises(ValueError, match="no params\\['head'\\]"):
        fold.fold_for_inference(random_variables(backbone))
    images = np.zeros((1, 64, 64, 3), np.float32)
    folded = fold.fold_for_inference(variables)
    with pytest.raises(ValueError, match="eval logits only"):
        spec.build(folded=True).apply(folded, images, train=True)
