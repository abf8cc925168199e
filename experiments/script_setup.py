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
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping, Sequence


def prepare(
    module_name: str, argv: Sequence[str] | None = None, environ: MutableMapping[str, str] = os.environ
) -> None:
    """Set OMP_WAIT_POLICY and, when `module_name` is "__main__", the project's XLA settings.

    `argv` defaults to sys.argv; `environ` to this process's environment (only then is the
    allocator set too, as `xla_flags.apply` does).
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv if argv is None else argv
    if module_name == "__main__" and "--keep-ynn-fusion" not in argv:
        from swiftformer_jax import xla_flags

        xla_flags.apply(environ)
