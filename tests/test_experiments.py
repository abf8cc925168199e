"""Smoke tests of the experiment scripts with tiny settings (seconds, not the real measurements).

They check that the scripts run end to end and write their JSON, markdown and PNG, that bad flags
fail with a clear message, that the exponent fit is right on exact power laws, and that the
prototyped fast depthwise conv (experiments/fast_ops.py) computes the same function as the model's.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import attention_scaling  # noqa: E402
import benchmark  # noqa: E402
import fast_ops  # noqa: E402
from swiftformer_jax import layers, ops  # noqa: E402


def test_attention_scaling_tiny_run(tmp_path):
    attention_scaling.main([
        "--widths", "8", "--tokens", "16,64", "--fit-from", "16", "--mechanisms",
        "efficient_additive_attention,softmax_self_attention", "--min-seconds", "0", "--max-reps", "1",
        "--tag", "t", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "attention_scaling_t.json").read_text())
    assert len(results["rows"]) == 2 * 2 * 2
    assert all(f["time_exponent"] is not None and f["memory_exponent"] is not None for f in results["fits"])
    assert (tmp_path / "attention_scaling_t.png").stat().st_size > 0
    assert "Fitted growth exponents" in (tmp_path / "attention_scaling_t.md").read_text()


def test_attention_scaling_skips_what_does_not_fit(tmp_path):
    attention_scaling.main([
        "--widths", "8", "--tokens", "16,512", "--mechanisms", "softmax_self_attention", "--max-gib",
        "0.0001", "--min-seconds", "0", "--max-reps", "1", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "attention_scaling.json").read_text())
    assert any(s["tokens"] == 512 and "GiB" in s["why"] for s in results["skipped"])


def test_fit_exponent_recovers_power_laws():
    tokens = [100, 1000, 10000]
    assert attention_scaling.fit_exponent(tokens, [3 * n for n in tokens]) == pytest.approx(1.0)
    assert attention_scaling.fit_exponent(tokens, [n**2 for n in tokens]) == pytest.approx(2.0)
    assert attention_scaling.fit_exponent([5], [1.0]) is None


@pytest.mark.parametrize("argv, message", [
    (["--mechanisms", "linformer"], "unknown mechanism"),
    (["--widths", "0"], "positive integers"),
    (["--tokens", "a,b"], "positive integers"),
])
def test_attention_scaling_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        attention_scaling.parse_args(argv)
    assert message in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--variants", "M"], "unknown variant"),
    (["--configs", "tf-f32"], "unknown config"),
    (["--tasks", "eval"], "unknown task"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_benchmark_bad_flags(argv, message):
    with pytest.raises(SystemExit) as error:
        benchmark.parse_args(argv)
    assert message in str(error.value)


def test_benchmark_tiny_run(tmp_path):
    benchmark.main([
        "--variants", "XS", "--configs", "jax-f32,torch-eager-f32", "--tasks", "latency",
        "--image-size", "32", "--reps", "2", "--warmup", "1", "--torch-memory-format", "contiguous",
        "--skip-peaks", "--tag", "t", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "benchmark_t.json").read_text())
    latency = results["variants"]["XS"]["tasks"]["latency"]["results"]
    assert set(latency) == {"jax-f32", "torch-eager-f32"}
    assert all(s["median_s"] > 0 and s["min_s"] <= s["median_s"] <= s["max_s"] for s in latency.values())
    assert results["variants"]["XS"]["analysis"]["jax-f32"]["latency"]["flops"] > 0
    assert results["machine"]["cpu"]
    assert "SwiftFormer-XS" in (tmp_path / "benchmark_t.md").read_text()


def test_fast_depthwise_conv_matches_model_code_with_gradients():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (2, 5, 7, 3))
    kernel, bias = jax.random.normal(keys[1], (3, 3, 1, 3)), jax.random.normal(keys[2], (3,))
    weight = jax.random.normal(keys[3], x.shape)

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) * weight), argnums=(0, 1, 2))(x, kernel, bias)

    np.testing.assert_allclose(fast_ops.depthwise_conv3x3(x, kernel, bias),
                               ops.depthwise_conv3x3(x, kernel, bias), rtol=1e-6, atol=1e-6)
    for new, old in zip(grads(fast_ops.depthwise_conv3x3), grads(ops.depthwise_conv3x3)):
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)
