"""Forward + backward of each kind of block alone: JAX against PyTorch (channels_last), same shapes.

Run:  python experiments/compare_blocks.py [--variant S] [--batch 32] [--reps 5]

Where the whole train step is behind, this says which blocks are: the stem, per stage the first
ConvEncoder, the SwiftFormerEncoder and the downsampling Embedding, each in train mode (batch
statistics), differentiated with respect to its parameters and its input (the stem: parameters
only, as in a train step), against a fixed random cotangent. JAX is jitted; PyTorch is the Hugging
Face module of the benchmark's reference model, eager, channels_last (what `benchmark.py` picks for
PyTorch on this CPU). The two frameworks alternate; each figure is the min over `--reps`. The
weighted total counts each block as often as the variant has it; it leaves out the head, the loss
and the optimizer. Two more rows time the whole model: the train-mode forward with the loss, and
forward + backward (no optimizer step). PERF_NOTES.md (sessions 4 and 5) quotes the output.

`--stages` adds one program per stage (its downsampling embedding and all its blocks, in both
frameworks) and their total. Why: a block timed alone pays each framework's per-call cost once per
block, and PyTorch's is the larger (its sum of blocks comes out above its whole model), so the sum
of blocks overstates PyTorch's whole. The stem and the stage programs pay it 5 times, not 25 (S),
and show how much JAX's whole program costs beyond its parts (PERF_NOTES.md, session 9).
"""

from __future__ import annotations

import script_setup  # experiments/ is sys.path[0] when run as a script; the tests put it there

script_setup.prepare(__name__)  # first: XLA settings, before jax or torch start

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import benchmark  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from swiftformer_jax import layers, losses  # noqa: E402
from swiftformer_jax.model import VARIANTS  # noqa: E402


def blocks(variant: str, batch: int, image_size: int, torch_model):
    """(name, count, jax module, torch module, input shape NHWC, input needs a gradient)."""
    spec = VARIANTS[variant]
    network = torch_model.hf.swiftformer.encoder.network
    side = _halved(_halved(image_size))  # the stem's two stride-2 convs
    rows = [("stem", 1, layers.Stem(spec.widths[0]), torch_model.hf.swiftformer.patch_embed,
             (batch, image_size, image_size, 3), False)]
    for stage, (depth, width) in enumerate(zip(spec.depths, spec.widths)):
        shape = (batch, side, side, width)
        torch_stage = network[2 * stage].blocks
        if depth > 1:
            rows.append((f"stage {stage} ConvEncoder", depth - 1, layers.ConvEncoder(4 * width),
                         torch_stage[0], shape, True))
        rows.append((f"stage {stage} SwiftFormerEncoder", 1, layers.SwiftFormerEncoder(),
                     torch_stage[-1], shape, True))
        if stage + 1 < len(spec.depths):
            rows.append((f"embedding {stage} -> {stage + 1}", 1, layers.Embedding(spec.widths[stage + 1]),
                         network[2 * stage + 1], shape, True))
            side = _halved(side)
    return rows


class EmbeddedStage(nn.Module):
    """A stage as in `SwiftFormer`: the downsampling Embedding (when `embed`), then its blocks."""

    width: int
    depth: int
    embed: bool

    @nn.compact
    def __call__(self, x, train: bool):
        if self.embed:
            x = layers.Embedding(self.width, name="embedding")(x, train)
        return layers.Stage(depth=self.depth, rates=(0.0,) * self.depth, mlp_ratio=4, attention_version=2,
                            drop_rate=0.0, layer_scale_init=1e-5, bn_group_size=None, dtype=jnp.float32,
                            name="stage")(x, train)


def stages(variant: str, batch: int, image_size: int, torch_model):
    """(name, jax module, torch module, input shape NHWC): each stage with the embedding before it."""
    import torch

    spec = VARIANTS[variant]
    network = torch_model.hf.swiftformer.encoder.network
    side, width = _halved(_halved(image_size)), spec.widths[0]
    rows = []
    for stage, (depth, stage_width) in enumerate(zip(spec.depths, spec.widths)):
        shape = (batch, side, side, width)
        if stage == 0:
            rows.append((f"stage program: stage 0 ({depth} blocks)", EmbeddedStage(stage_width, depth, False),
                         network[0], shape))
        else:
            rows.append((f"stage program: embedding {stage - 1} -> {stage} + stage {stage} ({depth} blocks)",
                         EmbeddedStage(stage_width, depth, True),
                         torch.nn.Sequential(network[2 * stage - 1], network[2 * stage]), shape))
            side = _halved(side)
        width = stage_width
    return rows


def _halved(side: int) -> int:
    """The output side of a 3x3, stride-2, padding-1 convolution."""
    return (side - 1) // 2 + 1


def _nchw(torch, array: np.ndarray):
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def block_pair(jax_module, torch_module, shape, input_grad: bool, seed: int):
    """(jax fn, torch fn), each one forward + backward of the block in train mode."""
    import torch

    rng = np.random.RandomState(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    variables = jax_module.init(jax.random.PRNGKey(seed), jnp.asarray(x), train=False)
    out_shape = jax.eval_shape(lambda v, x: jax_module.apply(v, x, train=False), variables, jnp.asarray(x)).shape
    cotangent = rng.standard_normal(out_shape).astype(np.float32)

    def loss(params, batch_stats, x, ct):
        y, _ = jax_module.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(y * ct)

    grad = jax.jit(jax.grad(loss, argnums=(0, 2) if input_grad else 0))
    jx, jct = jnp.asarray(x), jnp.asarray(cotangent)

    def run_jax():
        jax.block_until_ready(grad(variables["params"], variables["batch_stats"], jx, jct))

    torch_module.train()
    tx = _nchw(torch, x).requires_grad_(input_grad)
    tct = _nchw(torch, cotangent)

    def run_torch():
        for p in torch_module.parameters():
            p.grad = None
        tx.grad = None
        out = torch_module(tx)
        (out[0] if isinstance(out, tuple) else out).backward(tct)

    return run_jax, run_torch


def whole_model_pairs(variant: str, batch: int, image_size: int, torch_model):
    """{name: (jax fn, torch fn)}: the train-mode forward with the loss, and forward + backward."""
    import torch
    import torch_reference_model as trm

    case = benchmark.JaxCase("jax-f32", variant, "float32", image_size)
    images, labels = benchmark._images(batch, image_size), benchmark._labels(batch)
    targets = losses.one_hot_smoothed(jnp.asarray(labels), 1000, benchmark.LABEL_SMOOTHING)
    jimages = jnp.asarray(images)

    def loss(params, batch_stats, x, y):
        (cls_logits, dist_logits), _ = case.model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return 0.5 * (losses.cross_entropy(cls_logits, y) + losses.cross_entropy(dist_logits, y))

    forward, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    params, batch_stats = case.variables["params"], case.variables["batch_stats"]
    model = torch_model.to(memory_format=torch.channels_last).train()
    tx, ty = _nchw(torch, images), torch.from_numpy(labels).long()

    def torch_forward():
        with torch.no_grad():
            trm.loss_fn(model(tx), ty)

    def torch_grad():
        for p in model.parameters():
            p.grad = None
        trm.loss_fn(model(tx), ty).backward()

    return {
        "whole model: forward + loss (train mode)": (
            lambda: jax.block_until_ready(forward(params, batch_stats, jimages, targets)), torch_forward),
        "whole model: forward + backward": (
            lambda: jax.block_until_ready(grad(params, batch_stats, jimages, targets)), torch_grad),
    }


def main(argv=None) -> dict:
    import torch
    import torch_reference_model as trm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_model_arguments(parser)
    parser.add_argument("--reps", type=benchmark.positive_int, default=5)
    parser.add_argument("--skip-whole-model", action="store_true", help="only the blocks")
    parser.add_argument("--stages", action="store_true",
                        help="also one program per stage (embedding + blocks) in both frameworks, and their total")
    args = parser.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch_model = trm.build(args.variant).to(memory_format=torch.channels_last)

    rows, totals = [], {"jax": 0.0, "torch": 0.0}
    for seed, (name, count, jax_module, torch_module, shape, input_grad) in enumerate(
            blocks(args.variant, args.batch, args.image_size, torch_model)):
        run_jax, run_torch = block_pair(jax_module, torch_module, shape, input_grad, seed)
        jax_s, torch_s = _timed_pair(run_jax, run_torch, args.reps)
        rows.append((name, count, jax_s, torch_s))
        totals["jax"] += count * jax_s
        totals["torch"] += count * torch_s
    rows.append(("weighted total of the blocks", 1, totals["jax"], totals["torch"]))
    extra = {}
    if args.stages:
        stem = rows[0]
        stage_totals = {"jax": stem[2], "torch": stem[3]}
        for seed, (name, jax_module, torch_module, shape) in enumerate(
                stages(args.variant, args.batch, args.image_size, torch_model)):
            jax_s, torch_s = _timed_pair(*block_pair(jax_module, torch_module, shape, True, 100 + seed), args.reps)
            rows.append((name, 1, jax_s, torch_s))
            stage_totals["jax"] += jax_s
            stage_totals["torch"] += torch_s
        rows.append(("total of the stem and the stage programs", 1, stage_totals["jax"], stage_totals["torch"]))
        extra["stage_totals_s"] = stage_totals
    if not args.skip_whole_model:
        for name, (run_jax, run_torch) in whole_model_pairs(
                args.variant, args.batch, args.image_size, torch_model).items():
            rows.append((name, 1, *_timed_pair(run_jax, run_torch, args.reps)))

    print(f"SwiftFormer-{args.variant}, batch {args.batch}, {args.image_size} px, float32, train mode, "
          f"forward + backward; min of {args.reps}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, channels_last); load {os.getloadavg()[0]:.2f}\n")
    print("| block | count | JAX ms | PyTorch ms | PyTorch / JAX |")
    print("|---|---|---|---|---|")
    for name, count, jax_s, torch_s in rows:
        print(f"| {name} | {count} | {jax_s * 1e3:.1f} | {torch_s * 1e3:.1f} | {torch_s / jax_s:.2f} |")
    return {"rows": rows, "totals_s": totals, **extra}


def _timed_pair(run_jax, run_torch, reps: int) -> tuple[float, float]:
    """Warm both, then alternate them `reps` times; the min of each."""
    for fn in (run_jax, run_torch):
        fn()
    best = {run_jax: float("inf"), run_torch: float("inf")}
    for _ in range(reps):
        for fn in best:
            start = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - start)
    return best[run_jax], best[run_torch]


if __name__ == "__main__":
    main()
