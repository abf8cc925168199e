"""What distilling from the paper's teacher costs: the SwiftFormer-S train step with and without RegNetY-160.

Run:  python experiments/teacher_cost.py [--batch 8] [--reps 5] [--tag cpu]
Tiny: python experiments/teacher_cost.py --variant XS --teacher tiny --image-size 64 --batch 2 --reps 1 \
          --drift-images 1 --output-dir /tmp/out

What is timed, side by side in one process: the trainer's own train step (`train.make_train_step`,
jitted with the trainer's shardings by `train.jit_steps`, the state donated) for SwiftFormer-S at
`--batch` images of 224 px, float32, with configs/s.py's recipe (AdamW, AGC 0.01, EMA, label
smoothing, no mixup), in three configurations:
  none           `distillation.kind=none`: one head, no teacher;
  hard-f32       hard distillation (alpha 0.5) from RegNetY-160, the teacher in float32;
  hard-bf16      the same with `distillation.teacher_dtype=bfloat16`;
and the teacher's forward alone at the same batch (float32, bfloat16), which is what the step adds.
Every configuration is compiled and run once first; then `--reps` rounds call each once in turn
(`benchmark.interleaved_times`: the order rotates, a short pause before each call), so load from
other processes falls on all of them alike. Reported: median, min and max seconds per step, images
per second, and each step's time over the `none` step's.

The teacher's weights are random (`randomized_variables`: the scales of the parity tests'
randomisation), not DeiT's released ones, which this machine cannot download: the time does not
depend on the values. The bfloat16 drift is measured on them too, so it is the drift of a randomly
weighted RegNetY-160, not of the trained teacher: `--drift-images` random N(0, 1) images at
224 px, max |bf16 - f32| over max |f32| logit, and how often the two agree on the argmax (hard
distillation's target).

Writes experiments/results/teacher_cost[_TAG].{json,md} with the machine, versions, date and the
command.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    from swiftformer_jax import xla_flags  # the project's XLA:CPU flags, before JAX starts its backend

    xla_flags.apply()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import benchmark  # noqa: E402
from configs import s as s_config  # noqa: E402
from swiftformer_jax import sharding, train  # noqa: E402
from swiftformer_jax.regnet import RegNetSpec  # noqa: E402

TINY_TEACHER = RegNetSpec(stem_width=8, depths=(1, 1, 1, 1), widths=(8, 16, 24, 32), group_width=8)
STEPS = ("none", "hard-f32", "hard-bf16")
TEACHER_DTYPES = {"hard-f32": "float32", "hard-bf16": "bfloat16"}
FORWARDS = ("teacher-f32", "teacher-bf16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="S", help="the student (default S)")
    parser.add_argument("--teacher", default="regnety_160", choices=("regnety_160", "tiny"),
                        help="RegNetY-160, or a tiny RegNetY for smoke tests")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds")
    parser.add_argument("--drift-images", type=int, default=4)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if min(args.batch, args.image_size, args.reps, args.drift_images) < 1:
        parser.error("--batch, --image-size, --reps and --drift-images must be positive")
    return args


def randomized_variables(spec: RegNetSpec, seed: int = 0) -> dict:
    """Random RegNetY variables of sensible scale (host float32): kernels N(0, 1 / fan_in), biases
    and BN shifts and means N(0, 0.2), BN scales U(0.5, 1.5), running variances U(0.5, 2)."""
    rs = np.random.RandomState(seed)
    flat = traverse_util.flatten_dict(spec.abstract_variables())
    out = {}
    for key, leaf in flat.items():
        shape, name = leaf.shape, key[-1]
        if name == "kernel":
            value = rs.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            value = rs.uniform(0.5, 1.5, shape)
        elif name == "var":
            value = rs.uniform(0.5, 2.0, shape)
        else:  # bias, mean
            value = 0.2 * rs.standard_normal(shape)
        out[key] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def student_config(args, kind: str, teacher_dtype: str = ""):
    config = s_config.get_config()
    config.model.variant = args.variant
    config.batch_size = args.batch
    config.image_size = args.image_size
    config.distillation.kind = kind
    config.distillation.teacher_dtype = teacher_dtype
    return config


def build_steps(args, teacher_spec: RegNetSpec, teacher_variables, batch, mesh) -> dict:
    """{name: callable running one train step}, each with its own state (the step donates it)."""
    fns = {}
    durations = train.Durations(1000, 10**6, 0, 10**6, 10**6, 1)
    rng = jax.random.key(1)
    for name in STEPS:
        kind, dtype = ("none", "") if name == "none" else ("hard", TEACHER_DTYPES[name])
        config = student_config(args, kind, dtype)
        spec = train.model_spec(config, 1000)
        model = train.build_model(config, spec)
        tx, schedule = train.build_optimizer(config, durations, train.abstract_params(model, args.image_size))
        teacher = None if kind == "none" else teacher_spec.build(dtype=train.DTYPES[dtype])
        state, shardings = train.create_train_state(model, tx, config, mesh, jax.random.key(0))
        teacher_shardings = None if teacher is None else sharding.tree_shardings(teacher_variables, mesh, 4.0)
        step, _ = train.jit_steps(config, model, tx, schedule, 1000, teacher, mesh, shardings, teacher_shardings)
        tv = None if teacher is None else sharding.put(teacher_variables, teacher_shardings)
        holder = {"state": state}

        def run(step=step, holder=holder, tv=tv):
            holder["state"], metrics = step(holder["state"], batch, rng, tv)
            jax.block_until_ready(metrics["loss"])

        fns[name] = run
    return fns


def build_forwards(teacher_spec: RegNetSpec, teacher_variables, images) -> dict:
    fns = {}
    for name, dtype in zip(FORWARDS, (jnp.float32, jnp.bfloat16)):
        model = teacher_spec.build(dtype=dtype)
        forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
        variables = jax.device_put(teacher_variables)
        fns[name] = lambda forward=forward, variables=variables: jax.block_until_ready(forward(variables, images))
    return fns


def drift(teacher_spec: RegNetSpec, teacher_variables, count: int, size: int) -> dict:
    images = np.random.RandomState(2).standard_normal((count, size, size, 3)).astype(np.float32)
    logits = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        model = teacher_spec.build(dtype=dtype)
        logits[name] = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(teacher_variables, images))
    scale = float(np.abs(logits["f32"]).max())
    error = float(np.abs(logits["bf16"] - logits["f32"]).max())
    agree = int(np.sum(np.argmax(logits["bf16"], -1) == np.argmax(logits["f32"], -1)))
    return {"images": count, "image_size": size, "logit_scale": scale, "max_abs_error": error,
            "relative_error": error / scale, "argmax_agree": agree,
            "weights": "random (randomized_variables), not DeiT's trained RegNetY-160"}


def summarize(times: dict[str, list[float]], batch: int) -> dict:
    out = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        out[name] = {"median_s": median, "min_s": min(ts), "max_s": max(ts), "reps": len(ts),
                     "images_per_second": batch / median}
    base = out["none"]["median_s"]
    for name in STEPS:
        out[name]["over_none"] = out[name]["median_s"] / base
    return out


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    rows = results["timings"]
    lines = [
        f"# Teacher cost: SwiftFormer-{s['variant']} train step with and without {s['teacher_name']}",
        "",
        f"{m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; jax {m['jax']} ({m['jax_backend']}), "
        f"flax {m['flax']}; {results['date']}; load average {results['load_before']} before, "
        f"{results['load_after']} after.",
        "",
        f"`{results['command']}`",
        "",
        f"Batch {s['batch']}, {s['image_size']} px, student float32, configs/s.py's recipe; median of "
        f"{s['reps']} interleaved rounds (min-max).",
        "",
        "| what | s per step | images/s | x the step without teacher |",
        "|---|---:|---:|---:|",
    ]
    labels = {"none": "train step, `distillation.kind=none`", "hard-f32": "train step, hard, teacher float32",
              "hard-bf16": "train step, hard, teacher bfloat16", "teacher-f32": "teacher forward alone, float32",
              "teacher-bf16": "teacher forward alone, bfloat16"}
    base = rows["none"]["median_s"]
    for name in STEPS + FORWARDS:
        r = rows[name]
        lines.append(f"| {labels[name]} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
                     f"{r['images_per_second']:.1f} | {r['median_s'] / base:.2f} |")
    d = results["drift"]
    lines += [
        "",
        f"bfloat16 teacher against float32, on {d['images']} random images at {d['image_size']} px with "
        f"**random weights** (not DeiT's trained teacher): max |logit difference| {d['max_abs_error']:.3g} "
        f"= {d['relative_error']:.2e} of the logit scale {d['logit_scale']:.3g}; argmax agrees on "
        f"{d['argmax_agree']} of {d['images']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "experiments/teacher_cost.py", *(sys.argv[1:] if argv is None else argv)])
    teacher_spec = RegNetSpec.named("regnety_160") if args.teacher == "regnety_160" else TINY_TEACHER
    teacher_variables = randomized_variables(teacher_spec)
    rs = np.random.RandomState(0)
    mesh = sharding.create_mesh(-1, 1)
    batch_np = {"image": rs.standard_normal((args.batch, args.image_size, args.image_size, 3)).astype(np.float32),
                "label": rs.randint(0, 1000, args.batch).astype(np.int32)}
    batch = sharding.global_batch(batch_np, sharding.batch_sharding(mesh))
    load_before = benchmark.load_average()
    fns = {**build_steps(args, teacher_spec, teacher_variables, batch, mesh),
           **build_forwards(teacher_spec, teacher_variables, batch["image"])}
    times = benchmark.interleaved_times(fns, reps=args.reps, warmup=1)
    results = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": benchmark.machine_info("cpu"),
        "settings": {"variant": args.variant, "teacher": args.teacher,
                     "teacher_name": "RegNetY-160" if args.teacher == "regnety_160" else "a tiny RegNetY",
                     "batch": args.batch, "image_size": args.image_size, "reps": args.reps,
                     "teacher_weights": "random"},
        "timings": summarize(times, args.batch),
        "times_s": times,
        "drift": drift(teacher_spec, teacher_variables, args.drift_images, args.image_size),
        "load_before": load_before,
        "load_after": benchmark.load_average(),
    }
    out_dir = pathlib.Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "teacher_cost" + (f"_{args.tag}" if args.tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
