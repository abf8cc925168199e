"""The trainer's own train step compiled ahead of time for devices this host need not have: a TPU
topology from `libtpu` on a CPU host (`tpu_topology`), NVIDIA GPUs from the CUDA plugin and a
device description (`gpu_topology`), or this host's devices.

`compile_train_step(config, devices)` builds the run exactly as `train.setup` does (model, `impl`
from those devices, optimizer, mesh from `config.mesh`), takes the state and batch shardings from
`sharding.py`'s rules, and lowers and compiles `train.jit_steps`' train step, the function training
runs, donation included, from abstract arguments: nothing is allocated or run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from swiftformer_jax import input_pipeline, train
from swiftformer_jax import sharding as sharding_lib

# What libtpu needs to make compile-only TPU devices on a host that is not a TPU VM (and to stay
# quiet about it): set by `tpu_topology` unless already set.
_COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost"}


def accelerator_type(topology: str) -> str | None:
    """Cloud TPU's accelerator-type name of a topology ("v5e:4x4" -> "v5litepod-16"; v4 and v5p
    count TensorCores, two per chip), or None for a name it does not know."""
    family, _, dims = topology.partition(":")
    try:
        chips = math.prod(int(d) for d in dims.split("x"))
    except ValueError:
        return None
    names = {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}", "v4": f"v4-{2 * chips}", "v5p": f"v5p-{2 * chips}"}
    return names.get(family)


def tpu_topology(name: str) -> list:
    """Compile-only devices of a TPU topology such as "v5e:2x2" or "v5e:16x16" (needs `libtpu`;
    run with JAX_PLATFORMS=cpu on a host without TPUs)."""
    for key, value in {**_COMPILE_ONLY_ENV, "TPU_ACCELERATOR_TYPE": accelerator_type(name)}.items():
        if value is not None:
            os.environ.setdefault(key, value)
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(name, "tpu").devices)


# XLA's description of a GPU (its stream executor's DeviceDescription, as a GpuTargetConfig text
# proto): what the GPU compiler would read from the device. NVIDIA H100 SXM5 80GB: compute
# capability 9.0, 132 SMs, 50 MiB L2, 80 GB HBM3 (79.1 GiB usable) at 3.35 TB/s, 1.98 GHz boost;
# CUDA 12.8 and cuDNN 9.8, the versions jax-cuda12-plugin 0.10.2 is built for.
GPU_TARGETS = {
    "h100": """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}


def gpu_topology(name: str) -> list:
    """Compile-only NVIDIA GPUs: "h100:PxHxD" is P partitions of H hosts with D GPUs each (the CUDA
    plugin's topology shape), e.g. "h100:1x1x8" for one 8-GPU host. Needs jax-cuda12-plugin and
    jax-cuda12-pjrt importable (requirements-gpu.txt) and, on a host without a GPU,
    JAX_PLATFORMS=cpu and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 set before JAX starts (the plugin
    otherwise insists on loading the CUDA runtime)."""
    family, _, shape = name.partition(":")
    if family not in GPU_TARGETS:
        raise ValueError(f"GPU topology {name!r}: no device description for {family!r} (known: {sorted(GPU_TARGETS)})")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="cuda", topology=shape, target_config=GPU_TARGETS[family]).devices)
    except NotImplementedError as error:  # JAX has no "cuda" platform: the plugin is not importable
        raise RuntimeError(f"GPU topology {name!r}: the CUDA plugin is not loaded ({error}); install "
                           "requirements-gpu.txt and set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a host without a GPU") from error


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    compiled: Any  # jax.stages.Compiled: memory_analysis(), cost_analysis(), as_text()
    run: train.Setup
    abstract_state: Any  # the TrainState as ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    batch_sharding: Any


# ImageNet-1k's sizes, for compiling the official recipe without the data set at hand.
IMAGENET = input_pipeline.DatasetInfo(num_train_examples=1_281_167, num_eval_examples=50_000, num_classes=1000)


def abstract_teacher(config: ml_collections.ConfigDict, spec) -> tuple[Any, Any]:
    """(model, variables as ShapeDtypeStructs) of a teacher described by `spec` (a `ModelSpec` or
    `regnet.RegNetSpec`), built as `train.load_teacher` builds a loaded one: no weights needed."""
    return spec.build(dtype=train.teacher_dtype(config)), spec.abstract_variables()


def compile_train_step(config: ml_collections.ConfigDict, devices, *, process_count: int = 1,
                       data: input_pipeline.DatasetInfo | None = None, teacher_spec=None) -> CompiledStep:
    """Compile the train step of `config` for `devices` (as `train.train_and_evaluate` jits it).

    `data` gives the data set's sizes (e.g. `IMAGENET`) instead of reading them from the data set;
    `teacher_spec` the distillation teacher's architecture instead of loading its checkpoint."""
    teacher = None if teacher_spec is None else abstract_teacher(config, teacher_spec)
    run = train.setup(config, devices=devices, process_count=process_count, data=data, teacher=teacher)
    rng = jax.random.key(config.seed)
    abstract_state, state_shardings = train.abstract_train_state(run.model, run.tx, config, run.mesh, rng)
    teacher_variables, teacher_shardings = None, None
    if run.teacher is not None:
        teacher_shardings = sharding_lib.tree_shardings(run.teacher_variables, run.mesh, config.mesh.fsdp_min_size_mb)
        teacher_variables = sharding_lib.with_shardings(
            jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.teacher_variables),
            teacher_shardings)
    train_step, _ = train.jit_steps(config, run.model, run.tx, run.schedule, run.data.num_classes, run.teacher,
                                    run.mesh, state_shardings, teacher_shardings)
    batch_sharding = sharding_lib.batch_sharding(run.mesh)
    size = config.image_size
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch_sharding),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding)}
    key = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding_lib.replicated(run.mesh))
    compiled = train_step.lower(abstract_state, batch, key, teacher_variables).compile()
    return CompiledStep(compiled, run, abstract_state, state_shardings, batch_sharding)
