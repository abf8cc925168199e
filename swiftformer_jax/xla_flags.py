"""XLA:CPU settings this project measured to matter, set before JAX starts its CPU backend.

Why: jax 0.10's XLA:CPU hands subgraphs to YNNPACK ("YNN fusions" of three kinds: dot, eltwise,
reduce). On SwiftFormer-S (2-core CPU) the default set makes batch-32 inference 1.5x slower than
no YNN fusions at all, while no YNN fusions make the train step 1.25x slower than the default;
keeping only the reduce fusions gives the fastest training of the nine settings compared and
inference within 10% of the fastest.

`apply()` also sets glibc's allocator to keep freed memory on CPU runs (`host_allocator.py`:
otherwise the per-call buffers are unmapped and faulted in again every step).

XLA reads XLA_FLAGS once, when the first computation starts the backend, so `apply()` must run
before that: the entry points (main.py, predict, the benchmarks, the tests' conftest) call it
before any JAX computation. A value the user already gives in XLA_FLAGS wins. Only XLA:CPU reads
these flags; GPU and TPU runs are unaffected.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping

from swiftformer_jax import host_allocator

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "reduce"}


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
    """Add each of CPU_FLAGS to environ["XLA_FLAGS"] unless it is already there; returns the result.

    For this process (environ is os.environ) it also sets glibc's allocator to keep freed memory
    on CPU runs (`host_allocator`): the other runtime setting measured to matter, and one that must
    likewise happen before JAX starts its backend.
    """
    if environ is os.environ:
        host_allocator.apply_for_cpu(environ)
    return add_flags(CPU_FLAGS, environ)


def add_flags(flags: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> str:
    """Add each `--name=value` of `flags` to environ["XLA_FLAGS"] unless that flag is already set
    there (a value given first wins); returns the result."""
    current = environ.get("XLA_FLAGS", "")
    for name, value in flags.items():
        if f"--{name}=" not in current:
            current = f"{current} --{name}={value}".strip()
    environ["XLA_FLAGS"] = current
    return current
