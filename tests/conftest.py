"""Shared test setup: a persistent XLA compilation cache, the digits data set, a tiny trainer config.

Compiling a SwiftFormer train step takes tens of seconds on a 2-core CPU, and the training tests
compile the same programs several times (a run, its resumption, a subprocess). The persistent
compilation cache makes every compile after the first a cache hit; it stores compiled code only,
keyed by the program, so it cannot change a result. The environment variables reach subprocesses.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `from configs import ...`, as main.py does
    sys.path.insert(0, REPO)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "swiftformer_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# `pytest -n auto` runs as many workers as cores, each with PyTorch's threads: spinning OpenMP
# threads would take the cores the other workers need. Set before
# any test loads torch's libgomp, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from swiftformer_jax import xla_flags  # noqa: E402

# Tests compile far more than they run, so they compile for speed of compiling: LLVM's optimisation
# level 0, and XLA:CPU's older elemental emitters instead of its MLIR fusion emitters (the emitters
# alone take a quarter off the suite's CPU time: the README's test command under `time`, cold
# cache, 2 cores). The code either way computes the same function: SwiftFormer-S's logits and
# every gradient come out bit-identical with and without the emitters. Only the machine code is
# slower, which no test times. Then the flags main.py runs with. All reach subprocesses.
xla_flags.add_flags({"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"})
xla_flags.apply()  # before any test starts JAX's backend


# The test files, slowest first by their time on 2 cores from a cold compilation cache (the README's
# test command with `--durations=0`). `--dist loadfile` hands whole files to the workers in
# collection order, so the long ones start first and the short ones fill in at the end; by
# default pytest-xdist orders files by their number of tests, which started the one-test files
# (the fault injection, the two-process runs) last. Files not named here follow, in their order.
SLOWEST_FILES_FIRST = (
    "test_multihost.py", "test_faults.py", "test_parity.py", "test_train.py", "test_sharding.py",
    "test_export.py", "test_aot.py", "test_input_pipeline.py", "test_model.py", "test_gcs.py",
    "test_experiments.py", "test_accumulation.py", "test_ops.py", "test_regnet.py", "test_checkpoint.py",
    "test_convert.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection's file order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


def device_flags(count: int) -> str:
    """XLA_FLAGS for a subprocess with `count` simulated CPU devices, the suite's flags kept."""
    return f"--xla_force_host_platform_device_count={count} {os.environ['XLA_FLAGS']}"


@pytest.fixture(scope="session", autouse=True)
def _remove_tfds_scratch_dirs():
    """Remove the empty `tmp*tfds` directories this session left in the temp directory.

    TFDS makes one (`DatasetInfo.initialize_from_bucket`: mkdtemp before it looks for metadata on
    GCS, and never removes it) each time a builder is made for a data set not prepared yet: about
    15 per suite run, subprocesses included. Only empty ones go (`os.rmdir`), so a directory another
    process is filling is left alone.
    """
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.rmdir(path)
        except OSError:  # not empty, or gone already: not ours to remove
            pass


@pytest.fixture(autouse=True)
def _logging_as_found():
    """Give each test the project logger and the unraisable hook as the previous test found them.

    A command line's `logs.setup()` (export, predict, main) sends the `swiftformer_jax` logger to
    the sys.stderr of that moment: under `capsys` a capture that closes with the test. Kept, it
    would write a later test's INFO lines into a closed stream (a "Logging error" on that test's
    stderr). It also wraps sys.unraisablehook, which pytest reports through.
    """
    import logging

    logger = logging.getLogger("swiftformer_jax")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    unraisablehook = sys.unraisablehook
    yield
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
    sys.unraisablehook = unraisablehook


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the digits data set (written once per session, from scikit-learn)."""
    from swiftformer_jax import digits

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare(data_dir)
    return data_dir


def tiny_config(data_dir: str, **overrides):
    """The quickstart config shrunk to seconds: a 4-block network, batch 16, 6 steps.

    Eval uses batches of 64 over the 300 test images, so its last batch is padded (300 = 4*64 + 44).
    `overrides` are dotted keys with '__' for '.', e.g. model__drop_path_rate=0.1.
    """
    from configs import quickstart

    config = quickstart.get_config()
    config.data_dir = data_dir
    config.model.depths = (1, 1, 1, 1)
    config.model.widths = (8, 16, 16, 24)
    config.batch_size = 16
    config.eval_batch_size = 64
    config.total_steps = 6
    config.warmup_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.ema_decay = 0.9
    for key, value in overrides.items():
        *path, last = key.split("__")
        node = config
        for name in path:
            node = node[name]
        node[last] = value
    return config


def free_port() -> int:
    """A localhost port free right now, for a coordinator address."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(commands: list[list[str]], env: dict, log_dir, timeout: float) -> tuple[list[int], list[str]]:
    """Start every command at once (logs in `log_dir/p<i>.log`), wait for all, kill stragglers;
    returns (exit codes, outputs)."""
    logs = [open(os.path.join(log_dir, f"p{i}.log"), "w") for i in range(len(commands))]
    procs = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
             for command, log in zip(commands, logs)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            log.close()
    outputs = []
    for i in range(len(commands)):
        with open(os.path.join(log_dir, f"p{i}.log")) as handle:
            outputs.append(handle.read())
    return codes, outputs
