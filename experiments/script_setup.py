"""The process settings every experiments script makes first, before jax or torch start.

Each script begins with `import script_setup; script_setup.prepare(__name__)` (experiments/ is
`sys.path[0]` when a script runs as `python experiments/NAME.py`; the tests put it there to import
the scripts). Two settings, both read once by the libraries they steer, so they must come first:

- `OMP_WAIT_POLICY=PASSIVE`: libgomp's default busy-wait makes multi-threaded PyTorch collapse on a
  machine shared with other processes (measured here, load ~8 on 2 cores: SwiftFormer-S batch-1
  eager 1.4-9 s spinning against 0.05-0.18 s passive). Set for every script, so PyTorch is timed
  the same way everywhere; an explicit setting wins.
- the project's XLA:CPU flags and allocator setting (`swiftformer_jax.xla_flags.apply`), applied
  only when the script runs as the main program, so importing a script (the tests do) leaves the
  process's settings alone; `--keep-ynn-fusion` on the command line asks for XLA's default YNN
  fusions instead (the scripts that time both settings accept it).

A script that runs PyTorch and JAX on one GPU in one process (`benchmark.py`) also asks for
`shares_gpu_with_torch`: JAX then allocates GPU memory as it needs it
(`XLA_PYTHON_CLIENT_PREALLOCATE=false`) instead of taking 75% of it when it starts, which would
leave PyTorch a quarter of the GPU. Read once, when JAX's GPU backend starts; a CPU run ignores it;
an explicit setting wins.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping, Sequence


def prepare(
    module_name: str, argv: Sequence[str] | None = None, environ: MutableMapping[str, str] = os.environ,
    *, shares_gpu_with_torch: bool = False,
) -> None:
    """Set OMP_WAIT_POLICY and, when `module_name` is "__main__", the project's XLA settings (and,
    with `shares_gpu_with_torch`, JAX's on-demand GPU allocation).

    `argv` defaults to sys.argv; `environ` to this process's environment (only then is the
    allocator set too, as `xla_flags.apply` does).
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv if argv is None else argv
    if module_name != "__main__":
        return
    if shares_gpu_with_torch:
        environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if "--keep-ynn-fusion" not in argv:
        from swiftformer_jax import xla_flags

        xla_flags.apply(environ)
