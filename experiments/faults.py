"""Fault injection: kill the trainer at random moments, damage its checkpoints, and check that
nothing is lost.

  python experiments/faults.py --kills 50 --sigterms 5      # writes experiments/results/faults.{md,json}
  python experiments/faults.py --tiny --kills 3 --sigterms 1 --output-dir /tmp/faults

Each round runs `main.py` (the quickstart config, or with `--tiny` a 4-block network on the same
data) in a fresh process and:
  - `kill -9`s it at a random moment: during a step, just after a checkpoint save started (the
    save is asynchronous, so mostly while it is being written), or just after a step that is
    followed by an evaluation; then runs it again, N times, and lets the last run finish;
  - sends SIGTERM at a random moment: the run must save, exit 0, and resume;
  - damages the latest checkpoint of a stopped run in each way a failing disk or a partial copy
    would (`DAMAGES`) and resumes: the damaged step must be moved aside and the previous one
    resumed.
Every faulted run's final state (params, optimizer state, EMA, batch statistics, step; the data
position is the step) is compared bit for bit with an uninterrupted run of the same config, and
its `metrics.jsonl` must hold each logged step once.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
# Damage kinds, applied to the latest checkpoint's step directory (see `damage`).
DAMAGES = ("truncated array file", "deleted array file", "garbage state metadata", "garbage model json",
           "empty directory", "leftover unfinished save")
MOMENTS = ("step", "save", "eval")  # what a kill follows


def run_config(tiny: bool) -> list[str]:
    """The main.py flags of the faulted runs: short intervals, so kills meet saves and evals."""
    flags = ["--config=" + str(REPO / "configs" / "quickstart.py"), "--config.num_epochs=2",
             "--config.checkpoint_every_steps=4", "--config.eval_every_steps=9",
             "--config.log_every_steps=1", "--config.keep_checkpoints=2"]
    if tiny:
        flags += ["--config.model.depths=(1,1,1,1)", "--config.model.widths=(8,16,16,24)",
                  "--config.batch_size=16", "--config.eval_batch_size=64", "--config.total_steps=14",
                  "--config.warmup_steps=2", "--config.ema_decay=0.9"]
    return flags


@dataclasses.dataclass
class Attempt:
    moment: str
    delay: float
    signal: str
    exit_code: int
    last_logged_step: int | None


def start(workdir: pathlib.Path, flags: list[str], data_dir: str, log_path: pathlib.Path) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "main.py"), f"--workdir={workdir}", *flags, f"--config.data_dir={data_dir}"]
    log = open(log_path, "a", encoding="utf-8")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, text=True, env=ENV)


# Every process compiles the same programs: a persistent compilation cache (compiled code only,
# keyed by the program) makes the restarts cheap without changing any result.
ENV = dict(os.environ)


def wait_for_line(log_path: pathlib.Path, pattern: re.Pattern, process: subprocess.Popen, offset: int,
                  timeout: float) -> bool:
    """True once a line matching `pattern` appears in the log past `offset` (False if the process
    ended or `timeout` passed first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log_path.read_text(encoding="utf-8", errors="replace")[offset:]
        if pattern.search(text):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def interrupt(workdir, flags, data_dir, log_path, rng: random.Random, sig: int, timeout: float) -> Attempt:
    """One run, interrupted by `sig` at a random moment (or finishing first)."""
    moment = rng.choice(MOMENTS)
    patterns = {
        "step": re.compile(r"step (\d+)/\d+ \("),
        "save": re.compile(r"Checkpoint of step \d+ being written"),
        "eval": re.compile(r"step (9|18|27|36|45)/\d+ \("),  # the steps evaluation follows
    }
    offset = log_path.stat().st_size if log_path.exists() else 0
    process = start(workdir, flags, data_dir, log_path)
    delay = rng.uniform(0.0, 0.3 if moment != "step" else 1.5)
    if wait_for_line(log_path, patterns[moment], process, offset, timeout):
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(sig)
    code = process.wait(timeout=timeout)
    steps = re.findall(r"step (\d+)/\d+ \(", log_path.read_text(encoding="utf-8", errors="replace")[offset:])
    return Attempt(moment, round(delay, 3), signal.Signals(sig).name, code, int(steps[-1]) if steps else None)


def finish(workdir, flags, data_dir, log_path, timeout: float) -> int:
    process = start(workdir, flags, data_dir, log_path)
    return process.wait(timeout=timeout)


def final_state(workdir: pathlib.Path) -> dict:
    """The whole TrainState of the workdir's latest step, as host arrays keyed by path."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from swiftformer_jax import checkpoint

    step_dir = checkpoint.find_step_dir(workdir)
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.restore(step_dir / checkpoint.STATE_ITEM)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def compare(reference: dict, state: dict) -> list[str]:
    """The paths whose arrays differ (bit for bit), or that one side lacks."""
    import numpy as np

    differ = sorted(set(reference) ^ set(state))
    differ += [k for k in reference if k in state and not np.array_equal(reference[k], state[k])]
    return differ


def logged_once(workdir: pathlib.Path) -> bool:
    from swiftformer_jax import metrics

    steps = [r["step"] for r in metrics.read_metrics(str(workdir))]
    return steps == sorted(set(steps)) and steps == list(range(1, len(steps) + 1))


def damage(step_dir: pathlib.Path, kind: str) -> None:
    """Damage one saved step as a failing disk or a partial copy would."""
    state = step_dir / "state"
    arrays = sorted(state.glob("ocdbt.process_*/d/*"), key=lambda p: -p.stat().st_size)
    if kind == "truncated array file":
        os.truncate(arrays[0], arrays[0].stat().st_size // 3)
    elif kind == "deleted array file":
        arrays[0].unlink()
    elif kind == "garbage state metadata":
        (state / "_METADATA").write_bytes(os.urandom(64))
    elif kind == "garbage model json":
        next((step_dir / "model").iterdir()).write_text("{not json")
    elif kind == "empty directory":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif kind == "leftover unfinished save":  # a newer step whose save never finished
        unfinished = step_dir.parent / f"{int(step_dir.name) + 1}.orbax-checkpoint-tmp"
        shutil.copytree(step_dir, unfinished)
        os.truncate(sorted(unfinished.glob("state/ocdbt.process_*/d/*"), key=lambda p: -p.stat().st_size)[0], 10)
    else:
        raise ValueError(f"unknown damage {kind!r}; known: {', '.join(DAMAGES)}")


def bad_inputs(scratch: pathlib.Path, checkpoint_dir: pathlib.Path, data_dir: str) -> list[dict]:
    """Every place a user gives input, fed bad values: each must fail with one clear line (no
    traceback) and write nothing, or, where the input is merely unusual, be handled."""
    import struct
    import zlib

    import numpy as np
    import torch
    from PIL import Image

    from swiftformer_jax import convert, model

    inputs = scratch / "bad-inputs"
    inputs.mkdir()
    spec = model.ModelSpec.named("XS")
    good = {k: np.asarray(v) for k, v in convert.to_torch(jax_random_variables(spec)).items()}
    torch.save({k: torch.from_numpy(v) for k, v in good.items()}, inputs / "good.pth")
    files = {
        "random bytes": ("random.pth", os.urandom(4096)),
        "truncated": ("truncated.pth", (inputs / "good.pth").read_bytes()[:100_000]),
        "safetensors with a bad header": ("bad.safetensors", struct.pack("<Q", 10**6) + b'{"a": '),
    }
    for name, (file, data) in files.items():
        (inputs / file).write_bytes(data)

    class RunsCode:  # a pickle that would run a command when loaded
        def __reduce__(self):
            return (os.system, ("touch " + str(inputs / "PWNED"),))

    torch.save({"model": RunsCode()}, inputs / "code.pth")
    torch.save(torch.nn.Linear(4, 3).state_dict(), inputs / "linear.pth")
    nan = {k: torch.from_numpy(v.copy()) for k, v in good.items()}
    nan["head.weight"][0, 0] = float("nan")
    torch.save(nan, inputs / "nan.pth")
    torch.save({k: torch.from_numpy(v).to(torch.int32) if v.dtype == np.float32 else torch.from_numpy(v)
                for k, v in good.items()}, inputs / "int.pth")

    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 256, (300, 300, 3), dtype=np.uint8)).save(inputs / "photo.jpg")
    jpeg = (inputs / "photo.jpg").read_bytes()
    (inputs / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8" + os.urandom(2000))
    Image.fromarray(rs.randint(0, 256, (300, 300), dtype=np.uint8), "L").save(inputs / "gray.png")
    Image.fromarray(rs.randint(0, 256, (300, 300, 4), dtype=np.uint8), "RGBA").save(inputs / "alpha.png")
    Image.fromarray((rs.randint(0, 65536, (300, 300))).astype(np.uint16)).save(inputs / "deep.png")
    png = bytearray((inputs / "gray.png").read_bytes())  # claim 20000 x 20000 pixels in the header
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (inputs / "huge.png").write_bytes(bytes(png))

    folder = scratch / "folder"  # an image-folder data set, 64 train and 16 val PNGs, one train image corrupt
    for split, count in (("train", 32), ("val", 8)):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rs.randint(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / split / label / f"{i}.png")
    (folder / "train" / "b" / "7.png").write_bytes(os.urandom(1000))

    main_py = [sys.executable, str(REPO / "main.py"), "--config=" + str(REPO / "configs" / "quickstart.py"),
               f"--config.data_dir={data_dir}"]
    convert_import = [sys.executable, "-m", "swiftformer_jax.convert", "import", "--checkpoint"]
    predict = [sys.executable, "-m", "swiftformer_jax.predict", "--checkpoint", str(checkpoint_dir)]
    out = scratch / "bad-outputs"
    cases = [  # (what, command, expected text, refused: True, or handled (exit 0): False)
        ("PyTorch file: random bytes", convert_import + [str(inputs / "random.pth"), "--output", str(out / "a")], "cannot read", True),
        ("PyTorch file: truncated", convert_import + [str(inputs / "truncated.pth"), "--output", str(out / "a")], "cannot read", True),
        ("PyTorch file: a pickle that would run code", convert_import + [str(inputs / "code.pth"), "--output", str(out / "a")], "could run code", True),
        ("PyTorch file: another architecture", convert_import + [str(inputs / "linear.pth"), "--output", str(out / "a")], "found no SwiftFormer", True),
        ("PyTorch file: NaN weights", convert_import + [str(inputs / "nan.pth"), "--output", str(out / "a")], "NaN or infinite", True),
        ("PyTorch file: integer tensors", convert_import + [str(inputs / "int.pth"), "--output", str(out / "a")], "expected floating point", True),
        ("safetensors: bad header", convert_import + [str(inputs / "bad.safetensors"), "--output", str(out / "a")], "safetensors", True),
        ("config: unknown key", main_py + [f"--workdir={out / 'w'}", "--config.batch_sise=8"], "no such key", True),
        ("config: wrong type", main_py + [f"--workdir={out / 'w'}", "--config.batch_size=abc"], "invalid literal", True),
        ("config: negative size", main_py + [f"--workdir={out / 'w'}", "--config.batch_size=-8"], "config.batch_size must be >= 1", True),
        ("config: indivisible size", main_py + [f"--workdir={out / 'w'}", "--config.batch_size=100", "--config.bn_group_size=64"], "ghost batch-norm groups", True),
        ("folder data set: corrupt image", main_py + [f"--workdir={scratch / 'folder-run'}", f"--config.dataset=folder:{folder}",
                                                       "--config.batch_size=16", "--config.eval_batch_size=16"],
         "cannot decode image " + str(folder / "train" / "b" / "7.png"), True),
        ("predict: corrupt image", predict + [str(inputs / "corrupt.jpg")], "cannot read", True),
        ("predict: truncated image", predict + [str(inputs / "cut.jpg")], "truncated", True),
        ("predict: huge image", predict + [str(inputs / "huge.png")], "too large to decode safely", True),
        ("predict: grayscale image", predict + [str(inputs / "gray.png")], "1.", False),
        ("predict: image with alpha", predict + [str(inputs / "alpha.png")], "1.", False),
        ("predict: 16-bit image", predict + [str(inputs / "deep.png")], "1.", False),
    ]
    out.mkdir()
    rows = []
    for what, command, expected, refused in cases:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
        text = result.stdout + result.stderr
        clean = "Traceback" not in text and expected in text and (result.returncode != 0) == refused
        wrote = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        message = next((line for line in text.splitlines() if expected in line), text.strip().splitlines()[-1:])
        rows.append({"input": what, "refused": refused, "exit_code": result.returncode, "clean": clean,
                     "wrote": wrote, "message": str(message)[:160]})
        print(f"{what}: {'ok' if clean and not wrote else 'NOT CLEAN'}", flush=True)
    if (inputs / "PWNED").exists():
        rows.append({"input": "the pickle's command", "refused": True, "exit_code": None, "clean": False,
                     "wrote": ["PWNED"], "message": "the pickled command ran"})
    return rows


def jax_random_variables(spec):
    """Random variables of the spec's shapes (positive batch-norm variances)."""
    import jax
    import numpy as np

    rs = np.random.RandomState(0)
    return jax.tree_util.tree_map(lambda s: np.abs(rs.normal(0.5, 0.1, s.shape)).astype(s.dtype),
                                  spec.abstract_variables())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kill -9 rounds, all in one run")
    parser.add_argument("--sigterms", type=int, default=5, help="SIGTERM rounds, all in one run")
    parser.add_argument("--damages", default="all", help=f"comma list of {', '.join(DAMAGES)}, 'all' or 'none'")
    parser.add_argument("--tiny", action="store_true", help="a 4-block network instead of the quickstart's XS")
    parser.add_argument("--skip-bad-inputs", action="store_true", help="do not run the bad-input cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any one process may take")
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    parser.add_argument("--tag", default="faults", help="results go to <tag>.{md,json}")
    args = parser.parse_args(argv)
    damages = () if args.damages == "none" else DAMAGES if args.damages == "all" else tuple(args.damages.split(","))
    for kind in damages:
        if kind not in DAMAGES:
            parser.error(f"unknown damage {kind!r}; known: {', '.join(DAMAGES)}")
    if args.kills < 0 or args.sigterms < 0:
        parser.error("--kills and --sigterms must be >= 0")

    rng = random.Random(args.seed)
    flags = run_config(args.tiny)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="swiftformer-faults-"))
    ENV.setdefault("JAX_COMPILATION_CACHE_DIR", str(scratch / "xla_cache"))
    ENV.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    data_dir = str(scratch / "tfds")
    results: dict = {"command": "python experiments/faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                     "network": "tiny (4 blocks)" if args.tiny else "quickstart (SwiftFormer-XS)", "rounds": []}
    try:
        reference_dir = scratch / "reference"
        log = scratch / "reference.log"
        if finish(reference_dir, flags, data_dir, log, args.timeout) != 0:
            raise RuntimeError(f"the uninterrupted run failed: {log.read_text()[-3000:]}")
        reference = final_state(reference_dir)
        results["reference_steps"] = int(reference["['step']"])

        def judge(name: str, workdir: pathlib.Path, attempts: list, extra: dict) -> None:
            state = final_state(workdir)
            differ = compare(reference, state)
            results["rounds"].append({"round": name, "attempts": [dataclasses.asdict(a) for a in attempts],
                                      "bit_identical": not differ, "differing": differ[:10],
                                      "metrics_once": logged_once(workdir), **extra})
            print(f"{name}: {'bit-identical' if not differ else f'{len(differ)} arrays differ'}; "
                  f"{len(attempts)} interruptions", flush=True)

        for name, count, sig in (("kill -9", args.kills, signal.SIGKILL), ("SIGTERM", args.sigterms, signal.SIGTERM)):
            if not count:
                continue
            workdir, log = scratch / name.replace(" ", ""), scratch / f"{name.replace(' ', '')}.log"
            attempts = []
            for _ in range(count):
                attempt = interrupt(workdir, flags, data_dir, log, rng, sig, args.timeout)
                attempts.append(attempt)
                if sig == signal.SIGTERM and attempt.exit_code not in (0,):
                    raise RuntimeError(f"a SIGTERM'd run exited {attempt.exit_code}: {log.read_text()[-3000:]}")
            code = finish(workdir, flags, data_dir, log, args.timeout)
            judge(name, workdir, attempts, {"final_exit_code": code})

        for kind in damages:
            workdir, log = scratch / f"damage-{kind.replace(' ', '-')}", scratch / f"damage-{kind.replace(' ', '-')}.log"
            stopped = interrupt(workdir, flags, data_dir, log, rng, signal.SIGTERM, args.timeout)
            from swiftformer_jax import checkpoint

            latest = checkpoint.find_step_dir(workdir)
            damage(latest, kind)
            code = finish(workdir, flags, data_dir, log, args.timeout)
            moved = sorted(p.name for p in (workdir / "checkpoints").glob("corrupt-*"))
            judge(f"damage: {kind}", workdir, [stopped], {"final_exit_code": code, "damaged_step": latest.name,
                                                           "moved_aside": moved})
        if not args.skip_bad_inputs:
            results["bad_inputs"] = bad_inputs(scratch, reference_dir, data_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    output = pathlib.Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / f"{args.tag}.md").write_text(render(results))
    ok = all(r["bit_identical"] and r["metrics_once"] and r["final_exit_code"] == 0 for r in results["rounds"])
    ok = ok and all(r["clean"] and not r["wrote"] for r in results.get("bad_inputs", []))
    print(f"wrote {output / (args.tag + '.md')}; {'nothing lost' if ok else 'SOMETHING WAS LOST'}")
    return 0 if ok else 1


def render(results: dict) -> str:
    lines = [
        "# Fault injection: what survives what",
        "",
        f"Produced by `{results['command']}` on {results['date']} ({results['machine']}); network: "
        f"{results['network']}, {results['reference_steps']} steps. Each faulted run's final state is compared "
        "bit for bit with an uninterrupted run of the same config (params, optimizer state, EMA, batch "
        "statistics, step; the data position is the step), and its metrics.jsonl must hold each step once.",
        "",
        "| round | interruptions | moments (step / save / eval) | final state | metrics once | damaged step moved aside |",
        "|---|---:|---|---|---|---|",
    ]
    for r in results["rounds"]:
        moments = [a["moment"] for a in r["attempts"]]
        counts = " / ".join(str(moments.count(m)) for m in MOMENTS)
        signals = sum(a["signal"] in ("SIGKILL", "SIGTERM") for a in r["attempts"])
        moved = ", ".join(r.get("moved_aside", [])) or "-"
        lines.append(f"| {r['round']} | {signals} | {counts} | "
                     f"{'bit-identical' if r['bit_identical'] else 'DIFFERS: ' + ', '.join(r['differing'])} | "
                     f"{'yes' if r['metrics_once'] else 'NO'} | {moved} |")
    if results.get("bad_inputs"):
        lines += ["", "Bad inputs (each refused with one line and no traceback, writing nothing; or handled):", "",
                  "| input | outcome | exit code | files written | message |", "|---|---|---:|---|---|"]
        for r in results["bad_inputs"]:
            outcome = ("refused cleanly" if r["refused"] else "handled") if r["clean"] else "NOT CLEAN"
            message = r["message"].replace("|", "\\|")
            lines.append(f"| {r['input']} | {outcome} | {r['exit_code']} | {', '.join(r['wrote']) or 'none'} | {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
