"""Why a batch-1 JAX call is slower after the machine idled, and what pinning XLA's threads does.

Run:  python experiments/idle_latency.py [--variant S] [--pauses 0,0.01,0.03,0.1,0.3] [--calls 30] [--torch]

For each pause, calls the batch-1 inference program `benchmark.py` times `--calls` times, each
after the pause (untimed), and prints the median and min ms per call and the context switches per
call of XLA:CPU's worker threads (`tf_XLAEigen*`, read from /proc: voluntary, and involuntary, i.e.
preempted). Then the same with each worker pinned to a core of its own (`os.sched_setaffinity`),
and unpinned again. `--torch` times PyTorch eager's program the same way, unpinned, and how
long its OpenMP workers keep using CPU after a call returns (what `benchmark.SETTLE_S` must outlast).

What it showed (PERF_NOTES.md, session 11): after ~30 ms or more of idle, the two workers are
preempted ~100 times per call and the call takes ~15 ms longer; pinned, they are not. Linux's load
tracking (a 32 ms half-life) forgets the threads were busy and wakes them onto one core. Pinning is
a finding, not a setting this project makes: it depends on XLA's thread names and on nothing else
running on those cores. Linux only.
"""

from __future__ import annotations

import script_setup  # experiments/ is sys.path[0] when run as a script; the tests put it there

script_setup.prepare(__name__)  # first: XLA settings, before jax or torch start

import argparse  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import benchmark  # noqa: E402

TASKS_DIR = pathlib.Path("/proc/self/task")
XLA_WORKER_PREFIX = "tf_XLAEigen"  # XLA:CPU's intra-op thread pool, as Linux names its threads
SPIN_WINDOWS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]  # s after a PyTorch call returns
SPIN_CALLS = 5


def xla_worker_threads() -> list[int]:
    """Thread ids of XLA:CPU's worker pool in this process (started by its first computation)."""
    return sorted(int(d.name) for d in TASKS_DIR.iterdir() if _comm(d).startswith(XLA_WORKER_PREFIX))


def _comm(task_dir: pathlib.Path) -> str:
    try:
        return (task_dir / "comm").read_text().strip()
    except OSError:  # the thread ended between listing and reading
        return ""


def context_switches(tids: list[int]) -> tuple[int, int]:
    """(voluntary, involuntary) context switches so far, summed over the threads `tids`."""
    voluntary = involuntary = 0
    for tid in tids:
        for line in (TASKS_DIR / str(tid) / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def time_after_pauses(fn: Callable[[], None], pauses: list[float], calls: int, tids: list[int]) -> list[dict]:
    """Per pause: `calls` timed calls, each after an untimed `pause` s; ms and switches per call."""
    rows = []
    for pause in pauses:
        times = []
        before = context_switches(tids)
        for _ in range(calls):
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        after = context_switches(tids)
        rows.append({"pause_s": pause, "median_ms": statistics.median(times), "min_ms": min(times),
                     "voluntary_per_call": (after[0] - before[0]) / calls,
                     "involuntary_per_call": (after[1] - before[1]) / calls})
    return rows


def cpu_ms(tids: list[int]) -> float:
    """CPU time the threads `tids` have run so far (ms; /proc's schedstat, which on this VM's kernel
    advances in 4 ms scheduler ticks)."""
    return sum(int((TASKS_DIR / str(t) / "schedstat").read_text().split()[0]) for t in tids) / 1e6


def spin_after_call(fn: Callable[[], None], others: list[int], windows: list[float], calls: int) -> list[dict]:
    """How long the threads `others` keep running after `fn` returns: per window (s after the
    return), the median over `calls` of the CPU ms they used since. PyTorch's libgomp workers
    spin there under OpenMP's default policy; `benchmark.SETTLE_S` must outlast it."""
    used: list[list[float]] = [[] for _ in windows]
    for _ in range(calls):
        time.sleep(max(windows))  # start from asleep
        fn()
        returned, before = time.perf_counter(), cpu_ms(others)
        for i, window in enumerate(windows):
            time.sleep(max(0.0, returned + window - time.perf_counter()))
            used[i].append(cpu_ms(others) - before)
    return [{"after_s": w, "other_threads_cpu_ms": statistics.median(u)} for w, u in zip(windows, used)]


def pin(tids: list[int]) -> dict[int, set[int]]:
    """Pin each thread to one core of this process's set, round-robin; returns the old affinities."""
    cores = sorted(os.sched_getaffinity(0))
    old = {tid: os.sched_getaffinity(tid) for tid in tids}
    for i, tid in enumerate(tids):
        os.sched_setaffinity(tid, {cores[i % len(cores)]})
    return old


def unpin(old: dict[int, set[int]]) -> None:
    for tid, cores in old.items():
        os.sched_setaffinity(tid, cores)


def parse_pauses(text: str) -> list[float]:
    try:
        pauses = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SystemExit(f"--pauses: comma list of seconds, got {text!r}") from None
    if not pauses or min(pauses) < 0:
        raise SystemExit(f"--pauses: one or more seconds >= 0, got {text!r}")
    return pauses


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="S", choices=sorted(benchmark.VARIANTS))
    parser.add_argument("--image-size", type=benchmark.positive_int, default=224)
    parser.add_argument("--pauses", default="0,0.01,0.03,0.1,0.3", help="seconds idle before each call")
    parser.add_argument("--calls", type=benchmark.positive_int, default=30, help="timed calls per pause")
    parser.add_argument("--torch", action="store_true", help="PyTorch eager too, for comparison")
    args = parser.parse_args(argv)
    pauses = parse_pauses(args.pauses)
    if not TASKS_DIR.is_dir():
        raise SystemExit(f"{TASKS_DIR} not found: this probe reads Linux's per-thread records")

    case = benchmark.JaxCase("jax-f32", args.variant, "float32", args.image_size)
    fn = case.make("latency", 1)
    for _ in range(5):
        fn()
    tids = xla_worker_threads()
    if not tids:
        raise SystemExit(f"no threads named {XLA_WORKER_PREFIX}* in this process: not XLA:CPU, or XLA renamed "
                         "its worker pool (update XLA_WORKER_PREFIX)")
    result = {"workers": len(tids), "cores": sorted(os.sched_getaffinity(0)),
              "jax": time_after_pauses(fn, pauses, args.calls, tids)}
    old = pin(tids)
    try:
        result["pinned_affinities"] = [sorted(os.sched_getaffinity(t)) for t in tids]
        result["jax_pinned"] = time_after_pauses(fn, pauses, args.calls, tids)
    finally:
        unpin(old)
    result["jax_unpinned_again"] = time_after_pauses(fn, pauses, args.calls, tids)
    if args.torch:
        torch_case = benchmark.TorchCase("torch-eager-f32", args.variant, "float32", False, args.image_size,
                                         "channels_last")
        torch_fn = torch_case.make("latency", 1)
        for _ in range(5):
            torch_fn()
        result["torch_eager"] = time_after_pauses(torch_fn, pauses, args.calls, [])
        others = [int(d.name) for d in TASKS_DIR.iterdir()
                  if int(d.name) not in tids and int(d.name) != threading.get_native_id()]
        result["torch_spin"] = spin_after_call(torch_fn, others, SPIN_WINDOWS, SPIN_CALLS)

    print(f"SwiftFormer-{args.variant} batch 1, {args.image_size} px; {len(tids)} XLA workers on cores "
          f"{result['cores']}; load {os.getloadavg()[0]:.2f}")
    print("| program | pause s | median ms | min ms | XLA workers' switches per call (voluntary / involuntary) |")
    print("|---|---|---|---|---|")
    for key in ("jax", "jax_pinned", "jax_unpinned_again", "torch_eager"):
        for row in result.get(key, []):
            switches = (f"{row['voluntary_per_call']:.0f} / {row['involuntary_per_call']:.0f}"
                        if key != "torch_eager" else "-")
            print(f"| {key} | {row['pause_s']:g} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {switches} |")
    if "torch_spin" in result:
        print("PyTorch's other threads (its OpenMP workers) after an eager call returns, CPU ms used since "
              f"(median of {SPIN_CALLS}): " + ", ".join(
                  f"{1e3 * r['after_s']:g} ms: {r['other_threads_cpu_ms']:.1f}" for r in result["torch_spin"]))
    return result


if __name__ == "__main__":
    main()
