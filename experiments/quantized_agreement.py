"""Top-1 agreement of a quantised LiteRT export with the float network, on a trained checkpoint's eval set.

    python main.py --config=configs/quickstart.py --workdir=/tmp/swiftformer-quickstart
    python experiments/quantized_agreement.py --checkpoint /tmp/swiftformer-quickstart

Exports the checkpoint (its trainer config gives the data set and the eval preprocessing) to LiteRT
in float32, with `--quantize int8-weights`, and with `--quantize int8` calibrated on the first
`--calibration-images` images of the train split (eval preprocessing, so calibration never sees
an eval image); runs them and JAX on every eval image, and writes
`experiments/results/<tag>.{md,json}`: accuracy of each, and each export's top-1 agreement and
largest logit difference with JAX.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # process settings before JAX starts
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from swiftformer_jax import xla_flags

    xla_flags.apply()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from swiftformer_jax import checkpoint, export, input_pipeline  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def read_split(config: dict, part: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images (eval preprocessing) and labels of a workdir config's data set, `part` "eval" or
    "train", the first `limit` of them (all when None)."""
    images, labels = [], []
    for batch in input_pipeline.eval_dataset(
            config["dataset"], config.get("data_dir"), local_batch_size=50, image_size=config["image_size"],
            crop_pct=config["eval_crop_pct"], process_index=0, process_count=1, part=part):
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
        if limit is not None and sum(map(len, images)) >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training workdir (its config.json names the data)")
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--calibration-images", type=int, default=200, help="train images --quantize int8 calibrates on")
    parser.add_argument("--tag", default="quantized_agreement")
    parser.add_argument("--output-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if args.calibration_images < 1:
        parser.error(f"--calibration-images must be >= 1, got {args.calibration_images}")
    from swiftformer_jax import logs

    logs.setup()
    config_path = pathlib.Path(args.checkpoint) / "config.json"
    if not config_path.is_file():
        parser.error(f"{config_path} not found: --checkpoint must be a training workdir")
    config = json.loads(config_path.read_text())
    spec, variables = checkpoint.load_variables(args.checkpoint, ema=args.ema)
    images, labels = read_split(config, "eval")
    calibration, _ = read_split(config, "train", limit=args.calibration_images)
    size = (config["image_size"], config["image_size"])
    reference = np.asarray(jax.jit(lambda x: spec.build().apply(variables, x))(images))
    results = {"command": "python experiments/quantized_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "model": spec.describe(),
               "dataset": config["dataset"], "eval_images": int(len(labels)),
               "calibration_images": int(len(calibration)),
               "accuracy": {"jax": float(np.mean(reference.argmax(-1) == labels))}, "exports": {}}
    with tempfile.TemporaryDirectory() as scratch:
        representative = pathlib.Path(scratch) / "calibration.npy"
        np.save(representative, calibration)
        for name, quantize in (("float32", None), ("int8-weights", "int8-weights"), ("int8", "int8")):
            report = export.export(args.checkpoint, "tflite", pathlib.Path(scratch) / f"{name}.tflite", batch=50,
                                   image_size=size, ema=args.ema, quantize=quantize,
                                   representative=representative if quantize == "int8" else None)
            run = export.runner(report["file"], "tflite")
            logits = np.concatenate([run(images[i:i + 50]) for i in range(0, len(images), 50)])
            results["accuracy"][f"litert {name}"] = float(np.mean(logits.argmax(-1) == labels))
            results["exports"][name] = {
                "bytes": report["bytes"],
                "top1_agreement_with_jax": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
                "max_abs_logit_difference": float(np.abs(logits - reference).max()),
                "logit_scale": float(np.abs(reference).max())}
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(results, indent=1))
    lines = [f"# LiteRT exports against the float network: {results['model']}", "",
             f"Produced by `{results['command']}` on {results['date']} ({results['machine']}); "
             f"{results['eval_images']} eval images of `{results['dataset']}`; int8 calibrated on "
             f"{results['calibration_images']} train images.", "",
             "| export | file (MiB) | top-1 agreement with JAX | max abs logit difference (logit scale) | accuracy |",
             "|---|---:|---:|---:|---:|",
             f"| JAX (float32) | - | - | - | {results['accuracy']['jax']:.4f} |"]
    for name, r in results["exports"].items():
        lines.append(f"| LiteRT {name} | {r['bytes'] / 2**20:.2f} | {r['top1_agreement_with_jax']:.4f} | "
                     f"{r['max_abs_logit_difference']:.3g} ({r['logit_scale']:.3g}) | {results['accuracy'][f'litert {name}']:.4f} |")
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
