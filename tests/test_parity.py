"""Numerical parity with an independent PyTorch implementation (Hugging Face transformers).

Reference: `SwiftFormerForImageClassification` from transformers on torch (CPU, float32), every
tensor randomised (tests/torch_reference.py), its weights moved with `convert.from_torch`. Version 2
attention is HF's module with only its token weighting replaced (see torch_reference).

Tolerances, each relative to the scale (max |value|) of the PyTorch tensor compared:
  eval logits and stage maps 1e-5; train-mode logits and updated BN statistics 1e-5;
  gradients of a cross-entropy loss 1e-4 per parameter tensor.
All JAX computations run with `jax_default_matmul_precision="highest"` (set for this module only;
XLA:CPU computes float32 matmuls and convolutions in full precision anyway, the setting makes that
explicit and keeps the test meaningful on accelerators).

Cost: one XLA compilation per (variant, attention version, image size) for the forward and one
per variant for the gradient; everything else is shared through module-scoped caches.
"""

from __future__ import annotations

import copy
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from swiftformer_jax import convert, create_model, layers
from swiftformer_jax.model import ModelSpec

VARIANTS = ("XS", "S", "L1", "L3")
SIZES = ((224, 224), (193, 225))  # square, and odd non-square (asymmetric padding at every stride)
TRAIN_SIZE = (193, 225)
BATCH = 2
EVAL_RTOL = 1e-5
TRAIN_RTOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(2)
    yield
    jax.config.update("jax_default_matmul_precision", previous)


# ------------------------------------------------------------------------------------------------
# Shared, cached state
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def reference(variant: str):
    """(HF model in eval mode, our variables converted from its state dict)."""
    model = ref.build(variant, seed=len(variant) * 7 + ord(variant[-1]))
    return model, convert.from_torch(model.state_dict())


@functools.lru_cache(maxsize=None)
def images(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal((BATCH, *size, 3)).astype(np.float32)


def _is_stage(module: nn.Module, method_name: str) -> bool:
    return isinstance(module, layers.Stage) and method_name == "__call__"


@functools.lru_cache(maxsize=None)
def eval_fn(variant: str, version: int, impl: str = "cpu"):
    """Jitted eval forward -> (logits, [four stage outputs before any feature norm])."""
    model = create_model(variant, attention_version=version, impl=impl)

    @jax.jit
    def run(variables, x):
        logits, state = model.apply(variables, x, train=False, capture_intermediates=_is_stage)
        stages = [state["intermediates"][f"network_{2 * i}"]["__call__"][0] for i in range(4)]
        return logits, stages

    return run


@functools.lru_cache(maxsize=None)
def train_grad_fn(variant: str, version: int, impl: str = "cpu"):
    """Jitted train-mode loss, logits, updated batch stats and gradients w.r.t. every parameter.

    The loss is cross-entropy on the mean of both heads: what HF returns in train mode too.
    """
    model = create_model(variant, attention_version=version, impl=impl)

    def loss_fn(params, batch_stats, x, labels):
        (cls, dist), updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        logits = (cls + dist) / 2
        log_probs = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
        return loss, (logits, updates["batch_stats"])

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def torch_eval(variant: str, version: int, size):
    model, _ = reference(variant)
    x = ref.nchw(images(size))
    with torch.no_grad(), ref.attention_version(model, version):
        logits, stages = ref.logits_and_stages(model, x)
    return logits.numpy(), [ref.nhwc(s) for s in stages]


def assert_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert np.isfinite(error) and error <= rtol * scale, (
        f"{what}: max abs error {error:.3g} exceeds {rtol:g} x scale {scale:.3g} (relative {error / scale:.3g})"
    )


# ------------------------------------------------------------------------------------------------
# Eval mode: logits and stage maps, both attention versions, two image sizes
# ------------------------------------------------------------------------------------------------


# Version 2 (the official code's current function) at both sizes; version 1 at the odd size; the
# "xla" implementation (ops.py) at the odd size, version 2.
EVAL_CASES = ([(v, 2, size, "cpu") for v in VARIANTS for size in SIZES] + [(v, 1, SIZES[1], "cpu") for v in VARIANTS]
              + [(v, 2, SIZES[1], "xla") for v in VARIANTS])


@pytest.mark.parametrize(
    "variant,version,size,impl", EVAL_CASES,
    ids=[f"{v}-v{ver}-{s[0]}x{s[1]}" + ("-xla" if impl == "xla" else "") for v, ver, s, impl in EVAL_CASES],
)
def test_eval_logits_and_stage_maps(variant, version, size, impl):
    _, variables = reference(variant)
    logits, stages = eval_fn(variant, version, impl)(variables, jnp.asarray(images(size)))
    want_logits, want_stages = torch_eval(variant, version, size)
    assert_close(logits, want_logits, EVAL_RTOL, f"{variant} v{version} {size} logits")
    for i, (stage, want) in enumerate(zip(stages, want_stages)):
        assert_close(stage, want, EVAL_RTOL, f"{variant} v{version} {size} stage {i}")


def test_attention_versions_differ_on_the_same_weights():
    """Guards the version-2 patch of the reference: if it silently did nothing, v1 == v2 above."""
    v1, _ = torch_eval("XS", 1, SIZES[0])
    v2, _ = torch_eval("XS", 2, SIZES[0])
    assert np.abs(v1 - v2).max() > 1e-2 * np.abs(v1).max()


def test_features_only_applies_the_official_feature_norms():
    """features_only = the four stage maps, each through its own BN (official `fork_feat`).

    The official state dict of a `fork_feat` model carries norm0/2/4/6 instead of norm and the
    heads; `from_torch` must recognise it and the maps must equal torch BN(eval) of HF's stages.
    """
    torch_model, variables = reference("XS")
    official = {k: v for k, v in convert.to_torch(variables, "official").items()
                if not k.startswith(("norm.", "head.", "dist_head."))}
    generator = torch.Generator().manual_seed(5)
    norms = {}
    for i, width in zip((0, 2, 4, 6), (48, 56, 112, 220)):
        norms[i] = {
            "weight": 0.5 + torch.rand(width, generator=generator),
            "bias": 0.2 * torch.randn(width, generator=generator),
            "running_mean": 0.2 * torch.randn(width, generator=generator),
            "running_var": 0.5 + 1.5 * torch.rand(width, generator=generator),
        }
        official.update({f"norm{i}.{name}": t.numpy() for name, t in norms[i].items()})
    spec = convert.model_spec(official)
    assert spec == ModelSpec.named("XS", num_classes=0, distillation=False, features_only=True, attention_version=2)
    model = spec.build()
    features = jax.jit(lambda v, x: model.apply(v, x, train=False))(convert.from_torch(official), images(SIZES[1]))
    x = ref.nchw(images(SIZES[1]))
    with torch.no_grad(), ref.attention_version(torch_model, 2):
        stages = ref.stage_outputs(torch_model, x)
        for (i, norm), stage, feature in zip(norms.items(), stages, features):
            want = torch.nn.functional.batch_norm(
                stage, norm["running_mean"], norm["running_var"], norm["weight"], norm["bias"],
                training=False, eps=1e-5,
            )
            assert_close(feature, ref.nhwc(want), EVAL_RTOL, f"norm{i} features")


# ------------------------------------------------------------------------------------------------
# Train mode: batch statistics, running statistics, gradients
# ------------------------------------------------------------------------------------------------


def _torch_train_step(variant: str, version: int, x: np.ndarray, labels: np.ndarray):
    """One train-mode forward and backward of a copy of the reference (the shared one stays put)."""
    model = copy.deepcopy(reference(variant)[0]).train()
    with ref.attention_version(model, version):
        logits = model(ref.nchw(x)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    buffers = {name: b.numpy() for name, b in model.named_buffers() if "running" in name}
    return loss.item(), logits.detach().numpy(), buffers, grads


# Conv biases that feed a train-mode BN: the BN subtracts the batch mean, so their gradient is
# analytically zero and what both frameworks return is float32 rounding noise.
BIAS_BEFORE_BN = re.compile(r".*(patch_embedding\.[03]|network\.\d*[13579]\.proj|depth_wise_conv)\.bias")


def _layer_gradient_scale(grads: dict, name: str) -> float:
    """max |gradient| over a layer's weight and bias.

    A bias gradient is the sum of the layer's output gradients over B*H*W positions; it can cancel
    to nearly (or, before a train-mode BN, exactly) zero while its rounding error stays of the size
    of the summed terms. So biases are compared relative to their layer's scale.
    """
    layer = name.rsplit(".", 1)[0]
    return max(np.abs(grads[k]).max() for k in (f"{layer}.weight", f"{layer}.bias") if k in grads)


@pytest.mark.parametrize("variant, impl", [(v, "cpu") for v in VARIANTS] + [("XS", "xla")])
def test_train_mode_statistics_and_gradients(variant, impl):
    """Attention version 2 (version 1 differs only in the token weighting: see the op-level test)."""
    _, variables = reference(variant)
    x = images(TRAIN_SIZE, seed=1)
    labels = np.array([3, 997], np.int64)
    (loss, (logits, new_stats)), grads = train_grad_fn(variant, 2, impl)(
        variables["params"], variables["batch_stats"], jnp.asarray(x), jnp.asarray(labels, jnp.int32)
    )
    want_loss, want_logits, want_buffers, want_grads = _torch_train_step(variant, 2, x, labels)

    assert_close(logits, want_logits, TRAIN_RTOL, "train-mode logits")
    assert abs(float(loss) - want_loss) <= TRAIN_RTOL * max(1.0, abs(want_loss))

    # Running statistics after one step (PyTorch rule: unbiased variance, momentum 0.1).
    stats = convert.to_torch({"params": variables["params"], "batch_stats": new_stats}, "hf")
    before = convert.to_torch(variables, "hf")
    assert want_buffers and set(want_buffers) <= set(stats)
    for name, want in want_buffers.items():
        # Compare the updates (new - old): the n / (n - 1) factor is then visible even for large n.
        assert np.abs(want - before[name]).max() > 0, f"{name} did not move in the step"
        assert_close(stats[name] - before[name], want - before[name], TRAIN_RTOL, f"update of {name}")

    # Gradients, mapped to PyTorch names and layouts; every parameter covered.
    ours = convert.to_torch({"params": grads}, "hf", num_batches_tracked=False)
    assert set(ours) == set(want_grads)
    for name, want in want_grads.items():
        if name.endswith(".bias"):
            scale = _layer_gradient_scale(want_grads, name)
            if BIAS_BEFORE_BN.fullmatch(name):
                assert max(np.abs(want).max(), np.abs(ours[name]).max()) <= 1e-5 * scale, name
        else:
            scale = np.abs(want).max()
        assert scale > 0, f"{name}: the reference gradient is zero; the test cannot see it"
        error = np.abs(ours[name] - want).max()
        assert error <= GRAD_RTOL * scale, f"grad {name}: error {error:.3g}, scale {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# BatchNorm running variance: PyTorch's unbiased rule, and the biased alternative
# ------------------------------------------------------------------------------------------------


def _bn_step(unbiased: bool, x: np.ndarray, old_mean: np.ndarray, old_var: np.ndarray):
    bn = layers.BatchNorm(unbiased_running_var=unbiased)
    variables = {
        "params": {"scale": jnp.ones(x.shape[-1]), "bias": jnp.zeros(x.shape[-1])},
        "batch_stats": {"mean": jnp.asarray(old_mean), "var": jnp.asarray(old_var)},
    }
    y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    return np.asarray(y), np.asarray(updates["batch_stats"]["mean"]), np.asarray(updates["batch_stats"]["var"])


def test_batchnorm_running_var_unbiased_like_pytorch_and_biased_option():
    """Default: running_var takes the unbiased batch variance (n / (n - 1)), as torch.nn.BatchNorm2d.

    With `unbiased_running_var=False` (Flax's own rule) it takes the biased one: the difference is
    exactly momentum * biased_var / (n - 1), with n = B * H * W values per channel.
    """
    rng = np.random.RandomState(0)
    x = (rng.standard_normal((4, 5, 6, 7)) * 2 + 1).astype(np.float32)
    old_mean = rng.standard_normal(7).astype(np.float32)
    old_var = rng.uniform(0.5, 2, 7).astype(np.float32)
    torch_bn = torch.nn.BatchNorm2d(7).train()
    with torch.no_grad():
        torch_bn.running_mean.copy_(torch.from_numpy(old_mean))
        torch_bn.running_var.copy_(torch.from_numpy(old_var))
        want_y = ref.nhwc(torch_bn(ref.nchw(x)))

    y, mean, var = _bn_step(True, x, old_mean, old_var)
    assert_close(y, want_y, 1e-5, "train-mode output")
    assert_close(mean, torch_bn.running_mean.numpy(), 1e-6, "running mean")
    assert_close(var, torch_bn.running_var.numpy(), 1e-6, "running var (unbiased)")

    y_biased, mean_biased, var_biased = _bn_step(False, x, old_mean, old_var)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    biased = x.reshape(-1, 7).astype(np.float64).var(axis=0)
    np.testing.assert_array_equal(y_biased, y)
    np.testing.assert_array_equal(mean_biased, mean)
    np.testing.assert_allclose(var - var_biased, 0.1 * biased / (n - 1), rtol=1e-3)
    assert np.all(var - var_biased > 0)


# ------------------------------------------------------------------------------------------------
# The attention op alone, both versions, forward and gradients (cheap: no network compile)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", (1, 2))
def test_attention_op_forward_and_gradients(version):
    """`ops.efficient_additive_attention` against HF's attention module (patched for version 2).

    In version 1 the token weights are a softmax over an axis of size 1, identically 1: w_g gets
    exactly zero gradient in both frameworks. In version 2 it must get the same, non-zero one.
    """
    from swiftformer_jax import ops
    from transformers.models.swiftformer import modeling_swiftformer

    dim, tokens = 24, 35
    module = modeling_swiftformer.SwiftFormerEfficientAdditiveAttention(None, dim=dim)
    ref.randomize_(module, seed=11)
    x = np.random.RandomState(2).standard_normal((2, tokens, dim)).astype(np.float32)
    upstream = np.random.RandomState(3).standard_normal((2, tokens, dim)).astype(np.float32)

    x_torch = torch.from_numpy(x).requires_grad_()
    with ref.attention_version(module, version):
        out_torch = module(x_torch)
        (out_torch * torch.from_numpy(upstream)).sum().backward()

    def dense(linear):
        return {"kernel": jnp.asarray(linear.weight.detach().numpy().T), "bias": jnp.asarray(linear.bias.detach().numpy())}

    params = {"to_query": dense(module.to_query), "to_key": dense(module.to_key), "Proj": dense(module.proj),
              "final": dense(module.final), "w_g": jnp.asarray(module.w_g.detach().numpy())}

    def objective(params, x):
        out = ops.efficient_additive_attention(params, x, version=version)
        return jnp.sum(out * upstream), out

    (_, out), (grad_params, grad_x) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x))
    assert_close(out, out_torch.detach().numpy(), EVAL_RTOL, "attention output")
    assert_close(grad_x, x_torch.grad.numpy(), GRAD_RTOL, "grad x")
    for ours, theirs in (("to_query", module.to_query), ("to_key", module.to_key), ("Proj", module.proj), ("final", module.final)):
        assert_close(grad_params[ours]["kernel"], theirs.weight.grad.numpy().T, GRAD_RTOL, f"grad {ours}.kernel")
        assert_close(grad_params[ours]["bias"], theirs.bias.grad.numpy(), GRAD_RTOL, f"grad {ours}.bias")
    if version == 1:
        assert not np.any(module.w_g.grad.numpy()) and not np.any(grad_params["w_g"])
    else:
        assert np.abs(module.w_g.grad.numpy()).max() > 0
        assert_close(grad_params["w_g"], module.w_g.grad.numpy(), GRAD_RTOL, "grad w_g")


@pytest.mark.parametrize("train", (False, True))
def test_batchnorm_epsilon_matters_and_matches(train):
    """With variances near eps (1e-5) the epsilon is visible: running variances of 1e-6..1e-4 in
    eval mode, inputs of scale 1e-3 in train mode. Random running statistics elsewhere hide it."""
    rng = np.random.RandomState(1)
    channels = 6
    x = (rng.standard_normal((3, 4, 5, channels)) * (1e-3 if train else 1e-2)).astype(np.float32)
    running_var = (10.0 ** rng.uniform(-6, -4, channels)).astype(np.float32)
    torch_bn = torch.nn.BatchNorm2d(channels).train(train)
    with torch.no_grad():
        torch_bn.running_var.copy_(torch.from_numpy(running_var))
        torch_bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, channels).astype(np.float32)))
        want = ref.nhwc(torch_bn(ref.nchw(x)))
    variables = {
        "params": {"scale": jnp.asarray(torch_bn.weight.detach().numpy()), "bias": jnp.zeros(channels)},
        "batch_stats": {"mean": jnp.zeros(channels), "var": jnp.asarray(running_var)},
    }
    bn = layers.BatchNorm()
    y = bn.apply(variables, jnp.asarray(x), train=train, mutable=["batch_stats"])[0]
    assert_close(y, want, 1e-5, f"BN output (train={train})")
    # The same BN with eps 1.1e-5 is visibly different: the check above can see eps.
    y_other = layers.BatchNorm(epsilon=1.1e-5).apply(variables, jnp.asarray(x), train=train, mutable=["batch_stats"])[0]
    assert np.abs(np.asarray(y_other) - want).max() > 1e-3 * np.abs(want).max()
