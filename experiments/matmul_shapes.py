"""The train step's 1x1-conv matmuls alone: JAX (XLA:CPU, Eigen) against PyTorch (oneDNN), same shapes.

Run:  python experiments/matmul_shapes.py [--variant S] [--batch 32] [--reps 7] [--dtype bfloat16]

For every stage of the variant, the two 1x1 convs of each block (C -> 4C and 4C -> C over all
B*H*W pixels), each as the three products a train step computes: forward `x @ W`, input gradient
`dy @ W^T` and kernel gradient `x^T @ dy`, in `--dtype` (float32, or bfloat16 operands and
result as a bfloat16 train step has them). Each product is timed alone (jitted for JAX), the two
frameworks alternating, min over `--reps`. The total weights each stage by its block count:
the matmul time of one train step's blocks in each framework, which is what PERF_NOTES.md compares
with the whole step. Stems, downsampling convs and the attention's D x D products are left out.
"""

from __future__ import annotations

import script_setup  # experiments/ is sys.path[0] when run as a script; the tests put it there

script_setup.prepare(__name__)  # first: XLA settings, before jax or torch start

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import benchmark  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from swiftformer_jax.model import VARIANTS  # noqa: E402

PATCH_SIZE = 4  # the stem divides the image by 4; each later stage by 2


def products(pixels: int, c_in: int, c_out: int):
    """(name, lhs shape, rhs shape, jax fn, torch fn) for forward, input and kernel gradients."""
    import torch

    return [
        ("forward x@W", (pixels, c_in), (c_in, c_out), lambda a, b: a @ b, lambda a, b: a @ b),
        ("input grad dy@W^T", (pixels, c_out), (c_in, c_out), lambda a, b: a @ b.T, lambda a, b: a @ b.T),
        ("kernel grad x^T@dy", (pixels, c_in), (pixels, c_out),
         lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ()))), lambda a, b: torch.mm(a.T, b)),
    ]


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_model_arguments(parser)
    parser.add_argument("--reps", type=benchmark.positive_int, default=7)
    benchmark.add_dtype_argument(parser)
    args = parser.parse_args(argv)
    import torch

    jax_dtype, torch_dtype = (jnp.bfloat16, torch.bfloat16) if args.dtype == "bfloat16" else (jnp.float32, torch.float32)

    spec = VARIANTS[args.variant]
    rng = np.random.default_rng(0)
    rows, totals = [], {"jax": 0.0, "torch": 0.0}
    side = args.image_size // PATCH_SIZE
    for stage, (depth, width) in enumerate(zip(spec.depths, spec.widths)):
        pixels = args.batch * side * side
        for c_in, c_out in ((width, 4 * width), (4 * width, width)):
            for name, lhs_shape, rhs_shape, jax_fn, torch_fn in products(pixels, c_in, c_out):
                lhs = rng.standard_normal(lhs_shape, dtype=np.float32)
                rhs = rng.standard_normal(rhs_shape, dtype=np.float32)
                jax_args = (jnp.asarray(lhs, jax_dtype), jnp.asarray(rhs, jax_dtype))
                compiled = jax.jit(jax_fn).lower(*jax_args).compile()
                torch_args = (torch.from_numpy(lhs).to(torch_dtype), torch.from_numpy(rhs).to(torch_dtype))
                run_jax = lambda: compiled(*jax_args).block_until_ready()  # noqa: E731
                run_torch = lambda: torch_fn(*torch_args)  # noqa: E731
                run_jax(), run_torch()
                jax_s, torch_s = float("inf"), float("inf")
                for _ in range(2):  # alternate the frameworks
                    jax_s = min(jax_s, _best(run_jax, args.reps))
                    torch_s = min(torch_s, _best(run_torch, args.reps))
                totals["jax"] += depth * jax_s
                totals["torch"] += depth * torch_s
                rows.append((stage, f"[{pixels}, {c_in}] -> {c_out}", name, jax_s, torch_s, 2 * pixels * c_in * c_out))
        side //= 2

    print(f"SwiftFormer-{args.variant}, batch {args.batch}, {args.image_size} px, {args.dtype}; jax {jax.__version__} "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads); load {os.getloadavg()[0]:.2f}\n")
    print("| stage | 1x1 conv | product | JAX ms | JAX GFLOP/s | torch ms | torch GFLOP/s |\n|---|---|---|---|---|---|---|")
    for stage, conv, name, jax_s, torch_s, flops in rows:
        print(f"| {stage} | {conv} | {name} | {1e3 * jax_s:.1f} | {flops / jax_s / 1e9:.0f} | "
              f"{1e3 * torch_s:.1f} | {flops / torch_s / 1e9:.0f} |")
    print(f"\nPer train step (each stage's products times its {spec.depths} blocks): "
          f"JAX {1e3 * totals['jax']:.0f} ms, torch {1e3 * totals['torch']:.0f} ms")
    # The operands' dtypes as the last products were timed with them (the tests read these).
    operand_dtypes = {"jax": str(jax_args[0].dtype), "torch": str(torch_args[0].dtype)}
    return {"rows": rows, "totals_s": totals, "dtype": args.dtype, "operand_dtypes": operand_dtypes}


if __name__ == "__main__":
    main()
