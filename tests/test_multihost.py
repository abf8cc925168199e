"""Several processes on one machine, as the hosts of a pod: two trainer processes preempted, resumed
and restored in one process; `compile_then_meet` connecting a process that compiles late."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import REPO, device_flags, free_port, run_processes
from swiftformer_jax import checkpoint, metrics, multihost, xla_flags

TESTS = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Several processes (the pod path): 2 processes x 4 CPU devices on this machine, then a restore in
# one process of 4 devices
# ---------------------------------------------------------------------------------------------

# The tiny config's values, given to main.py on the command line (and to tiny_config below).
TWO_PROCESS_CONFIG = dict(
    model__depths=(1, 1, 1, 1), model__widths=(8, 16, 16, 24), batch_size=32, eval_batch_size=64,
    total_steps=8, warmup_steps=1, learning_rate=5e-3, eval_every_steps=4, checkpoint_every_steps=4,
    log_every_steps=1, ema_decay=0.9,
)

RESTORE_IN_ONE_PROCESS = textwrap.dedent(r"""
    import json, os, sys
    sys.path[:0] = [REPO, TESTS]
    import jax
    from conftest import tiny_config
    from swiftformer_jax import checkpoint, sharding, train

    config = tiny_config(DATA_DIR, **OVERRIDES)
    run = train.setup(config)  # the mesh: data=4 on this process's 4 devices
    checkpointer = checkpoint.Checkpointer(os.path.join(WORKDIR, checkpoint.CHECKPOINT_DIR), keep=2)
    state, state_sh = train.initial_state(config, run, jax.random.key(0), checkpointer)  # the trainer's resume
    checkpointer.close()
    leaves = jax.tree_util.tree_leaves(state)
    _, eval_step = train.jit_steps(config, run.model, run.tx, run.schedule, run.data.num_classes, None,
                                   run.mesh, state_sh)
    metrics = train.evaluate(config, eval_step, state, sharding.batch_sharding(run.mesh), run.data.num_eval_examples)
    print("RESULT " + json.dumps({
        "processes": jax.process_count(), "devices": jax.device_count(), "step": int(state.step),
        "leaf_devices": sorted({len(leaf.sharding.device_set) for leaf in leaves}), **metrics}))
""")


def start_processes(commands, env, log_dir, name):
    """Start every command at once, each logging to `log_dir/<name><i>.log`."""
    logs = [open(os.path.join(log_dir, f"{name}{i}.log"), "w") for i in range(len(commands))]
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env) for c, log in zip(commands, logs)]
    for log in logs:
        log.close()
    return procs


def read_log(log_dir, name, i) -> str:
    with open(os.path.join(log_dir, f"{name}{i}.log")) as handle:
        return handle.read()


@pytest.mark.slow
def test_two_processes_preempted_on_one_host_save_together_resume_and_restore_in_one_process(tmp_path, digits_data_dir):
    workdir = tmp_path / "work"
    overrides = [f"--config.{key.replace('__', '.')}={value}".replace(" ", "")
                 for key, value in TWO_PROCESS_CONFIG.items()]
    args = [
        sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/quickstart.py"),
        f"--workdir={workdir}", f"--config.data_dir={digits_data_dir}", *overrides, "--num_processes=2",
    ]
    env = {**os.environ, "XLA_FLAGS": device_flags(4),
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}

    # Preemption of one host: SIGTERM to process 1 only, once training runs. JAX's preemption
    # sync point makes both processes save the same step and exit 0.
    port = free_port()
    procs = start_processes([args + [f"--coordinator_address=localhost:{port}", f"--process_id={i}"]
                             for i in range(2)], env, tmp_path, "preempted")
    try:
        deadline = time.time() + 600
        while "step 1/8" not in read_log(tmp_path, "preempted", 0):
            assert all(p.poll() is None for p in procs), read_log(tmp_path, "preempted", 0)[-3000:]
            assert time.time() < deadline, "no training step within 10 minutes"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [read_log(tmp_path, "preempted", i) for i in range(2)]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    stopped = [re.findall(r"Stopped at step (\d+) with a checkpoint", out) for out in outputs]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, outputs
    preempted_at = int(stopped[0][0])
    assert 1 < preempted_at < 8
    assert checkpoint.complete_steps(workdir / "checkpoints")[-1] == preempted_at

    # The same command again on both hosts: it resumes from that step and finishes.
    port = free_port()
    codes, outputs = run_processes([args + [f"--coordinator_address=localhost:{port}", f"--process_id={i}"]
                                    for i in range(2)], env, tmp_path, timeout=900)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert f"at step {preempted_at}." in outputs[0]
    assert "over 8 devices, 2 process(es)" in outputs[0] and "step 8/8" in outputs[0]
    assert "process 1 of 2; 4 local / 8 global devices" in outputs[1]
    assert "step 8/8" not in outputs[1]  # progress is logged by process 0 only
    records = metrics.read_metrics(str(workdir))  # written by process 0 only: one line per step
    assert [r["step"] for r in records] == list(range(1, 9))
    losses = [r["train/loss"] for r in records]
    assert np.isfinite(losses).all() and np.mean(losses[-2:]) < 0.95 * np.mean(losses[:2]), losses  # measured: 0.93
    assert all(r["eval/num_examples"] == 300 for r in records if r["step"] in (4, 8))
    assert 8 in checkpoint.complete_steps(workdir / "checkpoints")

    # The checkpoint the two processes wrote, restored in one process of 4 devices (resharded from
    # 8), evaluates exactly as the two processes evaluated it at step 8.
    code = (f"REPO, TESTS, DATA_DIR, WORKDIR = {REPO!r}, {TESTS!r}, {digits_data_dir!r}, {str(workdir)!r}\n"
            f"OVERRIDES = {TWO_PROCESS_CONFIG!r}\n" + RESTORE_IN_ONE_PROCESS)
    env = {**os.environ, "XLA_FLAGS": device_flags(4)}
    xla_flags.apply(env)  # and the project's XLA:CPU settings, as main.py runs
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    restored = json.loads(lines[-1][len("RESULT "):])
    assert (restored["processes"], restored["devices"], restored["step"]) == (1, 4, 8)
    assert restored["leaf_devices"] == [4]
    final = records[-1]
    for key in ("eval/accuracy", "eval/ema_accuracy", "eval/num_examples"):
        assert restored[key] == final[key], key
    for key in ("eval/loss", "eval/ema_loss"):
        assert restored[key] == pytest.approx(final[key], rel=1e-5), key


# ---------------------------------------------------------------------------------------------
# compile_then_meet: a process that compiles more than gloo's 30 s late still gets connected
# ---------------------------------------------------------------------------------------------

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
