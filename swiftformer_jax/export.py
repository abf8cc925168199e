"""Export a SwiftFormer checkpoint for deployment: ONNX (onnxruntime) or LiteRT (TFLite), checked.

    python -m swiftformer_jax.export --checkpoint PATH --format onnx|tflite --output FILE
        [--batch N | --dynamic-batch] [--image-size H W] [--layout nhwc|nchw] [--ema]
        [--quantize int8-weights | --quantize int8 --representative IMAGES] [--overwrite]

`PATH` is any checkpoint `checkpoint.load_checkpoint` reads (a trainer workdir or step, a
`convert import` output). The network is exported in eval mode as a function of one input,
`images` (float32, normalised with the ImageNet mean and std, NHWC or NCHW), to one output,
`logits` (float32 [B, classes]; with a distillation head the mean of both heads, as in eval).

Routes: ONNX through jax2onnx (opset `ONNX_OPSET`); LiteRT through jax2tf (StableHLO) and
TensorFlow's TFLite converter restricted to TFLite's builtin ops, so a graph that would need
TensorFlow (`Flex`) ops fails to convert instead of shipping slow. Both trace the network's "xla"
implementation (`ops.py`: grouped and strided convolutions, `jax.nn.gelu`), the form the
runtimes have kernels for, with the batch norms and layer scales folded into the convolutions and
linears (`fold.py`), which the runtimes' graph optimisers do not do on their own.

After writing, the file is run once by its runtime (onnxruntime, or the ai-edge-litert
interpreter) on seeded random images and compared with JAX: a float32 export whose logits differ
from JAX's by more than `TOLERANCE` of the logit scale is an error, and no file is left. A
quantised export reports its error and top-1 agreement instead. The file is written beside its
destination and renamed at the end: an interrupted or failed export leaves nothing at `--output`.

Exact GELU in LiteRT: TFLite's converter has no lowering for StableHLO's erf, so the network is
traced with GELU in its tanh form (`ops.litert_gelu_form`), which the converter fuses into its
GELU builtin; that op's `approximate` option is then cleared (`exact_gelu`), so the runtime
computes the exact GELU, and the check below compares with JAX's exact network.

Quantisation (LiteRT): `--quantize int8-weights` stores the weights as int8 and computes in
float32 (TFLite's dynamic-range quantisation; no calibration data). `--quantize int8` is
full-integer post-training quantisation: int8 weights and activations, their ranges calibrated
on `--representative` images (a folder of image files, preprocessed as `predict` does, or a .npy
of preprocessed NHWC images); the file keeps a float32 `images` input and `logits` output.
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
QUANTIZATIONS = ("int8-weights", "int8")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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


def to_tflite(fn: Callable, shape: tuple, quantize: str | None = None,
              representative: np.ndarray | None = None) -> bytes:
    """The TFLite flatbuffer of `fn`, builtin ops only, with exact GELU ops (`exact_gelu`).

    `quantize` "int8-weights": int8 weights, float32 compute; "int8": int8 weights and
    activations calibrated on `representative` (preprocessed images, NHWC or as `shape` lays them
    out), float32 input and output.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    from swiftformer_jax import ops

    polymorphic = None if shape[0] is not None else ["(b, " + ", ".join(str(d) for d in shape[1:]) + ")"]
    # A function object of its own: JAX caches traces by function, and the GELU form below is
    # decided at trace time, so neither this trace nor an earlier one of `fn` may be reused.
    converted = jax2tf.convert(lambda images: fn(images), with_gradient=False, polymorphic_shapes=polymorphic)
    signature = [tf.TensorSpec(shape, tf.float32, name="images")]
    module = tf.Module()
    module.logits = tf.function(lambda images: {"logits": converted(images)}, autograph=False,
                                input_signature=signature)
    if shape[0] is None:  # symbolic batch: GELU stays jax.nn.gelu's exact erfc polynomial
        from swiftformer_jax import logs

        logs.log.warning("A LiteRT export with a dynamic batch is slower than one with a fixed --batch: TFLite's "
                         "converter puts shape and broadcast ops around every elementwise op and cannot fuse GELU "
                         "into its builtin, so GELU runs as an elementwise erf polynomial.")
        concrete = module.logits.get_concrete_function()
    else:
        with ops.litert_gelu_form():
            concrete = module.logits.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # weights only, unless calibrated below
    if quantize == "int8":
        if representative is None or not len(representative):
            raise ExportError("--quantize int8 needs representative images to calibrate on")
        step = 1 if shape[0] is None else shape[0]
        converter.representative_dataset = lambda: ([representative[i:i + step]]
                                                    for i in range(0, len(representative) - step + 1, step))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # noqa: BLE001  (the converter raises its own ConverterError and others)
        text = str(error)
        hint = " (an op outside TFLite's builtins)" if "Flex" in text or "not supported" in text else ""
        raise ExportError(f"the TFLite converter failed{hint}: {_converter_message(text) or error}") from None
    return exact_gelu(flatbuffer)


def _converter_message(text: str) -> str:
    """The converter's own error line (its text is mostly MLIR locations), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line[line.rindex("error: ") + len("error: "):] for line in lines if "error: " in line]
    return (errors or lines or [""])[-1][:500]


def exact_gelu(flatbuffer: bytes) -> bytes:
    """The flatbuffer with every GELU op set to the exact form (`approximate` false).

    An ExportError if a GELU traced in its tanh form was not fused into the builtin (a `TANH` op
    is left: the network has no other tanh), which would leave the approximation in the file.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            if builtin == schema.BuiltinOperator.TANH:
                raise ExportError("the TFLite converter did not fuse a GELU into its builtin (a TANH op is left)")
            if builtin == schema.BuiltinOperator.GELU:
                op.builtinOptions.approximate = False
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def representative_images(source: str | os.PathLike, image_size: tuple[int, int], layout: str = "nhwc") -> np.ndarray:
    """Calibration images for `--quantize int8`, float32 in the export's layout.

    `source`: a folder of image files (every file with an image suffix, sorted; preprocessed as
    `predict` does, square sizes only) or a .npy file of preprocessed NHWC images [N, H, W, 3].
    """
    from swiftformer_jax import predict

    source = paths.path(source)
    height, width = image_size
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ExportError(f"--representative {source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
        if height != width:
            raise ExportError(f"--representative {source}: a folder of images calibrates square exports only "
                              f"(--image-size {height} {width}); pass a .npy of preprocessed images")
        images = np.stack([predict.preprocess(predict.load_image(p), height) for p in files])
    elif source.is_file() and source.suffix == ".npy":
        try:
            with source.open("rb") as f:
                images = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:  # truncated, not a .npy, or pickled objects
            raise ExportError(f"--representative {source}: cannot read it as a .npy array ({error})") from None
        if images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise ExportError(f"--representative {source}: images of shape {images.shape}; the export needs "
                              f"[N, {height}, {width}, 3] (NHWC, preprocessed)")
        if not np.issubdtype(images.dtype, np.floating) or not np.isfinite(images).all():
            raise ExportError(f"--representative {source}: needs finite float images, got {images.dtype}")
    else:
        raise ExportError(f"--representative {source}: not a folder of images or a .npy file")
    images = images.astype(np.float32)
    return images.transpose(0, 3, 1, 2) if layout == "nchw" else images


# ---------------------------------------------------------------------------------------------
# Running an exported file
# ---------------------------------------------------------------------------------------------


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tflite_interpreter(model: str | os.PathLike | bytes, threads: int | None = None):
    """The ai-edge-litert interpreter (XNNPACK delegate) of a file, or of a flatbuffer's bytes."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, bytes):
        return Interpreter(model_content=model, num_threads=threads)
    return Interpreter(model_path=str(model), num_threads=threads)


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
                  layout: str, quantize: str | None, overwrite: bool,
                  representative: str | os.PathLike | None = None, dynamic_batch: bool = False) -> None:
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
    if quantize == "int8" and representative is None:
        raise ExportError("--quantize int8 calibrates on --representative images: name a folder of images or a .npy")
    if representative is not None and quantize != "int8":
        raise ExportError("--representative is for --quantize int8")
    if quantize == "int8" and dynamic_batch:
        raise ExportError("--quantize int8 needs a fixed --batch: under a dynamic batch TFLite's converter cannot "
                          "fuse GELU into its builtin, and ai-edge-litert aborts on the int8 form of GELU's polynomial")
    if representative is not None and not paths.exists(representative):
        raise ExportError(f"--representative {representative} does not exist")
    output = paths.path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; choose another --output or pass --overwrite")
    if not paths.parent_exists(output):
        raise ExportError(f"the directory of --output {output} does not exist")


def export(checkpoint_path: str | os.PathLike, fmt: str, output: str | os.PathLike, *, batch: int = 1,
           dynamic_batch: bool = False, image_size: Sequence[int] | None = None, layout: str = "nhwc",
           ema: bool = False, quantize: str | None = None, representative: str | os.PathLike | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    """Write the export and check it; returns a report (shapes, op counts, size, check errors).

    A quantised export is checked on (up to a batch of) its representative images, a float one on
    seeded random images.
    """
    check_request(fmt, output, batch=batch, image_size=image_size, layout=layout, quantize=quantize,
                  overwrite=overwrite, representative=representative, dynamic_batch=dynamic_batch)
    import jax

    from swiftformer_jax import checkpoint, fold, logs
    from swiftformer_jax.model import ModelSpec

    spec, variables = checkpoint.load_variables(checkpoint_path, ema=ema)
    if not isinstance(spec, ModelSpec):
        raise ExportError(f"{checkpoint_path} holds a {spec.describe()}; export takes SwiftFormer checkpoints")
    if not spec.has_classifier:
        raise ExportError(f"{checkpoint_path} holds a backbone without a classifier head ({spec.describe()})")
    size = tuple(image_size) if image_size is not None else (spec.image_size, spec.image_size)
    shape = input_shape(None if dynamic_batch else batch, size, layout)
    calibration = None
    if representative is not None:
        calibration = representative_images(representative, size, layout)
        if shape[0] is not None and len(calibration) < shape[0]:
            raise ExportError(f"--representative {representative}: {len(calibration)} images, fewer than the "
                              f"export's batch of {shape[0]}")
    exported = inference_function(spec.build(impl="xla", folded=True), fold.fold_for_inference(variables), layout)
    logs.log.info("Exporting %s to %s, input %s %s.", spec.describe(), fmt, layout.upper(),
                  "x".join("B" if d is None else str(d) for d in shape))

    output = paths.path(output)
    partial = Path(paths.scratch_file(output))  # runtimes read local files: checked here, then published
    try:
        if fmt == "onnx":
            import onnx

            onnx.save_model(to_onnx(exported, shape, f"swiftformer_{spec.variant.lower()}"), str(partial))
        else:
            partial.write_bytes(to_tflite(exported, shape, quantize, calibration))
        report = check(partial, fmt, spec, variables, shape, layout, quantized=bool(quantize),
                       images=None if calibration is None else calibration[:shape[0] or CHECK_BATCH])
        report.update(bytes=partial.stat().st_size, ops=op_counts(partial, fmt))
        paths.publish(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    report.update(file=str(output), format=fmt, model=spec.describe(),
                  input_shape=["B" if d is None else d for d in shape], layout=layout,
                  opset=ONNX_OPSET if fmt == "onnx" else None, quantize=quantize, jax=jax.__version__,
                  calibration_images=None if calibration is None else len(calibration))
    return report


def check(path: str | os.PathLike, fmt: str, spec, variables, shape: tuple, layout: str, *,
          quantized: bool = False, images: np.ndarray | None = None) -> dict[str, Any]:
    """Run the file on `images` (default: one batch of seeded random images) and compare with JAX's
    own forward (the default implementation, unfolded); an ExportError for a float export beyond
    TOLERANCE."""
    import jax

    if images is None:
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
    parser.add_argument("--quantize", help="tflite only. int8-weights: int8 weights, float32 compute; "
                                           "int8: int8 weights and activations, calibrated on --representative")
    parser.add_argument("--representative", metavar="PATH",
                        help="calibration images for --quantize int8: a folder of image files (preprocessed as "
                             "predict does) or a .npy of preprocessed NHWC images")
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
                        representative=args.representative, overwrite=args.overwrite)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ops = ", ".join(f"{name} {count}" for name, count in sorted(report["ops"].items(), key=lambda kv: -kv[1]))
    print(f"wrote {report['file']} ({report['bytes'] / 2**20:.1f} MiB): {report['model']}, input images "
          f"{report['layout'].upper()} {report['input_shape']}, output logits")
    checked_on = "random"
    if report["calibration_images"]:
        print(f"calibrated on {report['calibration_images']} representative images")
        checked_on = "representative"
    print(f"checked on {report['check_images']} {checked_on} images: max |error| {report['max_abs_error']:.3g} "
          f"({report['relative_error']:.2g} of the logit scale), top-1 agreement {report['top1_agreement']:.3f}")
    print(f"ops: {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
