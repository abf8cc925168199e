"""PyTorch <-> Flax weights for SwiftFormer, and the `python -m swiftformer_jax.convert` command line.

Three PyTorch namings of the same tensors are understood:
  official  the authors' code: `patch_embed.{0,1,3,4}`, `network.{i}.{j}.*`, `norm`, `head`, `dist_head`
  hf        Hugging Face `SwiftFormerForImageClassification`: `swiftformer.patch_embed.patch_embedding.*`,
            `swiftformer.encoder.network.{i}.blocks.{j}.*` (`depth_wise_conv`, `point_wise_conv1/2`,
            `attn.proj`), `norm`, `head`, `dist_head`
  timm      `stem.*`, `stages.{k}.blocks.{j}.*`, `stages.{k}.downsample.*`, layer scales `*.gamma`,
            `attn.proj`, `head_dist`
Every name is first brought to the official name, which `layout.official_key` pairs with a Flax leaf;
`layout` also does every transpose. A key is accepted only if renaming it back gives the same key,
so a checkpoint that mixes namings is reported, not half-read.

Conversion is strict: every tensor is used, every Flax leaf is filled, every shape is checked, and
any mismatch raises one ValueError that lists the missing, unexpected and mis-shaped keys
(`num_batches_tracked` buffers are ignored on the way in). The model a state dict needs (variant,
class count, distillation head, feature-pyramid norms) is read from its shapes: `model_spec`.

The attention version (version 1 for Hugging Face and the first official release, March 2023;
version 2 for official weights since July 2023 and timm) is stored in no PyTorch checkpoint: the
same tensors compute different functions. The caller states it; by default 1 for Hugging Face
naming and 2 otherwise. `import` records it in the spec of the checkpoint it writes.

`import` writes the package's one checkpoint layout (see `checkpoint.py`): a checkpoint directory
whose step 0 holds {"params", "batch_stats"} and the `ModelSpec`, with the source file, its
sha256, naming and entry. `export` reads any checkpoint `checkpoint.load_variables` reads.

RegNetY (the paper's teacher, DeiT's `regnety_160-a5fe301d.pth`) goes through the same files and
command line: `read_torch_checkpoint`, `import_checkpoint` and `export_checkpoint` tell the
architecture from the keys (`detect_architecture`) and hand a RegNetY to `regnet_convert.py`
(timm and Hugging Face naming; "official" means timm's there, DeiT's release), whose `RegNetSpec`
is stored like a `ModelSpec`. `from_torch`, `to_torch` and `model_spec` here are SwiftFormer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from swiftformer_jax import layout, ops, paths
from swiftformer_jax import checkpoint as checkpoint_lib
from swiftformer_jax.checkpoint import load_checkpoint  # noqa: F401 - convert.load_checkpoint, as documented
from swiftformer_jax.model import VARIANT_SIZES, ModelSpec, variant_name

NAMINGS = ("official", "hf", "timm")
ARCHITECTURES = ("swiftformer", "regnety")
# Entries of the official training checkpoints ({'model', 'model_ema', 'optimizer', 'args', ...}).
CHECKPOINT_ENTRIES = ("model", "model_ema")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")
SAFETENSORS_SUFFIX = ".safetensors"

_DDP_PREFIX = "module."
_HF_PREFIX = "swiftformer."
_NUM_BATCHES_TRACKED = "num_batches_tracked"
_MAX_LISTED = 12  # keys listed per category in a mismatch error

# The default attention version of each naming (see the module docstring).
DEFAULT_ATTENTION_VERSION = {"official": 2, "hf": 1, "timm": 2}


# ----------------------------------------------------------------------------------------------
# The model a state dict needs
# ----------------------------------------------------------------------------------------------


def model_spec(state_dict: Mapping, variant: str | None = None, *, which: str = "model",
               attention_version: int | None = None) -> ModelSpec:
    """The `ModelSpec` a PyTorch state dict (any naming, any wrapping) needs.

    The variant comes from the stage depths and widths unless given; the class count from the
    head's shape; distillation from the presence of a second head; `features_only` from the
    official `norm0`..`norm6` feature norms; the attention version, which no tensor fixes, is
    `attention_version` or the naming's default. Shapes are not checked here: `from_torch` does.
    """
    return _spec_from_tensors(_canonical(state_dict, which), variant, attention_version)


def infer_variant(state_dict: Mapping, *, which: str = "model") -> str:
    """"XS", "S", "L1" or "L3" from the stage depths and widths of a state dict (any naming).

    Raises ValueError saying which depths and widths it found when they match no variant.
    """
    return _infer_variant(_canonical(state_dict, which))


def detect_naming(state_dict: Mapping, *, which: str = "model") -> str:
    """"official", "hf" or "timm": the naming of a state dict, after unwrapping."""
    return _canonical(state_dict, which).naming


# ----------------------------------------------------------------------------------------------
# PyTorch -> Flax
# ----------------------------------------------------------------------------------------------


def from_torch(state_dict: Mapping, variant: str | None = None, *, which: str = "model") -> dict:
    """Flax variables {"params", "batch_stats"} from a PyTorch SwiftFormer state dict.

    Accepts official, Hugging Face and timm naming; torch tensors or NumPy arrays; the release
    format {'model': ..., 'model_ema': ...} (`which` picks the entry), DDP's `module.` prefix and
    Hugging Face's `swiftformer.` prefix. The variant is inferred when None. The result has exactly
    the tree `model_spec(state_dict).build().init(...)` produces, in float32.
    Raises one ValueError listing every missing, unexpected and mis-shaped key.
    """
    return _convert(_canonical(state_dict, which), variant)[1]


def _convert(weights: "_Canonical", variant: str | None,
             attention_version: int | None = None) -> tuple[ModelSpec, dict]:
    spec = _spec_from_tensors(weights, variant, attention_version)
    expected = _expected_leaves(spec)  # official key -> (flax key tuple, ShapeDtypeStruct)
    missing = [key for key in expected if key not in weights.tensors]
    unexpected = list(weights.rejected) + [key for key in weights.tensors if key not in expected]
    misshaped = []
    for key, (flax_key, struct) in expected.items():
        if key not in weights.tensors:
            continue
        array = weights.tensors[key]
        want = layout.torch_shape(flax_key[1:], struct.shape)
        if array.shape != want:
            misshaped.append(f"{weights.display(key)}: got {array.shape}, expected {want}")
        elif not np.issubdtype(array.dtype, np.floating):
            misshaped.append(f"{weights.display(key)}: got dtype {array.dtype}, expected floating point")
        elif not np.all(np.isfinite(array)):
            misshaped.append(f"{weights.display(key)}: holds {np.sum(~np.isfinite(array))} NaN or infinite values")
    if missing or unexpected or misshaped:
        raise ValueError(_mismatch_message(
            spec, weights, [weights.display(k) for k in missing],
            [weights.display(k) if k in weights.tensors else k for k in unexpected], misshaped,
        ))
    flat = {}
    for key, (flax_key, struct) in expected.items():
        array = layout.from_torch_layout(flax_key[1:], weights.tensors[key], struct.shape)
        flat[flax_key] = jnp.asarray(array, dtype=struct.dtype)
    return spec, traverse_util.unflatten_dict(flat)


def _mismatch_message(spec, weights, missing, unexpected, misshaped) -> str:
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped"
    lines = [
        f"state dict ({weights.naming} naming) does not match {spec.describe()}: {counts}"
    ]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:_MAX_LISTED])
            more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            lines.append(f"  {title}: {shown}{more}")
    return "\n".join(lines)


def _expected_leaves(spec: ModelSpec) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """Official key -> (Flax key (collection, *path), shape and dtype) for every leaf of the model.

    Read from `jax.eval_shape` of the model's own `init`, so the tree is by construction the one
    `spec.build().init` produces.
    """
    flat = traverse_util.flatten_dict(spec.abstract_variables())
    return {
        layout.official_key(flax_key[0], flax_key[1:]): (flax_key, flat[flax_key])
        for flax_key in sorted(flat, key=_module_order)
    }


# ----------------------------------------------------------------------------------------------
# Flax -> PyTorch
# ----------------------------------------------------------------------------------------------


def to_torch(
    variables: Mapping, naming: str = "official", *, num_batches_tracked: bool = True
) -> dict[str, np.ndarray]:
    """{name: NumPy array} in the PyTorch layout and naming, for `load_state_dict(strict=True)`.

    `naming` "official" (the authors' model), "hf" (`SwiftFormerForImageClassification`) or "timm".
    `variables` holds "params" and optionally "batch_stats" (so gradients map too: pass
    {"params": grads}). With `num_batches_tracked`, every BatchNorm also gets its
    `num_batches_tracked` buffer (0): the key set is then exactly `model.state_dict()`'s. Strict
    loading of a plain dict accepts it either way (PyTorch fills the buffer in), but
    `from_pretrained` and other loaders compare key sets. Hugging Face and timm always build a
    distillation head and have no feature-pyramid norms: weights without the one or with the
    other only export with official naming.
    """
    _check_naming(naming)
    collections = set(variables)
    if "params" not in collections or collections - {"params", "batch_stats"}:
        raise ValueError(
            f"variables must hold 'params' and optionally 'batch_stats'; got {sorted(collections)}"
        )
    flat = traverse_util.flatten_dict(_plain(variables))
    top_level = {flax_key[1] for flax_key in flat}
    if naming != "official" and "head" in top_level and "dist_head" not in top_level:
        raise ValueError(
            f"{naming} models always have a distillation head (dist_head) and these variables have "
            "none; export with naming='official'"
        )
    out: dict[str, np.ndarray] = {}
    for flax_key in sorted(flat, key=_module_order):
        collection, path = flax_key[0], flax_key[1:]
        try:
            key = layout.official_key(collection, path)
        except KeyError as error:
            raise ValueError(f"not a SwiftFormer variable: {'/'.join(flax_key)} ({error})") from None
        name = _from_official(key, naming)
        array = layout.to_torch_layout(path, flat[flax_key])
        out[name] = array if array.flags.writeable else array.copy()  # torch.from_numpy wants writable
        if num_batches_tracked and collection == "batch_stats" and path[-1] == "var":
            out[name[: -len("running_var")] + _NUM_BATCHES_TRACKED] = np.zeros((), np.int64)
    return out


def _module_order(flax_key: tuple[str, ...]) -> tuple:
    """Sort key that lists tensors in network order (stem, stages in order, head), like PyTorch."""
    parts = []
    for part in flax_key[1:]:
        match = re.fullmatch(r"(\D*?)_?(\d+)", part)
        parts.append((match.group(1), int(match.group(2))) if match else (part, -1))
    top = flax_key[1]
    rank = 0 if top == "patch_embed" else 1 if top.startswith("network_") else 2
    return (rank, parts, flax_key[0])


def _plain(tree: Mapping) -> dict:
    """Nested plain dicts (FrozenDicts and other mappings unwrapped) for `flatten_dict`."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# ----------------------------------------------------------------------------------------------
# Names: every naming to and from the official one
# ----------------------------------------------------------------------------------------------

# Part names inside blocks: official -> Hugging Face, official -> timm.
_HF_PARTS = {
    "dwconv": "depth_wise_conv", "pwconv1": "point_wise_conv1", "pwconv2": "point_wise_conv2", "Proj": "proj",
}
_TIMM_PARTS = {"Proj": "proj"}
_HF_PARTS_INVERSE = {v: k for k, v in _HF_PARTS.items()}
_TIMM_PARTS_INVERSE = {v: k for k, v in _TIMM_PARTS.items()}
_HEAD_KEY = re.compile(r"(norm|head|dist_head)\.(weight|bias|running_mean|running_var)")


def _rename_parts(rest: str, table: Mapping[str, str]) -> str:
    return ".".join(table.get(part, part) for part in rest.split("."))


def _official_to_hf(key: str) -> str:
    """Official name -> Hugging Face name (without the `swiftformer.` prefix)."""
    if match := re.fullmatch(r"patch_embed\.(\d+)\.(.+)", key):
        return f"patch_embed.patch_embedding.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"network\.(\d*[02468])\.(\d+)\.(.+)", key):
        return f"encoder.network.{match[1]}.blocks.{match[2]}.{_rename_parts(match[3], _HF_PARTS)}"
    if match := re.fullmatch(r"network\.(\d*[13579])\.(.+)", key):
        return f"encoder.network.{match[1]}.{match[2]}"
    if _HEAD_KEY.fullmatch(key):
        return key
    raise ValueError(f"{key!r} has no Hugging Face name (HF SwiftFormer has no feature-pyramid norms)")


def _hf_to_official(key: str) -> str | None:
    if match := re.fullmatch(r"patch_embed\.patch_embedding\.(\d+)\.(.+)", key):
        return f"patch_embed.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"encoder\.network\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        return f"network.{match[1]}.{match[2]}.{_rename_parts(match[3], _HF_PARTS_INVERSE)}"
    if match := re.fullmatch(r"encoder\.network\.(\d+)\.(.+)", key):
        return f"network.{match[1]}.{match[2]}"
    return key if _HEAD_KEY.fullmatch(key) else None


def _official_to_timm(key: str) -> str:
    if match := re.fullmatch(r"patch_embed\.(\d+)\.(.+)", key):
        return f"stem.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"network\.(\d+)\.(.+)", key):
        index, rest = int(match[1]), match[2]
        if index % 2:
            return f"stages.{(index + 1) // 2}.downsample.{rest}"
        rest = _rename_parts(rest, _TIMM_PARTS)
        if rest.split(".")[-1] in layout.LAYER_SCALES:
            rest += ".gamma"
        return f"stages.{index // 2}.blocks.{rest}"
    if match := re.fullmatch(r"dist_head\.(.+)", key):
        return f"head_dist.{match[1]}"
    if _HEAD_KEY.fullmatch(key):
        return key
    raise ValueError(f"{key!r} has no timm name (timm SwiftFormer has no feature-pyramid norms)")


def _timm_to_official(key: str) -> str | None:
    if match := re.fullmatch(r"stem\.(\d+)\.(.+)", key):
        return f"patch_embed.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"stages\.(\d+)\.downsample\.(.+)", key):
        return f"network.{2 * int(match[1]) - 1}.{match[2]}" if int(match[1]) > 0 else None
    if match := re.fullmatch(r"stages\.(\d+)\.blocks\.(.+)", key):
        rest = _rename_parts(match[2], _TIMM_PARTS_INVERSE)
        parts = rest.split(".")
        if len(parts) >= 2 and parts[-1] == "gamma" and parts[-2] in layout.LAYER_SCALES:
            rest = ".".join(parts[:-1])
        return f"network.{2 * int(match[1])}.{rest}"
    if match := re.fullmatch(r"head_dist\.(.+)", key):
        return f"dist_head.{match[1]}"
    return key if _HEAD_KEY.fullmatch(key) else None


_TO_OFFICIAL: dict[str, Callable[[str], str | None]] = {
    "official": lambda key: key,
    "hf": _hf_to_official,
    "timm": _timm_to_official,
}
_FROM_OFFICIAL: dict[str, Callable[[str], str]] = {
    "official": lambda key: key,
    "hf": _official_to_hf,
    "timm": _official_to_timm,
}


def _from_official(key: str, naming: str) -> str:
    """Official name -> the full name in `naming` (Hugging Face names get `swiftformer.`)."""
    name = _FROM_OFFICIAL[naming](key)
    if naming == "hf" and not _HEAD_KEY.fullmatch(name):
        name = _HF_PREFIX + name
    return name


def _check_naming(naming: str) -> None:
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; valid: {', '.join(NAMINGS)}")


# ----------------------------------------------------------------------------------------------
# Unwrapping a checkpoint into official names and NumPy arrays
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Canonical:
    """A state dict brought to official names: what every public function works on."""

    tensors: dict[str, np.ndarray]  # official key -> array (num_batches_tracked dropped)
    naming: str
    source_names: dict[str, str]  # official key -> the key as the checkpoint spells it
    rejected: tuple[str, ...]  # checkpoint keys with no official name, or not tensors
    entry: str | None  # "model" / "model_ema" when unwrapped from a training checkpoint

    def display(self, official: str) -> str:
        """A key as the checkpoint spells it (or would, for a missing one)."""
        if official in self.source_names:
            return self.source_names[official]
        try:
            return _from_official(official, self.naming)
        except ValueError:
            return official


def _canonical(checkpoint: Mapping, which: str) -> _Canonical:
    def rename(name: str, naming: str) -> str | None:
        local = name[len(_HF_PREFIX):] if naming == "hf" and name.startswith(_HF_PREFIX) else name
        official = _TO_OFFICIAL[naming](local)
        return official if official is not None and _round_trip(official, naming) == local else None

    return _Canonical(*unwrap_state(checkpoint, which, _naming_of, rename))


def unwrap_state(checkpoint: Mapping, which: str, naming_of: Callable[[Mapping], str],
                 rename: Callable[[str, str], str | None]):
    """(tensors, naming, source_names, rejected, entry) of a PyTorch checkpoint, for any architecture.

    Takes the `which` entry of a training checkpoint, drops DDP's `module.` prefix and the
    `num_batches_tracked` buffers, and brings every key to the architecture's canonical name with
    `rename(key, naming)` (None: the key has none). Keys without a canonical name, a name taken
    twice, and values that are not tensors are collected in `rejected`, so one error lists them all.
    """
    state, entry = _select_entry(checkpoint, which)
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith(_DDP_PREFIX) for k in keys):
        state = {k[len(_DDP_PREFIX):]: v for k, v in state.items()}
    naming = naming_of(state)
    tensors, source_names, rejected = {}, {}, []
    for name, value in state.items():
        if not isinstance(name, str):
            rejected.append(repr(name))
            continue
        if name.rsplit(".", 1)[-1] == _NUM_BATCHES_TRACKED:
            continue
        key = rename(name, naming)
        if key is None or key in tensors:
            rejected.append(name)
            continue
        array = _as_numpy(value)
        if array is None:
            rejected.append(f"{name} (a {type(value).__name__}, not a tensor)")
            continue
        tensors[key] = array
        source_names[key] = name
    return tensors, naming, source_names, tuple(rejected), entry


def _round_trip(official: str, naming: str) -> str | None:
    try:
        return _FROM_OFFICIAL[naming](official)
    except ValueError:
        return None


def _select_entry(checkpoint: Mapping, which: str) -> tuple[Mapping, str | None]:
    """The state dict inside a training checkpoint ({'model': ..., 'model_ema': ...}), or itself."""
    if which not in CHECKPOINT_ENTRIES:
        raise ValueError(f"which must be one of {CHECKPOINT_ENTRIES}, got {which!r}")
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"expected a state dict (a mapping of names to tensors), got a {type(checkpoint).__name__}"
        )
    wrapped = [k for k in CHECKPOINT_ENTRIES if isinstance(checkpoint.get(k), Mapping)]
    if wrapped:
        if which not in wrapped:
            raise ValueError(
                f"the checkpoint has no {which!r} entry; its top-level keys are "
                f"{sorted(map(str, checkpoint))}"
            )
        return checkpoint[which], which
    if which != "model":
        raise ValueError(
            f"the checkpoint is a bare state dict ({len(checkpoint)} entries), it has no {which!r} entry"
        )
    return checkpoint, None


def _naming_of(state: Mapping) -> str:
    keys = [k for k in state if isinstance(k, str)]
    hf = any(k.startswith((_HF_PREFIX, "patch_embed.patch_embedding.", "encoder.network.")) for k in keys)
    timm = any(k.startswith(("stem.", "stages.")) for k in keys)
    if hf and timm:
        raise ValueError(
            "the state dict mixes Hugging Face names (swiftformer.*) and timm names (stem.*, stages.*)"
        )
    return "hf" if hf else "timm" if timm else "official"


def _as_numpy(value) -> np.ndarray | None:
    """A torch tensor or array-like as a NumPy array (half precision widened exactly to float32)."""
    if type(value).__module__.startswith("torch"):
        if not hasattr(value, "detach"):
            return None
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.element_size() < 4:
            value = value.float()
        return value.numpy()
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value)
    return None


# ----------------------------------------------------------------------------------------------
# Variant and head from shapes
# ----------------------------------------------------------------------------------------------


def _infer_variant(weights: _Canonical) -> str:
    depths, widths = _stage_structure(weights)
    for name, sizes in VARIANT_SIZES.items():
        if sizes == (depths, widths):
            return name
    known = "; ".join(f"{n} depths {d} widths {w}" for n, (d, w) in VARIANT_SIZES.items())
    if not any(d for d in depths):
        first = list(weights.source_names.values())[:5] + list(weights.rejected)[:5]
        raise ValueError(
            f"found no SwiftFormer stage tensors in this {weights.naming}-named state dict of "
            f"{len(weights.tensors) + len(weights.rejected)} entries (first keys: {first}); known "
            f"variants: {known}"
        )
    raise ValueError(
        f"no SwiftFormer variant has depths {depths} and widths {widths} (read from a "
        f"{weights.naming}-named state dict); known variants: {known}"
    )


def _stage_structure(weights: _Canonical) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """(depths, widths) as found: depth = blocks seen per stage; width = output channels of the
    stem's second conv (stage 0) or of the downsampling conv before the stage (None if absent)."""
    blocks: dict[int, set[int]] = {i: set() for i in range(4)}
    for key in weights.tensors:
        if match := re.match(r"network\.(\d+)\.(\d+)\.", key):
            index = int(match[1])
            if index % 2 == 0 and index // 2 in blocks:
                blocks[index // 2].add(int(match[2]))
    depths = tuple(max(b) + 1 if b else 0 for b in blocks.values())
    sources = ["patch_embed.3.weight"] + [f"network.{2 * i - 1}.proj.weight" for i in (1, 2, 3)]
    widths = tuple(
        int(weights.tensors[k].shape[0]) if k in weights.tensors and weights.tensors[k].ndim else None
        for k in sources
    )
    return depths, widths


def _spec_from_tensors(weights: _Canonical, variant: str | None, attention_version: int | None) -> ModelSpec:
    variant = _infer_variant(weights) if variant is None else variant
    version = DEFAULT_ATTENTION_VERSION[weights.naming] if attention_version is None else attention_version
    tensors = weights.tensors
    head = tensors.get("head.weight")
    if any(re.match(r"norm[0246]\.", key) for key in tensors):
        heads = dict(num_classes=0, distillation=False, features_only=True)
    elif head is None or head.ndim != 2:
        heads = dict(num_classes=0, distillation=False)
    else:
        heads = dict(num_classes=int(head.shape[0]), distillation="dist_head.weight" in tensors)
    return ModelSpec.named(variant, attention_version=version, **heads)


# ----------------------------------------------------------------------------------------------
# Files: reading PyTorch checkpoints, writing them, imported orbax checkpoints
# ----------------------------------------------------------------------------------------------


def read_torch_file(path: str | os.PathLike) -> Mapping:
    """Read a .pth / .pt / .bin / .pth.tar (`torch.load(weights_only=True)`) or .safetensors file.

    Only tensors and plain containers load (no pickled code), plus `argparse.Namespace`, which the
    official training checkpoints store under 'args'. Raises FileNotFoundError or a one-line
    ValueError for a missing, truncated or foreign file.
    """
    path = paths.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with paths.local_copy(path) as local:
        return _read_local_torch_file(path, local)


def _read_local_torch_file(path, local: str) -> Mapping:
    """`read_torch_file` of `path`, whose bytes are in the local file `local`."""
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(local, device="cpu")
        except Exception as error:  # noqa: BLE001 - any failure here means "not a readable file"
            raise ValueError(f"cannot read {path} as a safetensors file: {checkpoint_lib.first_line(error)}") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"cannot read {path}: unsupported file type {path.suffix!r}; expected one of "
            f"{', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}"
        )
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(local, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        unsupported = re.search(r"GLOBAL ([\w.]+)", str(error))
        reason = (f"it refers to {unsupported.group(1)}, which is not a tensor type (refused: loading it "
                  "could run code)" if unsupported else checkpoint_lib.first_line(error))
        raise ValueError(
            f"cannot read {path} as a PyTorch checkpoint (not a torch.save file, truncated, or it "
            f"holds objects other than tensors): {type(error).__name__}: {reason}"
        ) from None


def write_torch_file(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write {name: array} as .safetensors or a `torch.save` file (.pth/.pt/.bin), atomically.

    Refuses an existing `path`; writes a temporary sibling file and renames it at the end, so a
    failure leaves nothing behind.
    """
    path = paths.path(path)
    _check_torch_suffix(path)
    if path.exists():
        raise FileExistsError(f"output already exists: {path}")
    if not paths.parent_exists(path):
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    import torch

    # ascontiguousarray makes 0-d arrays 1-d: the shape is put back (num_batches_tracked is 0-d).
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v).reshape(np.shape(v))) for k, v in state_dict.items()}
    temporary = paths.scratch_file(path)
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import save_file

            save_file(tensors, temporary, metadata={"format": "pt"})
        else:
            torch.save(tensors, temporary)
        paths.publish(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _check_torch_suffix(path) -> None:
    if path.suffix not in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,):
        raise ValueError(
            f"cannot write {path}: unsupported file type {path.suffix!r}; use .pth, .pt, .bin or "
            ".safetensors"
        )


# Keys only a SwiftFormer state dict has (any naming), against `regnet_convert.looks_like_regnet`.
_SWIFTFORMER_KEY = re.compile(
    r"(module\.)?(swiftformer\.|patch_embed\.|network\.\d|encoder\.network\.|stem\.\d|stages\.\d|"
    r"dist_head\.|head_dist\.|head\.(weight|bias)$|norm\d?\.)"
)


def _regnet_convert():
    from swiftformer_jax import regnet_convert  # it imports this module: loaded on first use

    return regnet_convert


def detect_architecture(checkpoint: Mapping, *, which: str = "model") -> str:
    """"swiftformer" or "regnety": the network a PyTorch state dict (any naming and wrapping)
    holds, from which of the two architectures' key patterns more of its keys follow. A state
    dict with neither raises ValueError."""
    state, _ = _select_entry(checkpoint, which)
    keys = [k for k in state if isinstance(k, str)]
    regnet = _regnet_convert().looks_like_regnet(keys)
    swiftformer = sum(1 for k in keys if _SWIFTFORMER_KEY.match(k))
    if regnet == swiftformer == 0:
        raise ValueError(
            f"found no SwiftFormer stage tensors and no RegNetY tensors in this state dict of "
            f"{len(state)} entries (first keys: {[str(k) for k in list(state)[:5]]})"
        )
    return "regnety" if regnet > swiftformer else "swiftformer"


def _convert_any(checkpoint: Mapping, which: str, variant: str | None, attention_version: int | None,
                 architecture: str | None) -> tuple[object, dict, str, str | None]:
    """(spec, variables, naming, entry) of a SwiftFormer or RegNetY state dict, strictly."""
    found = detect_architecture(checkpoint, which=which)
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
    if found == "regnety":
        regnet_convert = _regnet_convert()
        weights = regnet_convert.canonical(checkpoint, which)
        if architecture not in (None, found):
            raise ValueError(f"the checkpoint holds a RegNetY state dict ({weights.naming} naming), not a {architecture}")
        if variant is not None or attention_version is not None:
            raise ValueError("the checkpoint holds a RegNetY state dict: a variant and an attention version "
                             "are SwiftFormer settings, give neither")
        spec, variables = regnet_convert.convert(weights)
        return spec, variables, weights.naming, weights.entry
    weights = _canonical(checkpoint, which)
    if architecture not in (None, found):
        raise ValueError(f"the checkpoint holds a SwiftFormer state dict ({weights.naming} naming), not a {architecture}")
    spec, variables = _convert(weights, variant, attention_version)
    return spec, variables, weights.naming, weights.entry


def read_torch_checkpoint(path: str | os.PathLike, *, which: str = "model",
                          variant: str | None = None, attention_version: int | None = None,
                          architecture: str | None = None) -> tuple[object, dict]:
    """(spec, Flax variables as NumPy arrays) from a PyTorch file: `read_torch_file`, then the
    strict `from_torch` (a `ModelSpec`), or `regnet_convert`'s for a RegNetY (a `RegNetSpec`).
    The architecture comes from the keys (`architecture` insists on one); the attention version
    defaults to the naming's (module docstring)."""
    spec, variables, _, _ = _convert_any(read_torch_file(path), which, variant, attention_version, architecture)
    return spec, jax.tree_util.tree_map(np.asarray, variables)


def import_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    variant: str | None = None,
    attention_version: int | None = None,
    which: str = "model",
    architecture: str | None = None,
) -> tuple[object, dict]:
    """Convert a PyTorch checkpoint file (a SwiftFormer, or a RegNetY teacher) into a checkpoint
    directory (see `checkpoint.py`).

    The architecture comes from the keys (`architecture` insists on one). `attention_version`
    None takes the naming's default (1 for Hugging Face, else 2; SwiftFormer only). The output
    must not exist; it is written aside and renamed at the end. Returns the spec and the source
    description (file, sha256, naming, entry) it recorded.
    """
    output = paths.path(output)
    if output.exists():
        raise FileExistsError(f"output already exists: {output}")
    if not paths.parent_exists(output):
        raise FileNotFoundError(f"output directory does not exist: {output.parent}")
    source = paths.path(checkpoint)
    spec, variables, naming, entry = _convert_any(read_torch_file(source), which, variant,
                                                  attention_version, architecture)
    provenance = {"file": str(source), "sha256": _sha256(source), "naming": naming,
                  "entry": entry}
    checkpoint_lib.save_weights(output, variables, spec, source=provenance)
    return spec, provenance


def export_checkpoint(
    checkpoint: str | os.PathLike, output: str | os.PathLike, *, naming: str = "official",
    ema: bool = False, num_batches_tracked: bool = True,
) -> object:
    """Write the weights of any checkpoint (imported, or a trainer's workdir / step; `ema` for its
    EMA weights) as a PyTorch state dict file (see `to_torch`; for a RegNetY
    `regnet_convert.to_torch`, where "official" is timm's naming). Returns the checkpoint's spec."""
    _check_naming(naming)
    output = paths.path(output)
    _check_torch_suffix(output)
    if output.exists():
        raise FileExistsError(f"output already exists: {output}")
    spec, variables = checkpoint_lib.load_variables(checkpoint, ema=ema)
    if isinstance(spec, ModelSpec):
        state = to_torch(variables, naming, num_batches_tracked=num_batches_tracked)
    else:
        state = _regnet_convert().to_torch(variables, naming, num_batches_tracked=num_batches_tracked)
    write_torch_file(state, output)
    return spec


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with paths.path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _variant_argument(text: str) -> str:
    try:
        return variant_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m swiftformer_jax.convert",
        description="Convert SwiftFormer weights (and RegNetY teachers') between PyTorch files and "
        "orbax checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser(
        "import", help="PyTorch .pth/.pt/.bin/.safetensors (official, Hugging Face or timm) -> orbax dir",
    )
    imp.add_argument("--architecture", choices=ARCHITECTURES,
                     help="insist on the network the file holds; default: from the keys")
    imp.add_argument("--checkpoint", required=True, help="PyTorch checkpoint file")
    imp.add_argument("--output", required=True, help="directory to create (must not exist)")
    imp.add_argument("--variant", type=_variant_argument,
                     help=f"{', '.join(VARIANT_SIZES)} (any case); default: from the shapes")
    imp.add_argument(
        "--attention-version", type=int, choices=ops.ATTENTION_VERSIONS,
        help="1: first official release (March 2023) and Hugging Face; 2: official since July 2023 "
        "and timm. Default: 1 for Hugging Face naming, else 2",
    )
    imp.add_argument("--ema", action="store_true", help="take 'model_ema' from a training checkpoint")
    exp = commands.add_parser("export", help="checkpoint (made by import or training) -> PyTorch file")
    exp.add_argument("--checkpoint", required=True, help="imported checkpoint, workdir or step directory")
    exp.add_argument("--ema", action="store_true", help="export a trainer checkpoint's EMA weights")
    exp.add_argument("--naming", choices=NAMINGS, default="official",
                     help="for a RegNetY: official = timm (DeiT's release), or hf")
    exp.add_argument("--output", required=True, help=".pth/.pt/.bin or .safetensors file (must not exist)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message for user errors)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "import":
            which = "model_ema" if args.ema else "model"
            spec, source = import_checkpoint(args.checkpoint, args.output, variant=args.variant,
                                             attention_version=args.attention_version, which=which,
                                             architecture=args.architecture)
            entry = f", entry {source['entry']!r}" if source["entry"] else ""
            print(f"imported {spec.describe()} ({source['naming']} naming{entry}) into {args.output}")
        else:
            spec = export_checkpoint(args.checkpoint, args.output, naming=args.naming, ema=args.ema)
            print(f"exported {spec.describe()} from {args.checkpoint} with {args.naming} naming to {args.output}")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
