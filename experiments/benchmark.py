"""SwiftFormer speed, JAX against PyTorch, measured side by side in one run.

Run:  python experiments/benchmark.py [--variants S] [--configs all] [--tag cpu]
GPU:  python experiments/benchmark.py --device gpu --variants all --batch 256 --train-batch 128 --tag gpu
Tiny: python experiments/benchmark.py --image-size 64 --batch 2 --train-batch 2 --reps 2 \
          --configs jax-f32,torch-eager-f32 --skip-peaks --tag smoke --output-dir /tmp/out
Redo the table and plot of a saved run (after a change to what is derived; nothing is timed):
      python experiments/benchmark.py --render-only --tag cpu
One table from runs saved one variant each (a GPU session whose calls are time-limited):
      python experiments/benchmark.py --merge gpu_xs,gpu_s,gpu_l1,gpu_l3 --tag gpu

What is measured, per variant and per configuration (framework x dtype x execution mode):
- inference latency at batch 1 (ms per call): `latency`, calls in a stream (each after a short
  pause, `SETTLE_S`), and `idle_latency`, each call after the machine idled (`IDLE_S`), which on
  Linux costs XLA:CPU more than PyTorch (see `SETTLE_S`); inference throughput at `--batch` (images/s);
- training throughput at `--train-batch` (images/s): forward, label-smoothed cross-entropy on both
  heads, backward, AdamW step (lr 1e-3, weight decay 0.025 on every tensor, both frameworks);
- peak memory: the peak rise of the memory in use during one call, sampled every millisecond by a
  thread (see `MemoryPeak`): on the CPU glibc's malloc statistics, where both frameworks allocate;
  on a GPU each framework's device allocator (JAX's `memory_stats`, `torch.cuda.memory_allocated`);
  for JAX also XLA's compiled memory analysis (temp + output + argument bytes: deterministic);
- for JAX, XLA's cost analysis of the compiled programs (FLOPs and bytes accessed per image), next
  to the paper's GMACs, and each configuration's throughput as a fraction of the machine's measured
  peaks (a large matmul for FLOP/s, a large array copy for bandwidth; see `machine_peaks`). The
  PyTorch runs do the same arithmetic, so the same per-image FLOPs are used for them; bfloat16
  configurations are counted with the bfloat16 program's bytes and against the bfloat16 matmul
  peak (see `derive`).

Device (`--device`): the CPU, or one GPU for both frameworks (JAX's default device, PyTorch's
"cuda"; each PyTorch call ends with `torch.cuda.synchronize()`, each JAX call with
`block_until_ready`; cuDNN's benchmark mode on, as the official training script sets it). Run as
a program, this file first sets `XLA_PYTHON_CLIENT_PREALLOCATE=false` (unless you set it): JAX
then allocates GPU memory as it needs it instead of taking 75% of it when it starts, which would
leave PyTorch a quarter of the GPU. The tests run the GPU path on the CPU with CUDA faked
(`test_benchmark_gpu_path_runs_with_cuda_faked`): that shows every line of it runs, not how fast
a GPU is, nor its memory or numerics.

How: every configuration is built and warmed up first; then the timed calls go round-robin over
the configurations (one call each per round), so load from other processes on a shared machine
falls on all of them alike, each call after an untimed pause (`SETTLE_S`; `IDLE_S` for
`idle_latency`) so that the threads the previous one left spinning are asleep. Reported: median,
min and max per configuration, and the load average before and after each task.

Process settings, made at the top of this file when it runs as a program (importing it, as the
tests do, changes nothing): the project's XLA:CPU flags and host allocator
(`swiftformer_jax.xla_flags.apply`, before JAX starts its backend; `--keep-ynn-fusion` skips it
to time XLA's default YNN fusions), and JAX's on-demand GPU allocation (above). OpenMP's wait
policy is left as you set it (unset: libgomp's default, what a PyTorch user gets), and recorded
with the load average. With it unset, PyTorch's threads spin a while after each parallel region:
under load on few cores they wait for descheduled siblings (`load_warning` says so), while
`OMP_WAIT_POLICY=PASSIVE` makes them pay a wake-up in every parallel region on a quiet machine
(compare `--configs torch-eager-f32 --tasks train` with and without it). On a machine shared with
other work, set `OMP_WAIT_POLICY=PASSIVE` yourself.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Read once, when JAX starts its backend: set before any JAX computation (an explicit setting wins).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share one GPU
    if "--keep-ynn-fusion" not in sys.argv:
        from swiftformer_jax import xla_flags

        xla_flags.apply()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Callable, Hashable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from swiftformer_jax import create_model, host_allocator, losses  # noqa: E402
from swiftformer_jax.model import VARIANTS  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

# jax-*: the model's default implementation (impl="auto": "cpu" on a CPU, "xla" on a GPU);
# jax-xla-*: impl="xla" whatever the device, to measure the per-backend choice.
CONFIGS = (
    "jax-f32", "jax-bf16", "jax-xla-f32", "jax-xla-bf16",
    "torch-eager-f32", "torch-eager-bf16", "torch-compile-f32", "torch-compile-bf16",
)
TASKS = ("latency", "idle_latency", "inference", "train")
LATENCY_TASKS = ("latency", "idle_latency")  # batch 1, reported in ms
DEVICES = ("auto", "cpu", "gpu")
LABEL_SMOOTHING = 0.1
LR, WEIGHT_DECAY = 1e-3, 0.025


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="S", help=f"comma list of {', '.join(VARIANTS)} or 'all' (default S: a 2-core CPU)")
    p.add_argument("--configs", default="all", help=f"comma list of {', '.join(CONFIGS)} or 'all'")
    p.add_argument("--tasks", default="all", help=f"comma list of {', '.join(TASKS)} or 'all'")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32, help="inference throughput batch")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=0, help="timed rounds per task (0: per-task defaults 30/20/10/6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per configuration after compiling")
    p.add_argument("--torch-memory-format", default="auto", choices=("auto", "channels_last", "contiguous"),
                   help="auto: time both in warm-up and keep the faster, per configuration")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: all usable cores)")
    p.add_argument("--skip-peaks", action="store_true", help="skip measuring the machine's FLOP/s and bandwidth")
    p.add_argument("--keep-ynn-fusion", action="store_true",
                   help="keep XLA:CPU's default YNNPACK fusions (default: reduce fusions only, see swiftformer_jax/xla_flags.py)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: the GPU when JAX's default backend is one, else the CPU (see resolve_device)")
    p.add_argument("--render-only", action="store_true",
                   help="time nothing: derive the figures, table and plot again from the saved benchmark_<tag>.json")
    p.add_argument("--merge", default="",
                   help="comma list of saved tags (same machine, configurations and tasks, different variants): "
                        "one table of them all under --tag; nothing is timed")
    p.add_argument("--output-dir", default=str(HERE / "results"))
    p.add_argument("--tag", default="cpu", help="results go to benchmark_<tag>.{json,md,png}")
    args = p.parse_args(argv)
    args.variants = _choose(args.variants, tuple(VARIANTS), "variant", upper=True)
    args.configs = _choose(args.configs, CONFIGS, "config")
    args.tasks = _choose(args.tasks, TASKS, "task")
    for name in ("image_size", "batch", "train_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.reps < 0 or args.warmup < 0:
        raise SystemExit("--reps and --warmup must be >= 0")
    args.merge = tuple(t.strip() for t in args.merge.split(",") if t.strip())
    if args.merge and args.render_only:
        raise SystemExit("--merge and --render-only: choose one")
    repeated = sorted({t for t in args.merge if args.merge.count(t) > 1})
    if repeated:
        raise SystemExit(f"--merge names {', '.join(repeated)} more than once")
    return args


def _choose(text: str, valid: tuple[str, ...], what: str, upper: bool = False) -> tuple[str, ...]:
    """Parse a comma list against `valid` ('all' for every one); exit with the valid names if not."""
    if text.strip().lower() == "all":
        return valid
    chosen = tuple(t.strip().upper() if upper else t.strip().lower() for t in text.split(",") if t.strip())
    bad = [c for c in chosen if c not in valid]
    if bad or not chosen:
        raise SystemExit(f"unknown {what}(s) {bad or text!r}; valid: {', '.join(valid)} or 'all'")
    return chosen


def resolve_device(requested: str, jax_backend: str, torch_has_cuda: bool) -> str:
    """"cpu" or "gpu": where both frameworks run, or SystemExit naming why that cannot be.

    JAX runs on its default backend, so the choice follows it; a PyTorch without CUDA beside a JAX
    on a GPU is an error, not a fallback: the two would be timed on different hardware.
    """
    if requested not in DEVICES:
        raise SystemExit(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    device = ("gpu" if jax_backend == "gpu" else "cpu") if requested == "auto" else requested
    if device == "gpu" and jax_backend != "gpu":
        raise SystemExit(f"--device gpu: JAX's default backend is {jax_backend!r}, not a GPU "
                         "(a CUDA jaxlib and a visible GPU are needed)")
    if device == "gpu" and not torch_has_cuda:
        raise SystemExit("--device gpu: JAX runs on the GPU but torch.cuda.is_available() is False; "
                         "install a CUDA PyTorch, or set JAX_PLATFORMS=cpu to time both on the CPU")
    if device == "cpu" and jax_backend != "cpu":
        raise SystemExit(f"--device cpu: JAX's default backend is {jax_backend!r}; set JAX_PLATFORMS=cpu "
                         "so JAX runs on the CPU too")
    return device


# ------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, memory, the GPU if one is used, and library versions: what a reader needs
    to compare numbers."""
    import torch
    import flax
    import transformers

    cpu = "unknown"
    flags: list[str] = []
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "avx2", "fma", "amx"))]
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    accelerator = {}
    if device == "gpu":
        accelerator = {
            "gpu": jax.devices()[0].device_kind, "gpu_torch": torch.cuda.get_device_name(0),
            # float32 matmuls and convolutions may run as TF32 on recent GPUs: how each framework is set.
            "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision
                                                or "unset (XLA's DEFAULT precision)"),
            "torch_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "torch_cudnn_benchmark": torch.backends.cudnn.benchmark,
            # Both frameworks share the GPU: JAX's default takes 75% of its memory when it starts.
            "jax_gpu_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true (JAX's default)"),
        }
    return {"device": device, **accelerator,
        "cpu": cpu, "simd_flags": flags, "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem_gib, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "jax": jax.__version__, "jax_backend": jax.default_backend(), "flax": flax.__version__,
        "optax": optax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__, "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "unset (libgomp's default)",
        "memory_measure": MemoryPeak.MEASURE if device == "cpu" else DEVICE_MEMORY_MEASURE,
        "malloc": host_allocator.status,  # glibc settings, shared by both frameworks in this process
    }


def load_warning(load: float, machine: dict) -> str | None:
    """A warning when the load is at least the core count and PyTorch's OpenMP threads spin
    (any policy but PASSIVE): they then wait for descheduled siblings and can be many times slower."""
    cores = machine["usable_cores"]
    if load < cores or machine["omp_wait_policy"].upper() == "PASSIVE":
        return None
    return (f"warning: load average {load} on {cores} cores: other work competes for them, and PyTorch's "
            "spinning OpenMP threads can then be many times slower; consider OMP_WAIT_POLICY=PASSIVE "
            "(see experiments/benchmark.py's docstring)")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_peaks(reps: int = 7, device: str = "cpu") -> dict:
    """Measured peak FLOP/s (matmul) and memory bandwidth (array copy) of this machine, or its GPU.

    FLOP/s: a 4096 x 4096 matmul (2 * n**3 FLOPs) in float32 and in bfloat16, through jax.jit and
    through torch, best of the two medians per dtype (both use every core). Bandwidth: copying a
    512 MiB float32 array into an existing one (counted as 2 x 512 MiB moved: one read, one write)
    with torch's multithreaded `copy_` and numpy's `copyto`, best of the two medians. Both are
    medians, so they are what the machine gives under its current load, like the model timings. On
    a GPU (`gpu_peaks`): float32 and bfloat16 matmuls and a device-to-device copy.
    """
    if device == "gpu":
        return gpu_peaks(reps)
    import torch

    a = jnp.asarray(np.random.RandomState(0).standard_normal((4096, 4096)).astype(np.float32))
    ta = torch.from_numpy(np.array(a))  # a writable copy: torch warns on read-only numpy memory
    matmul = _matmul_gflops(a, ta, reps)
    matmul_bf16 = _matmul_gflops(a.astype(jnp.bfloat16), ta.to(torch.bfloat16), reps)

    count = 512 * 2**20 // 4
    src = np.random.RandomState(1).standard_normal(count).astype(np.float32)
    dst = np.empty_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    moved = 2.0 * src.nbytes
    copy_gbs = {"numpy": moved / _median_time(lambda: np.copyto(dst, src), reps) / 1e9,
                "torch": moved / _median_time(lambda: tdst.copy_(tsrc), reps) / 1e9}
    return _peaks(matmul, matmul_bf16, copy_gbs, "4096^3 matmuls in float32 and bfloat16 (2n^3 FLOPs), "
                  "512 MiB float32 copy counted as read+write; best of jax/torch medians")


# PyTorch's name for the GPU, and the sizes of the GPU peak measurements; module constants so that
# a test can run the whole GPU path on this CPU (test_benchmark_gpu_path_runs_with_cuda_faked).
TORCH_GPU_DEVICE = "cuda"
GPU_PEAK_MATMUL_N = 8192
GPU_PEAK_COPY_BYTES = 2**30


def gpu_peaks(reps: int = 7) -> dict:
    """The GPU's peaks: 8192^3 matmuls in float32 and bfloat16 (JAX and torch, synchronised), and a
    1 GiB float32 array written from another on the device (counted as read + write)."""
    import torch

    n, device = GPU_PEAK_MATMUL_N, TORCH_GPU_DEVICE
    matmul = {dtype: _matmul_gflops(jax.random.normal(jax.random.PRNGKey(0), (n, n), jdt),
                                    torch.randn(n, n, device=device, dtype=tdt), reps, torch.cuda.synchronize)
              for dtype, jdt, tdt in (("float32", jnp.float32, torch.float32),
                                      ("bfloat16", jnp.bfloat16, torch.bfloat16))}
    count = GPU_PEAK_COPY_BYTES // 4
    src = jnp.ones((count,), jnp.float32)
    plus_one = jax.jit(lambda x: x + 1.0)  # not x * 1.0, which XLA may return uncopied
    tsrc, tdst = torch.ones(count, device=device), torch.empty(count, device=device)
    moved = 2.0 * count * 4
    copy_gbs = {
        "jax": moved / _median_time(lambda: plus_one(src).block_until_ready(), reps) / 1e9,
        "torch": moved / _median_time(lambda: (tdst.copy_(tsrc), torch.cuda.synchronize()), reps) / 1e9,
    }
    return _peaks(matmul["float32"], matmul["bfloat16"], copy_gbs, f"{n}^3 matmuls in float32 and bfloat16 "
                  f"(2n^3 FLOPs), {GPU_PEAK_COPY_BYTES / 2**30:g} GiB float32 device copy counted as read+write; "
                  "best of jax/torch medians")


def _matmul_gflops(a: jax.Array, ta, reps: int, sync: Callable[[], object] = lambda: None) -> dict:
    """GFLOP/s of the square product a @ a through jax.jit, and of ta @ ta through torch.mm then `sync`."""
    import torch

    flops = 2.0 * a.shape[0] ** 3
    mm = jax.jit(lambda x: x @ x)
    jax_s = _median_time(lambda: mm(a).block_until_ready(), reps)
    torch_s = _median_time(lambda: (torch.mm(ta, ta), sync()), reps)
    return {"jax": flops / jax_s / 1e9, "torch": flops / torch_s / 1e9}


def _peaks(matmul: dict, matmul_bf16: dict, copy_gbs: dict, how: str) -> dict:
    """The peaks record `derive` reads: each framework's figure, and the best of them per kind."""
    return {"matmul_gflops": matmul, "peak_gflops": max(matmul.values()),
            "matmul_gflops_bf16": matmul_bf16, "peak_gflops_bf16": max(matmul_bf16.values()),
            "copy_gbs": copy_gbs, "peak_gbs": max(copy_gbs.values()), "how": how}


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# Memory: peak rise of the memory in use during a call
# ------------------------------------------------------------------------------------------------


_MALLOC_IN_USE = host_allocator.malloc_bytes_in_use()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryPeak:
    """Peak rise of the memory this process uses during a `with` block, sampled every `interval` s.

    Measures glibc's bytes in use (mallinfo2: both XLA:CPU and PyTorch allocate through malloc),
    or the resident set where that is not available. Not RSS alone: with `host_allocator` freed
    memory stays resident, so the RSS no longer rises during a call. Sampled from a thread (both
    frameworks release the GIL while computing); a lower bound, a spike shorter than the interval
    can be missed. `MEASURE` names which one is used. On a GPU, `read` is the framework's device
    allocator (`device_memory_reader`).
    """

    MEASURE = "glibc malloc bytes in use (mallinfo2)" if _MALLOC_IN_USE else "resident set size"

    def __init__(self, interval: float = 0.001, read: Callable[[], int] | None = None):
        self.interval = interval
        self.read = read or _MALLOC_IN_USE or _rss
        self.peak_bytes = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.read())
            time.sleep(self.interval)

    def __enter__(self):
        self._start = self.read()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.read())
        self.peak_bytes = self._peak - self._start
        return False


DEVICE_MEMORY_MEASURE = ("device memory in use: JAX memory_stats()['bytes_in_use'], "
                         "PyTorch torch.cuda.memory_allocated()")


def device_memory_reader(framework: str) -> Callable[[], int]:
    """Bytes in use on the GPU by one framework's allocator, for `MemoryPeak(read=...)`."""
    if framework == "jax":
        device = jax.devices()[0]
        return lambda: int(device.memory_stats()["bytes_in_use"])
    import torch

    return torch.cuda.memory_allocated


# ------------------------------------------------------------------------------------------------
# JAX side
# ------------------------------------------------------------------------------------------------


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _labels(batch: int, num_classes: int = 1000) -> np.ndarray:
    return (np.arange(batch) * 7919 % num_classes).astype(np.int64)


def _cost(compiled) -> dict:
    """FLOPs and bytes accessed from XLA's cost analysis of a compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}


def _xla_memory(compiled) -> dict:
    """XLA's compiled memory analysis (bytes): temporaries, outputs, arguments."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    return {"temp": int(mem.temp_size_in_bytes), "output": int(mem.output_size_in_bytes),
            "argument": int(mem.argument_size_in_bytes)}


class JaxCase:
    """The JAX model for one variant and compute dtype; builds the timed callables per task."""

    framework = "jax"

    def __init__(self, name: str, variant: str, dtype: str, image_size: int, impl: str = "auto"):
        self.name, self.variant, self.dtype, self.image_size = name, variant, dtype, image_size
        self.model = create_model(variant, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, impl=impl)
        self.impl = self.model.impl
        init = jax.jit(lambda key, x: self.model.init({"params": key}, x, train=False))
        self.variables = init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))
        self.analysis: dict = {"impl": self.impl}  # the implementation "auto" resolved to
        self.memory_format = "NHWC"

    def make(self, task: str, batch: int) -> Callable[[], None]:
        return self._make_train(batch) if task == "train" else self._make_infer(task, batch)

    def _make_infer(self, task: str, batch: int) -> Callable[[], None]:
        images = jnp.asarray(_images(batch, self.image_size))
        fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
        compiled = fn.lower(self.variables, images).compile()
        self.analysis[task] = {"batch": batch, **_cost(compiled), "xla_memory": _xla_memory(compiled)}
        variables = self.variables
        return lambda: compiled(variables, images).block_until_ready()

    def _make_train(self, batch: int) -> Callable[[], None]:
        model = self.model
        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        images = jnp.asarray(_images(batch, self.image_size))
        targets = losses.one_hot_smoothed(jnp.asarray(_labels(batch)), 1000, LABEL_SMOOTHING)

        def loss_fn(params, batch_stats, x, y):
            (cls_logits, dist_logits), state = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
            loss = 0.5 * (losses.cross_entropy(cls_logits, y) + losses.cross_entropy(dist_logits, y))
            return loss, state["batch_stats"]

        def step(params, batch_stats, opt_state, x, y):
            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss

        state = [jax.tree.map(jnp.copy, self.variables["params"]),
                 jax.tree.map(jnp.copy, self.variables["batch_stats"])]
        state.append(tx.init(state[0]))
        compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, images, targets).compile()
        self.analysis["train"] = {"batch": batch, **_cost(compiled), "xla_memory": _xla_memory(compiled)}

        def run() -> None:
            params, batch_stats, opt_state, loss = compiled(*state, images, targets)
            state[:] = [params, batch_stats, opt_state]
            loss.block_until_ready()

        return run


# ------------------------------------------------------------------------------------------------
# PyTorch side
# ------------------------------------------------------------------------------------------------


class TorchCase:
    """HF SwiftFormer (version-2 attention) eager or under torch.compile, float32 or bf16 autocast,
    on the CPU or on "cuda" (`device` "gpu"), each call synchronised."""

    framework = "torch"

    def __init__(self, name: str, variant: str, dtype: str, compiled: bool, image_size: int, memory_format: str,
                 device: str = "cpu"):
        import torch
        import torch_reference_model as trm

        self.torch, self.trm = torch, trm
        self.device = TORCH_GPU_DEVICE if device == "gpu" else "cpu"
        self._sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
        self.name, self.variant, self.dtype, self.compiled = name, variant, dtype, compiled
        self.image_size, self.requested_format = image_size, memory_format
        self.model = trm.build(variant)
        self.analysis: dict = {}
        self.memory_format = None  # decided on the first task

    def _format(self, fmt: str):
        return self.torch.channels_last if fmt == "channels_last" else self.torch.contiguous_format

    def _inputs(self, batch: int, fmt: str):
        x = self.torch.from_numpy(_images(batch, self.image_size)).permute(0, 3, 1, 2)
        return x.to(self.device).contiguous(memory_format=self._format(fmt))

    def _model(self, fmt: str, train: bool):
        model = copy.deepcopy(self.model).to(self.device, memory_format=self._format(fmt))
        return model.train() if train else model.eval()

    def _infer_fn(self, batch: int, fmt: str) -> Callable[[], None]:
        torch = self.torch
        model = self._model(fmt, train=False)
        forward = torch.compile(model, dynamic=False) if self.compiled else model
        x = self._inputs(batch, fmt)

        def run() -> None:
            with torch.inference_mode(), self.trm.autocast(self.dtype, self.device):
                forward(x)
            self._sync()

        return run

    def _choose_format(self, batch: int) -> str:
        """channels_last or contiguous: the one with the faster warm inference call (eager runs;
        compiled ones take their eager sibling's choice, see `_share_memory_format`)."""
        if self.requested_format != "auto":
            return self.requested_format
        best, best_time = None, float("inf")
        for fmt in ("contiguous", "channels_last"):
            fn = self._infer_fn(batch, fmt)
            seconds = _median_time(fn, 3)
            self.analysis.setdefault("format_probe_ms", {})[fmt] = 1e3 * seconds
            if seconds < best_time:
                best, best_time = fmt, seconds
        return best

    def _decide_format(self, batch: int) -> str:
        if not self.compiled:
            return self._choose_format(batch)
        if self.requested_format != "auto":
            return self.requested_format
        sibling = getattr(self, "sibling", None)
        if sibling is not None and sibling.memory_format is not None:
            return sibling.memory_format
        return "channels_last"

    def make(self, task: str, batch: int) -> Callable[[], None]:
        if self.memory_format is None:
            self.memory_format = self._decide_format(batch)
        if task != "train":
            return self._infer_fn(batch, self.memory_format)
        torch = self.torch
        model = self._model(self.memory_format, train=True)
        forward = torch.compile(model, dynamic=False) if self.compiled else model
        step = self.trm.make_train_step(model, forward, self.dtype, lr=LR, weight_decay=WEIGHT_DECAY,
                                        device_type=self.device)
        x = self._inputs(batch, self.memory_format)
        labels = torch.from_numpy(_labels(batch)).to(self.device)

        def run() -> None:
            step(x, labels)
            self._sync()

        return run


def make_case(name: str, variant: str, args) -> JaxCase | TorchCase:
    dtype = "bfloat16" if "bf16" in name else "float32"
    if name.startswith("jax-"):
        return JaxCase(name, variant, dtype, args.image_size, impl="xla" if name.startswith("jax-xla-") else "auto")
    return TorchCase(name, variant, dtype, "compile" in name, args.image_size, args.torch_memory_format,
                     getattr(args, "device", "cpu"))


# ------------------------------------------------------------------------------------------------
# Interleaved timing
# ------------------------------------------------------------------------------------------------


# Pause before each timed call, untimed. Long enough for the OpenMP threads the previous PyTorch
# call left spinning (libgomp's default wait policy spins a while before it sleeps) to be asleep
# when the next configuration starts. Short enough that Linux's load tracking (32 ms half-life)
# still counts XLA:CPU's two worker threads as busy: after a longer idle it wakes them onto one
# core, and JAX's batch-1 call is slower (compare jax-f32's `idle_latency` with its `latency`:
# `python experiments/benchmark.py --configs jax-f32,torch-eager-f32 --tasks latency,idle_latency`).
SETTLE_S = 0.02
# `idle_latency` measures that on purpose: a batch-1 call after the machine idled, as a server with
# sporadic requests sees it (`latency` is a stream of requests).
IDLE_S = 0.25
PAUSE_S = {"idle_latency": IDLE_S}  # per task; the others pause SETTLE_S


def interleaved_times(fns: dict[Hashable, Callable[[], None]], reps: int, warmup: int,
                      settle_s: float = SETTLE_S) -> dict[Hashable, list[float]]:
    """Warm every callable, then time `reps` rounds, each calling every callable once in turn, each
    call after an untimed `settle_s` pause; returns each callable's times (seconds), round by round.

    The order within a round rotates, so no configuration always runs right after the same other.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[Hashable, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(settle_s)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int,
                     memory_reads: dict[str, Callable[[], int]] | None = None,
                     settle_s: float = SETTLE_S) -> dict[str, dict]:
    """`interleaved_times`' median, min and max per callable, plus the peak memory rise over
    `MEMORY_CALLS` extra calls per configuration (`MemoryPeak`, reading `memory_reads[name]` where
    given: a GPU allocator)."""
    times = interleaved_times(fns, reps, warmup, settle_s)
    names = list(fns)
    out = {}
    for name in names:
        rises = []
        for _ in range(MEMORY_CALLS):
            with MemoryPeak(read=(memory_reads or {}).get(name)) as memory:
                fns[name]()
            rises.append(memory.peak_bytes)
        ts = times[name]
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "reps": len(ts), "memory_peak_rise_mib": max(rises) / 2**20}
    return out


# The memory rise is the largest over this many extra calls: the sampling thread can miss a whole
# call (one call of PyTorch eager training can read as no rise at all; the cause is not known).
MEMORY_CALLS = 2


DEFAULT_REPS = {"latency": 30, "idle_latency": 20, "inference": 10, "train": 6}


def run_benchmark(args) -> dict:
    import torch

    torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
    args.device = resolve_device(args.device, jax.default_backend(), torch.cuda.is_available())
    if args.device == "gpu":
        # cuDNN picks the fastest convolution algorithm per shape: how the official training script
        # (and most PyTorch users) run a fixed-shape convnet on a GPU.
        torch.backends.cudnn.benchmark = True
    results = {"machine": machine_info(args.device), "settings": _settings(args), "load_average_start": load_average()}
    warning = load_warning(results["load_average_start"][0], results["machine"])
    if warning:
        _log(warning)
    if not args.skip_peaks:
        results["peaks"] = machine_peaks(device=args.device)
        _log(f"machine peaks: {results['peaks']['peak_gflops']:.0f} GFLOP/s, {results['peaks']['peak_gbs']:.1f} GB/s")
    results["variants"] = {}
    for variant in args.variants:
        cases = {}
        for name in args.configs:
            _log(f"{variant}: building {name}")
            cases[name] = make_case(name, variant, args)
        _share_memory_format(cases)
        tasks = {}
        for task in args.tasks:
            batch = 1 if task in LATENCY_TASKS else {"inference": args.batch, "train": args.train_batch}[task]
            fns = {}
            for name, case in cases.items():
                _log(f"{variant}/{task}: preparing {name} (batch {batch})")
                t0 = time.perf_counter()
                fns[name] = case.make(task, batch)
                fns[name]()  # first call: compilation for torch.compile, any lazy setup
                _log(f"  ready in {time.perf_counter() - t0:.1f} s")
            load_before = load_average()
            reads = ({name: device_memory_reader(case.framework) for name, case in cases.items()}
                     if args.device == "gpu" else None)
            pause = PAUSE_S.get(task, SETTLE_S)
            timed = time_interleaved(fns, args.reps or DEFAULT_REPS[task], args.warmup, reads, settle_s=pause)
            for stats in timed.values():
                stats["images_per_s"] = batch / stats["median_s"]
                stats["images_per_s_min"] = batch / stats["max_s"]
                stats["images_per_s_max"] = batch / stats["min_s"]
            tasks[task] = {"batch": batch, "pause_s": pause, "load_average_before": load_before,
                           "load_average_after": load_average(), "results": timed}
            _log(f"{variant}/{task}: " + ", ".join(
                f"{n} {1e3 * s['median_s']:.1f} ms" for n, s in timed.items()))
            del fns
        analysis = {n: c.analysis for n, c in cases.items() if c.analysis}
        memory_format = {n: c.memory_format for n, c in cases.items()}
        del cases  # the timed models and programs, before any more are built
        if "jax-f32" not in analysis and not args.skip_peaks:
            analysis["jax-f32"] = count_float32_programs(variant, args.image_size,
                                                         {t: r["batch"] for t, r in tasks.items()})
        results["variants"][variant] = {"tasks": tasks, "analysis": analysis, "memory_format": memory_format}
    results["load_average_end"] = load_average()
    results["paper"] = _paper()
    return results


def count_float32_programs(variant: str, image_size: int, batches: dict[str, int]) -> dict:
    """XLA's cost analysis of the float32 JAX programs for `batches` (task -> batch), compiled but
    never called: the FLOPs `derive` counts every configuration with, for a run that did not time
    jax-f32 (a bfloat16-only GPU run). Marked `"timed": False`, and so labelled in the table."""
    case = JaxCase("jax-f32", variant, "float32", image_size)
    for task, batch in batches.items():
        case.make(task, batch)
    return {**case.analysis, "timed": False}


def _share_memory_format(cases: dict) -> None:
    """Point each compiled torch configuration at its eager sibling (same dtype), whose warm-up
    probe picks the memory format both then use; without a sibling, compiled runs use channels_last."""
    for name, case in cases.items():
        if isinstance(case, TorchCase) and case.compiled:
            sibling = cases.get(name.replace("compile", "eager"))
            case.sibling = sibling if isinstance(sibling, TorchCase) else None


def _paper() -> dict:
    from model_table import PAPER
    return PAPER


def _settings(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Derived figures, table, plot
# ------------------------------------------------------------------------------------------------


def derive(results: dict) -> None:
    """Per configuration: speed relative to torch eager float32, and fractions of machine peaks.

    FLOPs per image come from XLA's cost analysis of the float32 JAX program (the arithmetic, the
    same in every configuration; a bfloat16 program's count adds its conversions; compiled for the
    count alone when the run did not time jax-f32, see `count_float32_programs`), bytes per image
    from the JAX program of the configuration's dtype (`bytes_program`): bfloat16 moves fewer.
    bfloat16 configurations are compared with the bfloat16 matmul peak, float32 ones with the
    float32 peak; a saved run that has no bfloat16 peak compares them all with the float32 one,
    and its table says so.
    """
    peaks = results.get("peaks")
    for variant, vres in results["variants"].items():
        for task, tres in vres["tasks"].items():
            ref = tres["results"].get("torch-eager-f32")
            for name, stats in tres["results"].items():
                if ref:
                    stats["speedup_vs_torch_eager_f32"] = ref["median_s"] / stats["median_s"]
                flops = vres["analysis"].get("jax-f32", {}).get(task)
                cost, bytes_from = bytes_program(name, task, vres["analysis"])
                if flops and cost and peaks:
                    bf16 = "bf16" in name and "peak_gflops_bf16" in peaks
                    peak_gflops = peaks["peak_gflops_bf16"] if bf16 else peaks["peak_gflops"]
                    per_image_flops = flops["flops"] / flops["batch"]
                    per_image_bytes = cost["bytes_accessed"] / cost["batch"]
                    stats["bytes_from"] = bytes_from
                    stats["achieved_gflops"] = per_image_flops * stats["images_per_s"] / 1e9
                    stats["fraction_of_peak_flops"] = stats["achieved_gflops"] / peak_gflops
                    stats["achieved_gbs"] = per_image_bytes * stats["images_per_s"] / 1e9
                    stats["fraction_of_peak_bandwidth"] = stats["achieved_gbs"] / peaks["peak_gbs"]


def bytes_program(name: str, task: str, analysis: dict) -> tuple[dict | None, str]:
    """(XLA's counts for `task`, the JAX configuration they come from) whose bytes configuration
    `name` is measured with: jax-bf16's for a bfloat16 configuration when it was built, else jax-f32's."""
    for source in (("jax-bf16", "jax-f32") if "bf16" in name else ("jax-f32",)):
        cost = analysis.get(source, {}).get(task)
        if isinstance(cost, dict) and "flops" in cost:
            return cost, source
    return None, ""


def markdown(results: dict) -> str:
    m = results["machine"]
    gpu = (f" GPU: {m.get('gpu')} (PyTorch: {m.get('gpu_torch')}); float32 matmul precision: JAX "
           f"{m.get('jax_default_matmul_precision')}, PyTorch allow_tf32 matmul {m.get('torch_matmul_allow_tf32')} / "
           f"cuDNN {m.get('torch_cudnn_allow_tf32')}; cuDNN benchmark mode {m.get('torch_cudnn_benchmark')}; "
           f"JAX GPU preallocation: {m.get('jax_gpu_preallocate')}."
           if m.get("device") == "gpu" else "")
    lines = [
        "# SwiftFormer benchmark: JAX vs PyTorch (measured side by side, interleaved)",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m['memory_gib']} GiB; {m['platform']}.{gpu}",
        f"Versions: jax {m['jax']} ({m['jax_backend']}), flax {m['flax']}, optax {m['optax']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads, OMP_WAIT_POLICY={m.get('omp_wait_policy')}), transformers {m['transformers']}, numpy {m['numpy']}.",
        f"XLA_FLAGS={m.get('xla_flags', '')!r}; host allocator (both frameworks): {m.get('malloc', 'unknown')}.",
        f"Load average (1/5/15 min) at start {results['load_average_start']}, at end {results['load_average_end']} "
        "(timings alternate the configurations, so load from other processes falls on all of them).",
        f"Image size {results['settings']['image_size']}; timings are median [min - max] over "
        "the interleaved rounds.",
    ]
    pauses = {t: r["pause_s"] for v in results["variants"].values() for t, r in v["tasks"].items() if "pause_s" in r}
    if pauses:
        lines += ["Each timed call follows an untimed pause (the other configurations' threads asleep): " + ", ".join(
            f"{t} {p:g} s" for t, p in pauses.items()) + "."]
    if "merged_from" in results:
        lines += ["Merged from runs saved one by one (`--merge`): " + ", ".join(
            f"{v} from benchmark_{m['tag']} (load at start {m['load_average_start']})"
            for v, m in results["merged_from"].items()) + "; machine peaks from the first."]
    if "peaks" in results:
        p = results["peaks"]

        def each(figures: dict) -> str:
            return ", ".join(f"{k} {v:.1f}" if v < 100 else f"{k} {v:.0f}" for k, v in figures.items())

        bf16 = (f", {p['peak_gflops_bf16']:.0f} GFLOP/s bfloat16 (matmul: {each(p['matmul_gflops_bf16'])})"
                if "peak_gflops_bf16" in p else "")
        lines += [f"Measured machine peaks: {p['peak_gflops']:.0f} GFLOP/s float32 (matmul: "
                  f"{each(p['matmul_gflops'])}){bf16}, {p['peak_gbs']:.1f} GB/s copy bandwidth "
                  f"({each(p['copy_gbs'])}); {p['how']}."]
    for variant, vres in results["variants"].items():
        lines += ["", f"## SwiftFormer-{variant}", ""]
        header = "| config | memory format |"
        sep = "|---|---|"
        # the ratio columns only where torch-eager-f32, their reference, was timed
        with_ref = any("torch-eager-f32" in tres["results"] for tres in vres["tasks"].values())
        for task, tres in vres["tasks"].items():
            unit = "ms" if task in LATENCY_TASKS else "img/s"
            header += f" {task} (batch {tres['batch']}, {unit}) |{' x torch eager f32 |' if with_ref else ''} peak memory rise MiB |"
            sep += "---|---|---|" if with_ref else "---|---|"
        lines += [header, sep]
        names = next(iter(vres["tasks"].values()))["results"].keys() if vres["tasks"] else []
        for name in names:
            row = f"| {name} | {vres['memory_format'].get(name)} |"
            for task, tres in vres["tasks"].items():
                s = tres["results"][name]
                if task in LATENCY_TASKS:
                    row += f" {1e3 * s['median_s']:.1f} [{1e3 * s['min_s']:.1f} - {1e3 * s['max_s']:.1f}] |"
                else:
                    row += f" {s['images_per_s']:.1f} [{s['images_per_s_min']:.1f} - {s['images_per_s_max']:.1f}] |"
                if with_ref:
                    row += f" {s.get('speedup_vs_torch_eager_f32', float('nan')):.2f} |"
                row += f" {s['memory_peak_rise_mib']:.0f} |"
            lines.append(row)
        lines += ["", "Load average before/after each task: " + "; ".join(
            f"{t} {r['load_average_before']} / {r['load_average_after']}" for t, r in vres["tasks"].items())]
        lines += _analysis_lines(variant, vres, results)
    lines += ["", f"Peak memory rise: the largest increase of {results['machine'].get('memory_measure', 'memory')} "
              f"during a call, the largest over {MEMORY_CALLS} calls, sampled every 1 ms (a lower bound; memory already "
              "held from earlier calls is not counted). "
              "XLA memory: temp + output bytes of the compiled program (deterministic)."]
    return "\n".join(lines) + "\n"


def _analysis_lines(variant: str, vres: dict, results: dict) -> list[str]:
    out = []
    paper = results.get("paper", {}).get(variant, {})
    programs = [(n, vres["analysis"][n]) for n in ("jax-f32", "jax-bf16", "jax-xla-f32", "jax-xla-bf16")
                if vres["analysis"].get(n)]
    if programs:
        out += ["", f"XLA cost analysis (paper: {paper.get('gmacs', '?')} GMACs per image = "
                f"{2 * paper.get('gmacs', float('nan')):.1f} GFLOP):", "",
                "| program | config | batch | GFLOP per image | GB accessed per image | XLA temp+output MiB |",
                "|---|---|---|---|---|---|"]
        for config, analysis in programs:
            if analysis.get("impl"):
                config += f" (impl {analysis['impl']})"
            if analysis.get("timed") is False:
                config += " (counted, not timed)"
            for task, a in analysis.items():
                if not isinstance(a, dict) or "flops" not in a:
                    continue
                mem = a.get("xla_memory", {})
                out.append(f"| {task} | {config} | {a['batch']} | {a['flops'] / a['batch'] / 1e9:.2f} | "
                           f"{a['bytes_accessed'] / a['batch'] / 1e9:.3f} | "
                           f"{(mem.get('temp', 0) + mem.get('output', 0)) / 2**20:.0f} |")
    if "peaks" in results:
        peak_note = ("bfloat16 configurations against the bfloat16 matmul peak"
                     if "peak_gflops_bf16" in results["peaks"] else "all against the float32 matmul peak")
        out += ["", "Fraction of machine peaks (FLOPs from XLA's count for the float32 JAX program, bytes from "
                f"its count for the JAX program named in 'bytes from'; {peak_note}):", "",
                "| config | task | bytes from | GFLOP/s | of peak FLOP/s | GB/s | of peak bandwidth |",
                "|---|---|---|---|---|---|---|"]
        for task, tres in vres["tasks"].items():
            for name, s in tres["results"].items():
                if "achieved_gflops" in s:
                    out.append(f"| {name} | {task} | {s['bytes_from']} | {s['achieved_gflops']:.1f} | "
                               f"{100 * s['fraction_of_peak_flops']:.1f}% | "
                               f"{s['achieved_gbs']:.1f} | {100 * s['fraction_of_peak_bandwidth']:.1f}% |")
    return out


def plot(results: dict, path: pathlib.Path) -> None:
    """Bar chart of inference and training throughput per variant and configuration (min-max bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("inference", "train") if any(t in v["tasks"] for v in results["variants"].values())]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        variants = [v for v, r in results["variants"].items() if task in r["tasks"]]
        names = list(results["variants"][variants[0]]["tasks"][task]["results"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            stats = [results["variants"][v]["tasks"][task]["results"][name] for v in variants]
            med = [s["images_per_s"] for s in stats]
            err = [[m - s["images_per_s_min"] for m, s in zip(med, stats)],
                   [s["images_per_s_max"] - m for m, s in zip(med, stats)]]
            ax.bar(np.arange(len(variants)) + i * width, med, width, yerr=err, capsize=3, label=name)
        ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2)
        ax.set_xticklabels([f"SwiftFormer-{v}" for v in variants])
        batch = results["variants"][variants[0]]["tasks"][task]["batch"]
        ax.set_ylabel("images / s")
        ax.set_title(f"{task} throughput, batch {batch}")
        ax.legend(fontsize=7)
    m = results["machine"]
    where = m["gpu"] if m.get("device") == "gpu" else f"{m['cpu']}, {m['usable_cores']} cores"
    fig.suptitle(f"{where}; load {results['load_average_start']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_runs(runs: dict[str, dict]) -> dict:
    """One result holding the variants of several saved runs (tag -> results), for one table.

    Only runs of one machine and device, with the same configurations and tasks and no variant
    twice, go together; anything else is a SystemExit naming the two runs that differ. The machine
    peaks are the first run's (each run measured its own: `merged_from` keeps them all).
    """
    tags = list(runs)
    first = runs[tags[0]]

    def where(r: dict) -> tuple:
        m = r["machine"]
        return m.get("device", "cpu"), m.get("gpu"), m["cpu"], m["usable_cores"]

    def what(r: dict) -> tuple:
        return tuple(r["settings"]["configs"]), tuple(r["settings"]["tasks"])

    variants: dict = {}
    merged_from: dict = {}
    for tag, run in runs.items():
        if where(run) != where(first):
            raise SystemExit(f"--merge: {tag} ran on {where(run)}, {tags[0]} on {where(first)}: "
                             "runs of different machines do not go in one table")
        if what(run) != what(first):
            raise SystemExit(f"--merge: {tag} timed configurations and tasks {what(run)}, {tags[0]} {what(first)}")
        for variant, result in run["variants"].items():
            if variant in variants:
                raise SystemExit(f"--merge: variant {variant} is in both {merged_from[variant]['tag']} and {tag}")
            variants[variant] = result
            merged_from[variant] = {"tag": tag, "load_average_start": run["load_average_start"],
                                    "peaks": run.get("peaks")}
    return {**first, "variants": variants, "merged_from": merged_from,
            "load_average_end": runs[tags[-1]]["load_average_end"]}


def _saved(path: pathlib.Path, flag: str, tag: str) -> dict:
    """A run `main` saved, or SystemExit naming the file: missing, not JSON, or not a benchmark run."""
    if not path.is_file():
        raise SystemExit(f"{flag}: no saved run at {path} (run the benchmark with --tag {tag} first)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{flag}: {path} is not valid JSON (truncated?): {error}") from None
    missing = [key for key in ("machine", "settings", "variants") if key not in results]
    if missing:
        raise SystemExit(f"{flag}: {path} is not a saved benchmark run (no {', '.join(missing)})")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = pathlib.Path(args.output_dir)
    stem = out_dir / f"benchmark_{args.tag}"
    if args.render_only:
        results = _saved(stem.with_suffix(".json"), "--render-only", args.tag)
    elif args.merge:
        results = merge_runs({t: _saved(out_dir / f"benchmark_{t}.json", "--merge", t) for t in args.merge})
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        results = run_benchmark(args)
    derive(results)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))
    _log(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
