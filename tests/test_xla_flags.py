"""The project's XLA:CPU flags: added to XLA_FLAGS, never overriding what the user set."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator settings are glibc's")
def test_apply_also_sets_the_allocator_for_this_process_on_cpu():
    code = ("from swiftformer_jax import host_allocator, xla_flags; xla_flags.apply({}); print(host_allocator.status); "
            "xla_flags.apply(); print(host_allocator.status)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # A dict other than os.environ only gets flags; this process's environment gets the allocator too.
    assert proc.stdout.splitlines() == ["not applied", "applied: glibc arena_max=1, mmap_max=0, trim off"]
