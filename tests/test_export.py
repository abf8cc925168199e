"""Export to ONNX and LiteRT: the exported files compute the network (checked here with their own
runtimes against JAX, not only by the export's self-check), and bad requests write nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from swiftformer_jax import checkpoint, export
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
    """{(variant, format): (224 px with a dynamic batch, OTHER_SIZE with a fixed batch of 2)} reports."""
    out = {}
    for variant, (path, _, _) in saved.items():
        directory = tmp_path_factory.mktemp(f"exported-{variant}")
        for fmt in export.FORMATS:
            out[variant, fmt] = (export.export(path, fmt, directory / f"dynamic.{fmt}", dynamic_batch=True),
                                 export.export(path, fmt, directory / f"fixed.{fmt}", batch=2, image_size=OTHER_SIZE))
    return out


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("variant", ["XS", "S"])
def test_exported_logits_match_jax_at_two_batches_and_two_sizes(saved, exported, variant, fmt):
    _, spec, variables = saved[variant]
    dynamic, fixed = exported[variant, fmt]
    assert dynamic["input_shape"] == ["B", 224, 224, 3] and fixed["input_shape"] == [2, *OTHER_SIZE, 3]
    # 224 px run at batch 1 and 3; the other size at its fixed batch of 2.
    for report, batches, size in ((dynamic, (1, 3), (224, 224)), (fixed, (2,), OTHER_SIZE)):
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


def test_graphs_use_the_runtimes_own_convolutions_and_no_tensorflow_ops(exported):
    onnx_ops = exported["XS", "onnx"][0]["ops"]
    tflite_ops = exported["XS", "tflite"][0]["ops"]
    # XS: 16 depthwise 3x3 convs, 2 stem convs and 3 downsampling convs; 20 exact GELUs.
    assert onnx_ops["Conv"] == 21 and onnx_ops["Gelu"] == 20 and "Slice" not in onnx_ops
    assert tflite_ops["DEPTHWISE_CONV_2D"] == 16 and tflite_ops["CONV_2D"] == 5
    assert not [op for op in tflite_ops if "FLEX" in op.upper() or op == "CUSTOM"], tflite_ops


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


@pytest.mark.parametrize("change, message", [
    (dict(fmt="coreml"), "--format must be one of"),
    (dict(image_size=(16, 224)), "at least 32 pixels"),
    (dict(batch=0), "--batch must be >= 1"),
    (dict(layout="nwhc"), "--layout must be one of"),
    (dict(fmt="onnx", quantize="int8-weights"), "is for --format tflite"),
    (dict(quantize="int4"), "--quantize must be one of"),
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
