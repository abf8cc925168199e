"""Where the memory traffic of one jitted JAX program goes: its compiled HLO, instruction by instruction.

Run:  python experiments/step_bytes.py [--task train] [--variant S] [--batch 32] [--top 30]
      python experiments/step_bytes.py --block network_0/block_0   # every instruction of one block

Builds the program `benchmark.py` times (the S train step, or the eval forward), reads its compiled
HLO and counts, for every instruction of the entry computation that does work (fusions, dots,
conditionals, copies; not parameters, tuples or bitcasts), the bytes of its result plus the bytes
of its operands. Grouped by source (the `op_name` metadata with stage and block numbers taken out,
so the same layer in every block falls into one row), forward and backward apart. Why: on a 2-core
CPU the step moves ~20-26 GB and a tensor of the MLP's hidden width is the largest there is, so an
intermediate that XLA stores where it could recompute shows up here first (PERF_NOTES.md, session 6
change 14 and session 8's GELU were found this way). No timing: the counts are deterministic.

An estimate, an upper bound per instruction: an operand is counted whole even where the fusion reads
a slice of it or a single element (the `materialize` predicates read one), and no cache reuse is
assumed. The total is printed next to XLA's own `bytes accessed` figure.
"""

from __future__ import annotations

import script_setup  # experiments/ is sys.path[0] when run as a script; the tests put it there

script_setup.prepare(__name__)  # first: XLA settings, before jax or torch start

import argparse  # noqa: E402
import collections  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

import benchmark  # noqa: E402
import jax  # noqa: E402

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                 "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
NO_WORK = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id"}
_ARRAY = re.compile(r"\b(" + "|".join(ELEMENT_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(.*)$")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuples summed: `(f32[2,3]{1,0}, s32[])` -> 28."""
    total = 0
    for element, dims in _ARRAY.findall(shape):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * ELEMENT_BYTES[element]
    return total


def entry_instructions(hlo: str) -> list[dict]:
    """The entry computation's working instructions: name, opcode, bytes (result + operands), source."""
    start = hlo.index("\nENTRY")
    body = hlo[start:hlo.index("\n}", start)]
    sizes: dict[str, int] = {}
    rows = []
    for line in body.split("\n")[2:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, operands, rest = match.groups()
        sizes[name] = shape_bytes(shape)
        if opcode in NO_WORK:
            continue
        read = sum(sizes.get(operand, 0) for operand in re.findall(r"%([\w.\-]+)", operands))
        source = re.search(r'op_name="([^"]*)"', rest)
        rows.append({"name": name, "opcode": opcode, "written": sizes[name], "read": read,
                     "source": source.group(1) if source else ""})
    return rows


def group(source: str) -> tuple[str, str]:
    """(direction, layer/op with stage and block numbers removed) of an `op_name`."""
    direction = "backward" if "transpose(" in source else "forward" if "jvp(" in source else "other"
    path = re.sub(r"^jit\([^)]*\)/", "", source)
    path = re.sub(r"(transpose\()?jvp\([^)]*\)\)?/", "", path)
    path = re.sub(r"SwiftFormer\._stage/", "", path)
    path = re.sub(r"(network|block)_\d+", r"\1_*", path)
    return direction, path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("train", "inference"), default="train")
    benchmark.add_model_arguments(parser)
    benchmark.add_dtype_argument(parser)
    parser.add_argument("--top", type=benchmark.positive_int, default=30, help="how many groups to list")
    parser.add_argument("--block", help="also list every instruction whose source contains this, e.g. network_0/block_0/")
    args = parser.parse_args(argv)

    case = benchmark.JaxCase(f"jax-{args.dtype}", args.variant, args.dtype, args.image_size)
    case.make(args.task, args.batch)
    compiled = case.compiled[args.task]
    rows = entry_instructions(compiled.as_text())
    if not rows:
        raise RuntimeError("found no working instruction in the compiled program's entry computation")
    in_block = [row for row in rows if args.block and args.block in row["source"]]
    if args.block and not in_block:
        parser.error(f"--block {args.block!r}: no instruction's source contains it; sources read like "
                     f"{next((r['source'] for r in rows if 'block_0' in r['source']), rows[0]['source'])!r}")
    total = sum(row["read"] + row["written"] for row in rows)
    xla_bytes = case.analysis[args.task]["bytes_accessed"]  # XLA's cost analysis, taken by JaxCase
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for row in rows:
        entry = groups[group(row["source"])]
        entry[0] += row["read"] + row["written"]
        entry[1] += row["written"]
        entry[2] += 1

    print(f"{args.variant} {args.task} batch {args.batch} {args.image_size}px {args.dtype}; jax {jax.__version__}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{len(rows)} instructions; {total / 1e9:.2f} GB read + written by this count, XLA's cost analysis "
          f"{xla_bytes / 1e9:.2f} GB\n")
    print("| direction | source (stage and block numbers taken out) | instructions | GB | written GB | share |")
    print("|---|---|---|---|---|---|")
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    for (direction, path), (moved, written, count) in ranked[: args.top]:
        print(f"| {direction} | {path[-100:]} | {count} | {moved / 1e9:.2f} | {written / 1e9:.2f} | "
              f"{100 * moved / total:.1f}% |")
    if args.block:
        print(f"\n| instruction | opcode | MB read | MB written | source |\n|---|---|---|---|---|")
        for row in in_block:
            print(f"| `{row['name']}` | {row['opcode']} | {row['read'] / 1e6:.0f} | {row['written'] / 1e6:.0f} | "
                  f"{row['source'][-90:]} |")
    return {"total_bytes": total, "xla_bytes": xla_bytes,
            "groups": {f"{d} {p}": moved for (d, p), (moved, _, _) in groups.items()}}


if __name__ == "__main__":
    main()
