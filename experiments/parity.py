"""How close our SwiftFormer is to the PyTorch reference, stage by stage, in float32 and bfloat16.

Run: python experiments/parity.py [--batch 4] [--size 224] [--output experiments/results/parity.md]

Reference: Hugging Face transformers' `SwiftFormerForImageClassification` in float32 on torch
(CPU), every tensor randomised as in the tests (tests/torch_reference.py: weights ~ N(0, 1/fan_in),
layer scales uniform in [-1, 1], random BN statistics), with its weights moved by
`convert.from_torch`. Version 2 attention patches only the reference's token weighting (see
torch_reference). No released checkpoint is used (none can be downloaded here), so the numbers
describe the numerics of random networks of the real shapes, not of trained ones.

Ours: `create_model(variant, attention_version=v, dtype=...)` in float32 and in bfloat16 compute
(parameters and BN statistics stay float32), jitted, `jax_default_matmul_precision="highest"`.
Per variant, version and output (the four stage maps before any feature norm, and the eval logits):
max |ours - torch| and that divided by max |torch| (relative to the output's scale).
Last, how far versions 1 and 2 are apart on the same weights (our float32 model; the reference
agrees to the float32 error above).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the randomised PyTorch reference lives with the tests

import torch_reference as ref  # noqa: E402

from swiftformer_jax import VARIANTS, convert, create_model, layers  # noqa: E402

OUTPUTS = ("stage 1", "stage 2", "stage 3", "stage 4", "logits")


def _is_stage(module, method_name: str) -> bool:
    return isinstance(module, layers.Stage) and method_name == "__call__"


def ours(variant: str, version: int, dtype, variables, images) -> list[np.ndarray]:
    """Our four stage maps and eval logits, as float32 NumPy arrays."""
    model = create_model(variant, attention_version=version, dtype=dtype)

    @jax.jit
    def run(variables, x):
        logits, state = model.apply(variables, x, train=False, capture_intermediates=_is_stage)
        return [state["intermediates"][f"network_{2 * i}"]["__call__"][0] for i in range(4)] + [logits]

    return [np.asarray(o.astype(jnp.float32)) for o in run(variables, jnp.asarray(images))]


def reference(model, version: int, images) -> list[np.ndarray]:
    x = ref.nchw(images)
    with torch.no_grad(), ref.attention_version(model, version):
        logits, stages = ref.logits_and_stages(model, x)
    return [ref.nhwc(s) for s in stages] + [logits.numpy()]


def errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs error / max |expected|), in float64."""
    difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()
    return float(difference), float(difference / np.abs(expected).max())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.default_backend()}: {devices}), flax {flax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "experiments" / "results" / "parity.md"))
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(os.cpu_count() or 1)

    images = np.random.RandomState(args.seed).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    rows, version_rows = [], []
    for index, variant in enumerate(VARIANTS):
        torch_model = ref.build(variant, seed=args.seed + index)  # distinct tensors per variant
        variables = convert.from_torch(torch_model.state_dict())
        float32_by_version = {}
        for version in (1, 2):
            want = reference(torch_model, version, images)
            got32 = ours(variant, version, jnp.float32, variables, images)
            got16 = ours(variant, version, jnp.bfloat16, variables, images)
            float32_by_version[version] = got32
            for name, w, a, b in zip(OUTPUTS, want, got32, got16):
                rows.append((variant, version, name, float(np.abs(w).max()), *errors(a, w), *errors(b, w)))
                print(variant, version, name, *(f"{x:.3g}" for x in rows[-1][3:]), flush=True)
        for name, v1, v2 in zip(OUTPUTS, float32_by_version[1], float32_by_version[2]):
            version_rows.append((variant, name, float(np.abs(v1).max()), float(np.abs(v2).max()), *errors(v2, v1)))

    lines = [
        "# Parity with the PyTorch reference, float32 and bfloat16",
        "",
        f"Produced by `python experiments/parity.py --batch {args.batch} --size {args.size} --seed {args.seed}` "
        f"on {datetime.date.today().isoformat()}.",
        "",
        f"Machine and versions: {machine()}.",
        "",
        "Reference: Hugging Face `SwiftFormerForImageClassification`, float32, random weights (see the "
        "script's docstring); attention version 2 patches only its token weighting. Ours: the same "
        f"weights via `convert.from_torch`, jitted, on {args.batch} random N(0, 1) images of "
        f"{args.size}x{args.size}. Stage maps are before any feature norm; logits are the eval "
        "logits (mean of both heads). Relative error = max |ours - torch| / max |torch|.",
        "",
        f"Largest relative error: float32 {max(r[5] for r in rows):.2e}, bfloat16 {max(r[7] for r in rows):.2e} "
        "(bfloat16 keeps 8 significant bits, a relative rounding step of 2^-8 = 3.9e-3 per operation).",
        "",
        "| variant | attention | output | scale max abs torch | float32 max abs err | float32 rel | bfloat16 max abs err | bfloat16 rel |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for variant, version, name, scale, abs32, rel32, abs16, rel16 in rows:
        lines.append(f"| {variant} | v{version} | {name} | {scale:.3g} | {abs32:.2e} | {rel32:.2e} | {abs16:.2e} | {rel16:.2e} |")
    lines += [
        "",
        "## Attention version 1 vs version 2 on the same weights (ours, float32)",
        "",
        "Version 1 weights every token by exactly 1 (a softmax over an axis of size 1), so its global "
        "query is the plain sum of the N normalised queries; version 2 L2-normalises the token scores. "
        "The two are different functions of the same tensors: the version is the checkpoint's, not "
        "the loader's, to choose. These random networks have attention layer scales of order 1 "
        "(uniform in [-1, 1]), so the attention branch weighs far more than in trained networks, whose "
        "layer_scale_1 start at 1e-5, and the gap below says little about trained weights: no trained "
        "checkpoint is used here (see the script's docstring).",
        "",
        "| variant | output | max abs v1 | max abs v2 | max abs (v2 - v1) | relative to v1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for variant, name, scale1, scale2, diff, rel in version_rows:
        lines.append(f"| {variant} | {name} | {scale1:.3g} | {scale2:.3g} | {diff:.3g} | {rel:.3g} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
