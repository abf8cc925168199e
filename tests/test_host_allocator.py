"""glibc allocator settings for CPU runs: a large block freed on a thread is reused, not re-faulted."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from swiftformer_jax import host_allocator

# In a fresh process, on a worker thread (XLA allocates its per-call buffers on one): malloc and
# fill 256 MiB, free it, malloc and fill it again; print the page faults of the second fill.
REFAULTS = """
import ctypes, ctypes.util, resource, sys, threading
if sys.argv[1] == "apply":
    from swiftformer_jax import host_allocator
    assert host_allocator.keep_freed_memory(), host_allocator.status
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size, faults = 2**28, []
def work():
    block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size); ctypes.memset(block, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
thread = threading.Thread(target=work); thread.start(); thread.join()
print(faults[0])
"""


def _refaults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", REFAULTS, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator settings are glibc's")
def test_freed_large_block_is_reused_without_page_faults():
    pages = 2**28 // 4096
    assert _refaults("default") > pages // 2  # glibc's default: unmapped, faulted in again
    assert _refaults("apply") < pages // 100  # kept in the heap and reused


@pytest.mark.parametrize("environ, expected", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "CPU"}, True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False),
    ({"JAX_PLATFORMS": "tpu"}, False),
])
def test_jax_platforms_decides_when_set(environ, expected):
    assert host_allocator.runs_on_cpu(environ) is expected


def test_without_jax_platforms_an_installed_accelerator_plugin_decides(monkeypatch):
    assert host_allocator.runs_on_cpu({}) is True  # this machine: jax with the CPU backend only
    monkeypatch.setattr(host_allocator, "ACCELERATOR_PLUGINS", ("json",))  # any importable module
    monkeypatch.setattr(host_allocator, "status", host_allocator.status)  # restored afterwards
    assert host_allocator.runs_on_cpu({}) is False
    assert host_allocator.apply_for_cpu({}) is False
    assert host_allocator.status == "not applied: an accelerator platform"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallinfo2 is glibc's")
def test_malloc_bytes_in_use_counts_a_live_block():
    import numpy as np

    in_use = host_allocator.malloc_bytes_in_use()
    before = in_use()
    block = np.ones(2**23)  # 64 MiB
    assert in_use() - before >= 60 * 2**20
    del block
