"""Smoke tests of the timing scripts (benchmark.py, attention_scaling.py) with tiny settings.

Seconds, not the real measurements. They check that the scripts run end to end and write their
JSON, markdown and PNG, that bad flags fail with a clear message, that the exponent fit is right on
exact power laws, and that a script run as a program makes its process settings before JAX starts
while an imported one (as here) makes none.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import attention_scaling  # noqa: E402
import benchmark  # noqa: E402
from swiftformer_jax.model import ModelSpec  # noqa: E402


def test_attention_scaling_tiny_run(tmp_path):
    attention_scaling.main([
        "--widths", "8", "--tokens", "16,64", "--fit-from", "16", "--mechanisms",
        "efficient_additive_attention,softmax_self_attention", "--min-seconds", "0", "--max-reps", "1",
        "--tag", "t", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "attention_scaling_t.json").read_text())
    assert len(results["rows"]) == 2 * 2 * 2
    assert all(f["time_exponent"] is not None and f["memory_exponent"] is not None for f in results["fits"])
    assert (tmp_path / "attention_scaling_t.png").stat().st_size > 0
    assert "Fitted growth exponents" in (tmp_path / "attention_scaling_t.md").read_text()


def test_attention_scaling_skips_what_does_not_fit(tmp_path):
    attention_scaling.main([
        "--widths", "8", "--tokens", "16,512", "--mechanisms", "softmax_self_attention", "--max-gib",
        "0.0001", "--min-seconds", "0", "--max-reps", "1", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "attention_scaling.json").read_text())
    assert any(s["tokens"] == 512 and "GiB" in s["why"] for s in results["skipped"])


def test_fit_exponent_recovers_power_laws():
    tokens = [100, 1000, 10000]
    assert attention_scaling.fit_exponent(tokens, [3 * n for n in tokens]) == pytest.approx(1.0)
    assert attention_scaling.fit_exponent(tokens, [n**2 for n in tokens]) == pytest.approx(2.0)
    assert attention_scaling.fit_exponent([5], [1.0]) is None


@pytest.mark.parametrize("argv, message", [
    (["--mechanisms", "linformer"], "unknown mechanism"),
    (["--widths", "0"], "positive integers"),
    (["--tokens", "a,b"], "positive integers"),
])
def test_attention_scaling_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        attention_scaling.parse_args(argv)
    assert message in str(error.value)


@pytest.mark.parametrize("argv, message", [
    (["--variants", "M"], "unknown variant"),
    (["--configs", "tf-f32"], "unknown config"),
    (["--tasks", "eval"], "unknown task"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_benchmark_bad_flags(argv, message):
    with pytest.raises(SystemExit) as error:
        benchmark.parse_args(argv)
    assert message in str(error.value)


def test_benchmark_tiny_run(tmp_path, monkeypatch):
    pauses = {}
    timed = benchmark.time_interleaved

    def spy(fns, reps, warmup, reads, settle_s):  # the pause each task's rounds were given
        pauses[len(pauses)] = settle_s
        return timed(fns, reps, warmup, reads, settle_s=settle_s)

    monkeypatch.setattr(benchmark, "time_interleaved", spy)
    benchmark.main([
        "--variants", "XS", "--configs", "jax-f32,torch-eager-f32", "--tasks", "latency,idle_latency",
        "--image-size", "32", "--reps", "2", "--warmup", "1", "--torch-memory-format", "contiguous",
        "--skip-peaks", "--tag", "t", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "benchmark_t.json").read_text())
    tasks = results["variants"]["XS"]["tasks"]
    assert list(pauses.values()) == [benchmark.SETTLE_S, benchmark.IDLE_S] == [
        tasks["latency"]["pause_s"], tasks["idle_latency"]["pause_s"]]
    assert benchmark.IDLE_S > 0.1 > benchmark.SETTLE_S  # idle long enough to be idle; a stream's gap short
    latency = tasks["latency"]["results"]
    assert set(latency) == set(tasks["idle_latency"]["results"]) == {"jax-f32", "torch-eager-f32"}
    assert tasks["latency"]["batch"] == tasks["idle_latency"]["batch"] == 1
    assert all(s["median_s"] > 0 and s["min_s"] <= s["median_s"] <= s["max_s"] for s in latency.values())
    assert results["variants"]["XS"]["analysis"]["jax-f32"]["latency"]["flops"] > 0
    assert results["machine"]["cpu"]
    assert results["machine"]["memory_measure"] == benchmark.MemoryPeak.MEASURE
    assert all(s["memory_peak_rise_mib"] >= 0 for s in latency.values())
    assert results["machine"]["device"] == "cpu"
    table = (tmp_path / "benchmark_t.md").read_text()
    assert "SwiftFormer-XS" in table and "idle_latency (batch 1, ms)" in table
    assert f"latency {benchmark.SETTLE_S:g} s, idle_latency {benchmark.IDLE_S:g} s" in table

    # --render-only derives the table again from the saved JSON, timing nothing.
    (tmp_path / "benchmark_t.md").unlink()
    benchmark.main(["--render-only", "--tag", "t", "--output-dir", str(tmp_path)])
    assert (tmp_path / "benchmark_t.md").read_text() == table


def test_benchmark_warns_of_load_only_without_passive_openmp(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    unset = benchmark.machine_info()
    assert unset["omp_wait_policy"] == "unset (libgomp's default)"
    assert "load average 2.5 on 2 cores" in benchmark.load_warning(2.5, {**unset, "usable_cores": 2})
    assert benchmark.load_warning(1.9, {**unset, "usable_cores": 2}) is None  # a quiet machine
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    passive = benchmark.machine_info()
    assert passive["omp_wait_policy"] == "passive"
    assert benchmark.load_warning(64.0, {**passive, "usable_cores": 2}) is None
    assert "OMP_WAIT_POLICY=PASSIVE" in benchmark.load_warning(64.0, {**passive, "omp_wait_policy": "ACTIVE"})


def test_benchmark_merge_puts_runs_of_different_variants_in_one_table(tmp_path):
    common = ["--configs", "jax-f32", "--tasks", "latency", "--image-size", "32", "--reps", "1", "--warmup", "0",
              "--skip-peaks", "--output-dir", str(tmp_path)]
    benchmark.main(["--variants", "XS", "--tag", "xs", *common])
    # A second variant's run, made from the first (merging reads files; timing S would add nothing).
    s_run = json.loads((tmp_path / "benchmark_xs.json").read_text())
    s_run["variants"] = {"S": s_run["variants"].pop("XS")}
    s_run["settings"]["variants"] = ["S"]
    (tmp_path / "benchmark_s.json").write_text(json.dumps(s_run))
    benchmark.main(["--merge", "xs,s", "--tag", "both", "--output-dir", str(tmp_path)])
    merged = json.loads((tmp_path / "benchmark_both.json").read_text())
    assert list(merged["variants"]) == ["XS", "S"]
    assert {v: m["tag"] for v, m in merged["merged_from"].items()} == {"XS": "xs", "S": "s"}
    table = (tmp_path / "benchmark_both.md").read_text()
    assert "## SwiftFormer-XS" in table and "## SwiftFormer-S" in table and "Merged from runs" in table

    with pytest.raises(SystemExit, match="--merge names xs more than once"):
        benchmark.main(["--merge", "xs,xs", "--tag", "twice", "--output-dir", str(tmp_path)])
    (tmp_path / "benchmark_xs_again.json").write_text((tmp_path / "benchmark_xs.json").read_text())
    with pytest.raises(SystemExit, match="variant XS is in both xs and xs_again"):
        benchmark.main(["--merge", "xs,xs_again", "--tag", "twice", "--output-dir", str(tmp_path)])
    other = json.loads((tmp_path / "benchmark_s.json").read_text())
    other["settings"]["configs"] = ["jax-f32", "torch-eager-f32"]
    (tmp_path / "benchmark_other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="--merge: other timed configurations and tasks"):
        benchmark.main(["--merge", "xs,other", "--tag", "bad", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="benchmark_missing.json"):
        benchmark.main(["--merge", "xs,missing", "--tag", "bad", "--output-dir", str(tmp_path)])
    assert not (tmp_path / "benchmark_twice.json").exists() and not (tmp_path / "benchmark_bad.json").exists()


def test_benchmark_render_only_without_a_saved_run_names_the_file(tmp_path):
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--render-only", "--tag", "none", "--output-dir", str(tmp_path)])
    assert str(tmp_path / "benchmark_none.json") in str(error.value)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("text, message", [
    ('{"machine": {"cpu": "x"}, "sett', "is not valid JSON (truncated?)"),
    ('{"rows": []}', "is not a saved benchmark run (no machine, settings, variants)"),
])
def test_benchmark_render_only_names_a_file_that_is_not_a_saved_run(tmp_path, text, message):
    saved = tmp_path / "benchmark_bad.json"
    saved.write_text(text)
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--render-only", "--tag", "bad", "--output-dir", str(tmp_path)])
    assert str(saved) in str(error.value) and message in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["benchmark_bad.json"] and saved.read_text() == text


@pytest.mark.parametrize("requested, backend, cuda, expected", [
    ("auto", "cpu", False, "cpu"),
    ("auto", "cpu", True, "cpu"),
    ("auto", "gpu", True, "gpu"),
    ("cpu", "cpu", True, "cpu"),
    ("gpu", "gpu", True, "gpu"),
    ("gpu", "cpu", True, "JAX's default backend is 'cpu', not a GPU"),
    ("auto", "gpu", False, "torch.cuda.is_available() is False"),
    ("cpu", "gpu", True, "set JAX_PLATFORMS=cpu"),
    ("tpu", "tpu", False, "--device must be one of"),
])
def test_benchmark_device_both_frameworks_on_one_device_or_an_error(requested, backend, cuda, expected):
    if expected in ("cpu", "gpu"):
        assert benchmark.resolve_device(requested, backend, cuda) == expected
    else:
        with pytest.raises(SystemExit) as error:
            benchmark.resolve_device(requested, backend, cuda)
        assert expected in str(error.value)


def test_benchmark_asked_for_a_gpu_on_this_cpu_exits_before_timing(tmp_path):
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--device", "gpu", "--variants", "XS", "--configs", "jax-f32", "--tasks", "latency",
                        "--skip-peaks", "--output-dir", str(tmp_path)])
    assert "not a GPU" in str(error.value)
    assert not list(tmp_path.iterdir())


def test_benchmark_gpu_path_runs_with_cuda_faked(tmp_path, monkeypatch):
    """`--device gpu` end to end on this CPU, with the CUDA calls faked and PyTorch's "cuda" as the
    CPU: every line of the GPU path runs (machine record, peaks, synchronised calls, device memory
    readers, derive, table), so a mistake in it fails here rather than in a time-limited GPU session.
    What it cannot show is GPU behaviour: speed, memory, numerics."""
    import torch

    synced, reads = [], {"jax": 0, "torch": 0}
    monkeypatch.setattr(benchmark.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    # Each synchronize records its caller: TorchCase's timed closures are named "run".
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(sys._getframe(1).f_code.co_name))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    monkeypatch.setattr(benchmark, "TORCH_GPU_DEVICE", "cpu")
    monkeypatch.setattr(benchmark, "GPU_PEAK_MATMUL_N", 64)
    monkeypatch.setattr(benchmark, "GPU_PEAK_COPY_BYTES", 2**20)

    def fake_reader(framework):  # this CPU's JAX device has no memory_stats(); count the reads
        def read() -> int:
            reads[framework] += 1
            return 0
        return read

    monkeypatch.setattr(benchmark, "device_memory_reader", fake_reader)
    # The JAX side on a miniature: XS's own train steps (bfloat16, and float32 for the FLOP count)
    # would be most of this test's time, and the GPU path's lines are the same for any network.
    monkeypatch.setattr(benchmark, "create_model", lambda variant, dtype, impl: ModelSpec(
        (1, 1, 1, 1), (8, 16, 16, 24)).build(dtype=dtype, impl=impl))
    benchmark.main([
        "--device", "gpu", "--variants", "XS", "--configs", "jax-bf16,torch-eager-bf16",
        "--tasks", "latency,train", "--image-size", "32", "--batch", "2", "--train-batch", "2", "--reps", "1",
        "--warmup", "0", "--torch-memory-format", "contiguous", "--tag", "g", "--output-dir", str(tmp_path)])

    results = json.loads((tmp_path / "benchmark_g.json").read_text())
    machine = results["machine"]
    assert machine["device"] == "gpu" and machine["gpu_torch"] == "Fake GPU"
    assert machine["memory_measure"] == benchmark.DEVICE_MEMORY_MEASURE
    assert machine["torch_cudnn_benchmark"] is True  # set for the run, as the official script does
    assert "jax_gpu_preallocate" in machine
    assert results["peaks"]["peak_gflops_bf16"] > 0 and "64^3 matmuls" in results["peaks"]["how"]
    assert "run" in synced and "<lambda>" in synced  # the timed PyTorch calls and the peaks synchronise
    assert reads["jax"] and reads["torch"]  # each framework's device memory read
    train = results["variants"]["XS"]["tasks"]["train"]["results"]
    assert set(train) == {"jax-bf16", "torch-eager-bf16"}
    # No jax-f32 was timed: its programs were compiled for the FLOP count alone, so the bfloat16-only
    # run still reports its fractions of the peaks.
    counted = results["variants"]["XS"]["analysis"]["jax-f32"]
    assert counted["timed"] is False and counted["train"]["flops"] > 0
    for stats in train.values():
        assert stats["fraction_of_peak_flops"] > 0 and stats["fraction_of_peak_bandwidth"] > 0
        assert stats["bytes_from"] == "jax-bf16"
    table = (tmp_path / "benchmark_g.md").read_text()
    assert "GPU: cpu (PyTorch: Fake GPU)" in table and "cuDNN benchmark mode True" in table
    assert "| train | jax-f32 (impl cpu) (counted, not timed) | 2 |" in table


def _stats(seconds: float, batch: int) -> dict:
    return {"median_s": seconds, "min_s": seconds, "max_s": seconds, "images_per_s": batch / seconds}


def test_derive_counts_flops_from_float32_and_bytes_from_the_configurations_dtype():
    analysis = {"jax-f32": {"train": {"batch": 2, "flops": 4e9, "bytes_accessed": 2e9}},
                "jax-bf16": {"train": {"batch": 2, "flops": 5e9, "bytes_accessed": 1e9}}}
    results = {
        "peaks": {"peak_gflops": 100.0, "peak_gflops_bf16": 400.0, "peak_gbs": 10.0},
        "variants": {"XS": {"analysis": analysis, "tasks": {"train": {"results": {
            "torch-eager-f32": _stats(1.0, 2), "torch-eager-bf16": _stats(0.5, 2), "jax-bf16": _stats(0.5, 2)}}}}},
    }
    benchmark.derive(results)
    rows = results["variants"]["XS"]["tasks"]["train"]["results"]
    f32, bf16 = rows["torch-eager-f32"], rows["torch-eager-bf16"]
    assert f32["bytes_from"] == "jax-f32" and bf16["bytes_from"] == "jax-bf16"
    assert f32["achieved_gflops"] == pytest.approx(4.0) and bf16["achieved_gflops"] == pytest.approx(8.0)
    assert f32["fraction_of_peak_flops"] == pytest.approx(0.04)
    assert bf16["fraction_of_peak_flops"] == pytest.approx(8.0 / 400.0)  # the bfloat16 peak
    assert f32["achieved_gbs"] == pytest.approx(2.0) and bf16["achieved_gbs"] == pytest.approx(2.0)
    assert bf16["speedup_vs_torch_eager_f32"] == pytest.approx(2.0)
    # A run without a bfloat16 program or peak counts bfloat16 with the float32 ones.
    del analysis["jax-bf16"], results["peaks"]["peak_gflops_bf16"]
    benchmark.derive(results)
    assert bf16["bytes_from"] == "jax-f32" and bf16["achieved_gbs"] == pytest.approx(4.0)
    assert bf16["fraction_of_peak_flops"] == pytest.approx(0.08)


def test_memory_peak_reads_the_given_counter():
    import time
    calls = []

    def counter() -> int:  # grows by 1000 bytes a read
        calls.append(1)
        return 1000 * len(calls)

    with benchmark.MemoryPeak(interval=0.0005, read=counter) as memory:
        time.sleep(0.01)
    assert len(calls) >= 3  # the start, samples, the end
    assert memory.peak_bytes == 1000 * (len(calls) - 1)  # the last reading less the first


def test_memory_peak_sees_an_allocation_made_inside_the_block():
    import numpy as np
    with benchmark.MemoryPeak() as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched, alive at the end of the block
    assert memory.peak_bytes >= 60 * 2**20
    del block


def test_memory_rise_is_the_largest_over_the_extra_calls():
    import numpy as np
    calls, kept = [], []

    def grows_on_last_extra_call():  # warm-up 1 + reps 1 = 2 calls, then the extra ones
        calls.append(1)
        if len(calls) == 2 + benchmark.MEMORY_CALLS:
            kept.append(np.ones(64 * 2**20 // 8))  # alive at the end of the call: no sampling luck needed

    out = benchmark.time_interleaved({"a": grows_on_last_extra_call}, reps=1, warmup=1)
    assert len(calls) == 2 + benchmark.MEMORY_CALLS >= 4
    assert out["a"]["memory_peak_rise_mib"] >= 60


def test_interleaved_times_rotates_and_pauses_untimed_before_each_call():
    import time
    starts, order = [], []

    def call(name):
        def run():
            starts.append(time.perf_counter())
            order.append(name)
        return run

    times = benchmark.interleaved_times({n: call(n) for n in "abc"}, reps=3, warmup=1, settle_s=0.03)
    assert order[3:] == list("abc" "bca" "cab")  # after the warm-up, each round starts one later
    assert all(len(t) == 3 and max(t) < 0.02 for t in times.values())  # the pause is not timed
    gaps = [b - a for a, b in zip(starts[3:], starts[4:])]
    assert min(gaps) >= 0.03  # but it happens before every timed call


TIMING_SCRIPTS = ("attention_scaling", "benchmark")


@pytest.mark.parametrize("script", TIMING_SCRIPTS)
def test_timing_scripts_make_their_settings_before_importing_jax_or_torch(script):
    import ast

    tree = ast.parse((EXPERIMENTS / f"{script}.py").read_text())
    setup = next(node for node in tree.body
                 if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'")
    first_import = min(
        node.lineno for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(name.split(".")[0] in {"jax", "torch", "swiftformer_jax", "numpy", "optax"}
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])))
    assert setup.lineno < first_import
    assert "xla_flags.apply()" in ast.unparse(setup)


def test_timing_scripts_set_xla_flags_only_as_the_main_program():
    """Run in a fresh process (this one has the flags from conftest): importing a script sets
    nothing; run as a program, each applies the XLA flags unless `--keep-ynn-fusion`, and only
    benchmark.py (JAX and PyTorch on one GPU) asks JAX to allocate GPU memory on demand."""
    import os
    import subprocess

    probe = f"""
import json, os, runpy, sys
sys.path.insert(0, {str(EXPERIMENTS)!r})
seen = {{}}
def look(name):
    seen[name] = [os.environ.pop(k, None) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE")]
import benchmark, attention_scaling
look("imported")
for script in {TIMING_SCRIPTS!r}:
    for extra in (["--keep-ynn-fusion"], []):
        sys.argv = [script + ".py", *extra, "--help"]
        try:
            runpy.run_path({str(EXPERIMENTS)!r} + "/" + script + ".py", run_name="__main__")
        except SystemExit:
            pass
        look(" ".join([script, *extra]))
print(json.dumps(seen))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    flags = "--xla_cpu_experimental_ynn_fusion_type=reduce"
    assert seen == {
        "imported": [None, None],
        "attention_scaling --keep-ynn-fusion": [None, None],
        "attention_scaling": [flags, None],
        "benchmark --keep-ynn-fusion": [None, "false"],
        "benchmark": [flags, "false"],
    }


# ----------------------------------------------------------------------------------------------
# tpu_plan.py: reading the TPU compiler's HLO (the compile itself is in test_aot.py)
# ----------------------------------------------------------------------------------------------

HLO_COLLECTIVES = """
  %all-reduce.1 = f32[1024]{0:T(1024)} all-reduce(%p), channel_id=1, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%add
  %all-gather.2 = bf16[3,3,16,16]{2,3,1,0:T(8,128)(2,1)} all-gather(%q), channel_id=2, replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={3}
  %all-gather.3 = bf16[3,3,16,16]{2,3,1,0:T(8,128)(2,1)S(1)} all-gather(%q2), channel_id=2, replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={3}
  %reduce-scatter.4 = f32[64]{0} reduce-scatter(%r), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %all-to-all.5 = f32[8,12]{1,0} all-to-all(%s), channel_id=5, replica_groups=[4,2]<=[8], dimensions={0}
  %cp = (f32[8,12]{1,0:T(8,128)S(1)}, f32[8,12]{1,0:T(8,128)}, u32[]{:S(2)}) collective-permute-start(%w), channel_id=6, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,12]{1,0} collective-permute-done(%cp)
  %all-reduce.7 = f32[10]{0} all-reduce(%t), replica_groups={}, to_apply=%add
"""


def test_tpu_plan_reads_every_collective_once_with_its_group_and_ring_bytes():
    import tpu_plan

    found = tpu_plan.collectives(HLO_COLLECTIVES, 8)
    summary = tpu_plan.summarize_collectives(found)
    assert summary["all-reduce"]["count"] == 2 and sorted(summary["all-reduce"]["groups"]) == [4, 8]
    assert summary["all-reduce"]["ring_bytes"] == pytest.approx(2 * 3 / 4 * 4096 + 2 * 7 / 8 * 40)
    assert summary["all-gather"]["count"] == 1  # one channel cloned into two computations
    assert summary["all-gather"] == {"count": 1, "payload_bytes": 3 * 3 * 16 * 16 * 2, "ring_bytes": 4608 / 2, "groups": [2]}
    assert summary["reduce-scatter"]["payload_bytes"] == 64 * 4 * 4  # the scattered input: result x group
    assert summary["all-to-all"]["groups"] == [2]
    assert summary["collective-permute"] == {"count": 1, "payload_bytes": 384, "ring_bytes": 384.0, "groups": [2]}


HLO_LOOP = """
%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %y = f32[256]{0} fusion(%x), kind=kLoop, calls=%f
  %ag = f32[512]{0} all-gather(%y), channel_id=9, replica_groups={{0,1}}, dimensions={0}
  ROOT %t = (s32[], f32[256]{0}) tuple(%i, %y)
}

%cond (p.1: (s32[], f32[256])) -> pred[] {
  %p.1 = (s32[], f32[256]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[256]) -> f32[3,100] {
  %a = f32[256]{0} parameter(0)
  %c = (f32[256]{0}, f32[256]{0:S(1)}, u32[]{:S(2)}) copy-start(%a)
  %d = f32[256]{0:S(1)} copy-done(%c)
  %zero = s32[] constant(0)
  %tuple = (s32[], f32[256]{0}) tuple(%zero, %a)
  %w = (s32[], f32[256]{0}) while(%tuple), condition=%cond, body=%body
  ROOT %e = f32[3,100]{1,0:T(8,128)} fusion(%d), kind=kLoop, calls=%g
}
"""


def test_tpu_plan_memory_traffic_splits_hbm_from_on_chip_and_counts_loops_per_trip():
    import tpu_plan

    traffic = tpu_plan.memory_traffic(HLO_LOOP)
    copy_in = 256 * 4  # read from HBM, written on chip
    padded_result = 8 * 128 * 4  # f32[3,100] in (8,128) tiles
    loop = 4 * (2 * 256 * 4 + 512 * 4 + 256 * 4)  # fusion and all-gather, both in HBM, 4 trips
    assert traffic["hbm_bytes"] == copy_in + padded_result + loop
    assert traffic["on_chip_bytes"] == copy_in + 256 * 4  # the copy's destination, the fusion's operand
    assert traffic["loops_without_trip_count"] == []
    assert traffic["hbm_bytes_by_opcode"]["all-gather"] == 4 * 3 * 256 * 4
    assert traffic["total_bytes_loops_once"] == traffic["total_bytes"] - 3 * loop // 4  # as "bytes accessed" counts
    gathers = tpu_plan.summarize_collectives(tpu_plan.collectives(HLO_LOOP, 2))["all-gather"]
    assert gathers["count"] == 1 and gathers["ring_bytes"] == 4 * 512 * 4 / 2  # once per trip


HLO_GPU_MATMULS = """
%gemm (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %d = bf16[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[8,16,16,4], w: bf16[3,3,4,8], a: bf16[64,32], b: bf16[32,16], gy: bf16[8,16,16,8]) -> bf16[64,16] {
  %x = bf16[8,16,16,4]{3,2,1,0} parameter(0)
  %w = bf16[3,3,4,8]{3,2,1,0} parameter(1)
  %a = bf16[64,32]{1,0} parameter(2)
  %b = bf16[32,16]{1,0} parameter(3)
  %gy = bf16[8,16,16,8]{3,2,1,0} parameter(4)
  %c = (bf16[8,16,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %gw = (bf16[3,3,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %gy), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %f = bf16[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm
}
"""


def test_tpu_plan_counts_the_gpu_programs_dot_and_convolution_flops():
    import tpu_plan

    dot = 2 * 64 * 16 * 32
    conv = 2 * (8 * 16 * 16 * 8) * (3 * 3 * 4)  # per output element: a 3x3 window over 4 input features
    assert tpu_plan.matmul_flops(HLO_GPU_MATMULS) == dot + 2 * conv  # forward and filter gradient alike


def test_tpu_plan_reads_a_saved_program_into_its_record_and_marks_a_reading_the_compiler_disagrees_with():
    import tpu_plan

    traffic = tpu_plan.memory_traffic(HLO_LOOP)
    record = {"chips": 2, "per_chip_batch": 4, "global_batch": 8, "run": {"total_steps": 10},
              "cost_analysis": {"flops": 1e6, "bytes_accessed": float(traffic["total_bytes_loops_once"])}}
    tpu_plan.read_program(record, HLO_LOOP, tpu_plan.CHIPS["v5e"])
    assert record["traffic_check"] == 1.0 and tpu_plan._trusted(record["traffic_check"])
    assert record["hbm_bytes_per_image"] == traffic["hbm_bytes"] / 4
    assert record["roofline"]["step_s"] == max(1e6 / 197e12, traffic["hbm_bytes"] / 819e9, record["ring_bytes"] / 200e9)
    assert record["run"]["hours"] == 10 * record["roofline"]["step_s"] / 3600
    record["cost_analysis"]["bytes_accessed"] /= 2  # the compiler counts half: the reading is not trusted
    assert not tpu_plan._trusted(tpu_plan.read_program(record, HLO_LOOP, tpu_plan.CHIPS["v5e"])["traffic_check"])


HLO_IN_PLACE = """
%update (buffer: f32[1024], piece: f32[16], at: s32[]) -> f32[1024] {
  %buffer = f32[1024]{0} parameter(0)
  %piece = f32[16]{0} parameter(1)
  %at = s32[] parameter(2)
  ROOT %dus = f32[1024]{0} dynamic-update-slice(%buffer, %piece, %at)
}

%carry (x: f32[1024], y: f32[16]) -> (f32[16], f32[1024]) {
  %x = f32[1024]{0} parameter(0)
  %y = f32[16]{0} parameter(1)
  %n = f32[16]{0} negate(%y)
  ROOT %t = (f32[16]{0}, f32[1024]{0}) tuple(%n, %x)
}

ENTRY %main (b: f32[1024], p: f32[16], i: s32[]) -> f32[16] {
  %b = f32[1024]{0} parameter(0)
  %p = f32[16]{0} parameter(1)
  %i = s32[] parameter(2)
  %u = f32[1024]{0} fusion(%b, %p, %i), kind=kLoop, calls=%update
  %c = (f32[16]{0}, f32[1024]{0}) fusion(%u, %p), kind=kLoop, calls=%carry
  ROOT %r = f32[16]{0} get-tuple-element(%c), index=0
}
"""


def test_tpu_plan_counts_an_in_place_update_by_its_slice_and_a_passed_through_buffer_not_at_all():
    import tpu_plan

    traffic = tpu_plan.memory_traffic(HLO_IN_PLACE)
    update = 16 * 4 + 16 * 4 + 4  # the piece read and written, the index read
    carry = 16 * 4 + 16 * 4  # y read, n written; the 1024-element buffer only passes through
    assert traffic["hbm_bytes"] == update + carry


def test_deploy_latency_times_back_to_back_calls_and_renders_both_measures(tmp_path):
    import deploy_latency

    calls_made = {"a": 0, "b": 0}

    def call(name):
        calls_made[name] += 1

    back = deploy_latency.back_to_back_latency({n: (lambda n=n: call(n)) for n in calls_made}, rounds=2, per_round=3)
    assert calls_made == {"a": 2 * (1 + 3), "b": 2 * (1 + 3)}  # one untimed call per round each
    assert set(back) == {"a", "b"} and all(t >= 0 for t in back.values())

    def stats(ms, back_ms=None, batch=1):
        out = {"median_s": ms / 1e3, "images_per_s": batch * 1e3 / ms, "threads": 2, "file_mib": 1.0,
               "max_abs_error_vs_jax": 1e-6, "logit_scale": 5.0}
        return {**out, "back_to_back_median_s": back_ms / 1e3} if back_ms else out

    results = {"machine": {"cpu": "CPU", "usable_cores": 2, "memory_gib": 1, "platform": "p"},
               "command": "python experiments/deploy_latency.py", "date": "d", "versions": {"jax": "0"},
               "load_average_start": [0, 0, 0], "load_average_end": [0, 0, 0], "image_size": 224,
               "variants": {"S": {"1": {r: stats(10.0 + i, 5.0 + i) for i, r in enumerate(deploy_latency.RUNTIMES)},
                                  "32": {r: stats(300.0, batch=32) for r in deploy_latency.RUNTIMES}}}}
    text = deploy_latency.markdown(results)
    assert "| SwiftFormer-S | litert | 12.0 | 7.0 | 106.7 |" in text and "litert-int8" in text
    deploy_latency.plot(results, tmp_path / "deploy.png")
    assert (tmp_path / "deploy.png").stat().st_size > 0
