"""Before you rent a TPU slice: does a config fit, and how fast should the slice train it?

  python experiments/tpu_plan.py --config=configs/s.py --topology=v5e:4x4 \\
      [--config.dtype=bfloat16 --config.mesh.fsdp=16 --config.model.impl=xla ...] [--teacher=regnety_160]
  python experiments/tpu_plan.py --matrix          # the committed results, experiments/results/tpu_plan.{json,md}

Compiles the trainer's own train step (`aot.compile_train_step`: `train.jit_steps`' function with
its shardings and donation) for a TPU topology on this CPU host with libtpu (requirements-tpu.txt,
in .venv/tpu-compiler), for ImageNet-1k's sizes, from the config `main.py` takes. Nothing runs:
every figure is the TPU compiler's own analysis of the program, per chip:

  memory    parameters, batch statistics, optimizer state and EMA (from the shardings), and the
            compiled program's argument, output, aliased (donated) and temporary bytes; the peak
            (arguments + outputs - aliased + temporaries) against the chip's HBM. A program that
            does not fit does not compile (the compiler's out-of-memory error is recorded).
  work      FLOPs and HBM bytes accessed per step (`cost_analysis()`), per image.
  comms     every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute in the
            optimised HLO, with its payload and group size, and the bytes a bandwidth-optimal ring
            sends per chip for it.
  roofline  step time = max(FLOPs / peak, bytes / HBM bandwidth, ring bytes / ICI bandwidth), the
            published per-chip peaks of `CHIPS` below; images/s per chip and per slice; and what
            the whole run (`train.durations` of the config on ImageNet-1k) takes in hours and
            chip-hours at that rate. A roofline is a lower bound on time: no overlap is lost, no
            kernel is slower than its bound.
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

if __name__ == "__main__":  # before JAX starts: compile-only TPU devices on a CPU host
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_LIBRARY_PATH", str(LIBTPU))
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard with libtpu's lockfile

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
flags.DEFINE_string("topology", "v5e:4x4", "TPU topology to compile for (libtpu's names: v5e:2x2, v5e:4x4, v5e:16x16, ...).")
flags.DEFINE_string("teacher", "regnety_160", "Teacher architecture when config.distillation.kind is not 'none' "
                    "(a RegNetY name or a SwiftFormer variant); its weights are not needed.")
flags.DEFINE_bool("fit_batch", False, "Also find the largest global batch that fits (two or more further compiles).")
flags.DEFINE_string("name", "", "Record name (default: derived from the config).")
flags.DEFINE_string("output", "", "Merge the record into this JSON file (a list of records, by name).")
flags.DEFINE_bool("matrix", False, "Compile every case of MATRIX missing from --output (default "
                  "experiments/results/tpu_plan.json), then write the markdown report.")
flags.DEFINE_string("cases", "*", "With --matrix: only the cases matching this fnmatch pattern (e.g. 's-*-cpu').")
flags.DEFINE_bool("report", False, "Only rewrite the markdown report from the JSON.")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (https://cloud.google.com/tpu/docs/v5e)."""

    name: str
    peak_flops: float  # bf16 FLOP/s; float32 matmuls at JAX's default precision run as bf16 passes
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s each way (half the bidirectional figure)
    chips_per_host: int


CHIPS = {"v5e": Chip("TPU v5e", 197e12, 16 * 2**30, 819e9, 400e9 / 2, 8)}

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
# The cases compiled first: what the README's answer rests on.
PRIORITY = ["s-4x4-dp-bf16-xla", "s-4x4-dp-bf16-cpu", "s-4x4-fsdp-bf16-xla", "s-16x16-dp-bf16-xla",
            "s-4x4-dp-bf16-xla-largest-batch",
            "s-4x4-dp-bf16-xla-teacher", "s-16x16-dp-bf16-xla-teacher", "l3-4x4-dp-bf16-xla", "s-4x4-dp-f32-xla"]


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
    `channel_id`: each channel counts once. A collective inside a loop counts once, not per trip."""
    by_channel: dict = {}
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
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
        item = {"kind": kind, "payload_bytes": payload, "group": n, "ring_bytes": ring}
        channel = re.search(r"channel_id=(\d+)", rest)
        if channel:
            key = (kind, channel.group(1))
            if key not in by_channel or by_channel[key]["payload_bytes"] < payload:
                by_channel[key] = item
        else:
            found.append(item)
    return found + list(by_channel.values())


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
    family = topology.split(":")[0]
    if family not in CHIPS:
        raise app.UsageError(f"--topology={topology}: no published figures for {family!r} here (known: {sorted(CHIPS)})")
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


def plan(config, topology: str, teacher: str, with_fit: bool) -> dict:
    from swiftformer_jax import aot, regnet
    from swiftformer_jax.model import ModelSpec

    chip = _chip(topology)
    devices = aot.tpu_topology(topology)
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
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    hlo = compiled.as_text()
    found = collectives(hlo, chips)
    flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    ring_bytes = sum(c["ring_bytes"] for c in found)
    per_chip = config.batch_size // chips
    bounds = {"compute_s": flops / chip.peak_flops, "hbm_s": bytes_accessed / chip.hbm_bandwidth,
              "ici_s": ring_bytes / chip.ici_bandwidth}
    step_s = max(bounds.values())
    total_steps = run.steps.total_steps
    record.update({
        "impl": run.model.impl, "mesh": {**record["mesh"], **dict(run.mesh.shape)}, "compile_s": seconds,
        "state_bytes": state_bytes_per_chip(step.abstract_state, step.state_shardings),
        "memory": {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
                   "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
                   "generated_code": memory.generated_code_size_in_bytes, "peak": _peak(memory),
                   "hbm": chip.hbm_bytes},
        "fits": _peak(memory) <= chip.hbm_bytes,
        "flops": flops, "bytes_accessed": bytes_accessed,
        "flops_per_image": flops / per_chip, "bytes_per_image": bytes_accessed / per_chip,
        "conditionals": hlo.count(" conditional("),
        "convolutions": hlo.count(" convolution("),
        "collectives": summarize_collectives(found), "ring_bytes": ring_bytes,
        "roofline": {**bounds, "step_s": step_s, "bound": max(bounds, key=bounds.get)[:-2],
                     "images_per_s_per_chip": per_chip / step_s, "images_per_s_per_slice": config.batch_size / step_s},
        "run": {"total_steps": total_steps, "epochs": config.num_epochs, "images": total_steps * config.batch_size,
                "hours": total_steps * step_s / 3600, "chip_hours": total_steps * step_s * chips / 3600},
        "traffic": activation_traffic_per_image(run.model, config.image_size, config.dtype),
    })
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


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def write_report(path: pathlib.Path) -> pathlib.Path:
    records = _load(path)
    done = {r["name"] for r in records}
    lines = [
        "# TPU pod plan: the trainer's train step compiled for TPU v5e slices on a CPU host",
        "",
        f"Command: `python experiments/tpu_plan.py --matrix` (one case: `python experiments/tpu_plan.py "
        f"--config=configs/s.py --topology=v5e:4x4 --config.dtype=bfloat16 ...`). Each record's command is in "
        f"`{path.name}`. Nothing ran on a TPU: every figure is the TPU compiler's analysis (libtpu, "
        "compile-only devices) of the program `main.py` would run, for ImageNet-1k's sizes (1000 classes, "
        "1,281,167 training images), global batch 2048, the official recipe; per chip unless stated.",
        "",
        f"Peaks used (TPU v5e, https://cloud.google.com/tpu/docs/v5e): {CHIPS['v5e'].peak_flops / 1e12:.0f} "
        f"TFLOP/s bf16 (float32 matmuls at JAX's default precision are bf16 passes, so the same peak), HBM "
        f"{CHIPS['v5e'].hbm_bytes / 2**30:.0f} GiB at {CHIPS['v5e'].hbm_bandwidth / 1e9:.0f} GB/s, ICI "
        f"{2 * CHIPS['v5e'].ici_bandwidth / 1e9:.0f} GB/s bidirectional ({CHIPS['v5e'].ici_bandwidth / 1e9:.0f} "
        "GB/s each way). Roofline step = max(compute, HBM, ICI); a lower bound on the real step time.",
        "",
        "Traffic estimate: per image, the tensors reverse mode saves (bytes of `jax.vjp`'s residuals) "
        "written forward, read backward, plus gradients of the same size (3x the saved bytes).",
        "",
        "| case | impl | mesh | per-chip batch | conditionals | state GiB | temp GiB | peak GiB / 16 | fits | GFLOP/img | MB/img | traffic est. MB/img | collectives (count, MB sent/chip) | bound | img/s/chip | img/s/slice | 300 epochs: h | chip-h |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if not r.get("memory"):
            lines.append(f"| {r['name']} | {r.get('impl_requested')} | | {r.get('per_chip_batch')} | | | | no: {r.get('compile_error', '')[:80]} | | | | | | | | | |")
            continue
        state = sum(r["state_bytes"].values())
        comms = ", ".join(f"{k} {v['count']}" for k, v in r["collectives"].items())
        roof, run = r["roofline"], r["run"]
        lines.append(
            f"| {r['name']} | {r['impl']} | data {r['mesh']['data']} x fsdp {r['mesh']['fsdp']} | {r['per_chip_batch']} | {r['conditionals']} | "
            f"{_gib(state)} | {_gib(r['memory']['temp'])} | {_gib(r['memory']['peak'])} | {'yes' if r['fits'] else 'no'} | "
            f"{r['flops_per_image'] / 1e9:.2f} | {r['bytes_per_image'] / 1e6:.0f} | {r['traffic']['estimate_bytes'] / 1e6:.0f} | "
            f"{comms} ({r['ring_bytes'] / 1e6:.1f} MB) | {roof['bound']} | {roof['images_per_s_per_chip']:,.0f} | "
            f"{roof['images_per_s_per_slice']:,.0f} | {run['hours']:.1f} | {run['chip_hours']:,.0f} |")
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
        if r.get("run") and r["variant"] == "S" and r["dtype"] == "bfloat16" and r["impl"] == "xla" and r["mesh"]["fsdp"] == 1:
            teacher = f"with the {r['teacher']} teacher" if r.get("teacher") else "without a teacher"
            lines.append(f"- SwiftFormer-S on v5e-{r['chips']}, bfloat16, {teacher}: {r['run']['total_steps']:,} steps, "
                         f"{r['run']['hours']:.1f} h ({r['run']['chip_hours']:,.0f} chip-hours) at "
                         f"{r['roofline']['images_per_s_per_slice']:,.0f} images/s ({r['roofline']['bound']}-bound).")
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
    order = sorted(MATRIX, key=lambda case: PRIORITY.index(case[0]) if case[0] in PRIORITY else len(PRIORITY))
    for name, args in order:
        if not fnmatch.fnmatch(name, pattern) or any(r["name"] == name for r in _load(output)):
            continue
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), *args, f"--name={name}", f"--output={output}"]
        print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {shlex.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, cwd=REPO)
        write_report(output)
    print(f"wrote {write_report(output)}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    output = pathlib.Path(FLAGS.output) if FLAGS.output else RESULTS / "tpu_plan.json"
    if FLAGS.report:
        print(f"wrote {write_report(output)}")
        return
    if FLAGS.matrix:
        run_matrix(output, FLAGS.cases)
        return
    if FLAGS.config is None:
        raise app.UsageError("--config is required (or --matrix / --report)")
    if not pathlib.Path(os.environ["TPU_LIBRARY_PATH"]).is_file():
        raise app.UsageError(f"libtpu is missing at {os.environ['TPU_LIBRARY_PATH']}: install it with `{INSTALL}`")
    from swiftformer_jax import logs

    logs.setup(verbose=False)
    config = FLAGS.config
    record = {"name": FLAGS.name or _case_name(config, FLAGS.topology),
              "command": "python experiments/tpu_plan.py " + shlex.join(a for a in sys.argv[1:] if not a.startswith(("--output", "--name"))),
              **plan(config, FLAGS.topology, FLAGS.teacher, FLAGS.fit_batch), "machine": _machine()}
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine",)}, indent=1))
    if FLAGS.output:
        _merge(output, record)


if __name__ == "__main__":
    app.run(main)
