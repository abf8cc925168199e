"""The trainer's train step compiled for a TPU without a TPU: libtpu's compile-only devices of a
v5e:2x2 topology, a data=2 x fsdp=2 mesh, the tiny network (`aot.compile_train_step`).

libtpu is not installed into the environment (imported, it would try to start a TPU in every CPU
run): `.ci/run` and the README put it in `.venv/tpu-compiler`, and only the subprocess here
loads it, through TPU_LIBRARY_PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

TESTS = os.path.dirname(os.path.abspath(__file__))
LIBTPU = os.environ.get("TPU_LIBRARY_PATH") or os.path.join(REPO, ".venv", "tpu-compiler", "libtpu", "libtpu.so")
INSTALL = "pip install --no-deps --target .venv/tpu-compiler -r requirements-tpu.txt"

PROGRAM = textwrap.dedent(r"""
    import json, sys
    sys.path[:0] = [REPO, TESTS, REPO + "/experiments"]
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from conftest import tiny_config
    from swiftformer_jax import aot, sharding, train
    import tpu_plan

    devices = aot.tpu_topology("v5e:2x2")
    config = tiny_config(None, mesh__data=2, mesh__fsdp=2, mesh__fsdp_min_size_mb=0.0)
    step = aot.compile_train_step(config, devices, data=aot.IMAGENET)  # 1000 classes, no data read
    mesh = step.run.mesh
    (state_in, batch_in, *_), _ = step.compiled.input_shardings
    params = train.abstract_params(step.run.model, config.image_size)
    rule_mismatches, fsdp_leaves = [], 0
    for (path, leaf), compiled in zip(jax.tree_util.tree_leaves_with_path(params),
                                      jax.tree_util.tree_leaves(state_in.params)):
        spec = sharding.leaf_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, 2, 0.0)
        fsdp_leaves += "fsdp" in spec
        if not compiled.is_equivalent_to(NamedSharding(mesh, spec), len(leaf.shape)):
            rule_mismatches.append(jax.tree_util.keystr(path))
    memory = step.compiled.memory_analysis()
    comms = tpu_plan.summarize_collectives(tpu_plan.collectives(step.compiled.as_text(), 4))
    state_bytes = tpu_plan.state_bytes_per_chip(step.abstract_state, step.state_shardings)
    full_param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    print("RESULT " + json.dumps({
        "platforms": sorted({d.platform for d in mesh.devices.flat}), "mesh": dict(mesh.shape),
        "impl": step.run.model.impl, "classes": step.run.spec.num_classes, "params": len(jax.tree_util.tree_leaves(params)), "fsdp_leaves": fsdp_leaves,
        "rule_mismatches": rule_mismatches,
        "batch_is_split": batch_in["image"].is_equivalent_to(sharding.batch_sharding(mesh), 4),
        "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
        "flops": step.compiled.cost_analysis().get("flops", 0.0),
        "all_reduces": step.compiled.as_text().count("all-reduce("),
        "comms": comms, "param_bytes_per_chip": state_bytes["params"], "full_param_bytes": int(full_param_bytes),
    }))
""")


def test_train_step_compiles_for_a_tpu_slice_without_one():
    assert os.path.isfile(LIBTPU), f"libtpu is missing at {LIBTPU}: install it with `{INSTALL}`"
    code = f"REPO, TESTS = {REPO!r}, {TESTS!r}\n" + PROGRAM
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_LIBRARY_PATH": LIBTPU, "TPU_ACCELERATOR_TYPE": "v5litepod-4"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["platforms"] == ["tpu"] and r["mesh"] == {"data": 2, "fsdp": 2}
    assert r["classes"] == 1000
    assert r["impl"] == "xla"  # "auto", decided by the mesh's devices
    assert r["rule_mismatches"] == [] and r["fsdp_leaves"] > r["params"] // 2  # sharding.py's rules, compiled in
    assert r["batch_is_split"]
    assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0 and r["flops"] > 0  # the TPU compiler's analyses
    assert r["all_reduces"] > 0  # gradients and batch statistics meet across the data axis
    # experiments/tpu_plan.py's reading of the same program: the data axis all-reduces (group 2
    # or the whole slice), the fsdp axis gathers parameters, and a chip holds about half of them.
    assert r["comms"]["all-reduce"]["ring_bytes"] > 0 and r["comms"]["all-gather"]["count"] > 0
    assert set(r["comms"]["all-reduce"]["groups"]) <= {2, 4}
    assert r["full_param_bytes"] / 2 <= r["param_bytes_per_chip"] < 0.75 * r["full_param_bytes"]


GPU_COMPILER = os.path.join(REPO, ".venv", "gpu-compiler")
INSTALL_GPU = "pip install --no-deps --target .venv/gpu-compiler -r requirements-gpu.txt"

GPU_PROGRAM = textwrap.dedent(r"""
    import json, sys
    sys.path[:0] = [REPO, TESTS, REPO + "/experiments"]
    from conftest import tiny_config
    from swiftformer_jax import aot
    import tpu_plan

    devices = aot.gpu_topology("h100:1x1x2")
    config = tiny_config(None, mesh__data=2, mesh__fsdp=1)
    step = aot.compile_train_step(config, devices, data=aot.IMAGENET)
    hlo = step.compiled.as_text()
    memory = step.compiled.memory_analysis()
    print("RESULT " + json.dumps({
        "kinds": sorted({d.device_kind for d in step.run.mesh.devices.flat}), "impl": step.run.model.impl,
        "temp_bytes": memory.temp_size_in_bytes, "cudnn_convolutions": hlo.count("__cudnn$conv"),
        "matmul_flops": tpu_plan.matmul_flops(hlo), "hbm_bytes": tpu_plan.memory_traffic(hlo)["hbm_bytes"],
        "all_reduces": tpu_plan.summarize_collectives(tpu_plan.collectives(hlo, 2)).get("all-reduce", {}).get("count", 0),
    }))
""")


def test_train_step_compiles_for_gpus_without_one():
    """The CUDA plugin compiles for an H100 from its device description (`aot.GPU_TARGETS`) on
    this CPU host: the GPU program, cuDNN convolutions and NCCL all-reduces included."""
    assert os.path.isdir(os.path.join(GPU_COMPILER, "jax_plugins")), f"the CUDA plugin is missing: `{INSTALL_GPU}`"
    code = f"REPO, TESTS = {REPO!r}, {TESTS!r}\n" + GPU_PROGRAM
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
           "PYTHONPATH": os.pathsep.join([GPU_COMPILER, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["kinds"] == ["NVIDIA H100 80GB HBM3"] and r["impl"] == "xla"
    assert r["temp_bytes"] > 0 and r["cudnn_convolutions"] > 0 and r["all_reduces"] > 0
    assert r["matmul_flops"] > 0 and r["hbm_bytes"] > 0


def test_an_unknown_gpu_is_named():
    import pytest

    from swiftformer_jax import aot

    with pytest.raises(ValueError, match="'a100'"):
        aot.gpu_topology("a100:1x1x8")


def test_accelerator_type_names_the_cloud_tpu_slice():
    from swiftformer_jax import aot

    assert aot.accelerator_type("v5e:4x4") == "v5litepod-16" and aot.accelerator_type("v5e:16x16") == "v5litepod-256"
    assert aot.accelerator_type("v4:2x2x1") == "v4-8"  # v4 and v5p count TensorCores
    assert aot.accelerator_type("v9z:2x2") is None and aot.accelerator_type("v5e") is None


def test_an_abstract_teacher_takes_the_place_of_a_checkpoint():
    """The planner compiles distillation without teacher weights: `train.setup(teacher=...)`."""
    import jax

    from conftest import tiny_config
    from swiftformer_jax import aot, regnet, train

    config = tiny_config(None, distillation__kind="hard", distillation__teacher="/no/such/teacher",
                         distillation__teacher_dtype="bfloat16")
    spec = regnet.RegNetSpec.named("regnety_160", num_classes=1000)
    run = train.setup(config, data=aot.IMAGENET, teacher=aot.abstract_teacher(config, spec))
    assert isinstance(run.teacher, regnet.RegNetY) and run.teacher.dtype == jax.numpy.bfloat16
    leaves = jax.tree_util.tree_leaves(run.teacher_variables)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
