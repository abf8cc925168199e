"""Export a SwiftFormer checkpoint for deployment: ONNX (onnxruntime) or LiteRT (TFLite), checked.

    python -m swiftformer_jax.export --checkpoint PATH --format onnx|tflite --output FILE
        [--batch N | --dynamic-batch] [--image-size H W] [--layout nhwc|nchw] [--ema]
        [--quantize int8-weights] [--overwrite]

`PATH` is any checkpoint `checkpoint.load_checkpoint` reads (a trainer workdir or step, a
`convert import` output). The network is exported in eval mode as a function of one input,
`images` (float32, normalised with the ImageNet mean and std, NHWC or NCHW), to one output,
`logits` (float32 [B, classes]; with a distillation head the mean of both heads, as in eval).

Routes: ONNX through jax2onnx (opset `ONNX_OPSET`); LiteRT through jax2tf (StableHLO) and
TensorFlow's TFLite converter restricted to TFLite's builtin ops, so a graph that would need
TensorFlow (`Flex`) ops fails to convert instead of shipping slow. Both trace the network's "xla"
implementation (`ops.py`: grouped and strided convolutions, `jax.nn.gelu`), the form the
runtimes have kernels for.

After writing, the file is run once by its runtime (onnxruntime, or the ai-edge-litert
interpreter) on seeded random images and compared with JAX: a float32 export whose logits differ
from JAX's by more than `TOLERANCE` of the logit scale is an error, and no file is left. A
quantised export reports its error and top-1 agreement instead. The file is written beside its
destination and renamed at the end: an interrupted or failed export leaves nothing at `--output`.

Quantisation: `--quantize int8-weights` (LiteRT) stores the weights as int8 and computes in
float32 (TFLite's dynamic-range quantisation; no calibration data). Full-integer quantisation
(int8 activations, calibrated on representative images) is not offered: ai-edge-litert 2.3.0
aborts the process when it runs the int8 form of exact GELU (`jax.nn.gelu`'s erfc polynomial).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from swiftformer_jax import paths, xla_flags

FORMATS = ("onnx", "tflite")
LAYOUTS = ("nhwc", "nchw")
ONNX_OPSET = 23
TOLERANCE = 1e-4  # of the largest |logit|, for float32 exports
MIN_IMAGE_SIZE = 32  # the network downsamples by 32: a smaller side leaves the last stage nothing of the image
CHECK_BATCH = 2  # images the check runs through a dynamic-batch export
QUANTIZATIONS = ("int8-weights",)


class ExportError(ValueError):
    """A request export cannot fulfil, or an exported file that does not compute the network."""


def inference_function(model, variables, layout: str = "nhwc") -> Callable:
    """images -> float32 logits, in eval mode, with the variables baked in."""
    if layout not in LAYOUTS:
        raise ExportError(f"--layout must be one of {LAYOUTS}, got {layout!r}")

    def logits(images):
        if layout == "nchw":
            images = images.transpose(0, 2, 3, 1)
        return model.apply(variables, images, train=False)

    return logits


def input_shape(batch: int | None, image_size: tuple[int, int], layout: str) -> tuple:
    height, width = image_size
    return (batch, height, width, 3) if layout == "nhwc" else (batch, 3, height, width)


def to_onnx(fn: Callable, shape: tuple, name: str):
    """An onnx.ModelProto of `fn`; a None batch becomes the symbolic dimension "B"."""
    from jax2onnx import to_onnx as jax2onnx_convert

    spec = tuple("B" if d is None else d for d in shape)
    return jax2onnx_convert(fn, [spec], model_name=name, opset=ONNX_OPSET, input_names=["images"],
                            output_names=["logits"])


def to_tflite(fn: Callable, shape: tuple, quantize: str | None = None) -> bytes:
    """The TFLite flatbuffer of `fn`, builtin ops only; int8 weights (float32 compute) when
    `quantize` is "int8-weights"."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    polymorphic = None if shape[0] is not None else ["(b, " + ", ".join(str(d) for d in shape[1:]) + ")"]
    converted = jax2tf.convert(fn, with_gradient=False, polymorphic_shapes=polymorphic)
    signature = [tf.TensorSpec(shape, tf.float32, name="images")]
    module = tf.Module()
    module.logits = tf.function(lambda images: {"logits": converted(images)}, autograph=False,
                                input_signature=signature)
    concrete = module.logits.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "int8-weights":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # without a representative data set: weights only
    try:
        return converter.convert()
    except Exception as error:  # noqa: BLE001  (the converter raises its own ConverterError and others)
        text = str(error)
        hint = " (an op outside TFLite's builtins)" if "Flex" in text or "not supported" in text else ""
        raise ExportError(f"the TFLite converter failed{hint}: {text.strip().splitlines()[-1] if text else error}") from None


# ---------------------------------------------------------------------------------------------
# Running an exported file
# ---------------------------------------------------------------------------------------------


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tflite_interpreter(path: str | os.PathLike, threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=threads)


def runner(path: str | os.PathLike, fmt: str, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """images -> logits through the runtime of `fmt` (onnxruntime, or LiteRT with XNNPACK)."""
    if fmt == "onnx":
        session = onnx_session(path, threads)
        return lambda images: session.run(["logits"], {"images": images})[0]
    interpreter = tflite_interpreter(path, threads)
    state = {"shape": None}
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()

    def run(images):
        if state["shape"] != images.shape:
            if tuple(inp["shape_signature"]) != images.shape:
                interpreter.resize_tensor_input(inp["index"], images.shape)
            interpreter.allocate_tensors()
            state["shape"] = images.shape
        interpreter.set_tensor(inp["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()

    return run


def op_counts(path: str | os.PathLike, fmt: str) -> dict[str, int]:
    """Operator type -> count in an exported file (ONNX node types, or TFLite builtin op names)."""
    if fmt == "onnx":
        import onnx

        return dict(collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node))
    return dict(collections.Counter(op["op_name"] for op in tflite_interpreter(path)._get_ops_details()))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def check_request(fmt: str, output: str | os.PathLike, *, batch: int, image_size: Sequence[int] | None,
                  layout: str, quantize: str | None, overwrite: bool) -> None:
    """Every argument's problem, named, before anything is loaded or written."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if layout not in LAYOUTS:
        raise ExportError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < MIN_IMAGE_SIZE):
        raise ExportError(f"--image-size {' '.join(map(str, image_size))}: the network needs height and width of "
                          f"at least {MIN_IMAGE_SIZE} pixels (it downsamples by 32)")
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"--quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if quantize and fmt != "tflite":
        raise ExportError(f"--quantize {quantize} is for --format tflite")
    output = paths.path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; choose another --output or pass --overwrite")
    if not paths.parent_exists(output):
        raise ExportError(f"the directory of --output {output} does not exist")


def export(checkpoint_path: str | os.PathLike, fmt: str, output: str | os.PathLike, *, batch: int = 1,
           dynamic_batch: bool = False, image_size: Sequence[int] | None = None, layout: str = "nhwc",
           ema: bool = False, quantize: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the export and check it; returns a report (shapes, op counts, size, check errors)."""
    check_request(fmt, output, batch=batch, image_size=image_size, layout=layout, quantize=quantize,
                  overwrite=overwrite)
    import jax

    from swiftformer_jax import checkpoint, logs
    from swiftformer_jax.model import ModelSpec

    spec, variables = checkpoint.load_variables(checkpoint_path, ema=ema)
    if not isinstance(spec, ModelSpec):
        raise ExportError(f"{checkpoint_path} holds a {spec.describe()}; export takes SwiftFormer checkpoints")
    if not spec.has_classifier:
        raise ExportError(f"{checkpoint_path} holds a backbone without a classifier head ({spec.describe()})")
    size = tuple(image_size) if image_size is not None else (spec.image_size, spec.image_size)
    shape = input_shape(None if dynamic_batch else batch, size, layout)
    exported = inference_function(spec.build(impl="xla"), variables, layout)
    logs.log.info("Exporting %s to %s, input %s %s.", spec.describe(), fmt, layout.upper(),
                  "x".join("B" if d is None else str(d) for d in shape))

    output = paths.path(output)
    partial = Path(paths.scratch_file(output))  # runtimes read local files: checked here, then published
    try:
        if fmt == "onnx":
            import onnx

            onnx.save_model(to_onnx(exported, shape, f"swiftformer_{spec.variant.lower()}"), str(partial))
        else:
            partial.write_bytes(to_tflite(exported, shape, quantize))
        report = check(partial, fmt, spec, variables, shape, layout, quantized=bool(quantize))
        report.update(bytes=partial.stat().st_size, ops=op_counts(partial, fmt))
        paths.publish(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    report.update(file=str(output), format=fmt, model=spec.describe(),
                  input_shape=["B" if d is None else d for d in shape], layout=layout,
                  opset=ONNX_OPSET if fmt == "onnx" else None, quantize=quantize, jax=jax.__version__)
    return report


def check(path: str | os.PathLike, fmt: str, spec, variables, shape: tuple, layout: str, *,
          quantized: bool = False) -> dict[str, Any]:
    """Run the file on one batch of seeded random images and compare with JAX's own forward (the
    default implementation); an ExportError for a float export beyond TOLERANCE."""
    import jax

    batch = CHECK_BATCH if shape[0] is None else shape[0]
    images = np.random.RandomState(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    reference = np.asarray(jax.jit(inference_function(spec.build(), variables, layout))(images))
    got = runner(path, fmt)(images)
    scale = float(np.abs(reference).max())
    error = float(np.abs(got - reference).max())
    report = {"check_images": len(got), "max_abs_error": error, "logit_scale": scale,
              "relative_error": error / max(scale, 1e-30),
              "top1_agreement": float(np.mean(got.argmax(-1) == reference.argmax(-1)))}
    if not quantized and error > TOLERANCE * max(scale, 1e-30):
        raise ExportError(f"the exported {fmt} model's logits differ from JAX's by {error:.3g} "
                          f"({error / scale:.2g} of the logit scale {scale:.3g}; allowed {TOLERANCE:g}): not written")
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m swiftformer_jax.export",
                                     description="Export a SwiftFormer checkpoint to ONNX or LiteRT (TFLite), checked.")
    parser.add_argument("--checkpoint", required=True, help="a training workdir, one of its steps, or a `convert import` output")
    parser.add_argument("--format", required=True, help="onnx or tflite")
    parser.add_argument("--output", required=True, help="the file to write (.onnx / .tflite)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="a batch dimension set at run time")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the checkpoint's image size, square)")
    parser.add_argument("--layout", default="nhwc", help="nhwc (default) or nchw, the input's layout")
    parser.add_argument("--ema", action="store_true", help="export a trainer checkpoint's EMA weights")
    parser.add_argument("--quantize", help="int8-weights: int8 weights, float32 compute (tflite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--verbose", action="store_true", help="the libraries' log lines too")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message for user errors)."""
    args = _parser().parse_args(argv)
    from swiftformer_jax import logs

    logs.setup(verbose=args.verbose)
    xla_flags.apply()  # before the first computation starts JAX's backend
    try:
        report = export(args.checkpoint, args.format, args.output, batch=args.batch, dynamic_batch=args.dynamic_batch,
                        image_size=args.image_size, layout=args.layout, ema=args.ema, quantize=args.quantize,
                        overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ops = ", ".join(f"{name} {count}" for name, count in sorted(report["ops"].items(), key=lambda kv: -kv[1]))
    print(f"wrote {report['file']} ({report['bytes'] / 2**20:.1f} MiB): {report['model']}, input images "
          f"{report['layout'].upper()} {report['input_shape']}, output logits")
    print(f"checked on {report['check_images']} images: max |error| {report['max_abs_error']:.3g} "
          f"({report['relative_error']:.2g} of the logit scale), top-1 agreement {report['top1_agreement']:.3f}")
    print(f"ops: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
