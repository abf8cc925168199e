"""glibc malloc settings for CPU runs: keep freed memory in the process instead of unmapping it.

Why: XLA:CPU allocates each call's temporary buffer with malloc on a worker thread (about 2.6 GB
for the SwiftFormer-S batch-32 train step). glibc serves a block that large from a fresh mmap and
returns it with munmap when the call ends, so every step faults the whole buffer in again, page
by page: with a 3.2 GB buffer, 791k page faults and 1.5 s of kernel time in a 2.8 s step.
With one malloc arena, mmap off and trimming off, the freed buffer stays in the heap and the next
step reuses it: no faults, and the train step ~20% faster.

Costs, hence only for CPU runs: memory freed stays with the process (its RSS stays at its peak,
which a training process reaches every step anyway), and all threads share one malloc arena
(more lock contention for heavily threaded input pipelines). A run is taken to be on CPU when
JAX_PLATFORMS starts with `cpu`, or when no accelerator plugin is installed. glibc reads
`mallopt` at any time, but threads created earlier keep their arenas: call this before JAX starts
its backend (its thread pools). Elsewhere (not Linux/glibc) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
from typing import Callable

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"

ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu",
)

status = "not applied"  # what keep_freed_memory did; recorded by the benchmarks


def runs_on_cpu(environ=os.environ) -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS):
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """One arena, no mmap, no trimming (glibc). Returns whether glibc accepted all three settings."""
    global status
    libc = _glibc()
    if libc is None:
        status = f"not applied: no glibc (C library {ctypes.util.find_library('c')!r})"
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    accepted = [mallopt(param, value) == 1 for param, value in
                ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))]
    status = "applied: glibc arena_max=1, mmap_max=0, trim off" if all(accepted) else (
        f"partly refused by glibc (arena, mmap, trim accepted: {accepted})")
    return all(accepted)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_bytes_in_use() -> Callable[[], int] | None:
    """A function returning glibc's bytes in use (heap chunks + mmapped blocks), or None without
    glibc's `mallinfo2` (glibc < 2.33 or another C library). The benchmarks' memory yardstick."""
    libc = _glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd
    return in_use


def apply_for_cpu(environ=os.environ) -> bool:
    """`keep_freed_memory()` when the run is on CPU (see `runs_on_cpu`); returns whether applied."""
    global status
    if not runs_on_cpu(environ):
        status = "not applied: an accelerator platform"
        return False
    return keep_freed_memory()
