"""PyTorch <-> Flax weights for RegNetY: the names and layouts of timm's and Hugging Face's models.

Two PyTorch namings of the same tensors are understood:
  timm  timm's `RegNet` (DeiT's `regnety_160-a5fe301d.pth`, as `{"model": state_dict}`):
        `stem.{conv,bn}`, `s{i}.b{j}.{conv1,conv2,conv3,downsample}.{conv,bn}`,
        `s{i}.b{j}.se.{fc1,fc2}`, `head.fc`; stages and blocks count from 1
  hf    Hugging Face `RegNetForImageClassification`: `regnet.embedder.embedder.{convolution,
        normalization}`, `regnet.encoder.stages.{i-1}.layers.{j-1}.` + `layer.0` (conv1),
        `layer.1` (conv2), `layer.2.attention.0` / `.2` (se fc1 / fc2), `layer.3` (conv3),
        `shortcut` (downsample), each conv unit as `convolution` / `normalization`; `classifier.1`
        (`RegNetModel`'s keys, without `regnet.` and the classifier, are read too)
Every name is brought to the timm name, which pairs one-to-one with a Flax leaf (`timm_key`); a
key is accepted only if renaming it back gives the same key, so mixed namings are reported.

Layouts: 3x3 conv weights OIHW (out, in / groups, 3, 3) <-> HWIO (3, 3, in / groups, out); 1x1
conv weights (out, in, 1, 1) and the Linear head (out, in) <-> [in, out]; batch norm `weight`,
`bias`, `running_mean`, `running_var` <-> `scale`, `bias`, `mean`, `var`; `num_batches_tracked`
is ignored on the way in and written as 0 on the way out.

Strict like `convert.py`: every tensor used, every leaf filled, every shape checked, and any
mismatch is one ValueError on one line listing the missing, unexpected and mis-shaped keys. The
network (`RegNetSpec`) is read from the shapes: stem width, blocks per stage, stage widths, group
width, squeeze-excitation ratio, class count.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from swiftformer_jax import convert as convert_lib
from swiftformer_jax.regnet import RegNetSpec

NAMINGS = ("timm", "hf")
# convert's namings mean, for RegNetY: "official" is DeiT's release, i.e. timm's.
NAMING_ALIASES = {"official": "timm", "timm": "timm", "hf": "hf"}
_HF_PREFIX = "regnet."
_NUM_BATCHES_TRACKED = "num_batches_tracked"
_MAX_LISTED = 8

# Keys that only a RegNet has, in either naming: what `looks_like_regnet` counts.
_REGNET_KEY = re.compile(
    r"(module\.)?(s\d+\.b\d+\.|stem\.(conv|bn)\.|head\.fc\.|(regnet\.)?(embedder\.embedder|encoder\.stages)\.|classifier\.1\.)"
)


def looks_like_regnet(keys) -> int:
    """How many of `keys` only a RegNet state dict (timm or Hugging Face naming) has."""
    return sum(1 for k in keys if isinstance(k, str) and _REGNET_KEY.match(k))


# ----------------------------------------------------------------------------------------------
# Names: Flax leaf <-> timm <-> Hugging Face
# ----------------------------------------------------------------------------------------------


def timm_key(flax_key: tuple[str, ...]) -> str:
    """The timm name of a Flax leaf (collection, *path), e.g. ("params", "stage1", "block1", "se",
    "fc1", "kernel") -> "s1.b1.se.fc1.weight". KeyError for a path that is not a RegNetY leaf."""
    collection, *path = flax_key
    leaf = path[-1]
    if collection == "batch_stats":
        suffix = {"mean": "running_mean", "var": "running_var"}.get(leaf)
    else:
        suffix = {"kernel": "weight", "bias": "bias", "scale": "weight"}.get(leaf)
    if suffix is None or collection not in ("params", "batch_stats"):
        raise KeyError("/".join(flax_key))
    if path == ["head", leaf] and collection == "params":
        return f"head.fc.{suffix}"
    parts = []
    for part in path[:-1]:
        if match := re.fullmatch(r"stage(\d+)", part):
            parts.append(f"s{match[1]}")
        elif match := re.fullmatch(r"block(\d+)", part):
            parts.append(f"b{match[1]}")
        elif part == "shortcut":
            parts.append("downsample")
        elif part in ("stem", "conv", "bn", "se", "fc1", "fc2", "conv1", "conv2", "conv3"):
            parts.append(part)
        else:
            raise KeyError("/".join(flax_key))
    return ".".join(parts + [suffix])


def timm_to_hf(key: str) -> str:
    """timm name -> Hugging Face `RegNetForImageClassification` name."""
    if match := re.fullmatch(r"stem\.(conv|bn)\.(\w+)", key):
        unit = "convolution" if match[1] == "conv" else "normalization"
        return f"regnet.embedder.embedder.{unit}.{match[2]}"
    if match := re.fullmatch(r"s(\d+)\.b(\d+)\.(conv1|conv2|conv3|downsample)\.(conv|bn)\.(\w+)", key):
        part = {"conv1": "layer.0", "conv2": "layer.1", "conv3": "layer.3", "downsample": "shortcut"}[match[3]]
        unit = "convolution" if match[4] == "conv" else "normalization"
        return f"{_hf_block(match)}.{part}.{unit}.{match[5]}"
    if match := re.fullmatch(r"s(\d+)\.b(\d+)\.se\.fc([12])\.(\w+)", key):
        return f"{_hf_block(match)}.layer.2.attention.{0 if match[3] == '1' else 2}.{match[4]}"
    if match := re.fullmatch(r"head\.fc\.(\w+)", key):
        return f"classifier.1.{match[1]}"
    raise ValueError(f"{key!r} is not a timm RegNet name")


def _hf_block(match: re.Match) -> str:
    return f"regnet.encoder.stages.{int(match[1]) - 1}.layers.{int(match[2]) - 1}"


def hf_to_timm(key: str) -> str | None:
    """Hugging Face name (with or without `regnet.`) -> timm name; None if it is not one."""
    if key.startswith(_HF_PREFIX):
        key = key[len(_HF_PREFIX):]
    if match := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", key):
        return f"stem.{'conv' if match[1] == 'convolution' else 'bn'}.{match[2]}"
    if match := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key):
        block = f"s{int(match[1]) + 1}.b{int(match[2]) + 1}"
        rest = match[3]
        if unit := re.fullmatch(r"(layer\.[013]|shortcut)\.(convolution|normalization)\.(\w+)", rest):
            part = {"layer.0": "conv1", "layer.1": "conv2", "layer.3": "conv3", "shortcut": "downsample"}[unit[1]]
            return f"{block}.{part}.{'conv' if unit[2] == 'convolution' else 'bn'}.{unit[3]}"
        if se := re.fullmatch(r"layer\.2\.attention\.([02])\.(\w+)", rest):
            return f"{block}.se.fc{1 if se[1] == '0' else 2}.{se[2]}"
        return None
    if match := re.fullmatch(r"classifier\.1\.(\w+)", key):
        return f"head.fc.{match[1]}"
    return None


def _from_timm(key: str, naming: str) -> str:
    return key if naming == "timm" else timm_to_hf(key)


def _naming_of(keys) -> str:
    keys = [k for k in keys if isinstance(k, str)]
    hf = any(k.startswith(("regnet.", "embedder.embedder.", "encoder.stages.", "classifier.1.")) for k in keys)
    timm = any(re.match(r"(s\d+\.b\d+|stem\.(conv|bn)|head\.fc)\.", k) for k in keys)
    if hf and timm:
        raise ValueError("the state dict mixes Hugging Face RegNet names (regnet.*) and timm names (stem.*, s1.b1.*)")
    return "hf" if hf else "timm"


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def torch_shape(flax_key: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf: 3x3 conv OIHW, 1x1 conv (out, in, 1, 1), head (out, in)."""
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0]) if flax_key[1] == "head" else (shape[1], shape[0], 1, 1)
    return shape


def from_torch_layout(flax_key: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if array.ndim == 4 and array.shape[2:] == (1, 1) and flax_key[1] != "head":
        return array[:, :, 0, 0].T
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def to_torch_layout(flax_key: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if array.ndim == 2:
        out = np.ascontiguousarray(array.T)
        return out if flax_key[1] == "head" else out[:, :, None, None]
    return np.array(array)


# ----------------------------------------------------------------------------------------------
# PyTorch -> Flax
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Canonical:
    """A RegNet state dict brought to timm names."""

    tensors: dict[str, np.ndarray]  # timm key -> array (num_batches_tracked dropped)
    naming: str
    source_names: dict[str, str]  # timm key -> the key as the checkpoint spells it
    rejected: tuple[str, ...]
    entry: str | None

    def display(self, key: str) -> str:
        return self.source_names.get(key) or _from_timm(key, self.naming)


def canonical(checkpoint: Mapping, which: str = "model") -> Canonical:
    """Unwrap ({'model': ...}, `module.`) and bring every key to its timm name."""
    def rename(name: str, naming: str) -> str | None:
        return name if naming == "timm" else _hf_name_to_timm(name)

    return Canonical(*convert_lib.unwrap_state(checkpoint, which, _naming_of, rename))


def _hf_name_to_timm(name: str) -> str | None:
    """The timm name of a Hugging Face key, if renaming it back gives the same key."""
    key = hf_to_timm(name)
    if key is None:
        return None
    try:
        back = timm_to_hf(key)
    except ValueError:
        return None
    return key if back.removeprefix(_HF_PREFIX) == name.removeprefix(_HF_PREFIX) else None


def spec_from_tensors(weights: Canonical, image_size: int = 224) -> RegNetSpec:
    """The RegNetSpec the shapes of a (timm-named) state dict describe: the stem conv's width, the
    blocks per stage, each stage's width (its first grouped conv's output), the group width most
    grouped convs have, the SE ratio of the last stage's first block, the head's classes.
    ValueError when they describe no RegNetY (no stem, stages out of order, no grouped conv or SE)."""
    t = weights.tensors
    stem = t.get("stem.conv.weight")
    if stem is None or stem.ndim != 4:
        raise ValueError(
            f"found no RegNet stem ({weights.display('stem.conv.weight')}) in this {weights.naming}-named "
            f"state dict of {len(t) + len(weights.rejected)} entries (first keys: {list(weights.source_names.values())[:5]})"
        )
    blocks: dict[int, set[int]] = {}
    for key in t:
        if match := re.match(r"s(\d+)\.b(\d+)\.", key):
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    stages = sorted(blocks)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise ValueError(f"RegNet stages found: {stages}; expected s1, s2, ... in order")
    depths = tuple(max(blocks[s]) for s in stages)
    widths = []
    for s in stages:
        conv2 = t.get(f"s{s}.b1.conv2.conv.weight")
        if conv2 is None or conv2.ndim != 4:
            raise ValueError(f"RegNet stage {s} has no grouped conv {weights.display(f's{s}.b1.conv2.conv.weight')}")
        widths.append(int(conv2.shape[0]))
    # The group width most grouped convs have: a wrongly shaped one is then reported, not believed.
    group_widths = collections.Counter(int(v.shape[1]) for k, v in t.items()
                                       if re.fullmatch(r"s\d+\.b\d+\.conv2\.conv\.weight", k) and v.ndim == 4)
    last = stages[-1]
    fc1 = t.get(f"s{last}.b1.se.fc1.weight")
    in_width = widths[-2] if len(widths) > 1 else int(stem.shape[0])
    if fc1 is None or fc1.ndim < 1:
        raise ValueError(f"RegNet block s{last}.b1 has no squeeze-excitation ({weights.display(f's{last}.b1.se.fc1.weight')}): not a RegNetY")
    se_ratio = round(int(fc1.shape[0]) / in_width, 4)
    head = t.get("head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    return RegNetSpec(stem_width=int(stem.shape[0]), depths=depths, widths=tuple(widths),
                      group_width=group_widths.most_common(1)[0][0], se_ratio=se_ratio, num_classes=num_classes,
                      image_size=image_size)


def expected_leaves(spec: RegNetSpec) -> dict[str, tuple[tuple[str, ...], object]]:
    """timm key -> (Flax key (collection, *path), ShapeDtypeStruct) for every leaf of `spec`'s model."""
    flat = traverse_util.flatten_dict(spec.abstract_variables())
    return {timm_key(k): (k, flat[k]) for k in flat}


def convert(weights: Canonical) -> tuple[RegNetSpec, dict]:
    """(spec, Flax variables {"params", "batch_stats"} in float32) from canonical weights; one
    one-line ValueError listing every missing, unexpected and mis-shaped key."""
    spec = spec_from_tensors(weights)
    expected = expected_leaves(spec)
    missing = [weights.display(k) for k in expected if k not in weights.tensors]
    unexpected = list(weights.rejected) + [weights.display(k) for k in weights.tensors if k not in expected]
    misshaped = []
    for key, (flax_key, struct) in expected.items():
        if key not in weights.tensors:
            continue
        array, want = weights.tensors[key], torch_shape(flax_key, struct.shape)
        if array.shape != want:
            misshaped.append(f"{weights.display(key)} {tuple(array.shape)} (expected {want})")
        elif not np.issubdtype(array.dtype, np.floating):
            misshaped.append(f"{weights.display(key)} dtype {array.dtype} (expected floating point)")
        elif not np.all(np.isfinite(array)):
            misshaped.append(f"{weights.display(key)} holds {np.sum(~np.isfinite(array))} NaN or infinite values")
    if missing or unexpected or misshaped:
        raise ValueError(_mismatch_message(spec, weights, missing, unexpected, misshaped))
    flat = {flax_key: jnp.asarray(from_torch_layout(flax_key, weights.tensors[key]), dtype=struct.dtype)
            for key, (flax_key, struct) in expected.items()}
    return spec, traverse_util.unflatten_dict(flat)


def _mismatch_message(spec, weights, missing, unexpected, misshaped) -> str:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:_MAX_LISTED])}{more}")
    return f"RegNet state dict ({weights.naming} naming) does not match {spec.describe()}: " + "; ".join(parts)


def from_torch(state_dict: Mapping, *, which: str = "model") -> dict:
    """Flax variables from a PyTorch RegNetY state dict (timm or Hugging Face naming, optionally
    wrapped in {'model': ...} and/or `module.`): exactly the tree `model_spec(...).build().init`
    produces, in float32."""
    return convert(canonical(state_dict, which))[1]


def model_spec(state_dict: Mapping, *, which: str = "model") -> RegNetSpec:
    """The RegNetSpec a PyTorch RegNetY state dict needs (shapes are checked by `from_torch`)."""
    return spec_from_tensors(canonical(state_dict, which))


# ----------------------------------------------------------------------------------------------
# Flax -> PyTorch
# ----------------------------------------------------------------------------------------------


def to_torch(variables: Mapping, naming: str = "timm", *, num_batches_tracked: bool = True) -> dict[str, np.ndarray]:
    """{name: NumPy array} in timm's (also "official": DeiT's release) or Hugging Face's naming and
    layout, for `load_state_dict(strict=True)`; with `num_batches_tracked` every BatchNorm gets
    that buffer (0), so the key set is exactly `model.state_dict()`'s."""
    if naming not in NAMING_ALIASES:
        raise ValueError(f"unknown RegNet naming {naming!r}; valid: {', '.join(NAMING_ALIASES)}")
    naming = NAMING_ALIASES[naming]
    collections = set(variables)
    if "params" not in collections or collections - {"params", "batch_stats"}:
        raise ValueError(f"variables must hold 'params' and optionally 'batch_stats'; got {sorted(collections)}")
    flat = traverse_util.flatten_dict(convert_lib._plain(variables))
    out: dict[str, np.ndarray] = {}
    for flax_key in sorted(flat, key=_network_order):
        try:
            key = timm_key(flax_key)
        except KeyError as error:
            raise ValueError(f"not a RegNetY variable: {'/'.join(flax_key)} ({error})") from None
        name = _from_timm(key, naming)
        out[name] = to_torch_layout(flax_key, flat[flax_key])
        if num_batches_tracked and flax_key[0] == "batch_stats" and flax_key[-1] == "var":
            out[name[: -len("running_var")] + _NUM_BATCHES_TRACKED] = np.zeros((), np.int64)
    return out


_PART_ORDER = {"stem": 0, "conv1": 0, "conv2": 1, "se": 2, "conv3": 3, "shortcut": 4, "conv": 0, "bn": 1,
               "fc1": 0, "fc2": 1, "head": 1000, "kernel": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3}


def _network_order(flax_key: tuple[str, ...]) -> tuple:
    """timm's state_dict order: stem, stages and blocks in order (conv1, conv2, se, conv3,
    shortcut; conv before bn; weight, bias, running_mean, running_var), head last."""
    order = []
    for part in flax_key[1:]:
        if match := re.fullmatch(r"(stage|block)(\d+)", part):
            order.append(int(match[2]) + (0 if match[1] == "block" else 1))
        else:
            order.append(_PART_ORDER[part])
    return tuple(order)
