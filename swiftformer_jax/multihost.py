"""Multi-process start-up of a jitted step: compile, then meet, then run.

A program that spans processes connects them at its first run, and JAX's CPU collectives (gloo)
give the other processes a fixed 30 s to arrive (jax 0.10; `--xla_cpu_collective_timeout_seconds`
does not change it). Processes that compile the same step at different speeds, a loaded host being
enough, miss it, and the run fails with "Gloo context initialization failed: ... GetKeyValue()
timed out". So a multi-process step is compiled ahead of its first run for each input signature,
and the processes wait for each other at a barrier of JAX's coordination service, which allows
`BARRIER_TIMEOUT_S`, before running it. Once connected, later runs wait longer for a late process
(45 s was measured to pass).

With one process nothing changes: the jitted function is returned as it is.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from orbax.checkpoint import multihost as orbax_multihost

from swiftformer_jax.logs import log

BARRIER_TIMEOUT_S = 60 * 60  # the slowest process's compile, not a hang: a crashed process fails the barrier


def _signature(args: tuple) -> tuple:
    """What decides the compiled program: the tree, and each array's type and sharding."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((jax.typeof(leaf), getattr(leaf, "sharding", None)) for leaf in leaves)


def compile_then_meet(jitted: Any, name: str) -> Callable:
    """`jitted` (a `jax.jit` function), with every process compiled and at a barrier before the
    first run of each input signature; `jitted` itself when there is one process."""
    if jax.process_count() == 1:
        return jitted
    executables: dict[tuple, Any] = {}
    barrier = orbax_multihost.get_barrier_sync_fn()

    def run(*args):
        signature = _signature(args)
        executable = executables.get(signature)
        if executable is None:
            executable = jitted.lower(*args).compile()
            log.info("%s compiled (signature %d); waiting for the other processes.", name, len(executables))
            barrier(key=f"swiftformer_jax/{name}/{len(executables)}", timeout_ms=BARRIER_TIMEOUT_S * 1000)
            executables[signature] = executable
        return executable(*args)

    return run
