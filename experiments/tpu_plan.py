"""Before you rent a TPU slice (or GPUs): does a config fit, and how fast should the slice train it?

  python experiments/tpu_plan.py --config=configs/s.py --topology=v5e:4x4 \\
      [--config.dtype=bfloat16 --config.mesh.fsdp=16 --config.model.impl=xla ...] [--teacher=regnety_160]
  python experiments/tpu_plan.py --config=configs/s.py --topology=h100:1x1x8 ...   # one 8-GPU host
  python experiments/tpu_plan.py --matrix          # the committed results, experiments/results/tpu_plan.{json,md}

Compiles the trainer's own train step (`aot.compile_train_step`: `train.jit_steps`' function with
its shardings and donation) on this CPU host for a TPU topology with libtpu (requirements-tpu.txt,
in .venv/tpu-compiler) or for H100s with JAX's CUDA plugin (requirements-gpu.txt, in
.venv/gpu-compiler), for ImageNet-1k's sizes, from the config `main.py` takes. Nothing runs:
every figure is the compiler's own analysis of the program, per chip:

  memory    parameters, batch statistics, optimizer state and EMA (from the shardings), and the
            compiled program's argument, output, aliased (donated) and temporary bytes; the peak
            (arguments + outputs - aliased + temporaries) against the chip's HBM. A program that
            does not fit does not compile (the compiler's out-of-memory error is recorded).
  work      FLOPs and bytes accessed per step (`cost_analysis()`), per image; and the bytes each
            top-level instruction reads and writes, split by memory space from the program's
            layouts (`memory_traffic`): the compiler keeps many operands in on-chip memory
            (`S(1)`), and "bytes accessed" counts those too (a loop body once), so the HBM part,
            loops counted per trip, is what the HBM bandwidth bounds.
  comms     every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute in the
            optimised HLO, with its payload and group size, and the bytes a bandwidth-optimal ring
            sends per chip for it.
  roofline  step time = max(FLOPs / peak, HBM bytes / HBM bandwidth, ring bytes / ICI bandwidth), the
            published per-chip peaks of `CHIPS` below; images/s per chip and per slice; and what
            the whole run (`train.durations` of the config on ImageNet-1k) takes in hours and
            chip-hours at that rate. A roofline is a lower bound on time: no overlap is lost, no
            kernel is slower than its bound. Beside it, the pessimistic rate with every byte of
            "bytes accessed" at HBM speed.
  batch     with --fit_batch, the largest global batch that fits: peak memory is affine in the
            batch, fitted on this compile and one at half the per-chip batch, then checked by
            compiling the batch it predicts (stepping down while that does not fit).
  traffic   the activation-traffic estimate the HBM bytes are held against: per image, the bytes
            of the tensors reverse-mode autodiff saves (the leaves of `jax.vjp`'s residuals,
            measured with `jax.eval_shape`), written forward and read backward, plus gradients of
            the same size.

--teacher compiles hard or soft distillation (config.distillation.kind) with an abstract teacher of
that architecture (default RegNetY-160, the paper's), so no teacher weights are needed.

--matrix runs the cases of `MATRIX` (each in its own process), keeps the records already in the
JSON (delete a record, or the file, to recompile it) and writes the markdown report.
"""

from __future__ import annotations

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
LIBTPU = REPO / ".venv" / "tpu-compiler" / "libtpu" / "libtpu.so"
INSTALL = "pip install --no-deps --target .venv/tpu-compiler -r requirements-tpu.txt"
GPU_COMPILER = REPO / ".venv" / "gpu-compiler"
INSTALL_GPU = "pip install --no-deps --target .venv/gpu-compiler -r requirements-gpu.txt"
GPU_FAMILIES = ("h100",)


def _gpu_topology(topology: str) -> bool:
    return topology.split(":")[0] in GPU_FAMILIES


if __name__ == "__main__":  # before JAX starts: compile-only TPU or GPU devices on a CPU host
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_LIBRARY_PATH", str(LIBTPU))
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard with libtpu's lockfile
    if any(arg.startswith("--topology=") and _gpu_topology(arg.split("=", 1)[1]) for arg in sys.argv):
        sys.path.insert(0, str(GPU_COMPILER))  # the CUDA plugin, found by JAX among its jax_plugins
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA runtime to check here

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import fnmatch  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

RESULTS = HERE / "results"
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config (configs/*.py), as main.py takes it.", lock_config=False)
flags.DEFINE_string("topology", "v5e:4x4", "Topology to compile for: a TPU slice in libtpu's names (v5e:2x2, v5e:4x4, "
                    "v5e:16x16, ...) or one host of H100s, h100:1x1xGPUS.")
flags.DEFINE_string("teacher", "regnety_160", "Teacher architecture when config.distillation.kind is not 'none' "
                    "(a RegNetY name or a SwiftFormer variant); its weights are not needed.")
flags.DEFINE_bool("fit_batch", False, "Also find the largest global batch that fits (two or more further compiles).")
flags.DEFINE_string("name", "", "Record name (default: derived from the config).")
flags.DEFINE_string("output", "", "Merge the record into this JSON file (a list of records, by name).")
flags.DEFINE_bool("matrix", False, "Compile every case of MATRIX missing from --output (default "
                  "experiments/results/tpu_plan.json), then write the markdown report.")
flags.DEFINE_string("cases", "*", "With --matrix: only the cases matching this fnmatch pattern (e.g. 's-*-cpu').")
flags.DEFINE_bool("report", False, "Only rewrite the markdown report from the JSON.")
flags.DEFINE_string("hlo_dir", "", "Also write each compiled program's optimised HLO text to DIR/<name>.hlo.txt.")
flags.DEFINE_string("reread_hlo", "", "Only read the programs saved in DIR (by --hlo_dir) again into their records, "
                    "then rewrite the report: nothing is compiled.")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (https://cloud.google.com/tpu/docs/v5e)."""

    name: str
    peak_flops: float  # bf16 FLOP/s; float32 matmuls at JAX's default precision run as bf16 passes
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s each way (half the bidirectional figure)
    chips_per_host: int
    source: str = "https://cloud.google.com/tpu/docs/v5e"


CHIPS = {"v5e": Chip("TPU v5e", 197e12, 16 * 2**30, 819e9, 400e9 / 2, 8),
         # H100 SXM5: dense bf16 989 TFLOP/s, 3.35 TB/s HBM3, NVLink 900 GB/s bidirectional; the
         # memory is what the device description (aot.GPU_TARGETS) gives the compiler.
         "h100": Chip("NVIDIA H100 SXM5", 989e12, 84_929_347_584, 3.35e12, 900e9 / 2, 8,
                      "https://www.nvidia.com/en-us/data-center/h100/")}

# The committed matrix: SwiftFormer-S and -L3, official recipe at global batch 2048 (no teacher:
# kind=none), on v5e-16 and v5e-256, data-parallel and FSDP (fsdp=16 with every state array the
# rule can split, fsdp_min_size_mb=0), float32 and bfloat16, both implementations; then S with
# the paper's RegNetY-160 teacher, and the largest batch of S in bfloat16.
MATRIX: list[tuple[str, list[str]]] = []
for _variant in ("s", "l3"):
    for _topology in ("v5e:4x4", "v5e:16x16"):
        for _parallel in ("dp", "fsdp"):
            for _dtype in ("bfloat16", "float32"):
                for _impl in ("xla", "cpu"):
                    _name = f"{_variant}-{_topology.split(':')[1]}-{_parallel}-{'bf16' if _dtype == 'bfloat16' else 'f32'}-{_impl}"
                    _args = [f"--config=configs/{_variant}.py", f"--topology={_topology}", "--config.distillation.kind=none",
                             f"--config.dtype={_dtype}", f"--config.model.impl={_impl}"]
                    if _parallel == "fsdp":
                        _args += ["--config.mesh.fsdp=16", "--config.mesh.fsdp_min_size_mb=0"]
                    MATRIX.append((_name, _args))
MATRIX.append(("s-4x4-dp-bf16-xla-largest-batch",
               ["--config=configs/s.py", "--topology=v5e:4x4", "--config.distillation.kind=none",
                "--config.dtype=bfloat16", "--config.model.impl=xla", "--fit_batch"]))
for _topology in ("v5e:4x4", "v5e:16x16"):
    MATRIX.append((f"s-{_topology.split(':')[1]}-dp-bf16-xla-teacher",
                   ["--config=configs/s.py", f"--topology={_topology}", "--config.distillation.kind=hard",
                    "--config.dtype=bfloat16", "--config.model.impl=xla", "--teacher=regnety_160"]))
# The fit target: per-chip batch 256 (global 4096 on v5e-16), with FSDP and without.
for _parallel in ("dp", "fsdp"):
    MATRIX.append((f"s-4x4-{_parallel}-bf16-xla-per-chip-256",
                   ["--config=configs/s.py", "--topology=v5e:4x4", "--config.distillation.kind=none",
                    "--config.dtype=bfloat16", "--config.model.impl=xla", "--config.batch_size=4096"]
                   + (["--config.mesh.fsdp=16", "--config.mesh.fsdp_min_size_mb=0"] if _parallel == "fsdp" else [])))
# The same step for one 8-GPU H100 host (global batch 2048: 256 per GPU), both implementations.
for _impl in ("xla", "cpu"):
    MATRIX.append((f"s-h100x8-dp-bf16-{_impl}",
                   ["--config=configs/s.py", "--topology=h100:1x1x8", "--config.distillation.kind=none",
                    "--config.dtype=bfloat16", f"--config.model.impl={_impl}"]))
# The cases compiled first: what the README's answer rests on.
PRIORITY = ["s-4x4-dp-bf16-xla", "s-4x4-dp-bf16-cpu", "s-4x4-fsdp-bf16-xla", "s-16x16-dp-bf16-xla",
            "s-16x16-dp-bf16-cpu", "s-h100x8-dp-bf16-xla", "s-h100x8-dp-bf16-cpu", "s-4x4-dp-bf16-xla-per-chip-256",
            "s-4x4-fsdp-bf16-xla-per-chip-256", "s-4x4-dp-bf16-xla-teacher", "s-4x4-dp-bf16-xla-largest-batch",
            "s-16x16-dp-bf16-xla-teacher", "l3-4x4-dp-bf16-xla", "s-4x4-dp-f32-xla", "s-4x4-fsdp-bf16-cpu",
            "l3-4x4-dp-bf16-cpu", "s-16x16-fsdp-bf16-xla"]


# ----------------------------------------------------------------------------------------------
# Reading the compiled program
# ----------------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")


def _array_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _ARRAY.findall(text))


def _group_size(attributes: str, num_devices: int) -> int:
    """Devices in each replica group, from any of the HLO printer's forms: `mesh['axis_0'=4,...]
    [device_ids=(...)] {'axis_0',...}` (the named axes' sizes multiplied), `[groups,size]<=[...]`,
    `{{0,1},{2,3}}`; `{}` or none: every device."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
    if mesh:
        sizes = dict((name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
    if listed:
        return len(listed.group(1).split(","))
    return num_devices


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
    """Each collective of an optimised HLO module: kind, payload bytes (the full array: an
    all-reduce's operand, an all-gather's result, a reduce-scatter's input), group size, and the
    bytes a bandwidth-optimal ring sends per chip for it (all-reduce 2(n-1)/n of the payload;
    all-gather, reduce-scatter and all-to-all (n-1)/n; a permute its whole operand).

    The TPU program clones an asynchronous collective into several computations under one
    `channel_id`: each channel counts once. A collective inside a loop runs once per trip
    (`runs`; its ring bytes are per step)."""
    runs_of = _run_counts(*_parse_hlo(hlo_text))
    by_channel: dict = {}
    found = []
    computation = None
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            computation = header.group(2)
            continue
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        runs = runs_of.get(computation, 1)
        result_shape, kind, _, rest = match.groups()
        result_bytes = _array_bytes(result_shape)
        if kind == "collective-permute":
            first = _ARRAY.search(result_shape)  # -start's result is (operand, result, context...)
            result_bytes = _array_bytes(first.group(0)) if first else 0
            n = 2
        else:
            n = _group_size(rest, num_devices)
        payload = result_bytes * n if kind == "reduce-scatter" else result_bytes
        if n <= 1:
            ring = 0.0
        elif kind == "all-reduce":
            ring = 2 * (n - 1) / n * payload
        elif kind == "collective-permute":
            ring = float(payload)
        else:
            ring = (n - 1) / n * payload
        item = {"kind": kind, "payload_bytes": payload, "group": n, "runs": runs, "ring_bytes": ring * runs}
        channel = re.search(r"channel_id=(\d+)", rest)
        if channel:
            key = (kind, channel.group(1))
            if key not in by_channel or by_channel[key]["ring_bytes"] < item["ring_bytes"]:
                by_channel[key] = item
        else:
            found.append(item)
    return found + list(by_channel.values())


# An array with its layout, e.g. `bf16[128,56,56,48]{0,3,2,1:T(8,128)(2,1)S(1)}`: minor-to-major
# dimension order, tiles (each tile pads the most minor dimensions to its sizes) and memory space.
_LAID_OUT = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](?:\{([^}]*)\})?")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_HLO_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
               "replica-id", "opt-barrier"}
_SLICES = {"slice", "slice-start", "dynamic-slice"}


def _laid_out_bytes(dtype: str, dims: str, layout: str | None) -> tuple[int, int]:
    """(bytes as the chip stores the array, with its tiles' padding; memory space: 0 is HBM)."""
    shape = [int(d) for d in dims.split(",") if d]
    space = 0
    if layout:
        order_text, _, rest = layout.partition(":")
        order = [int(d) for d in order_text.split(",") if d]
        tile = re.search(r"T\(([0-9,]+)\)", rest)
        if tile and shape:
            sizes = [int(t) for t in tile.group(1).split(",")]
            for dim, size in zip(order, reversed(sizes)):  # the tile's last size pads the most minor dim
                shape[dim] = -(-shape[dim] // size) * size
        found = re.search(r"S\((\d+)\)", rest)
        space = int(found.group(1)) if found else 0
    return _DTYPE_BYTES[dtype] * math.prod(shape), space


def _split_bytes(text: str) -> tuple[int, int]:
    """(HBM bytes, other memory spaces' bytes) of the arrays in a shape's text."""
    hbm = other = 0
    for dtype, dims, layout in _LAID_OUT.findall(text):
        size, space = _laid_out_bytes(dtype, dims, layout or None)
        if space == 0:
            hbm += size
        else:
            other += size
    return hbm, other


def _parse_hlo(hlo_text: str):
    """({computation: [(name, result shape text, opcode, operand names, attributes, operand text)]}, entry)."""
    computations, current, entry = {}, None, None
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        match = _HLO_INSTRUCTION.match(line) if current is not None else None
        if match:
            name, shape, opcode, rest = match.groups()
            depth, end = 1, 0
            while end < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[end], 0)
                end += 1
            current.append((name, shape, opcode, re.findall(r"%([\w.\-]+)", rest[:end - 1]), rest[end:], rest[:end - 1]))
    return computations, entry


def _trip_count(condition: list) -> int | None:
    """A counted loop's trip count: the integer constant its condition compares with."""
    constants = [int(args) for _, _, opcode, _, _, args in condition if opcode == "constant" and re.fullmatch(r"-?\d+", args)]
    return constants[0] if len(constants) == 1 else None


def _in_place_updates(computations: dict, attributes: str) -> list[tuple[int, int, int]]:
    """(result index, parameter number, update bytes) for each output of a fusion that is a
    dynamic-update-slice of one of its parameters (the buffer is aliased in place and only the
    update is written) or the parameter itself, passed through (nothing is moved)."""
    called = re.search(r"calls=%([\w.\-]+)", attributes)
    body = computations.get(called.group(1), []) if called else []
    if not body:
        return []
    by_name = {name: (shape, opcode, operands, args) for name, shape, opcode, operands, _, args in body}
    root_name, _, root_opcode, root_operands, _, _ = body[-1]  # the printer puts ROOT last
    outputs = root_operands if root_opcode == "tuple" else [root_name]
    found = []
    for index, name in enumerate(outputs):
        shape, opcode, operands, _ = by_name.get(name, ("", "", [], ""))
        while opcode == "bitcast" and operands:  # through a bitcast to the update
            shape, opcode, operands, _ = by_name.get(operands[0], ("", "", [], ""))
        if opcode == "parameter" and by_name[name][3].isdigit():  # passed through untouched
            found.append((index, int(by_name[name][3]), 0))
            continue
        if opcode != "dynamic-update-slice" or len(operands) < 2:
            continue
        target = by_name.get(operands[0], ("", "", [], ""))
        if target[1] == "parameter" and target[3].isdigit():
            found.append((index, int(target[3]), sum(_split_bytes(by_name.get(operands[1], ("",))[0]))))
    return found


def _run_counts(computations: dict, entry: str) -> dict:
    """How often each computation runs per step: a loop's body and condition once per trip of
    every enclosing loop, anything else it calls (fusions, branches, reductions) as often as its caller."""
    runs = {entry: 1}
    pending = [entry]
    while pending:
        caller = pending.pop()
        for _, _, opcode, _, rest, _ in computations.get(caller, []):
            trips = 1
            if opcode == "while":
                condition = re.search(r"condition=%([\w.\-]+)", rest)
                trips = (_trip_count(computations.get(condition.group(1), [])) if condition else None) or 1
            for callee in re.findall(r"(?:calls|to_apply|body|condition|branch_computations|true_computation|"
                                     r"false_computation)=\{?%([\w.\-]+)", rest):
                count = runs[caller] * (trips if opcode == "while" else 1)
                if runs.get(callee, 0) < count:
                    runs[callee] = count
                    pending.append(callee)
    return runs


def _dims(text: str) -> list[int]:
    found = _LAID_OUT.search(text or "")
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def matmul_flops(hlo_text: str) -> int:
    """FLOPs of the program's dots and convolutions (2 per multiply-add), each as often as its
    computation runs: the matrix units' work, for a compiler that gives no cost analysis (the
    GPU's: dots, cuBLAS gemms and cuDNN convolutions, whose `dim_labels` describe the forward
    convolution). A convolution's multiply-adds are (output-shaped elements) x (kernel-shaped
    elements) / (output features), for the forward and both backward forms alike. Not for TPU
    programs, whose compiler rewrites dots into convolutions of other shapes."""
    computations, entry = _parse_hlo(hlo_text)
    runs = _run_counts(computations, entry)
    shapes = {name: shape for body in computations.values() for name, shape, *_ in body}
    total = 0
    for computation, body in computations.items():
        for _, shape, opcode, operands, rest, _ in body:
            times = runs.get(computation, 0)
            if not times:
                continue
            if opcode == "dot":
                lhs = _dims(shapes.get(operands[0], ""))
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
                k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
                total += 2 * math.prod(_dims(shape)) * k * times
            elif opcode == "custom-call" and "gemm" in rest and "lhs_contracting_dimensions" in rest:
                lhs = _dims(shapes.get(operands[0], ""))
                contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
                k = math.prod(lhs[int(d)] for d in re.findall(r"\d+", contracting.group(1)))
                total += 2 * math.prod(_dims(shape)) * k * times
            elif opcode == "convolution" or (opcode == "custom-call" and "__cudnn$conv" in rest):
                labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
                if not labels:
                    continue
                kernel_labels = labels.group(1)
                result = _dims(shape)
                if "convBackwardFilter" in rest:
                    out, kernel = _dims(shapes.get(operands[1], "")), result
                elif "convBackwardInput" in rest:
                    out, kernel = _dims(shapes.get(operands[0], "")), _dims(shapes.get(operands[1], ""))
                else:
                    out, kernel = result, _dims(shapes.get(operands[1], ""))
                if len(kernel) != len(kernel_labels):
                    continue
                total += 2 * math.prod(out) * math.prod(kernel) // kernel[kernel_labels.index("o")] * times
    return int(total)


def memory_traffic(hlo_text: str) -> dict:
    """Bytes the optimised program reads and writes, split by memory space, from its layouts: each
    top-level instruction (a fusion, a convolution, a copy, a collective...) reads its operands and
    writes its result; loops count once per trip, conditionals their largest branch.

    On a TPU, the compiler's memory-space assignment keeps many operands in on-chip memory
    (layout `S(1)`, the TensorCore's VMEM) and moves them with asynchronous copies
    (`copy-start`, `slice-start`); `cost_analysis()`'s "bytes accessed" adds up every operand
    wherever it lives. The HBM part, arrays in the default memory space (no `S(n)`), is what
    the HBM bandwidth bounds. Sizes include the tiles' padding, as the chip stores them.
    Returns the HBM bytes, the other spaces' bytes, their total, the total with each loop body
    counted once (as "bytes accessed" counts it: the check of this reading against the
    compiler's), the HBM bytes of the 12 largest opcodes, and the loops whose trip count was not
    found."""
    computations, entry = _parse_hlo(hlo_text)
    shapes = {name: shape for body in computations.values() for name, shape, *_ in body}
    by_opcode: dict = {}
    unknown_loops = []

    def walk(computation: str, times: int, per_trip: bool = True) -> tuple[int, int]:
        hbm = other = 0
        for name, shape, opcode, operands, rest, _ in computations.get(computation, []):
            if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
                continue
            if opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                trips = _trip_count(computations.get(re.search(r"condition=%([\w.\-]+)", rest).group(1), []))
                if trips is None and per_trip:
                    unknown_loops.append(name)
                h, o = walk(body, times * (trips or 1) if per_trip else times, per_trip)
            elif opcode == "conditional":
                branches = re.findall(r"%([\w.\-]+)", re.search(r"(branch_computations=\{[^}]*\}|true_computation=.*)", rest).group(1))
                h, o = max((walk(b, times, per_trip) for b in branches), key=sum)
            elif opcode == "call":
                h, o = walk(re.search(r"to_apply=%([\w.\-]+)", rest).group(1), times, per_trip)
            else:
                if opcode in _SLICES or opcode == "copy-start":
                    results = _LAID_OUT.findall(shape)
                    # an async copy's result is (source, destination, context): the moved bytes
                    moved = results[1] if opcode.endswith("-start") else results[0]
                    size, space = _laid_out_bytes(moved[0], moved[1], moved[2] or None)
                    source_space = _split_bytes(shapes.get(operands[0], "")) if operands else (0, 0)
                    h = size * (space == 0) + size * (source_space[0] > 0)
                    o = 2 * size - h
                elif opcode == "dynamic-update-slice":
                    update = _split_bytes(shapes.get(operands[1], ""))
                    target = 0 if _split_bytes(shape)[0] else 1
                    h = update[0] + (sum(update) if target == 0 else 0)
                    o = update[1] + (sum(update) if target == 1 else 0)
                else:
                    result = _split_bytes(shape)
                    inputs = [_split_bytes(shapes.get(operand, "")) for operand in operands]
                    h = result[0] + sum(i[0] for i in inputs)
                    o = result[1] + sum(i[1] for i in inputs)
                    if opcode == "fusion":  # an in-place update touches its slice, not the buffer
                        for index, parameter, update in _in_place_updates(computations, rest):
                            results = _LAID_OUT.findall(shape)
                            if index < len(results) and parameter < len(operands):
                                dtype, dims, layout = results[index]
                                size, space = _laid_out_bytes(dtype, dims, layout or None)
                                buffer = inputs[parameter]
                                h += (update - size) * (space == 0) - buffer[0]
                                o += (update - size) * (space != 0) - buffer[1]
                h, o = h * times, o * times
                if per_trip:
                    by_opcode[opcode] = by_opcode.get(opcode, 0) + h
            hbm += h
            other += o
        return hbm, other

    hbm, other = walk(entry, 1)
    top = dict(sorted(by_opcode.items(), key=lambda item: -item[1])[:12])
    return {"hbm_bytes": hbm, "on_chip_bytes": other, "total_bytes": hbm + other, "hbm_bytes_by_opcode": top,
            "total_bytes_loops_once": sum(walk(entry, 1, per_trip=False)), "loops_without_trip_count": unknown_loops}


def summarize_collectives(found: list[dict]) -> dict:
    summary = {}
    for item in found:
        entry = summary.setdefault(item["kind"], {"count": 0, "payload_bytes": 0, "ring_bytes": 0.0, "groups": []})
        entry["count"] += 1
        entry["payload_bytes"] += item["payload_bytes"]
        entry["ring_bytes"] += item["ring_bytes"]
        if item["group"] not in entry["groups"]:
            entry["groups"].append(item["group"])
    return summary


def state_bytes_per_chip(abstract_state, shardings) -> dict:
    """Bytes of each TrainState field on one chip (its shard of every array)."""
    import jax
    import numpy as np

    out = {}
    for field in ("params", "batch_stats", "opt_state", "ema_params", "ema_batch_stats"):
        leaves = jax.tree_util.tree_leaves(getattr(abstract_state, field))
        shards = jax.tree_util.tree_leaves(getattr(shardings, field))
        out[field] = int(sum(math.prod(s.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                             for leaf, s in zip(leaves, shards)))
    return out


def activation_traffic_per_image(model, image_size: int, dtype_name: str) -> dict:
    """Bytes per image of what reverse mode saves for the backward pass of the model's training
    forward (the residual leaves of `jax.vjp`, by `jax.eval_shape`: nothing is computed), from
    the difference between batches 16 and 8 (so weights saved once per step do not count), and
    the traffic estimate: saved tensors written and read, plus gradients of the same size (3x)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
                               jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))

    def residual_bytes(batch):
        images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)

        def forward(params, batch_stats, x):
            logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": jax.random.key(0), "drop_path": jax.random.key(1)})
            return logits

        def residuals(params, batch_stats, x):
            return jax.vjp(lambda p, xs: forward(p, batch_stats, xs), params, x)[1]

        vjp = jax.eval_shape(residuals, variables["params"], variables["batch_stats"], images)
        return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(vjp))

    saved = (residual_bytes(16) - residual_bytes(8)) / 8
    return {"saved_bytes": saved, "estimate_bytes": 3 * saved, "dtype": dtype_name}


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------


def _chip(topology: str) -> Chip:
    family, _, shape = topology.partition(":")
    if family not in CHIPS:
        raise app.UsageError(f"--topology={topology}: no published figures for {family!r} here (known: {sorted(CHIPS)})")
    if _gpu_topology(topology) and not re.fullmatch(r"1x1x\d+", shape):
        raise app.UsageError(f"--topology={topology}: GPU topologies here are one host, 1x1xGPUS (the roofline "
                             "knows NVLink, not the network between hosts)")
    return CHIPS[family]


def _compile(config, devices, process_count, teacher_spec):
    """(CompiledStep, seconds) or (None, the compiler's error) when the program does not fit."""
    from swiftformer_jax import aot

    start = time.perf_counter()
    try:
        step = aot.compile_train_step(config, devices, process_count=process_count, data=aot.IMAGENET,
                                      teacher_spec=teacher_spec)
    except Exception as error:  # noqa: BLE001 -- only out-of-memory is an answer; anything else is re-raised
        text = str(error)
        if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower() and "hbm" in text.lower():
            return None, text.strip().splitlines()[0][:400]
        raise
    return step, time.perf_counter() - start


def _peak(memory) -> int:
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes)


def _global_batch_step(config, chips: int) -> int:
    """Global batches must split over the chips and into whole BN / mixup groups and micro-batches."""
    step = chips
    for size in (config.bn_group_size, config.mixup.group_size if config.mixup.mixup_alpha or config.mixup.cutmix_alpha else 0,
                 config.microbatch_size):
        if size:
            step = step * size // math.gcd(step, size)
    return step


def fit_batch(config, devices, process_count, teacher_spec, first_peak: int, chip: Chip) -> dict:
    """The largest global batch whose step fits in HBM: affine fit of peak memory on two compiles
    (`config.batch_size` and half its per-chip batch), then compiles downwards from the prediction."""
    chips = len(devices)
    unit = _global_batch_step(config, chips)
    half = config.batch_size // 2 // unit * unit
    if half < unit or half == config.batch_size:
        return {"error": f"global batch {config.batch_size} has no smaller multiple of {unit} to fit against"}
    small = config.copy_and_resolve_references()
    small.batch_size = half
    step, seconds = _compile(small, devices, process_count, teacher_spec)
    if step is None:
        return {"error": f"batch {half} does not fit: {seconds}"}
    small_peak = _peak(step.compiled.memory_analysis())
    per_image = (first_peak - small_peak) / (config.batch_size - half)  # per global image (chips see 1/chips each)
    if per_image <= 0:
        return {"error": f"peak memory does not grow with the batch ({small_peak} bytes at {half}, "
                         f"{first_peak} at {config.batch_size}): no affine fit to extrapolate"}
    fixed = first_peak - per_image * config.batch_size
    predicted = int((chip.hbm_bytes - fixed) / per_image) // unit * unit
    tries = []
    batch = predicted
    while batch >= unit:
        candidate = config.copy_and_resolve_references()
        candidate.batch_size = batch
        step, result = _compile(candidate, devices, process_count, teacher_spec)
        tries.append({"batch": batch, "fits": step is not None,
                      "peak_bytes": _peak(step.compiled.memory_analysis()) if step is not None else None})
        if step is not None:
            break
        batch -= unit
    largest = tries[-1]["batch"] if tries and tries[-1]["fits"] else None
    return {"fit_points": [[half, small_peak], [config.batch_size, first_peak]], "fixed_bytes": fixed,
            "bytes_per_global_image": per_image, "predicted": predicted, "checked": tries,
            "largest_global_batch": largest, "largest_per_chip_batch": largest // chips if largest else None}


def read_program(record: dict, hlo: str, chip: Chip) -> dict:
    """Fill `record` with what the optimised program's text says, given the compiler's cost
    analysis already in it: collectives, HBM traffic, the FLOPs where the compiler counts none,
    the roofline and the run's hours. Also what `--reread_hlo` redoes from a saved program."""
    chips, per_chip, global_batch = record["chips"], record["per_chip_batch"], record["global_batch"]
    found = collectives(hlo, chips)
    flops, bytes_accessed = record["cost_analysis"]["flops"], record["cost_analysis"]["bytes_accessed"]
    if not flops:  # no cost analysis (the GPU compiler): the FLOPs of its dots and convolutions
        flops = float(matmul_flops(hlo))
    ring_bytes = sum(c["ring_bytes"] for c in found)
    traffic = memory_traffic(hlo)
    bounds = {"compute_s": flops / chip.peak_flops, "hbm_s": traffic["hbm_bytes"] / chip.hbm_bandwidth,
              "ici_s": ring_bytes / chip.ici_bandwidth}
    step_s = max(bounds.values())
    # The pessimistic bound: every byte "bytes accessed" counts, on-chip ones too, at HBM speed
    # (none where the compiler gives no cost analysis).
    all_bytes_s = max(bounds["compute_s"], bytes_accessed / chip.hbm_bandwidth, bounds["ici_s"]) if bytes_accessed else None
    total_steps = record["run"]["total_steps"]
    record.update({
        "flops": flops, "bytes_accessed": bytes_accessed,
        "flops_source": "cost_analysis" if record["cost_analysis"]["flops"] else "matmul_flops",
        "flops_per_image": flops / per_chip, "bytes_per_image": bytes_accessed / per_chip if bytes_accessed else None,
        "memory_traffic": traffic, "hbm_bytes_per_image": traffic["hbm_bytes"] / per_chip,
        # the reading against the compiler's own count (both with loop bodies once)
        "traffic_check": traffic["total_bytes_loops_once"] / bytes_accessed if bytes_accessed else None,
        "conditionals": hlo.count(" conditional("),
        "convolutions": hlo.count(" convolution("),
        "collectives": summarize_collectives(found), "ring_bytes": ring_bytes,
        "roofline": {**bounds, "step_s": step_s, "bound": max(bounds, key=bounds.get)[:-2],
                     "images_per_s_per_chip": per_chip / step_s, "images_per_s_per_slice": global_batch / step_s,
                     "all_bytes_at_hbm_speed_s": all_bytes_s,
                     "images_per_s_per_chip_all_bytes_at_hbm_speed": per_chip / all_bytes_s if all_bytes_s else None},
        "run": {**record["run"], "hours": total_steps * step_s / 3600, "chip_hours": total_steps * step_s * chips / 3600},
    })
    return record


def reread(output: pathlib.Path, hlo_dir: pathlib.Path) -> None:
    """Redo `read_program` for every record whose program `--hlo_dir` saved (after a change to how
    the program is read; nothing is compiled)."""
    records = _load(output)
    for record in records:
        path = hlo_dir / f"{record['name']}.hlo.txt"
        if record.get("memory") and path.exists():
            if "cost_analysis" not in record:  # a record written before the cost analysis had its own key
                record["cost_analysis"] = {"flops": record["flops"] if record.get("flops_source", "cost_analysis") == "cost_analysis" else 0.0,
                                           "bytes_accessed": record.get("bytes_accessed") or 0.0}
            read_program(record, path.read_text(), _chip(record["topology"]))
            print(f"reread {record['name']}")
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, output)


def plan(config, topology: str, teacher: str, with_fit: bool, hlo_path: pathlib.Path | None = None) -> dict:
    from swiftformer_jax import aot, regnet
    from swiftformer_jax.model import ModelSpec

    chip = _chip(topology)
    devices = aot.gpu_topology(topology) if _gpu_topology(topology) else aot.tpu_topology(topology)
    chips = len(devices)
    process_count = len({d.process_index for d in devices})
    teacher_spec = None
    if config.distillation.kind != "none":
        teacher_spec = (regnet.RegNetSpec.named(teacher, num_classes=aot.IMAGENET.num_classes)
                        if teacher.lower().startswith("regnet") else
                        ModelSpec.named(teacher, num_classes=aot.IMAGENET.num_classes))
    step, seconds = _compile(config, devices, process_count, teacher_spec)
    record = {"topology": topology, "chips": chips, "hosts": process_count, "global_batch": config.batch_size,
              "per_chip_batch": config.batch_size // chips, "variant": config.model.variant,
              "dtype": config.dtype, "impl_requested": config.model.impl,
              "mesh": {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "fsdp_min_size_mb": config.mesh.fsdp_min_size_mb},
              "distillation": config.distillation.kind,
              "teacher": teacher_spec.describe() if teacher_spec is not None else None}
    if step is None:
        return {**record, "fits": False, "compile_error": seconds}
    compiled, run = step.compiled, step.run
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}  # the GPU compiler gives none
    hlo = compiled.as_text()
    if hlo_path is not None:
        hlo_path.parent.mkdir(parents=True, exist_ok=True)
        hlo_path.write_text(hlo)
    total_steps = run.steps.total_steps
    record.update({
        "impl": run.model.impl, "mesh": {**record["mesh"], **dict(run.mesh.shape)}, "compile_s": seconds,
        "state_bytes": state_bytes_per_chip(step.abstract_state, step.state_shardings),
        "memory": {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
                   "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
                   "generated_code": memory.generated_code_size_in_bytes, "peak": _peak(memory),
                   "hbm": chip.hbm_bytes},
        "fits": _peak(memory) <= chip.hbm_bytes,
        "cost_analysis": {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))},
        "run": {"total_steps": total_steps, "epochs": config.num_epochs, "images": total_steps * config.batch_size},
        "traffic": activation_traffic_per_image(run.model, config.image_size, config.dtype),
    })
    read_program(record, hlo, chip)
    if with_fit:
        record["batch_fit"] = fit_batch(config, devices, process_count, teacher_spec, _peak(memory), chip)
    return record


# ----------------------------------------------------------------------------------------------
# Records and the report
# ----------------------------------------------------------------------------------------------


def _load(path: pathlib.Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _merge(path: pathlib.Path, record: dict) -> None:
    records = [r for r in _load(path) if r["name"] != record["name"]] + [record]
    order = {name: i for i, (name, _) in enumerate(MATRIX)}
    records.sort(key=lambda r: order.get(r["name"], len(order)))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)


def _machine() -> dict:
    import jax
    import jaxlib

    import importlib.metadata

    where = pathlib.Path(os.environ.get("TPU_LIBRARY_PATH", LIBTPU)).parent.parent
    libtpu_version = next((d.version for d in importlib.metadata.distributions(path=[str(where)])
                           if d.metadata["Name"] == "libtpu"), "unknown")
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "libtpu": libtpu_version, "date": datetime.date.today().isoformat()}


def _trusted(check) -> bool:
    """Whether the layout reading agrees with the compiler's count (None: no count to check)."""
    return check is None or 0.8 <= check <= 1.25


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.0f}"


def _rate(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def write_report(path: pathlib.Path) -> pathlib.Path:
    records = _load(path)
    done = {r["name"] for r in records}
    lines = [
        "# Pod plan: the trainer's train step compiled for TPU v5e slices and an 8-GPU H100 host on a CPU host",
        "",
        f"Command: `python experiments/tpu_plan.py --matrix` (one case: `python experiments/tpu_plan.py "
        f"--config=configs/s.py --topology=v5e:4x4 --config.dtype=bfloat16 ...`). Each record's command is in "
        f"`{path.name}`. Nothing ran on a TPU or a GPU: every figure is the compiler's analysis (libtpu's "
        "compile-only devices; the CUDA plugin with an H100's device description, `aot.GPU_TARGETS`) of the "
        "program `main.py` would run, for ImageNet-1k's sizes (1000 classes, 1,281,167 training images), global "
        "batch 2048, the official recipe; per chip (or GPU) unless stated.",
        "",
        f"Peaks used: TPU v5e ({CHIPS['v5e'].source}) {CHIPS['v5e'].peak_flops / 1e12:.0f} TFLOP/s bf16 (float32 "
        f"matmuls at JAX's default precision are bf16 passes, so the same peak), HBM {CHIPS['v5e'].hbm_bytes / 2**30:.0f} "
        f"GiB at {CHIPS['v5e'].hbm_bandwidth / 1e9:.0f} GB/s, ICI {2 * CHIPS['v5e'].ici_bandwidth / 1e9:.0f} GB/s "
        f"bidirectional ({CHIPS['v5e'].ici_bandwidth / 1e9:.0f} GB/s each way); H100 SXM5 ({CHIPS['h100'].source}) "
        f"{CHIPS['h100'].peak_flops / 1e12:.0f} TFLOP/s dense bf16, {CHIPS['h100'].hbm_bytes / 2**30:.1f} GiB at "
        f"{CHIPS['h100'].hbm_bandwidth / 1e12:.2f} TB/s, NVLink {2 * CHIPS['h100'].ici_bandwidth / 1e9:.0f} GB/s "
        "bidirectional. Roofline step = max(compute, HBM, interconnect); a lower bound on the real step time. "
        "The GPU compiler gives no cost analysis: its GFLOP/img (marked *) count the dots and convolutions "
        "(`matmul_flops`), its HBM bytes every fusion's operands and results (no cache).",
        "",
        "Bytes: \"accessed\" is `cost_analysis()`'s figure, every operand and result of every instruction "
        "wherever it lives (a loop body once). \"HBM\" is the part in HBM, read from the program's layouts "
        "(`memory_traffic`: arrays without an on-chip memory space `S(n)`, tiles' padding included, loops per "
        "trip); the roofline's HBM bound uses it. \"all at HBM speed\" is the rate if every accessed byte "
        "went through HBM: the pessimistic bound.",
        "",
        "Traffic estimate: per image, the tensors reverse mode saves (bytes of `jax.vjp`'s residuals) "
        "written forward, read backward, plus gradients of the same size (3x the saved bytes).",
        "",
        "| case | impl | mesh | per-chip batch | conditionals | state GiB | temp GiB | peak GiB (of HBM) | fits | GFLOP/img | accessed MB/img | HBM MB/img | traffic est. MB/img | collectives (count, MB sent/chip) | bound | img/s/chip | all at HBM speed: img/s/chip | img/s/slice | 300 epochs: h | chip-h |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if not r.get("memory"):
            lines.append(f"| {r['name']} | {r.get('impl_requested')} | | {r.get('per_chip_batch')} | | | | no: {r.get('compile_error', '')[:80]} | | | | | | | | | | | |")
            continue
        state = sum(r["state_bytes"].values())
        comms = ", ".join(f"{k} {v['count']}" for k, v in r["collectives"].items())
        roof, run = r["roofline"], r["run"]
        lines.append(
            f"| {r['name']} | {r['impl']} | data {r['mesh']['data']} x fsdp {r['mesh']['fsdp']} | {r['per_chip_batch']} | {r['conditionals']} | "
            f"{_gib(state)} | {_gib(r['memory']['temp'])} | {_gib(r['memory']['peak'])} ({_gib(r['memory']['hbm'])}) | {'yes' if r['fits'] else 'no'} | "
            f"{r['flops_per_image'] / 1e9:.2f}{'' if r.get('flops_source', 'cost_analysis') == 'cost_analysis' else '*'} | "
            f"{_mb(r['bytes_per_image'])} | {r['hbm_bytes_per_image'] / 1e6:.0f}{'' if _trusted(r.get('traffic_check')) else '?'} | "
            f"{r['traffic']['estimate_bytes'] / 1e6:.0f} | "
            f"{comms} ({r['ring_bytes'] / 1e6:.1f} MB) | {roof['bound']} | {roof['images_per_s_per_chip']:,.0f} | "
            f"{_rate(roof['images_per_s_per_chip_all_bytes_at_hbm_speed'])} | "
            f"{roof['images_per_s_per_slice']:,.0f} | {run['hours']:.1f} | {run['chip_hours']:,.0f} |")
    checked = {r["name"]: r["traffic_check"] for r in records if r.get("traffic_check")}
    trusted = [ratio for ratio in checked.values() if _trusted(ratio)]
    if checked:
        lines += ["", f"Check of the layout reading: with each loop body counted once, as the compiler counts it, "
                  f"`memory_traffic`'s all-spaces total is {min(trusted):.0%} to {max(trusted):.0%} of \"bytes accessed\" "
                  f"in {len(trusted)} of the {len(checked)} TPU cases."]
        if len(trusted) < len(checked):
            lines[-1] += (" Outside 80-125%, where the HBM figure (marked ?) and its roofline are not to be trusted: "
                          + ", ".join(f"{name} ({ratio:.0%})" for name, ratio in checked.items() if not _trusted(ratio))
                          + ".")
    fits = [r for r in records if r.get("batch_fit")]
    if fits:
        lines += ["", "## Largest batch that fits", "",
                  "Peak memory is affine in the batch: fitted on two compiles, then the predicted batch compiled "
                  "(stepping down by the smallest valid increment while it does not fit).", "",
                  "| case | fitted bytes per global image | fixed bytes | predicted global batch | checked | largest global batch | per chip |",
                  "|---|---|---|---|---|---|---|"]
        for r in fits:
            f = r["batch_fit"]
            if "error" in f:
                lines.append(f"| {r['name']} | {f['error']} | | | | | |")
                continue
            checked = ", ".join(f"{c['batch']}: {'fits' if c['fits'] else 'no'}" for c in f["checked"])
            lines.append(f"| {r['name']} | {f['bytes_per_global_image'] / 1e6:.1f} MB | {_gib(f['fixed_bytes'])} GiB | "
                         f"{f['predicted']} | {checked} | {f['largest_global_batch']} | {f['largest_per_chip_batch']} |")
    lines += ["", "## Reproducing the paper", "",
              "300 epochs of ImageNet-1k as the trainer counts them (`train.durations`: whole global batches of "
              "one pass over the 1,281,167 training images; repeated augmentation draws 3 copies of each image "
              "within that budget), at the roofline rate:", ""]
    for r in records:
        if (r.get("run") and r["variant"] == "S" and r["dtype"] == "bfloat16" and r["impl"] == "xla"
                and r["mesh"]["fsdp"] == 1 and not r.get("batch_fit")):
            teacher = f"with the {r['teacher']} teacher" if r.get("teacher") else "without a teacher"
            where = f"{r['chips']} H100s" if _gpu_topology(r["topology"]) else f"v5e-{r['chips']}"
            slow = r["roofline"].get("all_bytes_at_hbm_speed_s")
            pessimistic = (f"; {r['run']['total_steps'] * slow / 3600:.2f} h ({r['run']['total_steps'] * slow * r['chips'] / 3600:,.0f} "
                           f"chip-hours) if every accessed byte went through HBM" if slow else "")
            lines.append(f"- SwiftFormer-S on {where}, bfloat16, {teacher}, global batch {r['global_batch']}: "
                         f"{r['run']['total_steps']:,} steps, "
                         f"{r['run']['hours']:.2f} h ({r['run']['chip_hours']:,.0f} chip-hours) at "
                         f"{r['roofline']['images_per_s_per_slice']:,.0f} images/s ({r['roofline']['bound']}-bound){pessimistic}.")
    missing = [name for name, _ in MATRIX if name not in done]
    if missing:
        lines += ["", f"Not compiled yet ({len(missing)} of {len(MATRIX)} cases; `--matrix` compiles them): "
                  + ", ".join(missing) + "."]
    if records:
        m = records[-1].get("machine", {})
        lines += ["", f"Compiled on {m.get('cpu')} ({m.get('cores')} cores), Python {m.get('python')}, jax "
                  f"{m.get('jax')}, libtpu {m.get('libtpu')}, {m.get('date')}; compile times per case are in the JSON."]
    out = path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


def _case_name(config, topology: str) -> str:
    parallel = "fsdp" if config.mesh.fsdp > 1 else "dp"
    dtype = "bf16" if config.dtype == "bfloat16" else "f32"
    return f"{config.model.variant.lower()}-{topology.split(':')[1]}-{parallel}-{dtype}-{config.model.impl}"


def run_matrix(output: pathlib.Path, pattern: str) -> None:
    failed = []
    order = sorted(MATRIX, key=lambda case: PRIORITY.index(case[0]) if case[0] in PRIORITY else len(PRIORITY))
    for name, args in order:
        if not fnmatch.fnmatch(name, pattern) or any(r["name"] == name for r in _load(output)):
            continue
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), *args, f"--name={name}", f"--output={output}"]
        if FLAGS.hlo_dir:
            command.append(f"--hlo_dir={FLAGS.hlo_dir}")
        print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {shlex.join(command[1:])}", flush=True)
        if subprocess.run(command, cwd=REPO).returncode != 0:
            failed.append(name)  # the next cases still compile; the failure is reported at the end
        write_report(output)
    print(f"wrote {write_report(output)}")
    if failed:
        raise SystemExit(f"{len(failed)} case(s) failed (their errors are above): {', '.join(failed)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    output = pathlib.Path(FLAGS.output) if FLAGS.output else RESULTS / "tpu_plan.json"
    if FLAGS.reread_hlo:
        reread(output, pathlib.Path(FLAGS.reread_hlo))
        print(f"wrote {write_report(output)}")
        return
    if FLAGS.report:
        print(f"wrote {write_report(output)}")
        return
    if FLAGS.matrix:
        run_matrix(output, FLAGS.cases)
        return
    if FLAGS.config is None:
        raise app.UsageError("--config is required (or --matrix / --report)")
    if _gpu_topology(FLAGS.topology):
        if not (GPU_COMPILER / "jax_plugins").is_dir():
            raise app.UsageError(f"the CUDA plugin is missing at {GPU_COMPILER}: install it with `{INSTALL_GPU}`")
    elif not pathlib.Path(os.environ["TPU_LIBRARY_PATH"]).is_file():
        raise app.UsageError(f"libtpu is missing at {os.environ['TPU_LIBRARY_PATH']}: install it with `{INSTALL}`")
    from swiftformer_jax import logs

    logs.setup(verbose=False)
    config = FLAGS.config
    name = FLAGS.name or _case_name(config, FLAGS.topology)
    hlo_path = pathlib.Path(FLAGS.hlo_dir) / f"{name}.hlo.txt" if FLAGS.hlo_dir else None
    record = {"name": name,
              "command": "python experiments/tpu_plan.py " + shlex.join(
                  a for a in sys.argv[1:] if not a.startswith(("--output", "--name", "--hlo_dir"))),
              **plan(config, FLAGS.topology, FLAGS.teacher, FLAGS.fit_batch, hlo_path), "machine": _machine()}
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine",)}, indent=1))
    if FLAGS.output:
        _merge(output, record)


if __name__ == "__main__":
    app.run(main)
