"""Smoke tests of the experiment scripts with tiny settings (seconds, not the real measurements).

They check that the scripts run end to end and write their JSON, markdown and PNG, that bad flags
fail with a clear message, that the exponent fit is right on exact power laws, and that the
profiler's accounting of thunk and idle time adds up, and that the timing scripts make their process
settings (`script_setup.prepare`) before jax or torch is imported.
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
import profile_step  # noqa: E402


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
    benchmark.main(["--variants", "S", "--tag", "s", *common])
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
    assert "| train | jax-f32 (counted, not timed) | 2 |" in table


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


def test_profile_step_tiny_run_lists_thunks(capsys):
    profile_step.main(["--variant", "XS", "--batch", "2", "--image-size", "32", "--warmup", "1",
                       "--steps", "1", "--top", "3"])
    out = capsys.readouterr().out
    assert "| thunk kind |" in out and "| top thunk" in out
    assert "`dot" in out  # the matmuls are found and named


def test_profile_idle_time_goes_to_the_thunk_before_it_and_skips_dispatches():
    events = [("dot.1", 0, 10), ("fusion.2", 30, 40), ("fusion.3", 35, 50), ("fusion.4", 100, 110)]
    idle = profile_step.idle_after(events, dispatches=[])
    assert idle == {"dot.1": 20 / 1e6, "fusion.3": 50 / 1e6}
    # A dispatch inside the last gap: that gap lies between two calls.
    assert profile_step.idle_after(events, dispatches=[80]) == {"dot.1": 20 / 1e6}


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


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="reads Linux's per-thread records")
def test_idle_latency_tiny_run_pins_xla_workers_and_puts_them_back():
    import os

    import idle_latency
    result = idle_latency.main(["--variant", "XS", "--image-size", "32", "--pauses", "0,0.05", "--calls", "2",
                                "--torch"])
    cores = sorted(os.sched_getaffinity(0))
    workers = idle_latency.xla_worker_threads()
    assert result["workers"] == len(workers) >= 1
    assert result["pinned_affinities"] == [[cores[i % len(cores)]] for i in range(len(workers))]
    assert all(sorted(os.sched_getaffinity(t)) == cores for t in workers)  # unpinned again
    for key in ("jax", "jax_pinned", "jax_unpinned_again", "torch_eager"):
        assert [r["pause_s"] for r in result[key]] == [0.0, 0.05]
        assert all(0 < r["min_ms"] <= r["median_ms"] for r in result[key])
    assert all(r["voluntary_per_call"] >= 0 and r["involuntary_per_call"] >= 0 for r in result["jax"])
    spin = result["torch_spin"]
    assert [r["after_s"] for r in spin] == idle_latency.SPIN_WINDOWS
    used = [r["other_threads_cpu_ms"] for r in spin]
    assert used == sorted(used) and used[0] >= 0  # CPU time since the return only grows


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="reads Linux's per-thread records")
def test_idle_latency_measures_how_long_other_threads_run_after_a_call():
    import threading
    import time

    import idle_latency
    go, stop, tid = threading.Event(), threading.Event(), []

    def worker():  # spins 60 ms of CPU each time it is woken, then sleeps: as libgomp's workers do after a call
        tid.append(threading.get_native_id())
        while not stop.is_set():
            go.wait()
            go.clear()
            end = time.thread_time() + 0.06  # CPU time, so a busy machine (pytest -n auto) only stretches it
            while time.thread_time() < end:
                pass

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while not tid:
        time.sleep(0.001)
    try:
        rows = idle_latency.spin_after_call(go.set, tid, [0.005, 0.5], calls=1)  # the call returns at once
    finally:
        stop.set()
        go.set()
        thread.join()
    early, late = (r["other_threads_cpu_ms"] for r in rows)
    assert [r["after_s"] for r in rows] == [0.005, 0.5]
    assert late >= 40 and late > early  # the ~60 ms the thread ran after the call returned


@pytest.mark.parametrize("text", ["", "0.1,x", "-1"])
def test_idle_latency_bad_pauses_are_named(text):
    import idle_latency
    with pytest.raises(SystemExit, match="--pauses"):
        idle_latency.parse_pauses(text)


def test_time_step_tiny_run():
    import time_step
    result = time_step.main(["--variant", "XS", "--batch", "2", "--image-size", "32", "--reps", "2"])
    assert set(result) == {"train", "inference"}
    assert all(r["min_s"] > 0 and r["page_faults_per_call"] >= 0 for r in result.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_shapes_tiny_run(dtype):
    import matmul_shapes
    result = matmul_shapes.main(["--variant", "XS", "--batch", "1", "--image-size", "32", "--reps", "1", "--dtype", dtype])
    assert result["dtype"] == dtype
    assert result["operand_dtypes"] == {"jax": dtype, "torch": f"torch.{dtype}"}
    assert len(result["rows"]) == 4 * 2 * 3  # stages x (C -> 4C, 4C -> C) x (forward, two gradients)
    assert result["rows"][0][1] == "[64, 48] -> 192"  # 32 px / 4 = 8 x 8 pixels in stage 0
    assert result["totals_s"]["jax"] > 0 and result["totals_s"]["torch"] > 0


def test_compare_blocks_tiny_run():
    import compare_blocks
    result = compare_blocks.main(["--variant", "XS", "--batch", "2", "--image-size", "32", "--reps", "1"])
    names = [row[0] for row in result["rows"]]
    # XS: stem, 4 stages x (ConvEncoder, SwiftFormerEncoder), 3 embeddings, the total, 2 whole-model rows
    assert names[0] == "stem" and len(names) == 1 + 4 * 2 + 3 + 1 + 2
    assert names[-2:] == ["whole model: forward + loss (train mode)", "whole model: forward + backward"]
    counts = {row[0]: row[1] for row in result["rows"]}
    assert counts["stage 2 ConvEncoder"] == 5  # XS depths (3, 3, 6, 4): five ConvEncoders, one encoder
    weighted = sum(row[1] * row[2] for row in result["rows"][: 1 + 4 * 2 + 3])
    assert result["totals_s"]["jax"] == pytest.approx(weighted)
    assert all(row[2] > 0 and row[3] > 0 for row in result["rows"])


def test_compare_blocks_stage_programs_add_up_to_their_total():
    import compare_blocks
    result = compare_blocks.main(["--variant", "XS", "--batch", "2", "--image-size", "32", "--reps", "1",
                                  "--skip-whole-model", "--stages"])
    names = [row[0] for row in result["rows"]]
    stage_rows = [row for row in result["rows"] if row[0].startswith("stage program")]
    assert [row[0] for row in stage_rows] == [
        "stage program: stage 0 (3 blocks)", "stage program: embedding 0 -> 1 + stage 1 (3 blocks)",
        "stage program: embedding 1 -> 2 + stage 2 (6 blocks)", "stage program: embedding 2 -> 3 + stage 3 (4 blocks)"]
    assert names[-1] == "total of the stem and the stage programs"
    stem = result["rows"][0]
    for column, framework in ((2, "jax"), (3, "torch")):
        expected = stem[column] + sum(row[column] for row in stage_rows)
        assert result["stage_totals_s"][framework] == pytest.approx(expected)
        assert result["rows"][-1][column] == pytest.approx(expected)
    assert all(row[2] > 0 and row[3] > 0 for row in stage_rows)


def test_component_costs_knocks_out_the_op_while_compiling_only():
    import component_costs
    from swiftformer_jax import ops

    gelu = ops.gelu
    _, without_gelu = component_costs.jax_step("XS", 1, 32, "gelu")
    assert ops.gelu is gelu  # undone after compiling
    _, complete = component_costs.jax_step("XS", 1, 32, None)
    assert " erf(" in complete.as_text() and " erf(" not in without_gelu.as_text()


def test_step_bytes_parses_hlo_shapes_and_groups_by_layer():
    import step_bytes

    assert step_bytes.shape_bytes("f32[2,3]{1,0}") == 24
    assert step_bytes.shape_bytes("(f32[2,3]{1,0}, s32[], bf16[4]{0})") == 24 + 4 + 8
    hlo = """HloModule m

ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %f = f32[8]{0} fusion(%p, %p), kind=kLoop, calls=%c, metadata={op_name="jit(step)/jvp(SwiftFormer)/x/network_2/block_4/mul"}
  ROOT %d = f32[8]{0} dot(%f, %p), metadata={op_name="jit(step)/transpose(jvp(SwiftFormer))/network_0/block_1/pwconv1/dot_general"}
}
"""
    rows = step_bytes.entry_instructions(hlo)
    assert [(r["name"], r["read"], r["written"]) for r in rows] == [("f", 64, 32), ("d", 64, 32)]
    assert step_bytes.group(rows[0]["source"]) == ("forward", "x/network_*/block_*/mul")
    assert step_bytes.group(rows[1]["source"]) == ("backward", "network_*/block_*/pwconv1/dot_general")


def test_step_bytes_tiny_run(capsys):
    import step_bytes
    result = step_bytes.main(["--variant", "XS", "--batch", "2", "--image-size", "32", "--block", "network_0/block_0/"])
    # An upper bound that counts whole operands, close to XLA's own figure for the same program.
    assert 0.7 * result["xla_bytes"] < result["total_bytes"] < 1.5 * result["xla_bytes"]
    assert any(key.startswith("backward ") for key in result["groups"])
    assert any("pwconv1/dot_general" in key for key in result["groups"])
    assert "network_0/block_0/pwconv1/dot_general" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # a --block that names nothing in the program is an error, not an empty table
        step_bytes.main(["--variant", "XS", "--batch", "2", "--image-size", "32", "--block", "network_9/"])
    assert "--block 'network_9/': no instruction's source contains it" in capsys.readouterr().err


# XS, depths (3, 3, 6, 4): 12 ConvEncoders and 4 SwiftFormerEncoders (each a LocalRepresentation, the
# attention and an Mlp); batch norms also in the stem (2), the 3 embeddings and before the heads (1).
@pytest.mark.parametrize("component, replaced", [("gelu", 12 + 4 + 4), ("batch_norm", 12 + 4 + 4 + 2 + 3 + 1),
                                                 ("depthwise", 12 + 4), ("attention", 4)])
def test_component_costs_removes_every_torch_module_of_the_component(component, replaced):
    import component_costs
    import torch_reference_model

    model = torch_reference_model.build("XS")
    assert component_costs.knock_out_torch(model, component) == replaced
    assert not any(component_costs._torch_matches(component, m) for m in model.modules())
    with pytest.raises(RuntimeError, match=f"no PyTorch module matched component '{component}'"):
        component_costs.knock_out_torch(model, component)


def test_component_costs_tiny_run():
    import component_costs
    result = component_costs.main(["--variant", "XS", "--batch", "2", "--image-size", "32", "--reps", "2",
                                   "--components", "depthwise", "--torch", "eager"])
    assert set(result["cost_s"]) == {"jax", "torch-eager"}
    assert set(result["median_s"]) == {"jax/complete", "jax/depthwise", "torch-eager/complete",
                                       "torch-eager/depthwise"}
    for fw in ("jax", "torch-eager"):
        costs = result["cost_s"][fw]
        assert sum(costs.values()) == pytest.approx(result["median_s"][f"{fw}/complete"])


@pytest.mark.parametrize("script, argv, message", [
    ("time_step", ["--variant", "M"], "invalid choice: 'M'"),
    ("matmul_shapes", ["--reps", "0"], "must be >= 1, got 0"),
    ("profile_step", ["--batch", "two"], "expected an integer, got 'two'"),
    ("compare_blocks", ["--reps", "-1"], "must be >= 1, got -1"),
    ("component_costs", ["--components", "gelu,softmax"], "unknown component or PyTorch mode ['softmax']"),
    ("component_costs", ["--torch", "jit"], "unknown component or PyTorch mode ['jit']"),
    ("step_bytes", ["--task", "eval"], "invalid choice: 'eval'"),
])
def test_single_program_scripts_reject_bad_flags(script, argv, message, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.main(argv)
    assert message in capsys.readouterr().err


def test_script_setup_applies_xla_flags_only_to_the_main_program():
    import script_setup

    imported: dict[str, str] = {}
    script_setup.prepare("benchmark", argv=["x"], environ=imported)
    assert imported == {}  # importing a script leaves the process alone

    main: dict[str, str] = {"OMP_WAIT_POLICY": "ACTIVE", "XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    script_setup.prepare("__main__", argv=["x"], environ=main)
    assert main["OMP_WAIT_POLICY"] == "ACTIVE"  # OpenMP's policy is the user's (see script_setup)
    assert main["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_cpu_experimental_ynn_fusion_type=reduce"

    default_ynn: dict[str, str] = {}
    script_setup.prepare("__main__", argv=["x", "--keep-ynn-fusion"], environ=default_ynn)
    assert "XLA_FLAGS" not in default_ynn and "OMP_WAIT_POLICY" not in default_ynn
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in main  # only scripts that share a GPU with torch


def test_script_setup_lets_torch_share_the_gpu_only_when_asked():
    import script_setup

    shared: dict[str, str] = {}
    script_setup.prepare("__main__", argv=["x"], environ=shared, shares_gpu_with_torch=True)
    assert shared["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"

    explicit: dict[str, str] = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    script_setup.prepare("__main__", argv=["x"], environ=explicit, shares_gpu_with_torch=True)
    assert explicit["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"  # an explicit setting wins

    imported: dict[str, str] = {}
    script_setup.prepare("benchmark", argv=["x"], environ=imported, shares_gpu_with_torch=True)
    assert imported == {}  # importing a script leaves the process alone

    import ast

    tree = ast.parse((EXPERIMENTS / "benchmark.py").read_text())
    assert any(isinstance(node, ast.Expr)
               and ast.unparse(node) == "script_setup.prepare(__name__, shares_gpu_with_torch=True)"
               for node in tree.body), "benchmark.py runs torch on the GPU beside JAX: it must ask"


TIMING_SCRIPTS = ("attention_scaling", "benchmark", "compare_blocks", "component_costs", "idle_latency",
                  "matmul_shapes", "profile_step", "step_bytes", "time_step")


@pytest.mark.parametrize("script", TIMING_SCRIPTS)
def test_timing_scripts_prepare_before_importing_jax_or_torch(script):
    import ast

    tree = ast.parse((EXPERIMENTS / f"{script}.py").read_text())
    prepare_line = next(
        node.lineno for node in tree.body
        if isinstance(node, ast.Expr) and ast.unparse(node).startswith("script_setup.prepare(__name__"))
    first_import = min(
        node.lineno for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(name.split(".")[0] in {"jax", "torch", "swiftformer_jax", "benchmark"}
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])))
    assert prepare_line < first_import
