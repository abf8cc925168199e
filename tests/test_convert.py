"""Weight conversion: names, layouts, strictness, files, and the convert and predict command lines.

The numerics of converted weights are tested in test_parity.py; here every check is about moving
tensors: exact round trips through all three namings, names checked against the key maps the
other implementations publish (Hugging Face's converter, timm's checkpoint_filter_fn, restated in
torch_reference.py), what is inferred from shapes, and how bad input fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import torch_reference as ref
from swiftformer_jax import convert, create_model, predict
from swiftformer_jax import checkpoint
from swiftformer_jax.model import VARIANTS, ModelSpec

NBT = "num_batches_tracked"


# ------------------------------------------------------------------------------------------------
# Reference state dicts in the three namings
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def hf_model(variant: str):
    return ref.build(variant, seed=100 + len(variant))


@functools.lru_cache(maxsize=None)
def state_dicts(variant: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"hf", "official", "timm"}: the same random tensors under each naming, without our code.

    Official names are the preimage of HF's real keys under HF's published converter rule (that
    the rule maps our official key list one-to-one onto HF's key set is asserted); timm names are
    timm's published filter applied to the official dict, i.e. what timm loads.
    """
    hf = {k: v for k, v in hf_model(variant).state_dict().items() if not k.endswith(NBT)}
    official_keys = [k for k in convert.to_torch(convert.from_torch(hf), "official") if not k.endswith(NBT)]
    as_hf = [ref.official_to_hf(k) for k in official_keys]
    assert sorted(as_hf) == sorted(hf), "official names do not map one-to-one onto HF's keys"
    official = {k: hf[h] for k, h in zip(official_keys, as_hf)}
    timm = {ref.official_to_timm(k): v for k, v in official.items()}
    assert len(timm) == len(official)
    return {"hf": hf, "official": official, "timm": timm}


def with_nbt(state: dict) -> set[str]:
    """The key set including a num_batches_tracked buffer per BatchNorm."""
    return set(state) | {k[: -len("running_var")] + NBT for k in state if k.endswith("running_var")}


@functools.lru_cache(maxsize=None)
def init_shapes(variant: str, **kwargs) -> dict:
    model = create_model(variant, **kwargs)
    return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False))


def assert_same_tree(variables, shapes):
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(shapes)):
        assert (leaf.shape, leaf.dtype) == (want.shape, want.dtype), jax.tree_util.keystr(path)


def assert_same_variables(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


# ------------------------------------------------------------------------------------------------
# Round trips and names
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trips_are_exact_in_every_naming(variant):
    dicts = state_dicts(variant)
    variables = {naming: convert.from_torch(state) for naming, state in dicts.items()}
    assert_same_tree(variables["hf"], init_shapes(variant))
    assert_same_variables(variables["hf"], variables["official"])
    assert_same_variables(variables["hf"], variables["timm"])
    for naming, state in dicts.items():
        assert convert.detect_naming(state) == naming
        back = convert.to_torch(variables[naming], naming)
        assert set(back) == with_nbt(state), naming
        for key, tensor in state.items():
            assert back[key].dtype == np.float32 and back[key].flags.c_contiguous
            np.testing.assert_array_equal(back[key], tensor.numpy(), err_msg=f"{naming} {key}")
        assert all(back[k].dtype == np.int64 and back[k] == 0 for k in back if k.endswith(NBT))
    # The Hugging Face export loads strictly, with and without num_batches_tracked.
    model = hf_model(variant)
    for flag in (True, False):
        exported = convert.to_torch(variables["hf"], "hf", num_batches_tracked=flag)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    assert set(convert.to_torch(variables["hf"], "hf")) == set(model.state_dict())


def test_layouts_are_the_documented_transposes():
    """A few leaves by hand: conv OIHW -> HWIO, depthwise (C,1,3,3) -> (3,3,1,C), 1x1 conv and
    Linear (out, in) -> (in, out), layer scale (C,1,1) -> (C,), w_g and BN unchanged."""
    official = state_dicts("XS")["official"]
    params = convert.from_torch(official)["params"]
    stats = convert.from_torch(official)["batch_stats"]
    t = {k: v.numpy() for k, v in official.items()}
    np.testing.assert_array_equal(params["patch_embed"]["conv1"]["kernel"], t["patch_embed.0.weight"].transpose(2, 3, 1, 0))
    block = params["network_0"]["block_0"]
    np.testing.assert_array_equal(block["dwconv"]["kernel"][:, :, 0, 5], t["network.0.0.dwconv.weight"][5, 0])
    np.testing.assert_array_equal(block["pwconv1"]["kernel"], t["network.0.0.pwconv1.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(block["layer_scale"], t["network.0.0.layer_scale"][:, 0, 0])
    attn = params["network_6"]["block_3"]["attn"]
    np.testing.assert_array_equal(attn["Proj"]["kernel"], t["network.6.3.attn.Proj.weight"].T)
    np.testing.assert_array_equal(attn["w_g"], t["network.6.3.attn.w_g"])
    np.testing.assert_array_equal(stats["network_1"]["norm"]["var"], t["network.1.norm.running_var"])
    np.testing.assert_array_equal(params["dist_head"]["kernel"], t["dist_head.weight"].T)


def test_timm_names_follow_timm():
    names = set(state_dicts("XS")["timm"])
    for key in ("stem.0.weight", "stem.4.running_var", "stages.0.blocks.0.layer_scale.gamma",
                "stages.0.blocks.2.local_representation.layer_scale.gamma", "stages.0.blocks.2.attn.proj.weight",
                "stages.0.blocks.2.layer_scale_1.gamma", "stages.1.downsample.proj.weight",
                "stages.3.blocks.3.linear.fc2.bias", "head_dist.weight", "norm.running_mean"):
        assert key in names, key
    assert not any(k.startswith("stages.0.downsample") for k in names)  # timm: downsamples [F, T, T, T]


# ------------------------------------------------------------------------------------------------
# Inputs: wrappings, prefixes, array types
# ------------------------------------------------------------------------------------------------


def test_unwraps_release_format_ddp_and_hf_prefixes():
    official = state_dicts("XS")["official"]
    want = convert.from_torch(official)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    release = {"model": official, "model_ema": ema, "epoch": 299, "args": argparse.Namespace(lr=2e-3)}
    assert_same_variables(convert.from_torch(release), want)
    assert_same_variables(convert.from_torch(release, which="model_ema"), convert.from_torch(ema))
    assert_same_variables(convert.from_torch({"module." + k: v for k, v in official.items()}), want)
    numpy_dict = {k: v.numpy() for k, v in official.items()}
    assert_same_variables(convert.from_torch(numpy_dict), want)
    # Hugging Face names with or without the `swiftformer.` prefix (base-model naming).
    hf = state_dicts("XS")["hf"]
    assert_same_variables(convert.from_torch({k.removeprefix("swiftformer."): v for k, v in hf.items()}), want)
    # num_batches_tracked buffers are ignored, half precision is widened exactly.
    with_buffers = dict(official, **{"patch_embed.1.num_batches_tracked": torch.tensor(7)})
    assert_same_variables(convert.from_torch(with_buffers), want)
    half = convert.from_torch({k: v.to(torch.bfloat16) for k, v in official.items()})
    np.testing.assert_array_equal(
        half["params"]["head"]["kernel"], official["head.weight"].to(torch.bfloat16).float().numpy().T
    )


def test_which_entry_errors():
    official = state_dicts("XS")["official"]
    with pytest.raises(ValueError, match="no 'model_ema' entry"):
        convert.from_torch({"model": official, "epoch": 3}, which="model_ema")
    with pytest.raises(ValueError, match="bare state dict"):
        convert.from_torch(official, which="model_ema")
    with pytest.raises(ValueError, match="which must be one of"):
        convert.from_torch(official, which="ema")
    with pytest.raises(ValueError, match="expected a state dict"):
        convert.from_torch(torch.zeros(3))


# ------------------------------------------------------------------------------------------------
# What shapes tell: variant, classes, heads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_infer_variant_in_every_naming(variant):
    for naming, state in state_dicts(variant).items():
        assert convert.infer_variant(state) == variant, naming


def test_model_spec_single_head_other_classes_and_headless():
    official = state_dicts("XS")["official"]
    ten = {k: (v[:10] if k.startswith(("head.", "dist_head.")) else v) for k, v in official.items()}
    single = {k: v for k, v in ten.items() if not k.startswith("dist_head.")}
    headless = {k: v for k, v in official.items() if not k.startswith(("head.", "dist_head."))}
    cases = [
        (official, ModelSpec.named("XS", num_classes=1000, distillation=True)),
        (ten, ModelSpec.named("XS", num_classes=10, distillation=True)),
        (single, ModelSpec.named("XS", num_classes=10, distillation=False)),
        (headless, ModelSpec.named("XS", num_classes=0, distillation=False)),
    ]
    for state, spec in cases:
        assert convert.model_spec(state) == spec
        variables = convert.from_torch(state)
        assert_same_tree(variables, init_shapes("XS", num_classes=spec.num_classes, distillation=spec.distillation))
        assert spec.build().num_classes == spec.num_classes
        back = convert.to_torch(variables, "official", num_batches_tracked=False)
        assert back.keys() == state.keys()
    with pytest.raises(ValueError, match="always have a distillation head"):
        convert.to_torch(convert.from_torch(single), "hf")
    # The attention version is no tensor's: the naming's default, or the caller's.
    assert convert.model_spec(state_dicts("XS")["hf"]).attention_version == 1
    assert convert.model_spec(official, attention_version=1).attention_version == 1


def test_infer_variant_reports_what_it_found():
    linear = torch.nn.Linear(4, 3).state_dict()
    with pytest.raises(ValueError, match=r"found no SwiftFormer stage tensors .*first keys: \['weight', 'bias'\]"):
        convert.infer_variant(linear)
    official = state_dicts("XS")["official"]
    shallow = {k: v for k, v in official.items() if not k.startswith("network.4.5.")}  # drop stage 2's last block
    with pytest.raises(ValueError, match=r"depths \(3, 3, 5, 4\) and widths \(48, 56, 112, 220\)"):
        convert.infer_variant(shallow)
    with pytest.raises(ValueError, match="unknown SwiftFormer variant 'M'"):
        convert.from_torch(official, "M")


def test_strict_mismatch_lists_missing_unexpected_and_misshaped_keys():
    hf = dict(state_dicts("XS")["hf"])
    del hf["swiftformer.encoder.network.2.blocks.1.norm.running_var"]
    hf["swiftformer.encoder.network.2.blocks.1.extra.weight"] = torch.zeros(3)
    hf["swiftformer.encoder.network.6.blocks.3.attn.w_g"] = torch.zeros(220, 2)
    with pytest.raises(ValueError) as info:
        convert.from_torch(hf)
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "missing: swiftformer.encoder.network.2.blocks.1.norm.running_var" in message
    assert "unexpected: swiftformer.encoder.network.2.blocks.1.extra.weight" in message
    assert "swiftformer.encoder.network.6.blocks.3.attn.w_g: got (220, 2), expected (220, 1)" in message
    # A stated variant that does not fit lists the mis-shaped tensors too.
    with pytest.raises(ValueError, match=r"SwiftFormer-S .* mis-shaped"):
        convert.from_torch(state_dicts("XS")["official"], "S")
    # Mixed namings are refused key by key, not half-read.
    mixed = dict(state_dicts("XS")["official"], **{"network.0.0.depth_wise_conv.weight": torch.zeros(48, 1, 3, 3)})
    with pytest.raises(ValueError, match=r"unexpected: network\.0\.0\.depth_wise_conv\.weight"):
        convert.from_torch(mixed)


def test_to_torch_rejects_unknown_naming_and_collections():
    variables = convert.from_torch(state_dicts("XS")["official"])
    with pytest.raises(ValueError, match="unknown naming 'torch'"):
        convert.to_torch(variables, "torch")
    with pytest.raises(ValueError, match="must hold 'params'"):
        convert.to_torch({**variables, "intermediates": {}}, "official")


# ------------------------------------------------------------------------------------------------
# Files and the convert command line
# ------------------------------------------------------------------------------------------------


def files_in(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def run_cli(module, argv, capsys) -> tuple[int, str, str]:
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def release_file(tmp_path_factory) -> Path:
    """An official training checkpoint: model, model_ema, optimizer state, epoch, argparse args."""
    official = state_dicts("XS")["official"]
    path = tmp_path_factory.mktemp("release") / "swiftformer_xs.pth"
    ema = {k: v * 0.5 for k, v in official.items()}
    torch.save({"model": official, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "epoch": 299, "args": argparse.Namespace(model="SwiftFormer_XS", lr=2e-3)}, path)
    return path


@pytest.fixture(scope="module")
def imported(release_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("imported") / "xs"
    assert convert.main(["import", "--checkpoint", str(release_file), "--output", str(output)]) == 0
    return output


def saved_model_json(directory: Path) -> dict:
    """The model JSON (spec and source) of a checkpoint directory's latest step."""
    item = checkpoint.find_step_dir(directory) / checkpoint.MODEL_ITEM
    return json.loads(next(item.iterdir()).read_text())


def test_import_writes_the_checkpoint_layout_with_spec_and_source(imported, release_file):
    assert sorted(p.name for p in imported.iterdir()) == ["0"]  # one step, as a trainer's checkpoints/
    saved = saved_model_json(imported)
    assert saved["variant"] == "XS" and saved["num_classes"] == 1000
    assert saved["distillation"] is True and saved["features_only"] is False
    assert saved["attention_version"] == 2  # official naming's default
    assert saved["source"]["naming"] == "official" and saved["source"]["entry"] == "model"
    import hashlib

    assert saved["source"]["sha256"] == hashlib.sha256(release_file.read_bytes()).hexdigest()
    model, variables, spec = convert.load_checkpoint(imported)
    assert spec == ModelSpec.named("XS") and model.attention_version == 2
    assert_same_variables(variables, convert.from_torch(state_dicts("XS")["official"]))
    assert convert.load_checkpoint(imported, attention_version=1)[0].attention_version == 1


def test_import_ema_safetensors_and_attention_defaults(release_file, tmp_path, capsys):
    code, out, _ = run_cli(convert, ["import", "--checkpoint", release_file, "--ema", "--attention-version", "1",
                                     "--output", tmp_path / "ema"], capsys)
    assert code == 0 and "entry 'model_ema'" in out and "attention v1" in out
    _, variables, spec = convert.load_checkpoint(tmp_path / "ema")
    assert spec.attention_version == 1 and saved_model_json(tmp_path / "ema")["source"]["entry"] == "model_ema"
    ema = {k: v * 0.5 for k, v in state_dicts("XS")["official"].items()}
    assert_same_variables(variables, convert.from_torch(ema))

    # A Hugging Face safetensors file: version 1 unless stated.
    import safetensors.torch

    hf_file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(dict(hf_model("XS").state_dict()), str(hf_file))
    code, out, _ = run_cli(convert, ["import", "--checkpoint", hf_file, "--output", tmp_path / "hf"], capsys)
    assert code == 0, out
    _, variables, spec = convert.load_checkpoint(tmp_path / "hf")
    source = saved_model_json(tmp_path / "hf")["source"]
    assert spec.attention_version == 1 and source["naming"] == "hf" and source["entry"] is None
    assert_same_variables(variables, convert.from_torch(state_dicts("XS")["hf"]))


@pytest.mark.parametrize("naming,suffix", [("hf", ".safetensors"), ("official", ".pth"), ("timm", ".bin")])
def test_export_reproduces_the_source_tensors(imported, tmp_path, capsys, naming, suffix):
    output = tmp_path / f"out{suffix}"
    code, _, err = run_cli(convert, ["export", "--checkpoint", imported, "--naming", naming, "--output", output], capsys)
    assert code == 0, err
    assert files_in(tmp_path) == {output.name}
    state = convert.read_torch_file(output)
    want = state_dicts("XS")[naming]
    assert set(state) == with_nbt(want)
    for key, tensor in want.items():
        assert torch.equal(state[key], tensor), key
    if naming == "hf":
        hf_model("XS").load_state_dict(state, strict=True)


def _foreign_files(directory: Path) -> dict[str, Path]:
    """Bad inputs, each paired with the message its error must contain."""
    directory.mkdir()
    good = directory / "good.pth"
    torch.save(state_dicts("XS")["official"], good)
    files = {
        "missing": directory / "absent.pth",
        "truncated": directory / "truncated.pth",
        "random bytes": directory / "random.pth",
        "json": directory / "config.pth",
        "json suffix": directory / "config.json",
        "linear": directory / "linear.pth",
        "truncated safetensors": directory / "model.safetensors",
    }
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["random bytes"].write_bytes(np.random.RandomState(0).bytes(4096))
    files["json"].write_text(json.dumps({"model": "SwiftFormer_XS"}))
    files["json suffix"].write_text(json.dumps({"model": "SwiftFormer_XS"}))
    torch.save(torch.nn.Linear(4, 3).state_dict(), files["linear"])
    files["truncated safetensors"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    good.unlink()
    return files


EXPECTED_ERRORS = {
    "missing": "checkpoint file not found",
    "truncated": "cannot read",
    "random bytes": "cannot read",
    "json": "cannot read",
    "json suffix": "unsupported file type '.json'",
    "linear": "found no SwiftFormer stage tensors",
    "truncated safetensors": "as a safetensors file",
}


def test_import_errors_are_one_line_and_leave_nothing_behind(tmp_path, capsys):
    files = _foreign_files(tmp_path / "inputs")
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    for case, path in files.items():
        before = files_in(tmp_path)
        code, _, err = run_cli(convert, ["import", "--checkpoint", path, "--output", out_dir / "ckpt"], capsys)
        assert code == 2, case
        assert err.startswith("error: ") and EXPECTED_ERRORS[case] in err and err.count("\n") == 1, (case, err)
        assert files_in(tmp_path) == before, case


def test_existing_outputs_are_refused(imported, release_file, tmp_path, capsys):
    existing_dir = tmp_path / "exists"
    existing_dir.mkdir()
    existing_file = tmp_path / "exists.pth"
    existing_file.write_bytes(b"keep me")
    before = files_in(tmp_path)
    code, _, err = run_cli(convert, ["import", "--checkpoint", release_file, "--output", existing_dir], capsys)
    assert code == 2 and "output already exists" in err
    code, _, err = run_cli(convert, ["export", "--checkpoint", imported, "--output", existing_file], capsys)
    assert code == 2 and "output already exists" in err
    code, _, err = run_cli(convert, ["export", "--checkpoint", imported, "--output", tmp_path / "x.npz"], capsys)
    assert code == 2 and "unsupported file type '.npz'" in err
    code, _, err = run_cli(convert, ["export", "--checkpoint", tmp_path / "nowhere", "--output", tmp_path / "y.pth"], capsys)
    assert code == 2 and "checkpoint not found" in err
    code, _, err = run_cli(convert, ["export", "--checkpoint", existing_dir, "--output", tmp_path / "y.pth"], capsys)
    assert code == 2 and "neither a checkpoint directory of this package" in err
    assert files_in(tmp_path) == before and existing_file.read_bytes() == b"keep me"


def test_failed_write_leaves_nothing_behind(imported, release_file, tmp_path, monkeypatch):
    """A failure while the output is being written removes the temporary sibling."""

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.export_checkpoint(imported, tmp_path / "out.pth")
    monkeypatch.setattr(checkpoint.Checkpointer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.import_checkpoint(release_file, tmp_path / "never")
    assert files_in(tmp_path) == set()


def test_module_entry_point_reports_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "swiftformer_jax.convert", "import", "--checkpoint", str(tmp_path / "absent.pth"),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: checkpoint file not found")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------


def test_preprocess_geometry_follows_torchvision():
    assert predict.RESIZE_SIZE == 256 and predict.CROP_SIZE == 224
    assert predict.resized_size(500, 375) == (341, 256)  # int(256 * 500 / 375) = 341
    assert predict.resized_size(300, 500) == (256, 426)
    assert predict.resized_size(256, 256) == (256, 256)
    assert predict.center_crop_box(341, 256) == (58, 16, 282, 240)  # round(58.5) = 58, banker's
    assert predict.center_crop_box(256, 427) == (16, 102, 240, 326)  # round(101.5) = 102


def test_preprocess_values():
    from PIL import Image

    flat = Image.new("RGB", (320, 240), (255, 128, 0))
    pixels = predict.preprocess(flat)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.float32
    want = (np.array([255, 128, 0]) / 255.0 - np.array(predict.IMAGENET_MEAN)) / np.array(predict.IMAGENET_STD)
    np.testing.assert_allclose(pixels, np.broadcast_to(want, pixels.shape), atol=1e-5)
    # A horizontal ramp: the crop is centred (the resize keeps the ramp monotone and symmetric).
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 400).astype(np.uint8), (300, 1)), mode="L")
    red = predict.preprocess(ramp)[..., 0] * predict.IMAGENET_STD[0] + predict.IMAGENET_MEAN[0]
    assert red[0, 0] > 0.1 and red[0, -1] < 0.9 and abs(red[0, 0] + red[0, -1] - 1) < 0.02


def test_imagenet_labels_come_from_tfds():
    wnids = predict.imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids == sorted(wnids)


def test_predict_prints_top5_matching_the_reference(imported, tmp_path, capsys):
    from PIL import Image

    image_path = tmp_path / "photo.png"
    Image.fromarray(np.random.RandomState(4).randint(0, 256, (260, 300, 3), dtype=np.uint8)).save(image_path)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class number {i}\n" for i in range(1000)))
    code, out, err = run_cli(predict, ["--checkpoint", imported, "--names", names, image_path], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(image_path) and len(lines) == 6
    # The same top 5 from the PyTorch model (attention version 2) on the same pixels.
    torch_model = hf_model("XS")
    pixels = predict.preprocess(Image.open(image_path))
    with torch.no_grad(), ref.attention_version(torch_model, 2):
        probabilities = torch.softmax(torch_model(ref.nchw(pixels[None])).logits, -1)[0].numpy()
    wnids = predict.imagenet_wnids()
    for rank, (index, probability) in enumerate(predict.top_k(probabilities, 5), start=1):
        label, printed = lines[rank].rsplit(None, 1)
        assert label.strip() == f"{rank}. {wnids[index]} class number {index}"
        assert abs(float(printed) - probability) < 2e-4


def test_predict_errors(imported, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code, _, err = run_cli(predict, ["--checkpoint", imported, tmp_path / "absent.jpg"], capsys)
    assert code == 2 and "image not found" in err
    code, _, err = run_cli(predict, ["--checkpoint", imported, bad], capsys)
    assert code == 2 and "cannot read" in err and err.count("\n") == 1
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    code, _, err = run_cli(predict, ["--checkpoint", imported, "--names", names, bad], capsys)
    assert code == 2 and "has 2 names; the checkpoint has 1000 classes" in err
    code, _, err = run_cli(predict, ["--checkpoint", tmp_path, bad], capsys)
    assert code == 2 and "neither a checkpoint directory of this package" in err


def test_predict_reads_gray_alpha_and_16_bit_images_and_refuses_truncated_and_huge_ones(tmp_path, monkeypatch):
    from PIL import Image

    rs = np.random.RandomState(0)
    gray = rs.randint(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(np.asarray(predict.load_image(tmp_path / "gray.png")), np.stack([gray] * 3, -1))
    rgba = rs.randint(0, 256, (40, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(np.asarray(predict.load_image(tmp_path / "alpha.png")), rgba[..., :3])
    deep = (np.arange(40 * 50).reshape(40, 50) * 32).astype(np.uint16)  # 0 .. 63968 of 65535
    Image.fromarray(deep).save(tmp_path / "deep.png")
    loaded = np.asarray(predict.load_image(tmp_path / "deep.png"))
    np.testing.assert_array_equal(loaded[..., 0], np.round(deep / 65535 * 255).astype(np.uint8))  # scaled, not clipped

    Image.fromarray(rs.randint(0, 256, (300, 300, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg as an image: image file is truncated"):
        predict.load_image(tmp_path / "cut.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 90,000 pixels is then a decompression bomb
    with pytest.raises(ValueError, match="photo.jpg: too large to decode safely"):
        predict.load_image(tmp_path / "photo.jpg")
