"""The paper's model table from our code: parameters and GMACs at 224 px for each variant.

Run: python experiments/model_table.py [--image-size 224] [--output experiments/results/model_table.md]

How MACs are counted (the convention of fvcore/thop-style counters the paper's numbers come from):
- Every convolution and linear layer costs `kernel.size` multiply-accumulates per output position of
  that layer (a 3x3 conv C->C' per pixel: 9*C*C'; a depthwise 3x3 per pixel: 9*C; a linear D->D' per
  token: D*D'). Output positions are read from the model itself (Flax `capture_intermediates` under
  `jax.eval_shape`, no compilation), so the count follows the code, not a copy of the architecture.
- The attention's linear layers live inside the pure op, so each attention adds, per token, 4*D*D
  (to_query, to_key, Proj, final) + D (q @ w_g) + D (pooling the global query).
- Not counted: batch norm, activations, normalisations, residual adds, elementwise products.
Next to it, XLA's own cost analysis of the compiled eval forward (all floating-point operations,
elementwise ones included) divided by 2, as a cross-check that counts what XLA actually runs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from swiftformer_jax import VARIANTS, create_model

# Shaker et al. 2023, Table 2 (ImageNet-1K, 224 px).
PAPER = {
    "XS": dict(params_m=3.5, gmacs=0.6, top1=75.7),
    "S": dict(params_m=6.1, gmacs=1.0, top1=78.5),
    "L1": dict(params_m=12.1, gmacs=1.6, top1=80.9),
    "L3": dict(params_m=28.5, gmacs=4.0, top1=83.0),
}


def count_macs(model, variables, image_size: int) -> int:
    """Multiply-accumulates of one eval forward pass on one image (see the module docstring)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        variables, images,
    )
    outputs = flatten_dict(state["intermediates"])
    params = flatten_dict(variables["params"])
    macs = 0
    for path, leaf in params.items():
        module = path[:-1]
        if path[-1] == "kernel" and "attn" not in module:  # attention linears: counted with w_g
            (out,) = outputs[module + ("__call__",)]
            macs += math.prod(out.shape[:-1]) * leaf.size
        elif path[-1] == "w_g":
            (out,) = outputs[module + ("__call__",)]  # the attention module's output [1, N, D]
            _, tokens, dim = out.shape
            macs += tokens * (4 * dim * dim + dim + dim)
    return macs


def xla_flops(model, variables, image_size: int) -> float | None:
    images = jnp.zeros((1, image_size, image_size, 3))
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX returned one dict per device
        analysis = analysis[0]
    return analysis.get("flops") if analysis else None


def machine() -> str:
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"jax {jax.__version__} on {jax.devices()[0].platform}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "model_table.md"))
    parser.add_argument("--no-xla", action="store_true", help="skip compiling for XLA's cost analysis")
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error(f"--image-size must be positive, got {args.image_size}")

    rows = []
    for name in VARIANTS:
        model = create_model(name)
        variables = jax.eval_shape(
            lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
        )
        params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
        macs = count_macs(model, variables, args.image_size)
        flops = None if args.no_xla else xla_flops(
            model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables), args.image_size)
        rows.append((name, params, macs, flops))
        print(f"{name}: {params:,} parameters, {macs / 1e9:.3f} GMACs", flush=True)

    lines = [
        f"# SwiftFormer model table ({args.image_size} px, 1000 classes, distillation head)",
        "",
        f"Produced by `python experiments/model_table.py --image-size {args.image_size}` on {machine()}.",
        "MACs: conv and linear multiply-accumulates plus the attention's token products (see the",
        "script's docstring); XLA: the compiled forward's floating-point operations / 2, elementwise included.",
        "",
        "| variant | parameters | paper params (M) | GMACs (ours) | paper GMACs | XLA GFLOPs / 2 | paper top-1 (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, params, macs, flops in rows:
        paper = PAPER[name]
        xla = "-" if flops is None else f"{flops / 2e9:.3f}"
        lines.append(f"| {name} | {params:,} | {paper['params_m']} | {macs / 1e9:.3f} | {paper['gmacs']} "
                     f"| {xla} | {paper['top1']} |")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(table)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
