"""Candidate speed changes to `swiftformer_jax/ops.py` and `layers.py`, prototyped by monkeypatching.

The model code is owned elsewhere; these are measured proposals (experiments/results/PERF_NOTES.md).
`patched()` swaps them in while a model is traced (jit tracing happens at the first call or at
`.lower()`, so build and compile inside the `with` block). Each candidate computes the same
function as the code it replaces; `python experiments/fast_ops.py` checks that on the full model
(eval logits, train-mode loss and every gradient, float32) and times each piece before/after.

Candidates (profile of the jitted S train step, batch 32, on XLA:CPU):
1. `depthwise_conv3x3` with a custom VJP: the input gradient is the same nine-slice form applied to
   the cotangent with the flipped kernel, instead of XLA's transpose of nine pad/slice ops (nine
   padded full-size copies summed); the kernel gradient is nine fused multiply-reductions.
   Measured: no gain (PERF_NOTES.md, section 4), so it stays a prototype.
Two former candidates, exact GELU through erf and the stride-2 convolutions as im2col, were
measured faster here and moved into the model (`ops.gelu`, `ops.conv3x3_stride2`).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from swiftformer_jax import ops


# --- 1. depthwise conv with a hand-written backward ---------------------------------------------


def _nine_slices(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """sum_ij pad(x)[i:i+H, j:j+W] * kernel[i, j]: the forward form of ops.depthwise_conv3x3."""
    height, width = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = padded[:, 0:height, 0:width, :] * kernel[0, 0, 0]
    for i in range(3):
        for j in range(3):
            if i or j:
                out = out + padded[:, i:i + height, j:j + width, :] * kernel[i, j, 0]
    return out


@jax.custom_vjp
def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Same contract and result as `ops.depthwise_conv3x3`, with a cheaper backward."""
    return _nine_slices(x, kernel) + bias.astype(x.dtype)


def _dw_fwd(x, kernel, bias):
    return depthwise_conv3x3(x, kernel, bias), (x, kernel, bias)


def _dw_bwd(res, g):
    x, kernel, bias = res
    height, width = x.shape[1], x.shape[2]
    grad_x = _nine_slices(g, kernel[::-1, ::-1])  # correlation with the flipped kernel
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [jnp.sum(padded[:, i:i + height, j:j + width, :] * g, axis=(0, 1, 2), dtype=jnp.float32)
            for i in range(3) for j in range(3)]
    grad_k = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
    grad_b = jnp.sum(g, axis=(0, 1, 2), dtype=jnp.float32).astype(bias.dtype)
    return grad_x, grad_k, grad_b


depthwise_conv3x3.defvjp(_dw_fwd, _dw_bwd)


# --- switching them in ---------------------------------------------------------------------------

CANDIDATES = ("dwconv_vjp",)


@contextlib.contextmanager
def patched(which: tuple[str, ...] = CANDIDATES):
    """Within the block, the model code uses the chosen candidates (restored on exit)."""
    unknown = set(which) - set(CANDIDATES)
    if unknown:
        raise ValueError(f"unknown candidates {sorted(unknown)}; valid: {', '.join(CANDIDATES)}")
    saved = ops.depthwise_conv3x3
    try:
        if "dwconv_vjp" in which:
            ops.depthwise_conv3x3 = depthwise_conv3x3
        yield
    finally:
        ops.depthwise_conv3x3 = saved


# --- checks and measurements (python experiments/fast_ops.py) ------------------------------------


def _train_grad_fn(model):
    def loss(params, batch_stats, x):
        (c, d), _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.mean(jnp.square(c)) + jnp.mean(jnp.square(d))
    return jax.value_and_grad(loss)


def check_parity(variant: str = "S", size: int = 64, batch: int = 2) -> dict:
    """Max relative differences (to each tensor's max |value|) between patched and original model:
    eval logits, a train-mode loss and every parameter gradient, float32, same variables.

    Gradients whose true value is zero (the dwconv biases: a train-mode BN follows and removes any
    per-channel shift) are rounding noise of ~1e-10 in both; tensors whose largest gradient is below
    1e-6 of the largest gradient anywhere are listed, not compared."""
    from swiftformer_jax import create_model

    model = create_model(variant)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
    variables = jax.jit(lambda k: model.init({"params": k}, x, train=False))(jax.random.PRNGKey(0))
    # Randomise: default layer scales (1e-5) would hide the attention branch.
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    variables = {"params": params, "batch_stats": variables["batch_stats"]}

    def outputs():
        logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
        loss, grads = jax.jit(_train_grad_fn(model))(variables["params"], variables["batch_stats"], x)
        return logits, loss, grads

    with jax.default_matmul_precision("highest"):
        base = outputs()
        with patched():
            new = outputs()
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30))  # noqa: E731
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(base[2]))
    compared, zero = [], []
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(base[2])[0], jax.tree.leaves(new[2])):
        if float(jnp.max(jnp.abs(a))) < 1e-6 * scale:
            zero.append(jax.tree_util.keystr(path))
        else:
            compared.append(rel(a, b))
    return {"logits": rel(base[0], new[0]), "loss": rel(base[1], new[1]), "grad_max": max(compared),
            "grads_compared": len(compared), "grads_zero_skipped": len(zero),
            "zero_examples": zero[:3]}


def ablation(variant: str = "S", size: int = 224, batch: int = 32, reps: int = 5) -> dict:
    """Interleaved timing of the jitted value-and-grad of a train-mode loss: original, each
    candidate alone, all of them. Returns median/min/max seconds per configuration."""
    import statistics
    import time

    from swiftformer_jax import create_model

    model = create_model(variant)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
    variables = jax.jit(lambda k: model.init({"params": k}, x[:1], train=False))(jax.random.PRNGKey(0))
    args = (variables["params"], variables["batch_stats"], x)
    configs = {"original": ()} | {c: (c,) for c in CANDIDATES}
    if len(CANDIDATES) > 1:  # with a single candidate, "all" would compile and time it twice
        configs["all"] = CANDIDATES
    compiled = {}
    for name, which in configs.items():
        with patched(which):
            compiled[name] = jax.jit(_train_grad_fn(model)).lower(*args).compile()
        jax.block_until_ready(compiled[name](*args))
        print(f"compiled {name}", flush=True)
    times = {n: [] for n in configs}
    for r in range(reps):
        for name in configs:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            times[name].append(time.perf_counter() - start)
    return {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for n, t in times.items()}


def pieces(batch: int = 32, reps: int = 7) -> dict:
    """Before/after of each candidate on its own piece (SwiftFormer-S shapes at 224 px), forward
    plus backward of sum(out**2), timed interleaved. Milliseconds: median, min, max."""
    import statistics
    import time

    key = jax.random.PRNGKey(0)

    def vg(fn):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.square(fn(a, b))), argnums=(0, 1)))

    x = jax.random.normal(key, (batch, 56, 56, 48))
    kernel, bias = 0.1 * jax.random.normal(key, (3, 3, 1, 48)), jnp.zeros(48)
    cases = {
        "dwconv 56x56x48": (vg(lambda a, k: ops.depthwise_conv3x3(a, k, bias)),
                            vg(lambda a, k: depthwise_conv3x3(a, k, bias)), (x, kernel)),
    }
    out = {}
    for name, (before, after, args) in cases.items():
        fns = {"before": before, "after": after}
        for fn in fns.values():
            jax.block_until_ready(fn(*args))
        times = {w: [] for w in fns}
        for _ in range(reps):
            for w, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[w].append(1e3 * (time.perf_counter() - start))
        out[name] = {w: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t)} for w, t in times.items()}
        print(name, {w: round(v["median_ms"], 1) for w, v in out[name].items()}, flush=True)
    return out


if __name__ == "__main__":
    import json
    import os
    import sys

    print("load average", os.getloadavg())
    print("parity (relative to max |value|):", json.dumps(check_parity()), flush=True)
    if "--pieces" in sys.argv:
        print(json.dumps({"pieces_b32": pieces(), "load_average_end": os.getloadavg()}, indent=1))
    elif "--parity-only" not in sys.argv:
        result = ablation()
        print(json.dumps({"load_average_end": os.getloadavg(), "value_and_grad_S_b32_224": result}, indent=1))
