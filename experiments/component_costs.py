"""What each kind of layer costs a whole train step, in JAX and in PyTorch: knock it out, time the rest.

Run:  python experiments/component_costs.py [--variant S] [--batch 32] [--reps 8] [--torch eager,compile]

Why: a profile of the jitted step attributes time per XLA thunk, but tracing inflates the step by
a third or more and the matmul time lands between thunks (see profile_step.py), and timing a layer
alone (compare_blocks.py) misses what the whole program does differently. Here every program is
the whole train step, untraced: once complete, and once per component with that component
replaced by the identity in both frameworks (same shapes, so the rest of the step is unchanged).
A component's cost is the complete step's time minus the knocked-out step's, paired by round
(the median and quartiles of the per-round differences): what the step would save without it,
interaction with its neighbours included. Differences of ~100 ms against a step of ~2 s need many
rounds on a drifting VM: read the quartiles before the medians.

Compare costs within a framework; quote `benchmark.py` for the frameworks' ratio. Session 7's
runs of this script came out up to 20% more favourable to JAX than `benchmark.py`; in session 8
the two, alternated over six processes, agreed within the machine's process-to-process spread
(PERF_NOTES.md).

Components: `gelu` (every GELU), `batch_norm` (every batch norm in training: statistics,
normalisation, their gradients), `depthwise` (the 3x3 depthwise convs), `attention` (the
efficient additive attention itself; its layer scale and residual stay). JAX: the `ops` function
the layers call is swapped while the step is traced and compiled (the unused parameters stay and
get zero gradients). PyTorch: the HF modules are swapped for `nn.Identity`, their parameters go
(channels_last, float32, the optimizer eager, as in `benchmark.py`). All programs are compiled
first, then timed in interleaved rounds (`benchmark.interleaved_times`, the benchmark's own
timing: the order rotates each round); median and min per program. "rest" is the complete
step's median minus the four costs: matmuls, stem, embeddings, layer scales, residuals, loss and
AdamW.
"""

from __future__ import annotations

import script_setup  # experiments/ is sys.path[0] when run as a script; the tests put it there

script_setup.prepare(__name__)  # first: XLA settings, before jax or torch start

import argparse  # noqa: E402
import copy  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from typing import Callable  # noqa: E402

import benchmark  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from swiftformer_jax import ops  # noqa: E402

COMPONENTS = ("gelu", "batch_norm", "depthwise", "attention")


def _bn_identity(x, scale, bias, epsilon, dtype=None):
    """batch_norm_train's signature and output shapes; returns x and neutral statistics."""
    stats_shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    return x, jnp.zeros(stats_shape, jnp.float32), jnp.ones(stats_shape, jnp.float32)


JAX_IDENTITIES: dict[str, tuple[str, Callable]] = {
    "gelu": ("gelu", lambda x: x),
    "batch_norm": ("batch_norm_train", _bn_identity),
    "depthwise": ("depthwise_conv3x3", lambda x, kernel, bias: x),
    "attention": ("efficient_additive_attention", lambda params, tokens, version=2: tokens),
}


def jax_step(variant: str, batch: int, image_size: int, knockout: str | None):
    """benchmark.JaxCase's train step compiled with `knockout`'s op as the identity; (run, the
    compiled program)."""
    case = benchmark.JaxCase("jax-f32", variant, "float32", image_size)
    if knockout is None:
        run = case.make("train", batch)
    else:
        name, identity = JAX_IDENTITIES[knockout]
        original = getattr(ops, name)
        setattr(ops, name, identity)
        try:
            run = case.make("train", batch)  # traces and compiles now, with the identity in place
        finally:
            setattr(ops, name, original)
    return run, case.compiled["train"]


def _torch_matches(knockout: str, module) -> bool:
    kind = type(module).__name__
    if knockout == "gelu":
        return kind in ("GELU", "GELUActivation")
    if knockout == "batch_norm":
        return kind == "BatchNorm2d"
    if knockout == "depthwise":
        return kind == "Conv2d" and module.groups > 1 and module.groups == module.in_channels
    return kind == "SwiftFormerEfficientAdditiveAttention"


def knock_out_torch(model, knockout: str) -> int:
    """Replace every module of the component with nn.Identity in place; returns how many."""
    import torch

    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if _torch_matches(knockout, child):
                setattr(parent, child_name, torch.nn.Identity())
                replaced += 1
    if not replaced:
        raise RuntimeError(f"no PyTorch module matched component {knockout!r}")
    return replaced


def torch_step(variant: str, batch: int, image_size: int, knockout: str | None, compiled: bool):
    """benchmark.TorchCase's float32 channels_last train step with `knockout`'s modules removed."""
    case = benchmark.TorchCase("torch", variant, "float32", compiled, image_size, "channels_last")
    if knockout is not None:
        case.model = copy.deepcopy(case.model)
        knock_out_torch(case.model, knockout)
    run = case.make("train", batch)
    run()  # torch.compile compiles on the first call
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_model_arguments(parser)
    parser.add_argument("--reps", type=benchmark.positive_int, default=8, help="interleaved timed rounds")
    parser.add_argument("--torch", default="eager", help="comma list of PyTorch modes: eager, compile, or none")
    parser.add_argument("--components", default=",".join(COMPONENTS), help=f"comma list of {COMPONENTS}")
    args = parser.parse_args(argv)
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    modes = [m.strip() for m in args.torch.split(",") if m.strip() and m.strip() != "none"]
    bad = [c for c in components if c not in COMPONENTS] + [m for m in modes if m not in ("eager", "compile")]
    if bad or not components:
        parser.error(f"unknown component or PyTorch mode {bad or args.components!r}; components: "
                     f"{', '.join(COMPONENTS)}; modes: eager, compile, none")

    frameworks = ["jax"] + [f"torch-{m}" for m in modes]
    programs: dict[tuple[str, str], Callable[[], None]] = {}
    for knockout in [None] + components:
        label = knockout or "complete"
        programs[("jax", label)], _ = jax_step(args.variant, args.batch, args.image_size, knockout)
        for mode in modes:
            programs[(f"torch-{mode}", label)] = torch_step(
                args.variant, args.batch, args.image_size, knockout, compiled=mode == "compile")

    times = benchmark.interleaved_times(programs, args.reps, warmup=1)
    median = {key: statistics.median(ts) for key, ts in times.items()}
    # Paired by round: the machine drifts slowly, so a round's complete step and knocked-out step
    # share most of it; the median of those differences is steadier than a difference of medians.
    quartiles = {fw: {c: paired_cost(times[(fw, "complete")], times[(fw, c)]) for c in components}
                 for fw in frameworks}
    cost = {fw: {c: q[1] for c, q in quartiles[fw].items()} for fw in frameworks}
    for fw in frameworks:
        cost[fw]["rest"] = median[(fw, "complete")] - sum(cost[fw].values())

    print(f"{args.variant} train step, batch {args.batch}, {args.image_size} px, float32; {args.reps} interleaved "
          f"rounds; {benchmark.machine_info().get('cpu', '?')}; load {os.getloadavg()[0]:.2f}\n")
    print("| program | " + " | ".join(f"{fw} median (min) ms" for fw in frameworks) + " |")
    print("|---|" + "---|" * len(frameworks))
    for label in ["complete"] + components:
        cells = [f"{1e3 * median[(fw, label)]:.0f} ({1e3 * min(times[(fw, label)]):.0f})" for fw in frameworks]
        print(f"| {'without ' + label if label != 'complete' else 'complete step'} | " + " | ".join(cells) + " |")
    print("\ncost: median over rounds of (complete - without), ms, [quartiles]; rest: complete median - costs")
    print("| component | " + " | ".join(f"{fw}" for fw in frameworks)
          + "".join(f" | {fw} / jax" for fw in frameworks[1:]) + " |")
    print("|---|" + "---|" * (2 * len(frameworks) - 1))
    for c in components + ["rest"]:
        ratios = "".join(f" | {cost[fw][c] / cost['jax'][c]:.2f}" if cost["jax"][c] > 0 else " | -"
                         for fw in frameworks[1:])
        cells = [f"{1e3 * cost[fw][c]:.0f}" + (f" [{1e3 * quartiles[fw][c][0]:.0f}, {1e3 * quartiles[fw][c][2]:.0f}]"
                                              if c != "rest" else "") for fw in frameworks]
        print(f"| {c} | " + " | ".join(cells) + ratios + " |")
    return {"median_s": {f"{fw}/{label}": s for (fw, label), s in median.items()},
            "cost_s": cost,
            "cost_quartiles_s": {fw: {c: (q[0], q[2]) for c, q in qs.items()} for fw, qs in quartiles.items()}}


def paired_cost(complete: list[float], without: list[float]) -> tuple[float, float, float]:
    """Quartiles (lower, median, upper) of the per-round differences complete - without."""
    diffs = [a - b for a, b in zip(complete, without, strict=True)]
    if len(diffs) == 1:
        return diffs[0], diffs[0], diffs[0]
    lower, middle, upper = statistics.quantiles(diffs, n=4, method="inclusive")
    return lower, middle, upper


if __name__ == "__main__":
    main()
