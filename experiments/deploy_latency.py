"""Inference latency of the exported SwiftFormer beside JAX and PyTorch, in one process on this CPU.

    python experiments/deploy_latency.py [--variants XS,S,L1,L3] [--batches 1,32] [--tag deploy]

Per variant: the Hugging Face PyTorch SwiftFormer (random weights, version-2 attention) is the
source; its weights are converted (`convert.from_torch`) and exported with
`python -m swiftformer_jax.export`'s code to ONNX and LiteRT, one fixed-batch file per batch size,
so the runtimes compute the same function (their logits are compared and recorded); LiteRT also
with `--quantize int8`, calibrated on seeded random images (with random weights its error says
nothing of a trained network's: `quantized_agreement.py` measures that). Then JAX (jit, the
default implementation), onnxruntime (CPU provider), LiteRT float32 and int8 (the ai-edge-litert
interpreter with its default XNNPACK delegate), PyTorch eager and `torch.compile` are timed
interleaved, call by call (`benchmark.time_interleaved`), each with every core of the machine;
at batch 1 also back to back, with no pause (`back_to_back_latency`). Writes
`experiments/results/<tag>.{json,md,png}`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # process settings before JAX or PyTorch start
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from swiftformer_jax import xla_flags

    xla_flags.apply()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import torch_reference_model as trm  # noqa: E402

from swiftformer_jax import checkpoint, convert, export  # noqa: E402
from swiftformer_jax.model import VARIANTS, ModelSpec  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RUNTIMES = ("jax", "onnxruntime", "litert", "litert-int8", "torch-eager", "torch-compile")
CALIBRATION_IMAGES = 16  # seeded random images: the weights are random too, so only the speed is meaningful
REPS = {1: 30, 32: 8}  # timed rounds per batch size (others: 8)
BACK_TO_BACK_ROUNDS, BACK_TO_BACK_CALLS = 3, 10  # batch 1 with no pause: rounds of this many calls per runtime


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of XS, S, L1, L3")
    parser.add_argument("--batches", default="1,32", help="comma list of batch sizes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=0, help="timed rounds (default: 30 at batch 1, 8 otherwise)")
    parser.add_argument("--tag", default="deploy")
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    args.variants = [v.strip().upper() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be a comma list of positive integers, got {args.batches!r}")
    if min(args.batches) < 1:
        parser.error("--batches must be positive")
    return args


def runtime_calls(variant: str, batch: int, size: int, scratch: pathlib.Path, threads: int) -> tuple[dict, dict]:
    """{runtime: a call running one batch}, and {runtime: facts (file size, logits' error vs JAX)}."""
    import torch

    torch_model = trm.build(variant).eval()
    variables = convert.from_torch(torch_model.hf.state_dict())
    spec = ModelSpec.named(variant)
    weights = scratch / f"{variant}-{batch}"
    checkpoint.save_weights(weights, variables, spec)
    images = np.random.RandomState(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    facts: dict = {name: {"threads": threads} for name in RUNTIMES}

    jitted = jax.jit(lambda x: spec.build().apply(variables, x))
    reference = np.asarray(jitted(images))
    calls = {"jax": lambda: jitted(images).block_until_ready()}
    outputs = {"jax": reference}
    facts["jax"]["threads"] = f"XLA:CPU's pool ({os.cpu_count()} cores)"
    calibration = scratch / f"calibration-{size}.npy"
    np.save(calibration, np.random.RandomState(1).standard_normal((max(CALIBRATION_IMAGES, batch), size, size, 3))
            .astype(np.float32))
    for runtime, fmt, quantize in (("onnxruntime", "onnx", None), ("litert", "tflite", None),
                                   ("litert-int8", "tflite", "int8")):
        report = export.export(weights, fmt, scratch / f"{variant}-{batch}-{runtime}.{fmt}", batch=batch,
                               image_size=(size, size), quantize=quantize,
                               representative=calibration if quantize else None)
        facts[runtime]["file_mib"] = report["bytes"] / 2**20
        run = export.runner(report["file"], fmt, threads=threads)
        outputs[runtime] = run(images)
        calls[runtime] = lambda run=run: run(images)

    torch.set_num_threads(threads)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    model = torch_model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, dynamic=False)
    for runtime, fn in (("torch-eager", model), ("torch-compile", compiled)):
        with torch.inference_mode():
            outputs[runtime] = fn(x).numpy()

        def call(fn=fn):
            with torch.inference_mode():
                fn(x)

        calls[runtime] = call
    scale = float(np.abs(reference).max())
    for runtime, out in outputs.items():
        facts[runtime]["max_abs_error_vs_jax"] = float(np.abs(out - reference).max())
        facts[runtime]["logit_scale"] = scale
    return calls, facts


def run(args) -> dict:
    threads = len(os.sched_getaffinity(0))
    results = {"machine": benchmark.machine_info(), "load_average_start": benchmark.load_average(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": "python experiments/deploy_latency.py " + " ".join(sys.argv[1:]),
               "versions": _versions(), "image_size": args.image_size, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="swiftformer-deploy-") as scratch:
        for variant in args.variants:
            per_batch = {}
            for batch in args.batches:
                print(f"{variant} batch {batch}: exporting and compiling", flush=True)
                calls, facts = runtime_calls(variant, batch, args.image_size, pathlib.Path(scratch), threads)
                reps = args.reps or REPS.get(batch, 8)
                timed = benchmark.time_interleaved(calls, reps, args.warmup)
                back_to_back = back_to_back_latency(calls) if batch == 1 else {}
                for name, stats in timed.items():
                    stats.update(facts[name], images_per_s=batch / stats["median_s"])
                    if name in back_to_back:
                        stats["back_to_back_median_s"] = back_to_back[name]
                per_batch[str(batch)] = timed
                print("  " + ", ".join(f"{n} {1e3 * s['median_s']:.1f} ms" for n, s in timed.items()), flush=True)
                if back_to_back:
                    print("  back to back: " + ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in back_to_back.items()),
                          flush=True)
            results["variants"][variant] = per_batch
    results["load_average_end"] = benchmark.load_average()
    return results


def back_to_back_latency(calls: dict, rounds: int = BACK_TO_BACK_ROUNDS,
                         per_round: int = BACK_TO_BACK_CALLS) -> dict[str, float]:
    """Median seconds per call when each runtime is called back to back with no pause, as a server
    under steady load is; the runtimes take turns round by round. The interleaved timing pauses and
    switches runtime before every call, which costs some runtimes their warm threads."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()  # the first call after another runtime's is not counted
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("jax", "flax", "jax2onnx", "onnx", "onnxruntime", "ai-edge-litert",
                                                "tensorflow-cpu", "torch", "transformers")}


def markdown(results: dict) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        "# Deployment latency: exported SwiftFormer beside JAX and PyTorch", "",
        f"Produced by `{results['command'].strip()}` on {results['date']}: {m['cpu']}, {m['usable_cores']} cores, "
        f"{m['memory_gib']} GiB, {m['platform']}; {versions}. Load average {results['load_average_start']} at the "
        f"start, {results['load_average_end']} at the end. {results['image_size']} px, float32 (litert-int8: "
        "int8 weights and activations, calibrated on random images), random weights (the same in every "
        "runtime). Median of interleaved calls (min-max in the JSON); every runtime uses every core; batch 1 is "
        "also timed back to back, with no pause (`back_to_back_latency`). Error: the largest |logit difference| "
        "from JAX, against the largest |logit|.", "",
        "| variant | runtime | batch 1 (ms) | batch 1, back to back (ms) | batch 32 (img/s) | file (MiB) "
        "| max error / logit scale |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for variant, per_batch in results["variants"].items():
        for runtime in RUNTIMES:
            one = per_batch.get("1", {}).get(runtime)
            many = per_batch.get("32", {}).get(runtime)
            any_ = one or many
            size = f"{any_['file_mib']:.1f}" if any_ and "file_mib" in any_ else "-"
            error = f"{any_['max_abs_error_vs_jax']:.2g} / {any_['logit_scale']:.2g}" if any_ else "-"
            back = f"{1e3 * one['back_to_back_median_s']:.1f}" if one and "back_to_back_median_s" in one else "-"
            lines.append(f"| SwiftFormer-{variant} | {runtime} | {1e3 * one['median_s']:.1f} | {back} |" if one else
                         f"| SwiftFormer-{variant} | {runtime} | - | - |")
            lines[-1] += f" {many['images_per_s']:.1f} | {size} | {error} |" if many else f" - | {size} | {error} |"
    first = next(iter(next(iter(results["variants"].values())).values()))
    lines += ["", "Threads: " + "; ".join(f"{runtime} {first[runtime]['threads']}" for runtime in RUNTIMES), ""]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v, r in results["variants"].items() if "1" in r]
    if not variants:
        return
    m = results["machine"]
    panels = [("median_s", "batch 1, interleaved")]
    if all("back_to_back_median_s" in results["variants"][v]["1"][r] for v in variants for r in RUNTIMES):
        panels.append(("back_to_back_median_s", "batch 1, back to back"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    width = 0.8 / len(RUNTIMES)
    for ax, (key, title) in zip(axes[0], panels):
        for i, runtime in enumerate(RUNTIMES):
            ms = [1e3 * results["variants"][v]["1"][runtime][key] for v in variants]
            ax.bar(np.arange(len(variants)) + i * width, ms, width, label=runtime)
        ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2)
        ax.set_xticklabels([f"SwiftFormer-{v}" for v in variants])
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{title}: {m['cpu']}, {m['usable_cores']} cores, {results['image_size']} px, "
                     "float32 (litert-int8: int8)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from swiftformer_jax import logs

    logs.setup()
    results = run(args)
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
    (out / f"{args.tag}.md").write_text(markdown(results))
    plot(results, out / f"{args.tag}.png")
    print(f"wrote {out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
