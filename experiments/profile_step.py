"""Where the time of one jitted JAX program goes: XLA thunks from a profiler trace, by kind and by op.

Run:  python experiments/profile_step.py [--task train] [--variant S] [--batch 32] [--top 25]
      python experiments/profile_step.py --dump-hlo /tmp/step.hlo   # also write the compiled HLO

Builds the same program `benchmark.py` times (the S train step: forward, cross-entropy on both
heads, backward, AdamW; or the eval forward), runs it `--warmup` times, then traces `--steps` calls
with `jax.profiler` and sums the XLA:CPU thunk events: per kind (the fusion name with its
numbering stripped, e.g. `copy_bitcast_fusion`), and the `--top` single thunks with the source
lines (`op_name` metadata of the compiled HLO) they came from. Thread time counts both XLA worker
threads, so it can exceed the wall time. Matmuls need care: a `dot` thunk only hands the work to
Eigen's thread pool, so its event is short and the matmul runs while no thunk event is open; that
idle time is listed next to the thunk that preceded it. PERF_NOTES.md quotes the output.
"""

from __future__ import annotations

import script_setup  # experiments/ is sys.path[0] when run as a script; the tests put it there

script_setup.prepare(__name__)  # first: XLA settings, before jax or torch start

import argparse  # noqa: E402
import collections  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import benchmark  # noqa: E402
import jax  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("train", "inference"), default="train")
    benchmark.add_model_arguments(parser)
    benchmark.add_dtype_argument(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=benchmark.positive_int, default=2, help="traced calls (the sums are per call)")
    parser.add_argument("--top", type=benchmark.positive_int, default=25, help="how many single thunks to list")
    parser.add_argument("--dump-hlo", type=pathlib.Path, help="write the compiled HLO text here")
    parser.add_argument("--keep-ynn-fusion", action="store_true", help="XLA's default YNN fusions")
    return parser.parse_args(argv)


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its `op_name` metadata (the JAX source op), from compiled HLO text."""
    names = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        names.setdefault(match.group(1), match.group(2))
    return names


def thunk_events(trace_dir: str) -> list[tuple[str, int, int]]:
    """(thunk name, start ns, end ns) for every event in the host trace under trace_dir."""
    files = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        raise RuntimeError(f"no profiler trace was written under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                events.append((event.name, event.start_ns, event.start_ns + event.duration_ns))
    return events


def idle_after(events: list[tuple[str, int, int]], dispatches: list[int]) -> dict[str, float]:
    """Time (ms) when no thunk runs, attributed to the thunk that ended last before it.

    XLA:CPU's dot thunks hand the matmul to Eigen's thread pool and return: their events are
    short and the matmul itself runs in the gap that follows. So gaps after a `dot` are matmul
    time; gaps elsewhere are scheduling overhead. Gaps spanning a dispatch (a time in
    `dispatches`) lie between two calls and are left out.
    """
    edges = sorted([(start, 1, name) for name, start, _ in events] + [(end, -1, name) for name, _, end in events])
    idle: dict[str, float] = collections.defaultdict(float)
    running, last_end, last_name = 0, None, None
    for time_ns, step, name in edges:
        if step == 1 and running == 0 and last_end is not None:
            if not any(last_end <= dispatch <= time_ns for dispatch in dispatches):
                idle[last_name] += (time_ns - last_end) / 1e6
        running += step
        if step == -1 and running == 0:
            last_end, last_name = time_ns, name
    return idle


def kind(name: str) -> str:
    """`copy_bitcast_fusion.12` -> `copy_bitcast_fusion`; `dot.3` -> `dot`."""
    return re.sub(r"(\.\d+)+$", "", name)


def main(argv=None) -> None:
    args = parse_args(argv)
    case = benchmark.JaxCase(f"jax-{args.dtype}", args.variant, args.dtype, args.image_size)
    task = "train" if args.task == "train" else "inference"
    run = case.make(task, args.batch)
    hlo = case.compiled[task].as_text()
    if args.dump_hlo:
        args.dump_hlo.write_text(hlo)
    for _ in range(args.warmup):
        run()
    started = time.perf_counter()
    run()
    untraced = time.perf_counter() - started

    instructions = set(op_names(hlo)) | set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", hlo, re.M))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        started = time.perf_counter()
        for _ in range(args.steps):
            run()
        traced = (time.perf_counter() - started) / args.steps
        jax.profiler.stop_trace()
        all_events = thunk_events(trace_dir)
        events = [event for event in all_events if event[0] in instructions]
        # A call starts when the Python thread dispatches it: gaps across that are between calls.
        dispatches = [start for name, start, _ in all_events if name.startswith("PjitFunction(")]

    per_kind: dict[str, list[float]] = collections.defaultdict(list)
    per_thunk: dict[str, float] = collections.defaultdict(float)
    for name, start, end in events:
        per_kind[kind(name)].append((end - start) / 1e6)
        per_thunk[name] += (end - start) / 1e6
    idle_kind: dict[str, float] = collections.defaultdict(float)
    for name, ms in idle_after(events, dispatches).items():
        idle_kind[kind(name)] += ms / args.steps
        per_thunk[name] += ms
    busy = sum(sum(times) for times in per_kind.values()) / args.steps
    idle = sum(idle_kind.values())
    total = busy + idle
    sources = op_names(hlo)

    print(f"{args.variant} {args.task} batch {args.batch} {args.image_size}px {args.dtype}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax {jax.__version__}; load {os.getloadavg()[0]:.2f}")
    print(f"one call: {untraced * 1e3:.0f} ms untraced, {traced * 1e3:.0f} ms traced; thunk events "
          f"{busy:.0f} ms of thread time ({len(events) // args.steps} thunks), no thunk running "
          f"{idle:.0f} ms (Eigen's matmuls after `dot` thunks, and overhead)\n")
    print("| thunk kind | count | thunk ms | idle ms after | share |\n|---|---|---|---|---|")
    kinds = set(per_kind) | set(idle_kind)
    by_total = {k: sum(per_kind.get(k, [])) / args.steps + idle_kind.get(k, 0.0) for k in kinds}
    for name, ms in sorted(by_total.items(), key=lambda item: -item[1]):
        if ms >= 0.005 * total:
            print(f"| `{name}` | {len(per_kind.get(name, [])) // args.steps} | "
                  f"{sum(per_kind.get(name, [])) / args.steps:.0f} | {idle_kind.get(name, 0.0):.0f} | "
                  f"{100 * ms / total:.0f}% |")
    print("\n| top thunk (with the idle time after it) | ms per call | source op |\n|---|---|---|")
    for name, ms in sorted(per_thunk.items(), key=lambda item: -item[1])[: args.top]:
        print(f"| `{name}` | {ms / args.steps:.1f} | {sources.get(name, '?')[-90:]} |")


if __name__ == "__main__":
    main()
