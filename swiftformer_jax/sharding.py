"""Where every array lives: the device mesh and the sharding rules, in one place.

The mesh has two axes, `data` and `fsdp` (`config.mesh.data`, `config.mesh.fsdp`; -1 takes the
devices the other axis leaves). The rules:
  - batches are split along their first axis over both axes, (`data`, `fsdp`): every device holds
    a different slice of the global batch;
  - state arrays (params, batch statistics, optimizer moments, EMA) are replicated when small and,
    when `fsdp` > 1 and the array holds at least `min_size_mb`, split along their largest dimension
    that the `fsdp` size divides (big_vision's `fsdp` rule). The rule looks only at shapes, so an
    Adam moment always lives where its parameter lives.
With `fsdp` = 1 (the default) this is plain data parallelism: XLA all-reduces the gradient.

Everything goes through `jax.jit` with these shardings; there is no pmap, no leading device axis
and no explicit collective anywhere. Batch-norm statistics and losses are therefore those of the
global batch whatever the device count.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes with -1 resolved to the devices left over; checks they use every device."""
    sizes = {"data": data, "fsdp": fsdp}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{name} must be a positive size or -1 (the rest), got {size}")
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of config.mesh.data and config.mesh.fsdp may be -1")
    known = np.prod([s for s in sizes.values() if s != -1])
    if num_devices % known:
        raise ValueError(
            f"config.mesh (data={data}, fsdp={fsdp}) does not divide the {num_devices} devices"
        )
    resolved = tuple(num_devices // known if s == -1 else s for s in (data, fsdp))
    if resolved[0] * resolved[1] != num_devices:
        raise ValueError(
            f"config.mesh (data={data}, fsdp={fsdp}) uses {resolved[0] * resolved[1]} devices but "
            f"{num_devices} are available: the mesh must use them all (set one axis to -1)"
        )
    return resolved


def create_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (`data`, `fsdp`) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    # create_device_mesh orders devices so that neighbours on the mesh are close in the
    # interconnect; it only knows TPU/GPU topologies, so keep the given order otherwise.
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: first axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces `batch_sharding` splits a batch into."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def leaf_spec(shape: Sequence[int], itemsize: int, fsdp_size: int, min_size_mb: float) -> PartitionSpec:
    """The rule for one state array: replicated, or its largest `fsdp`-divisible dim over `fsdp`."""
    shape = tuple(shape)
    if fsdp_size <= 1 or not shape or np.prod(shape) * itemsize < min_size_mb * 2**20:
        return PartitionSpec()
    for axis in np.argsort(shape, kind="stable")[::-1]:  # largest dim first
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()  # no dim divides: replicate (small models never get here with fsdp=1)


def tree_shardings(abstract_tree: Any, mesh: Mesh, min_size_mb: float) -> Any:
    """NamedShardings for every leaf of a tree of arrays or `jax.ShapeDtypeStruct`s (state, teacher)."""
    fsdp_size = mesh.shape["fsdp"]

    def rule(leaf):
        spec = leaf_spec(np.shape(leaf), np.dtype(leaf.dtype).itemsize, fsdp_size, min_size_mb)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map(rule, abstract_tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s that carry their sharding (orbax restores straight into it)."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree, shardings,
    )


def put(host_tree: Any, shardings: Any) -> Any:
    """Host arrays (the same full values on every process) -> global arrays in `shardings`.

    `jax.device_put` only reaches this process's devices; each device here takes its own slice
    of the host array, so this works across processes too (teachers, fine-tuning weights).
    """
    def one(value, sharding):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(one, host_tree, shardings)


def check_batch_size(name: str, global_batch: int, mesh: Mesh, process_count: int) -> None:
    """Raise a clear ValueError when a global batch cannot be split over the devices and processes."""
    devices = mesh.devices.size
    if global_batch < 1:
        raise ValueError(f"{name} must be >= 1, got {global_batch}")
    if global_batch % devices:
        raise ValueError(
            f"{name}={global_batch} is not divisible by the {devices} devices of the mesh "
            f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}): use a multiple of {devices}"
        )
    if global_batch % process_count:
        raise ValueError(f"{name}={global_batch} is not divisible by the {process_count} processes")


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each process's slice of a batch into global arrays sharded by `sharding`.

    Every process passes its own `local_batch` (the input pipeline's per-process batch); the
    global batch is their concatenation in process order. Works unchanged with one process.
    """
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
