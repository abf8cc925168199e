"""How the paper's four attention mechanisms scale with the token count (time and memory per call).

Run:  python experiments/attention_scaling.py [--widths 64,128] [--tokens 196,784,...,65536]
Tiny: python experiments/attention_scaling.py --widths 16 --tokens 64,256,1024 --fit-from 64 --tag smoke \
          --output-dir /tmp/out

The four pure functions of `swiftformer_jax.ops` (softmax self-attention, transposed attention,
MobileViT-v2 separable attention, SwiftFormer's efficient additive attention), one image (batch 1)
of N tokens of width D, float32, each jitted and compiled for its shape:
- time per call, forward and forward+backward (gradient of sum(out**2) w.r.t. params and x):
  median with min and max over repeated calls (repeated until `--min-seconds` or `--max-reps`);
- memory per call from XLA's compiled memory analysis: temp + output bytes (deterministic; the
  parameters and input, the same for every mechanism, are not counted);
- the growth exponent per mechanism and mode: least squares of log(time) and log(memory) against
  log(N) over the sizes >= `--fit-from` (the two largest measured where fewer qualify).
A size is skipped (and listed as skipped, with why) when its compiled program needs more than
`--max-gib` of memory (checked first: compiling allocates nothing), or when the time extrapolated
from the sizes measured before it (their local exponent, at least 1) exceeds `--max-call-seconds`. Softmax attention at 65,536 tokens needs a 65k x 65k float32 matrix
(16 GiB) per intermediate: it is skipped by the memory rule on a small machine.

Run as a program, it first applies the project's XLA:CPU flags and host allocator
(`swiftformer_jax.xla_flags.apply`, before JAX starts its backend; `--keep-ynn-fusion` skips it
to time XLA's default YNN fusions); importing it, as the tests do, changes nothing.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    if "--keep-ynn-fusion" not in sys.argv:  # read once, when JAX starts its backend
        from swiftformer_jax import xla_flags

        xla_flags.apply()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from swiftformer_jax import ops  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

MECHANISMS = {
    "softmax_self_attention": (ops.softmax_self_attention, ops.init_softmax_self_attention_params),
    "transposed_attention": (ops.transposed_attention, ops.init_transposed_attention_params),
    "separable_attention": (ops.separable_attention, ops.init_separable_attention_params),
    "efficient_additive_attention": (ops.efficient_additive_attention, ops.init_efficient_additive_params),
}
MODES = ("forward", "forward_backward")
DEFAULT_TOKENS = (196, 784, 3136, 12544, 50176, 65536)  # 14^2 ... 224^2, and 2^16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="64,128", help="comma list of token widths D")
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="comma list of token counts N")
    p.add_argument("--mechanisms", default="all", help=f"comma list of {', '.join(MECHANISMS)} or 'all'")
    p.add_argument("--fit-from", type=int, default=3136, help="fit the exponent over sizes N >= this")
    p.add_argument("--max-gib", type=float, default=6.0, help="skip programs whose XLA temp+output exceed this")
    p.add_argument("--max-call-seconds", type=float, default=8.0, help="skip sizes predicted slower than this")
    p.add_argument("--min-seconds", type=float, default=0.5, help="time each point for at least this long")
    p.add_argument("--max-reps", type=int, default=15)
    p.add_argument("--keep-ynn-fusion", action="store_true",
                   help="keep XLA:CPU's default YNNPACK fusions (default: reduce fusions only, see swiftformer_jax/xla_flags.py)")
    p.add_argument("--output-dir", default=str(HERE / "results"))
    p.add_argument("--from-json", default="", help="rebuild md/png (and refit) from a saved JSON; measure nothing")
    p.add_argument("--tag", default="", help="results go to attention_scaling[_<tag>].{json,md,png}")
    args = p.parse_args(argv)
    args.widths = _ints(args.widths, "--widths")
    args.tokens = tuple(sorted(_ints(args.tokens, "--tokens")))
    if args.mechanisms.strip().lower() == "all":
        args.mechanisms = tuple(MECHANISMS)
    else:
        args.mechanisms = tuple(m.strip() for m in args.mechanisms.split(",") if m.strip())
        bad = [m for m in args.mechanisms if m not in MECHANISMS]
        if bad or not args.mechanisms:
            raise SystemExit(f"unknown mechanism(s) {bad or args.mechanisms}; valid: {', '.join(MECHANISMS)} or 'all'")
    if args.max_reps < 1 or args.min_seconds < 0 or args.max_gib <= 0 or args.max_call_seconds <= 0:
        raise SystemExit("--max-reps must be >= 1; --min-seconds >= 0; --max-gib and --max-call-seconds > 0")
    return args


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise SystemExit(f"{flag} takes a comma list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} takes a comma list of positive integers, got {text!r}")
    return values


def build(name: str, mode: str, width: int, tokens: int):
    """(compiled program, its arguments) for one mechanism, mode and shape."""
    fn, init = MECHANISMS[name]
    params = init(jax.random.PRNGKey(0), width)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, tokens, width), jnp.float32)
    if mode == "forward":
        program = jax.jit(fn)
    else:
        program = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.square(fn(p, x))), argnums=(0, 1)))
    return program.lower(params, x).compile(), (params, x)


def memory_bytes(compiled) -> int:
    """XLA's temp + output bytes of a compiled program: what one call allocates."""
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def time_calls(compiled, args, min_seconds: float, max_reps: int) -> dict:
    """Median, min, max seconds per call after one warm-up call."""
    jax.block_until_ready(compiled(*args))
    times, total = [], 0.0
    while len(times) < max_reps and (len(times) < 3 or total < min_seconds):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
        total += times[-1]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": len(times)}


def fit_exponent(tokens, values) -> float | None:
    """Slope of log(value) against log(tokens) by least squares (None with fewer than 2 points)."""
    if len(tokens) < 2:
        return None
    slope, _ = np.polyfit(np.log(np.asarray(tokens, float)), np.log(np.asarray(values, float)), 1)
    return float(slope)


def run(args) -> dict:
    rows, skipped = [], []
    for width in args.widths:
        for name in args.mechanisms:
            for mode in MODES:
                done: list[tuple[int, float]] = []  # (tokens, seconds) measured so far
                for tokens in args.tokens:
                    compiled, call_args = build(name, mode, width, tokens)
                    mem = memory_bytes(compiled)
                    if mem > args.max_gib * 2**30:
                        skipped.append(_skip(name, mode, width, tokens,
                                             f"needs {mem / 2**30:.1f} GiB (XLA temp+output) > --max-gib {args.max_gib}"))
                        continue
                    predicted, exponent = predict_seconds(done, tokens)
                    if predicted > args.max_call_seconds:
                        skipped.append(_skip(name, mode, width, tokens,
                                             f"predicted {predicted:.1f} s per call (exponent {exponent:.2f} from the "
                                             f"last sizes) > --max-call-seconds {args.max_call_seconds}"))
                        continue
                    stats = time_calls(compiled, call_args, args.min_seconds, args.max_reps)
                    rows.append({"mechanism": name, "mode": mode, "width": width, "tokens": tokens,
                                 "memory_bytes": mem, **stats})
                    done.append((tokens, stats["median_s"]))
                    print(f"D={width} {name} {mode} N={tokens}: {1e3 * stats['median_s']:.2f} ms, "
                          f"{mem / 2**20:.1f} MiB", flush=True)
                    del compiled, call_args
    return {"rows": rows, "skipped": skipped, "fits": fits(rows, args.fit_from)}


def predict_seconds(done: list[tuple[int, float]], tokens: int) -> tuple[float, float]:
    """Time per call predicted for `tokens` from the sizes measured so far: the local exponent of the
    last two (at least 1), or 2 with only one; (0, 2) before any measurement."""
    if not done:
        return 0.0, 2.0
    exponent = 2.0
    if len(done) >= 2:
        (n0, t0), (n1, t1) = done[-2], done[-1]
        exponent = max(1.0, float(np.log(t1 / t0) / np.log(n1 / n0)))
    n_last, t_last = done[-1]
    return t_last * (tokens / n_last) ** exponent, exponent


def _skip(name, mode, width, tokens, why) -> dict:
    print(f"D={width} {name} {mode} N={tokens}: skipped ({why})", flush=True)
    return {"mechanism": name, "mode": mode, "width": width, "tokens": tokens, "why": why}


def fits(rows: list[dict], fit_from: int) -> list[dict]:
    """Fitted time and memory exponents per (mechanism, mode, width) over tokens >= fit_from.

    Where fewer than two such sizes were measured (softmax attention, whose large sizes are
    skipped), the two largest measured sizes are used instead; `fit_tokens` says which.
    """
    out = []
    keys = sorted({(r["mechanism"], r["mode"], r["width"]) for r in rows})
    for name, mode, width in keys:
        mine = sorted((r for r in rows if (r["mechanism"], r["mode"], r["width"]) == (name, mode, width)),
                      key=lambda r: r["tokens"])
        pts = [r for r in mine if r["tokens"] >= fit_from]
        if len(pts) < 2:
            pts = mine[-2:]
        tokens = [r["tokens"] for r in pts]
        out.append({"mechanism": name, "mode": mode, "width": width, "fit_tokens": tokens,
                    "time_exponent": fit_exponent(tokens, [r["median_s"] for r in pts]),
                    "memory_exponent": fit_exponent(tokens, [r["memory_bytes"] for r in pts])})
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Attention mechanisms: time and memory per call against the token count",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores; jax {m['jax']} ({m['backend']}, "
        f"XLA_FLAGS={m.get('xla_flags', '')!r}); "
        f"load average at start {m['load_average_start']}, at end {m['load_average_end']}.",
        "Batch 1, float32, one head. Time: median [min - max] per call of the jitted program. Memory: XLA "
        "compiled memory analysis, temp + output bytes (deterministic). Exponent: least-squares slope of "
        f"log(value) on log(N) over N >= {results['settings']['fit_from']}.",
        "",
        "## Fitted growth exponents",
        "",
        "| mechanism | mode | width | sizes fitted | time exponent | memory exponent |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for f in results["fits"]:
        lines.append(f"| {f['mechanism']} | {f['mode']} | {f['width']} | {', '.join(map(str, f['fit_tokens']))} | "
                     f"{fmt(f['time_exponent'])} | {fmt(f['memory_exponent'])} |")
    lines += ["", "## Measurements", "", "| mechanism | mode | width | tokens | ms per call | MiB |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['mechanism']} | {r['mode']} | {r['width']} | {r['tokens']} | "
                     f"{1e3 * r['median_s']:.2f} [{1e3 * r['min_s']:.2f} - {1e3 * r['max_s']:.2f}] | "
                     f"{r['memory_bytes'] / 2**20:.2f} |")
    if results["skipped"]:
        lines += ["", "## Skipped", "", "| mechanism | mode | width | tokens | why |", "|---|---|---|---|---|"]
        for s in results["skipped"]:
            lines.append(f"| {s['mechanism']} | {s['mode']} | {s['width']} | {s['tokens']} | {s['why']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
    """Log-log time and memory against tokens: one line per mechanism, per width and mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(2, len(MODES), figsize=(12, 9), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for col, mode in enumerate(MODES):
        for row, (key, label) in enumerate((("median_s", "seconds per call"), ("memory_bytes", "bytes (XLA temp+output)"))):
            ax = axes[row][col]
            for i, name in enumerate(MECHANISMS):
                for j, width in enumerate(widths):
                    pts = sorted((r["tokens"], r[key]) for r in rows
                                 if r["mechanism"] == name and r["mode"] == mode and r["width"] == width)
                    if pts:
                        ax.plot(*zip(*pts), styles[j % len(styles)], marker="o", color=f"C{i}",
                                label=f"{name} D={width}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}: {label.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"Attention scaling, batch 1, float32 ({m['cpu']}, {m['usable_cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(load_start) -> dict:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "backend": jax.default_backend(), "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(pathlib.Path(args.from_json).read_text())
        results["fits"] = fits(results["rows"], results["settings"]["fit_from"])
        stem = pathlib.Path(args.from_json).with_suffix("")
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        stem.with_suffix(".md").write_text(markdown(results))
        plot(results, stem.with_suffix(".png"))
        return 0
    load_start = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    results = run(args)
    results["machine"] = machine(load_start)
    results["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    results["wall_seconds"] = time.perf_counter() - start
    out_dir = pathlib.Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ("attention_scaling" + (f"_{args.tag}" if args.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
