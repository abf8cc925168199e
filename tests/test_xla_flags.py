"""The project's XLA:CPU flags: added to XLA_FLAGS, never overriding what the user set."""

from __future__ import annotations

import subprocess
import sys

from swiftformer_jax import xla_flags


def test_flags_are_added_after_the_users_and_do_not_override_them():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply(env) == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=reduce")
    assert xla_flags.apply(env) == env["XLA_FLAGS"]  # idempotent
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    assert xla_flags.apply(mine) == "--xla_cpu_experimental_ynn_fusion_type="  # the user's choice stays
    assert xla_flags.apply({}) == "--xla_cpu_experimental_ynn_fusion_type=reduce"


def test_xla_accepts_the_flags():
    # XLA aborts the process on a flag it does not know or a value it refuses.
    code = ("from swiftformer_jax import xla_flags; xla_flags.apply(); import jax.numpy as jnp; "
            "print(float(jnp.ones((4, 4)).sum(axis=0).sum()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert proc.returncode == 0 and proc.stdout.strip() == "16.0", proc.stderr[-2000:]
