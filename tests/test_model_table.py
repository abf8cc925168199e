"""The model table script reproduces the paper's GMACs and parameter counts from our code."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from swiftformer_jax import create_model

SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "model_table.py"
spec = importlib.util.spec_from_file_location("model_table", SCRIPT)
model_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_table)


@pytest.mark.parametrize("variant", ["XS", "S", "L1", "L3"])
def test_macs_round_to_the_paper(variant):
    model = create_model(variant)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))
    gmacs = model_table.count_macs(model, variables, 224) / 1e9
    paper = model_table.PAPER[variant]["gmacs"]
    assert round(gmacs, 1) == paper, f"{variant}: {gmacs:.3f} GMACs, paper {paper}"


def test_macs_grow_with_the_image_area():
    model = create_model("XS")
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))
    # 224 and 448 divide exactly at every stride; everything but the head scales with the pixels.
    small = model_table.count_macs(model, variables, 224)
    large = model_table.count_macs(model, variables, 448)
    assert 3.99 < large / small < 4.0


def test_script_writes_the_table(tmp_path):
    out = tmp_path / "table.md"
    model_table.main(["--image-size", "64", "--no-xla", "--output", str(out)])
    text = out.read_text()
    assert "| S | 6,092,128 |" in text and "| L3 | 28,494,736 |" in text
    assert not (tmp_path / "table.md.tmp").exists()
