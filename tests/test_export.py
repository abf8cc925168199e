"""Export to ONNX and LiteRT: the exported files compute the network (checked here with their own
runtimes against JAX, not only by the export's self-check), and bad requests write nothing."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from swiftformer_jax import checkpoint, export, ops, predict
from swiftformer_jax.model import ModelSpec


TOLERANCE = 1e-4  # of the largest |logit|
OTHER_SIZE = (160, 192)


def trained_like_variables(spec: ModelSpec, seed: int = 0) -> dict:
    """Weights of a trained network's magnitudes: N(0, 0.05) kernels and biases, BN scales and
    variances in [0.5, 1.5] (the init's zero biases and unit statistics would hide mistakes)."""
    rs = np.random.RandomState(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']") or name.endswith("['scale']"):
            return rs.uniform(0.5, 1.5, shape.shape).astype(shape.dtype)
        return rs.normal(0.0, 0.05, shape.shape).astype(shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, spec.abstract_variables())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (checkpoint directory, spec, variables)} for XS and S, as `convert import` writes."""
    out = {}
    for variant in ("XS", "S"):
        spec = ModelSpec.named(variant)
        variables = trained_like_variables(spec)
        path = tmp_path_factory.mktemp("export") / variant
        checkpoint.save_weights(path, variables, spec)
        out[variant] = (path, spec, variables)
    return out


def jax_logits(spec, variables, images):
    return np.asarray(jax.jit(lambda x: spec.build().apply(variables, x))(images))


def images(batch, height, width, seed=1):
    return np.random.RandomState(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """{(variant, format): (224 px, OTHER_SIZE with a fixed batch of 2)} reports. At 224 px the batch is
    dynamic, except for S in LiteRT: batch 1, the fast file deployments use (XS covers LiteRT's
    slower dynamic-batch form)."""
    out = {}
    for variant, (path, _, _) in saved.items():
        directory = tmp_path_factory.mktemp(f"exported-{variant}")
        for fmt in export.FORMATS:
            batch = dict(batch=1) if (variant, fmt) == ("S", "tflite") else dict(dynamic_batch=True)
            out[variant, fmt] = (export.export(path, fmt, directory / f"224.{fmt}", **batch),
                                 export.export(path, fmt, directory / f"fixed.{fmt}", batch=2, image_size=OTHER_SIZE))
    return out


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("variant", ["XS", "S"])
def test_exported_logits_match_jax_at_two_batches_and_two_sizes(saved, exported, variant, fmt):
    _, spec, variables = saved[variant]
    at_224, fixed = exported[variant, fmt]
    dynamic = at_224["input_shape"][0] == "B"
    assert at_224["input_shape"][1:] == [224, 224, 3] and fixed["input_shape"] == [2, *OTHER_SIZE, 3]
    assert dynamic == ((variant, fmt) != ("S", "tflite"))
    # 224 px run at batch 1 (and 3 where the batch is dynamic); the other size at its fixed batch of 2.
    for report, batches, size in ((at_224, (1, 3) if dynamic else (1,), (224, 224)), (fixed, (2,), OTHER_SIZE)):
        run = export.runner(report["file"], fmt)
        for batch in batches:
            x = images(batch, *size)
            want = jax_logits(spec, variables, x)
            got = run(x)
            assert got.shape == (batch, 1000)
            scale = np.abs(want).max()
            assert scale > 0.1  # logits of a real scale, not an init's near-zero ones (~1e-3)
            assert np.abs(got - want).max() <= TOLERANCE * scale, (fmt, variant, batch, size)
            assert (got.argmax(-1) == want.argmax(-1)).all()


def delegated_partitions(path) -> int:
    """Parts of a LiteRT file that XNNPACK runs; every op it cannot take splits the graph."""
    interpreter = export.tflite_interpreter(path)
    interpreter.allocate_tensors()
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())


def test_graphs_use_the_runtimes_own_ops_and_no_tensorflow_ops(exported):
    onnx_ops = exported["XS", "onnx"][0]["ops"]
    fixed = exported["XS", "tflite"][1]
    tflite_ops = fixed["ops"]
    # XS: 16 depthwise 3x3 convs, 2 stem convs and 3 downsampling convs; 20 exact GELUs; no batch
    # norm left (folded).
    assert onnx_ops["Conv"] == 21 and onnx_ops["Gelu"] == 20 and "Slice" not in onnx_ops
    assert "BatchNormalization" not in onnx_ops
    assert tflite_ops["DEPTHWISE_CONV_2D"] == 16 and tflite_ops["CONV_2D"] == 5
    assert tflite_ops["GELU"] == 20 and "TANH" not in tflite_ops and "SELECT" not in tflite_ops, tflite_ops
    assert not [op for op in tflite_ops if "FLEX" in op.upper() or op == "CUSTOM"], tflite_ops
    # XNNPACK takes the whole fixed-batch graph: nothing runs on TFLite's slower reference kernels.
    assert delegated_partitions(fixed["file"]) == 1
    assert delegated_partitions(exported["S", "tflite"][0]["file"]) == 1  # S at 224 px, batch 1


def test_litert_gelu_is_the_exact_form():
    """The tanh form the converter fuses, set back to exact: GELU's values, not its approximation's."""
    x = np.linspace(-6, 6, 4096, dtype=np.float32).reshape(64, 64)
    flatbuffer = export.to_tflite(lambda v: ops.gelu(v, "xla"), x.shape)
    interpreter = export.tflite_interpreter(flatbuffer)
    assert [op["op_name"] for op in interpreter._get_ops_details()] == ["GELU"]
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    exact = np.asarray(jax.nn.gelu(x, approximate=False))
    assert np.abs(got - exact).max() < 2e-6
    assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - exact).max() > 1e-4  # what it would be


def test_nchw_input_and_int8_weights(saved, exported, tmp_path):
    path, spec, variables = saved["XS"]
    x = images(1, 224, 224)
    want = jax_logits(spec, variables, x)
    onnx_file = export.export(path, "onnx", tmp_path / "nchw.onnx", layout="nchw")["file"]
    got = export.runner(onnx_file, "onnx")(x.transpose(0, 3, 1, 2))
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()
    quantized = export.export(path, "tflite", tmp_path / "int8.tflite", quantize="int8-weights")
    assert quantized["bytes"] < 0.4 * exported["XS", "tflite"][1]["bytes"]  # int8 weights: about a quarter
    assert quantized["relative_error"] < 0.05 and quantized["top1_agreement"] == 1.0


def test_full_int8_calibrated_on_a_folder_of_images(saved, exported, tmp_path):
    from PIL import Image

    path, spec, variables = saved["XS"]
    folder = tmp_path / "calibration"
    folder.mkdir()
    rs = np.random.RandomState(3)
    for i in range(4):  # images of other sizes and modes: preprocessed as predict does
        Image.fromarray((rs.rand(250 + 10 * i, 300, 3) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image: skipped")
    report = export.export(path, "tflite", tmp_path / "int8.tflite", batch=2, quantize="int8",
                           representative=folder)
    assert report["calibration_images"] == 4 and report["check_images"] == 2
    assert report["ops"]["QUANTIZE"] == 1 and report["ops"]["DEQUANTIZE"] == 1 and report["ops"]["GELU"] == 20
    # No int8 division (its kernel stops the interpreter on a divisor at the zero point): L2
    # normalisation multiplies by RSQRT.
    assert "DIV" not in report["ops"] and report["ops"]["RSQRT"] == 12
    assert report["bytes"] < 0.4 * exported["XS", "tflite"][1]["bytes"]
    # Int8 activations: an error of a few percent of the logit scale, measured on the calibration
    # images and reported (not a float export's tolerance).
    assert 0 < report["relative_error"] < 0.2
    x = np.stack([predict.preprocess(predict.load_image(folder / f"{i}.png")) for i in (0, 1)])
    got = export.runner(report["file"], "tflite")(x)
    want = jax_logits(spec, variables, x)
    assert np.abs(got - want).max() == pytest.approx(report["max_abs_error"], rel=1e-5)


def test_representative_images_are_read_and_refused_by_name(tmp_path):
    good = np.random.RandomState(0).standard_normal((3, 40, 48, 3)).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    np.testing.assert_array_equal(export.representative_images(tmp_path / "good.npy", (40, 48)), good)
    assert export.representative_images(tmp_path / "good.npy", (40, 48), "nchw").shape == (3, 3, 40, 48)
    np.save(tmp_path / "nan.npy", np.full((1, 40, 48, 3), np.nan, np.float32))
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "good.npy", (48, 40), "shape (3, 40, 48, 3)"),
        (tmp_path / "nan.npy", (40, 48), "finite float"),
        (tmp_path / "empty", (32, 32), "no image files"),
        (tmp_path / "good.npy.txt", (40, 48), "not a folder of images or a .npy"),
    ]
    (tmp_path / "good.npy.txt").write_text("x")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:300])
    cases.append((tmp_path / "cut.npy", (40, 48), "cannot read it as a .npy array"))
    for source, size, message in cases:
        with pytest.raises(export.ExportError, match=re.escape(message)) as error:
            export.representative_images(source, size)
        assert str(source) in str(error.value)
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    with pytest.raises(export.ExportError, match="square exports only"):
        export.representative_images(tmp_path / "images", (32, 48))


@pytest.mark.parametrize("change, message", [
    (dict(fmt="coreml"), "--format must be one of"),
    (dict(image_size=(16, 224)), "at least 32 pixels"),
    (dict(batch=0), "--batch must be >= 1"),
    (dict(layout="nwhc"), "--layout must be one of"),
    (dict(fmt="onnx", quantize="int8-weights"), "is for --format tflite"),
    (dict(quantize="int4"), "--quantize must be one of"),
    (dict(quantize="int8"), "calibrates on --representative"),
    (dict(quantize="int8-weights", representative="images.npy"), "is for --quantize int8"),
    (dict(quantize="int8", representative="nowhere.npy"), "nowhere.npy does not exist"),
    (dict(quantize="int8", representative=__file__, dynamic_batch=True), "needs a fixed --batch"),
])
def test_bad_requests_fail_before_anything_is_written(saved, tmp_path, change, message):
    path, _, _ = saved["XS"]
    kwargs = {"fmt": "tflite", **change}
    fmt = kwargs.pop("fmt")
    with pytest.raises(export.ExportError, match=message):
        export.export(path, fmt, tmp_path / "out.file", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_missing_foreign_and_existing_paths_are_named(saved, tmp_path, capsys):
    path, _, _ = saved["XS"]
    (tmp_path / "taken.onnx").write_text("someone's file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere")], "nowhere"),
        (["--checkpoint", str(tmp_path / "notes")], "notes"),
        (["--checkpoint", str(path), "--output", str(tmp_path / "taken.onnx")], "exists"),
        (["--checkpoint", str(path), "--output", str(tmp_path / "no-dir" / "x.onnx")], "does not exist"),
    ]
    for args, named in cases:
        argv = ["--format", "onnx", "--output", str(tmp_path / "new.onnx"), *args]
        assert export.main(argv) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and named in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "taken.onnx"]
    assert (tmp_path / "taken.onnx").read_text() == "someone's file"


def test_an_export_that_does_not_compute_the_network_is_not_written(saved, tmp_path, monkeypatch):
    """The self-check is a real gate: an exporter that drops the distillation head is caught."""
    path, _, _ = saved["XS"]
    real = export.inference_function

    def wrong(model, variables, layout="nhwc"):
        crippled = {**variables, "params": {**variables["params"],
                                            "dist_head": jax.tree.map(np.zeros_like, variables["params"]["dist_head"])}}
        return real(model, crippled, layout)

    monkeypatch.setattr(export, "inference_function", lambda m, v, layout="nhwc": (
        wrong(m, v, layout) if m.impl == "xla" else real(m, v, layout)))
    with pytest.raises(export.ExportError, match="differ from JAX's"):
        export.export(path, "onnx", tmp_path / "wrong.onnx")
    assert list(tmp_path.iterdir()) == []
