"""RegNetY, the paper's teacher: parity with Hugging Face transformers, timm's and HF's names, the
import / export command line, train mode, and distillation from a RegNetY teacher in the trainer.

Reference: transformers' `RegNetForImageClassification` (PyTorch, float32) with every tensor
randomised (`torch_reference.randomize_`: conv and linear weights, biases, BN affine parameters and
running statistics), for RegNetY-160 itself (at 224 px, batch 1) and for a small RegNetY (at 224
and 193x225 px, eval and train mode). The RegNetY-160 config is the one transformers' converter
(`convert_regnet_to_pytorch.py`, "regnet-y-160") uses: depths [2, 4, 11, 1], hidden sizes [224,
448, 1232, 3024], groups width 112, layer type "y", with the config's defaults embedding_size 32,
hidden_act "relu", downsample_in_first_stage True, 1000 labels.

timm's names are restated here from timm's source (`timm/models/regnet.py`: `RegNet` registers
`stem` (ConvNormAct: `conv`, `bn`), stages `s1`.. of blocks `b1`.. (Bottleneck: `conv1`, `conv2`,
`se` (SEModule: `fc1`, `fc2` with biases), `conv3`, `downsample` where the shape changes, each
ConvNormAct `conv` + `bn`), `head.fc`), and the HF -> timm map from HF's module tree
(`RegNetYLayer.layer` = conv1, conv2, SE (`attention.0`, `attention.2`), conv3; `shortcut`;
`RegNetConvLayer` = `convolution` + `normalization`; `classifier.1`), independently of
`regnet_convert`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import RegNetConfig, RegNetForImageClassification

import torch_reference as ref
from conftest import tiny_config
from swiftformer_jax import checkpoint, convert, losses, mixup, regnet_convert, sharding, specs, train
from swiftformer_jax.model import ModelSpec
from swiftformer_jax.regnet import DEIT_TEACHER_URL, RegNetSpec, RegNetY


RTOL = 1e-5
NBT = "num_batches_tracked"
REGNETY_160 = RegNetSpec.named("regnety_160")
# A small RegNetY: 4 stages, group width 8, a stem of 18 so that its SE width rounds (18 / 4 = 4.5 -> 4).
SMALL = RegNetSpec(stem_width=18, depths=(1, 2, 2, 1), widths=(16, 32, 48, 64), group_width=8, num_classes=10)
# A tiny RegNetY teacher for the command line and the trainer (32 px images, 10 classes).
TINY = RegNetSpec(stem_width=8, depths=(1, 1, 1, 1), widths=(8, 16, 24, 32), group_width=8, num_classes=10)


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(2)
    yield
    jax.config.update("jax_default_matmul_precision", previous)


# ------------------------------------------------------------------------------------------------
# The reference and the independent name maps
# ------------------------------------------------------------------------------------------------


def hf_config(spec: RegNetSpec) -> RegNetConfig:
    return RegNetConfig(num_channels=3, embedding_size=spec.stem_width, depths=list(spec.depths),
                        hidden_sizes=list(spec.widths), groups_width=spec.group_width, layer_type="y",
                        hidden_act="relu", downsample_in_first_stage=True, num_labels=spec.num_classes)


@functools.lru_cache(maxsize=None)
def hf_model(spec: RegNetSpec, seed: int = 0) -> RegNetForImageClassification:
    model = RegNetForImageClassification(hf_config(spec))
    ref.randomize_(model, seed)
    return model.eval()


def hf_state(spec: RegNetSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    return dict(hf_model(spec, seed).state_dict())


def timm_name_of_hf_key(key: str) -> str:
    """Hugging Face's RegNet key -> timm's, from the two module trees (see the module docstring)."""
    key = re.sub(r"^regnet\.embedder\.embedder\.", "stem.", key)
    key = re.sub(r"^regnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.",
                 lambda m: f"s{int(m[1]) + 1}.b{int(m[2]) + 1}.", key)
    for hf, timm in (("layer.0.", "conv1."), ("layer.1.", "conv2."), ("layer.2.attention.0.", "se.fc1."),
                     ("layer.2.attention.2.", "se.fc2."), ("layer.3.", "conv3."), ("shortcut.", "downsample."),
                     ("convolution.", "conv."), ("normalization.", "bn.")):
        key = key.replace(hf, timm)
    return re.sub(r"^classifier\.1\.", "head.fc.", key)


def timm_keys(spec: RegNetSpec) -> set[str]:
    """Every state_dict key of timm's RegNet of these sizes (num_batches_tracked included)."""
    bn = ("weight", "bias", "running_mean", "running_var", NBT)
    keys = {"stem.conv.weight"} | {f"stem.bn.{n}" for n in bn}
    for stage, depth in enumerate(spec.depths, start=1):
        for block in range(1, depth + 1):  # the first block of a stage changes the shape (stride 2)
            prefix = f"s{stage}.b{block}."
            units = ["conv1", "conv2", "conv3"] + (["downsample"] if block == 1 else [])
            for unit in units:
                keys |= {prefix + f"{unit}.conv.weight"} | {prefix + f"{unit}.bn.{n}" for n in bn}
            keys |= {prefix + f"se.fc{i}.{n}" for i in (1, 2) for n in ("weight", "bias")}
    return keys | ({"head.fc.weight", "head.fc.bias"} if spec.num_classes else set())


def timm_state(spec: RegNetSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    return {timm_name_of_hf_key(k): v for k, v in hf_state(spec, seed).items()}


@functools.lru_cache(maxsize=None)
def teacher_state(naming: str) -> dict[str, torch.Tensor]:
    """The tiny teacher's state dict: random (seed 5), its head scaled by 20 for confident logits
    (so that a distillation temperature changes the loss)."""
    hf = hf_state(TINY, seed=5)
    hf["classifier.1.weight"] = hf["classifier.1.weight"] * 20
    return hf if naming == "hf" else {timm_name_of_hf_key(k): v for k, v in hf.items()}


def images(batch: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).standard_normal((batch, *size, 3)).astype(np.float32)


def assert_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert np.isfinite(error) and error <= rtol * scale, f"{what}: error {error:.3g} > {rtol:g} x scale {scale:.3g}"


def assert_same_variables(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


@functools.lru_cache(maxsize=None)
def eval_fn(spec: RegNetSpec, dtype=jnp.float32):
    model = spec.build(dtype=dtype)
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(ref.nchw(x)).logits.numpy()


# ------------------------------------------------------------------------------------------------
# RegNetY-160: sizes, parity, names
# ------------------------------------------------------------------------------------------------


def test_regnety_160_sizes_and_parameter_count():
    assert REGNETY_160 == RegNetSpec(stem_width=32, depths=(2, 4, 11, 1), widths=(224, 448, 1232, 3024),
                                     group_width=112, se_ratio=0.25, num_classes=1000, image_size=224)
    assert REGNETY_160.variant == "regnety_160" and REGNETY_160.describe() == "RegNetY-160 (1000 classes, 224 px)"
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(REGNETY_160.abstract_variables()["params"]))
    theirs = sum(p.numel() for p in hf_model(REGNETY_160).parameters())
    assert ours == theirs == 83_590_140
    blocks = REGNETY_160.blocks()
    assert [b.groups for b in blocks if b.block == 1] == [2, 4, 11, 27]
    assert [b.se_width for b in blocks if b.block == 1] == [8, 56, 112, 308]  # round(0.25 x input width)
    assert [b.se_width for b in blocks if b.block == 2][:3] == [56, 112, 308]


def test_regnety_160_eval_logits_match_hugging_face_at_224():
    x = images(1, (224, 224))
    variables = regnet_convert.from_torch(hf_state(REGNETY_160))
    logits = eval_fn(REGNETY_160)(variables, jnp.asarray(x))
    assert logits.dtype == jnp.float32
    assert_close(logits, torch_logits(hf_model(REGNETY_160), x), RTOL, "RegNetY-160 logits")


def test_timm_and_hugging_face_namings_give_identical_variables():
    hf, timm = hf_state(REGNETY_160), timm_state(REGNETY_160)
    assert set(timm) == timm_keys(REGNETY_160) and len(timm) == len(hf) == 428
    from_timm = regnet_convert.from_torch({"model": timm})  # DeiT's release wraps the state dict
    assert_same_variables(from_timm, regnet_convert.from_torch(hf))
    assert regnet_convert.model_spec(timm) == regnet_convert.model_spec(hf) == REGNETY_160
    # And back: our names are exactly theirs, tensor for tensor.
    for naming, want in (("timm", timm), ("hf", hf)):
        exported = regnet_convert.to_torch(from_timm, naming)
        assert set(exported) == set(want)
        assert all(np.array_equal(exported[k], want[k].numpy()) for k in want), naming


# ------------------------------------------------------------------------------------------------
# A small RegNetY: odd sizes, bfloat16, train mode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (193, 225)])
def test_small_regnety_eval_logits_match_hugging_face(size):
    x = images(2, size, seed=1)
    variables = regnet_convert.from_torch(hf_state(SMALL, seed=3))
    want = torch_logits(hf_model(SMALL, seed=3), x)
    assert_close(eval_fn(SMALL)(variables, jnp.asarray(x)), want, RTOL, f"logits at {size}")
    if size == (193, 225):  # bfloat16 compute: float32 logits, close to float32's
        low = eval_fn(SMALL, jnp.bfloat16)(variables, jnp.asarray(x))
        assert low.dtype == jnp.float32
        assert_close(low, want, 0.05, "bfloat16 logits")


def test_train_mode_matches_hugging_face_and_updates_batch_stats():
    x = images(2, (193, 225), seed=2)
    variables = regnet_convert.from_torch(hf_state(SMALL, seed=4))
    model = SMALL.build()
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    torch_model = RegNetForImageClassification(hf_config(SMALL))
    torch_model.load_state_dict(hf_state(SMALL, seed=4))
    torch_model.train()
    with torch.no_grad():
        want = torch_model(ref.nchw(x)).logits.numpy()
    assert_close(logits, want, RTOL, "train-mode logits")
    updated = regnet_convert.from_torch(torch_model.state_dict())["batch_stats"]
    flat, flat_want = traverse_util.flatten_dict(updates["batch_stats"]), traverse_util.flatten_dict(updated)
    old = traverse_util.flatten_dict(variables["batch_stats"])
    assert flat.keys() == flat_want.keys()
    for key in flat:
        assert not np.allclose(flat[key], old[key]), key  # every running statistic moved
        assert_close(flat[key], flat_want[key], RTOL, "/".join(key))


# ------------------------------------------------------------------------------------------------
# Specs and checkpoint JSON
# ------------------------------------------------------------------------------------------------


def test_spec_json_names_the_architecture_and_dispatches():
    for spec in (REGNETY_160, TINY, RegNetSpec.named("RegNetY-160", num_classes=0, image_size=288)):
        data = json.loads(json.dumps(spec.to_json()))
        assert data["architecture"] == "regnety" and specs.spec_from_json(data) == spec
    swift = ModelSpec.named("S")
    assert swift.to_json()["architecture"] == "swiftformer" and specs.spec_from_json(swift.to_json()) == swift
    legacy = {k: v for k, v in swift.to_json().items() if k != "architecture"}  # written before "architecture"
    assert specs.spec_from_json(legacy) == swift and ModelSpec.from_json(legacy) == swift
    with pytest.raises(ValueError, match="not a SwiftFormer's"):
        ModelSpec.from_json(REGNETY_160.to_json())
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        specs.spec_from_json({"architecture": "resnet"})
    assert TINY.variant == "custom" and TINY.has_classifier and not RegNetSpec.named("regnety_160", num_classes=0).has_classifier


@pytest.mark.parametrize("fields, message", [
    (dict(widths=(8, 12, 24, 32)), r"widths \[12\] are not multiples of group_width=8"),
    (dict(depths=(1, 1, 1)), "one entry per stage"),
    (dict(se_ratio=0.0), r"se_ratio must be in \(0, 1\]"),
    (dict(num_classes=-1), "num_classes must be an int >= 0"),
    (dict(stem_width=0), "stem_width must be a positive int"),
])
def test_spec_refuses_bad_sizes(fields, message):
    with pytest.raises(ValueError, match=message):
        RegNetSpec(**{**dataclass_fields(TINY), **fields})


def dataclass_fields(spec):
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


# ------------------------------------------------------------------------------------------------
# Import and export: the command line
# ------------------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files_in(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def release_file(tmp_path_factory) -> Path:
    """A DeiT-style release of the tiny RegNetY: {"model": timm-named state dict}."""
    path = tmp_path_factory.mktemp("release") / "regnety_tiny.pth"
    torch.save({"model": teacher_state("timm")}, path)
    return path


@pytest.fixture(scope="module")
def imported(release_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("imported") / "regnety_tiny"
    assert convert.main(["import", "--checkpoint", str(release_file), "--output", str(output)]) == 0
    return output


def test_import_detects_regnety_and_writes_the_one_layout(imported, capsys):
    step = checkpoint.find_step_dir(imported)
    saved = json.loads(next((step / checkpoint.MODEL_ITEM).iterdir()).read_text())
    assert saved["architecture"] == "regnety" and saved["source"]["naming"] == "timm"
    assert saved["source"]["entry"] == "model"
    assert checkpoint.read_spec(step) == TINY
    model, variables, spec = checkpoint.load_checkpoint(imported)
    assert isinstance(model, RegNetY) and spec == TINY
    assert_same_variables(variables, regnet_convert.from_torch(teacher_state("hf")))
    with pytest.raises(ValueError, match="no attention version"):
        checkpoint.load_checkpoint(imported, attention_version=1)


def test_hugging_face_files_import_too(tmp_path, capsys):
    import safetensors.torch

    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file(hf_state(TINY, seed=6), str(source))
    code, out, err = run_cli(["import", "--checkpoint", source, "--output", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert "RegNetY stem 8" in out and "hf naming" in out
    _, variables = checkpoint.load_variables(tmp_path / "hf")
    assert_same_variables(variables, regnet_convert.from_torch(timm_state(TINY, seed=6)))
    spec, direct = checkpoint.load_variables(source)  # a PyTorch file is a checkpoint as it is
    assert spec == TINY
    assert_same_variables(direct, variables)


@pytest.mark.parametrize("naming, suffix", [("timm", ".pth"), ("official", ".bin"), ("hf", ".safetensors")])
def test_export_round_trip_is_bit_exact(imported, tmp_path, capsys, naming, suffix):
    output = tmp_path / f"out{suffix}"
    code, _, err = run_cli(["export", "--checkpoint", imported, "--naming", naming, "--output", output], capsys)
    assert code == 0, err
    state = convert.read_torch_file(output)
    want = teacher_state("hf" if naming == "hf" else "timm")
    assert set(state) == set(want)
    for key, tensor in want.items():
        assert torch.equal(state[key], tensor), key
    if naming == "hf":
        RegNetForImageClassification(hf_config(TINY)).load_state_dict(state, strict=True)


def _bad_files(directory: Path) -> dict[str, tuple[Path, list[str]]]:
    """Bad RegNetY inputs, each with the fragments its one-line error must contain."""
    directory.mkdir()
    good = teacher_state("timm")
    cases = {
        "foreign": ({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)},
                    ["found no SwiftFormer stage tensors and no RegNetY tensors"]),
        "missing": ({k: v for k, v in good.items() if k != "s2.b1.se.fc2.bias"},
                    ["1 missing: s2.b1.se.fc2.bias"]),
        "extra": ({**good, "s1.b1.extra.weight": torch.zeros(2)}, ["1 unexpected: s1.b1.extra.weight"]),
        "wrong shape": ({**good, "s3.b1.conv2.conv.weight": torch.zeros(24, 4, 3, 3)},
                        ["1 mis-shaped: s3.b1.conv2.conv.weight (24, 4, 3, 3) (expected (24, 8, 3, 3))"]),
    }
    files = {}
    for name, (state, fragments) in cases.items():
        path = directory / f"{name.replace(' ', '_')}.pth"
        torch.save({"model": state}, path)
        files[name] = (path, fragments)
    return files


def test_import_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    files = _bad_files(tmp_path / "inputs")
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    for case, (path, fragments) in files.items():
        before = files_in(tmp_path)
        code, _, err = run_cli(["import", "--checkpoint", path, "--output", out_dir / "ckpt"], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (case, err)
        assert all(f in err for f in fragments), (case, err)
        if case != "foreign":
            assert "RegNet state dict (timm naming) does not match RegNetY stem 8" in err, err
        assert files_in(tmp_path) == before, case


def test_wrong_architecture_and_swiftformer_flags_are_refused(release_file, tmp_path, capsys):
    for flags, message in ((["--architecture", "swiftformer"], "holds a RegNetY state dict (timm naming), not a swiftformer"),
                           (["--variant", "S"], "a variant and an attention version are SwiftFormer settings"),
                           (["--attention-version", "1"], "SwiftFormer settings")):
        code, _, err = run_cli(["import", "--checkpoint", release_file, "--output", tmp_path / "x", *flags], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    swift = tmp_path / "swift.pth"
    model = ModelSpec((1, 1, 1, 1), (8, 16, 16, 24), 10, True).build()
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))
    convert.write_torch_file(convert.to_torch(jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract)), swift)
    code, _, err = run_cli(["import", "--checkpoint", swift, "--architecture", "regnety", "--output", tmp_path / "y"], capsys)
    assert code == 2 and "holds a SwiftFormer state dict (official naming), not a regnety" in err, err
    assert files_in(tmp_path) == {"swift.pth"}


# ------------------------------------------------------------------------------------------------
# The trainer: a RegNetY teacher
# ------------------------------------------------------------------------------------------------


def teacher_config(teacher, **overrides):
    return tiny_config("/unused", **{"distillation__kind": "hard", "distillation__teacher": str(teacher), **overrides})


def test_teacher_loads_from_a_release_file_or_an_import_frozen_in_its_dtype(release_file, imported):
    for path in (release_file, imported):
        teacher, variables = train.load_teacher(teacher_config(path), 10)
        assert isinstance(teacher, RegNetY) and teacher.dtype == jnp.float32
        assert_same_variables(variables, regnet_convert.from_torch(teacher_state("timm")))
    teacher, _ = train.load_teacher(teacher_config(imported, distillation__teacher_dtype="bfloat16"), 10)
    assert teacher.dtype == jnp.bfloat16
    with pytest.raises(train.ConfigError, match="teacher_dtype must be"):
        train.load_teacher(teacher_config(imported, distillation__teacher_dtype="float16"), 10)
    with pytest.raises(train.ConfigError, match="predicts 10 classes but digits has 100"):
        train.load_teacher(teacher_config(imported), 100)


def test_official_teacher_is_the_default_and_its_absence_says_where_to_get_it(tmp_path):
    from configs import default

    config = default.get_config()
    assert config.distillation.teacher == "checkpoints/regnety_160" and config.distillation.teacher_dtype == ""
    config.distillation.teacher = str(tmp_path / "regnety_160")
    with pytest.raises(train.ConfigError) as error:
        train.check_config(config)
    text = str(error.value)
    assert DEIT_TEACHER_URL in text and "--config.distillation.kind=none" in text
    assert (f"`python -m swiftformer_jax.convert import --checkpoint regnety_160-a5fe301d.pth --output "
            f"{tmp_path / 'regnety_160'}`") in text
    config.distillation.teacher = ""
    with pytest.raises(train.ConfigError, match="needs a teacher.*" + re.escape(DEIT_TEACHER_URL) + ".*kind=none"):
        train.check_config(config)


# The distillation tests share one student state and teacher; each compiles its own train step.
STUDENT = dict(clip_mode="none", learning_rate=1e-2, distillation__alpha=1.0)


@pytest.fixture(scope="module")
def student(imported):
    """(model, optimizer, schedule, the initial TrainState on the host, teacher, its variables, a batch)."""
    config = teacher_config(imported, **STUDENT)
    teacher, teacher_variables = train.load_teacher(config, 10)
    model = train.build_model(config, train.model_spec(config, 10))
    tx, schedule = train.build_optimizer(config, train.Durations(93, 100, 0, 100, 100, 1),
                                         train.abstract_params(model, 32))
    # The state from its shapes, filled on the host (compiling the random init costs more than the test).
    abstract = train.abstract_train_state(model, tx, config, sharding.create_mesh(-1, 1), jax.random.key(0))[0]
    rs = np.random.RandomState(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "opt_state" in name or name.endswith("['mean']") or name == ".step":
            return np.zeros(leaf.shape, leaf.dtype)  # AdamW's fresh state is zeros, like tx.init's
        if name.endswith(("['scale']", "['var']")):
            return np.ones(leaf.shape, leaf.dtype)
        return (0.1 * rs.standard_normal(leaf.shape)).astype(leaf.dtype)

    state = jax.tree_util.tree_map_with_path(fill, abstract)
    state = state.replace(ema_params=state.params, ema_batch_stats=state.batch_stats)
    batch = {"image": jnp.asarray(rs.standard_normal((16, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rs.randint(0, 10, 16), jnp.int32)}
    return model, tx, schedule, state, teacher, jax.device_put(teacher_variables), batch


def train_steps(student, steps: int, **overrides) -> list[float]:
    """The trainer's step (`train.make_train_step`) run `steps` times on the fixed batch."""
    model, tx, schedule, state, teacher, teacher_variables, batch = student
    config = teacher_config("/unused", **{**STUDENT, **overrides})
    step = jax.jit(train.make_train_step(config, model, tx, schedule, 10, teacher), donate_argnums=0)
    state, out = jax.device_put(state), []
    for _ in range(steps):
        state, metrics = step(state, batch, RNG, teacher_variables)
        out.append(float(metrics["loss"]))
    return out


RNG = jax.random.key(1)


def first_step_by_hand(student, images, targets, kind, tau=1.0):
    """From the initial state: (class logits, distillation logits, teacher logits) on `images`,
    and DeiT's loss (`losses.distillation_loss`) for `targets`, outside the train step."""
    model, _, _, state, teacher, teacher_variables, _ = student

    alpha = STUDENT["distillation__alpha"] if kind == "hard" else 0.5

    @jax.jit
    def outputs(images, targets):
        (cls, dist), _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
        teacher_logits = teacher.apply(teacher_variables, images, train=False)
        loss = losses.distillation_loss(cls, dist, targets, teacher_logits, kind=kind, alpha=alpha, tau=tau)
        return cls, dist, teacher_logits, loss

    cls, dist, teacher_logits, loss = outputs(images, targets)
    return cls, dist, teacher_logits, float(loss)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_hard_distillation_trains_the_dist_head_toward_the_teachers_argmax_on_the_mixed_images(student):
    overrides = dict(mixup__mixup_alpha=0.8, mixup__cutmix_alpha=1.0, mixup__group_size=8)
    config = teacher_config("/unused", **{**STUDENT, **overrides})
    batch = student[-1]
    # The step's own draw: the step folded into the key, the mixing key split off first.
    mix_rng = jax.random.split(jax.random.fold_in(RNG, 0), 3)[0]
    m = config.mixup
    mix = functools.partial(mixup.mixup_cutmix, num_classes=10, mixup_alpha=m.mixup_alpha,
                            cutmix_alpha=m.cutmix_alpha, switch_prob=m.switch_prob, prob=m.prob, mode=m.mode,
                            label_smoothing=config.label_smoothing, group_size=m.group_size)
    mixed, targets = jax.jit(mix)(mix_rng, batch["image"], batch["label"])
    _, dist, teacher_logits, want = first_step_by_hand(student, mixed, targets, "hard")
    on_mixed = jnp.argmax(teacher_logits, -1)
    # alpha 1: the loss is the distillation term alone, CE(dist head, the teacher's argmax).
    assert want == pytest.approx(float(losses.cross_entropy(dist, jax.nn.one_hot(on_mixed, 10))), rel=1e-6)
    on_clean = jnp.argmax(student[4].apply(student[5], batch["image"]), -1)
    assert np.any(np.asarray(on_clean) != np.asarray(on_mixed))  # so the targets tell the two apart
    curve = train_steps(student, 12, **overrides)
    assert curve[0] == pytest.approx(want, rel=1e-5)
    assert curve[0] != pytest.approx(float(losses.cross_entropy(dist, jax.nn.one_hot(on_clean, 10))), rel=1e-3)
    # The dist head learns the teacher (each step mixes the batch anew, so the curve is noisy).
    assert np.mean(curve[-4:]) < 0.6 * curve[0], curve


def test_soft_distillation_uses_the_temperature(student):
    tau = 3.0
    batch = student[-1]
    smoothed = losses.one_hot_smoothed(batch["label"], 10, 0.1)
    cls, dist, teacher_logits, want = first_step_by_hand(student, batch["image"], smoothed, "soft", tau)
    # DeiT's soft term by hand: KL(teacher / tau || dist / tau) summed, / (batch x classes), x tau^2.
    log_p, log_q = log_softmax(np.asarray(teacher_logits) / tau), log_softmax(np.asarray(dist) / tau)
    kl = np.sum(np.exp(log_p) * (log_p - log_q)) * tau * tau / dist.size
    ce = -np.mean(np.sum(np.asarray(smoothed) * log_softmax(cls), axis=-1))
    assert want == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-5)
    at_tau_1 = losses.distillation_loss(cls, dist, smoothed, teacher_logits, kind="soft", alpha=0.5, tau=1.0)
    assert abs(float(at_tau_1) - want) > 0.05 * want  # the temperature matters
    (loss,) = train_steps(student, 1, distillation__kind="soft", distillation__tau=tau, distillation__alpha=0.5)
    assert loss == pytest.approx(want, rel=1e-5)
