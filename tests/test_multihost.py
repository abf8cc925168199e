"""compile_then_meet: a process that compiles more than gloo's 30 s late still gets connected."""

from __future__ import annotations

import os
import sys
import textwrap

import jax
import pytest

from conftest import REPO, device_flags, free_port, run_processes
from swiftformer_jax import multihost

LATE_PROCESS = textwrap.dedent(r"""
    import sys, time
    sys.path.insert(0, REPO)
    import jax, jax.numpy as jnp, numpy as np
    jax.distributed.initialize(f"localhost:{PORT}", 2, PROCESS)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from swiftformer_jax import logs, multihost

    logs.setup()  # compile_then_meet logs each compile
    mesh = Mesh(np.array(jax.devices()), ("data",))
    step = multihost.compile_then_meet(
        jax.jit(lambda x: jnp.sum(x), out_shardings=NamedSharding(mesh, P())), "sum")
    def global_ones(n):
        return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones((n,), np.float32))
    if PROCESS == 1:
        time.sleep(DELAY)  # a compile this much slower than process 0's
    first = float(step(global_ones(2)))   # process 0 waits at the barrier, not in gloo's 30 s rendezvous
    again = float(step(global_ones(2)))   # the same signature: no new compile, no barrier
    other = float(step(global_ones(4)))   # a new signature: compiled and met again
    print("RESULTS", first, again, other, flush=True)
""")


def test_one_process_gets_the_jitted_function_back():
    jitted = jax.jit(lambda x: x + 1)
    assert multihost.compile_then_meet(jitted, "step") is jitted


@pytest.mark.slow
def test_a_process_compiling_35_s_late_still_connects(tmp_path):
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": device_flags(2),
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    commands = []
    for process in range(2):
        script = tmp_path / f"late{process}.py"
        script.write_text(f"REPO, PORT, PROCESS, DELAY = {REPO!r}, {port}, {process}, 35\n" + LATE_PROCESS)
        commands.append([sys.executable, str(script)])
    codes, outputs = run_processes(commands, env, tmp_path, timeout=300)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for output in outputs:
        assert "RESULTS 4.0 4.0 8.0" in output, output[-3000:]
        assert output.count("compiled (signature") == 2, output[-3000:]
