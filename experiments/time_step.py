"""Time the JAX train step and batch-32 inference alone, for quick A/B comparisons of code or flags.

Run:  python experiments/time_step.py [--variant S] [--batch 32] [--reps 5]
      XLA_FLAGS=--xla_cpu_prefer_vector_width=512 python experiments/time_step.py   # a flag A/B

Prints the minimum over `--reps` calls (after one warm-up) of the same programs `benchmark.py`
times, plus this process's page faults and kernel time per train step (the allocator's effect,
PERF_NOTES.md session 3, change 7). One process per setting; the machine drifts by 10-20% between
runs, so alternate the two sides of an A/B at least twice. PERF_NOTES.md's session-3 A/B figures
were taken this way.
"""

from __future__ import annotations

import script_setup  # experiments/ is sys.path[0] when run as a script; the tests put it there

script_setup.prepare(__name__)  # first: XLA settings, before jax or torch start

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import benchmark  # noqa: E402

from swiftformer_jax import host_allocator  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_model_arguments(parser)
    parser.add_argument("--reps", type=benchmark.positive_int, default=5)
    args = parser.parse_args(argv)
    case = benchmark.JaxCase("jax-f32", args.variant, "float32", args.image_size)
    result = {}
    for task in ("train", "inference"):
        run = case.make(task, args.batch)
        run()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        result[task] = {"min_s": round(min(times), 3),
                        "page_faults_per_call": round((after.ru_minflt - usage.ru_minflt) / args.reps),
                        "kernel_s_per_call": round((after.ru_stime - usage.ru_stime) / args.reps, 3)}
    print(f"{args.variant} batch {args.batch}: {result}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"allocator: {host_allocator.status}; load {os.getloadavg()[0]:.2f}")
    return result


if __name__ == "__main__":
    main()
