"""The process settings every experiments script makes first, before jax or torch start.

Each script begins with `import script_setup; script_setup.prepare(__name__)` (experiments/ is
`sys.path[0]` when a script runs as `python experiments/NAME.py`; the tests put it there to import
the scripts). It applies the settings that are read once by the libraries they steer, so they
must come first:

- the project's XLA:CPU flags and allocator setting (`swiftformer_jax.xla_flags.apply`), applied
  only when the script runs as the main program, so importing a script (the tests do) leaves the
  process's settings alone; `--keep-ynn-fusion` on the command line asks for XLA's default YNN
  fusions instead (the scripts that time both settings accept it).

OpenMP's wait policy is left as you set it (unset: libgomp's default, threads spin a little
before they sleep), which is what a PyTorch user gets. Sessions 1-9 set `OMP_WAIT_POLICY=PASSIVE`
for every script: under load 7-10 on 2 cores the spinning made PyTorch 10-50x slower (PERF_NOTES,
history section 1). On a quiet machine PASSIVE costs PyTorch a thread wake-up in every parallel
region instead: SwiftFormer-S eager training at batch 8 took 1001 ms with it against 662 ms
without (PERF_NOTES, session 10), so it favoured JAX. On a machine shared with other work, set
`OMP_WAIT_POLICY=PASSIVE` yourself; `benchmark.py` records the policy and the load average.

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
    """When `module_name` is "__main__", set the project's XLA settings (and, with
    `shares_gpu_with_torch`, JAX's on-demand GPU allocation); an imported script changes nothing.

    `argv` defaults to sys.argv; `environ` to this process's environment (only then is the
    allocator set too, as `xla_flags.apply` does).
    """
    argv = sys.argv if argv is None else argv
    if module_name != "__main__":
        return
    if shares_gpu_with_torch:
        environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if "--keep-ynn-fusion" not in argv:
        from swiftformer_jax import xla_flags

        xla_flags.apply(environ)
