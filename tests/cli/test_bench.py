"""`pathgeom bench` end to end at test sizes, and the cache flush of its CPU timing."""

import json
import os
import subprocess
import sys

import pytest
import torch

import pathgeom_fast as pg
from pathgeom_fast import bench, cli


def test_bench_cli_runs_every_case_and_checks_the_fused_op(tmp_path):
    """The CLI's whole table at small sizes, in a fresh process (the memory pass changes the
    allocator's settings): every case has its probe and a fused row within 1e-6 of the fp64
    reference, with positive times and fractions of the probe, and the JSON has them all."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "pathgeom_fast.cli", "bench", "--device", "cpu", "--size", "30000",
         "--small-n", "40", "--multi-size", "20000", "--multi-k", "3", "--repeats", "2", "--no-compile",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert cases == {"large_fp32", "large_bf16g_fp32", "small_40_fp32",
                     "multi_k3_fp32", "gram_k2_fp32"}
    for case in cases:
        mine = [r for r in rows if r["case"] == case]
        assert any(r["method"] == "probe" and r["ms"] > 0 for r in mine), case
        fused = [r for r in mine if r["method"].startswith("fused") and "error" not in r]
        assert fused and any(r["method"].startswith("fused_torch") for r in fused), case
        for r in fused:
            assert r["rel_err"] <= 1e-6 and r["ms"] > 0 and r["frac_probe"] > 0, r
    assert "small_40_fp32" in run.stdout and "of probe" in run.stdout


def test_cache_flush_size_follows_the_cache_and_the_inputs(monkeypatch):
    """Twice the last-level cache, at most four times the inputs (test sizes), at most 1 GiB;
    nothing on CUDA or where the cache size is unknown."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 1 << 20)
    assert bench.CacheFlush(cpu, 10**9).buf.numel() * 4 == 2 << 20
    assert bench.CacheFlush(cpu, 1000).buf.numel() * 4 == 4000
    flush = bench.CacheFlush(cpu, 1000)
    flush()  # a read, no error
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 1 << 40)
    assert bench.CacheFlush(cpu, 10**12).buf.numel() * 4 == 1 << 30
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 0)
    assert bench.CacheFlush(cpu, 10**9).buf is None
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 1 << 20)
    assert bench.CacheFlush(torch.device("cuda"), 10**9).buf is None


def test_last_level_cache_bytes_reads_sysfs_sizes(monkeypatch, tmp_path):
    """The largest of the cpu0 cache sizes, with K/M/G suffixes."""
    for i, text in enumerate(["48K", "2048K", "300M", "16"]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "size").write_text(text + "\n")
    real_glob = bench.glob.glob
    monkeypatch.setattr(bench.glob, "glob", lambda pattern: real_glob(str(tmp_path / "index*" / "size")))
    assert bench.last_level_cache_bytes() == 300 << 20


def test_time_interleaved_gives_fast_calls_more_rounds_and_flushes_before_each():
    """``repeats`` timed calls at least (after one warm-up); a fast call gets as many as fit in
    the budget, up to ``max_samples``; the flush runs before every timed call."""
    import time

    counts = {"slow": 0, "fast": 0, "flush": 0}

    def slow():
        counts["slow"] += 1
        time.sleep(0.02)

    def fast():
        counts["fast"] += 1

    def flush():
        counts["flush"] += 1

    t = bench.time_interleaved({"slow": (slow, ()), "fast": (fast, ())}, torch.device("cpu"), repeats=3,
                               flush=flush, budget_s=0.01, max_samples=9)
    assert counts == {"slow": 1 + 3, "fast": 1 + 9, "flush": 3 + 9}
    assert t["slow"] >= 0.02 > t["fast"]


def test_quick_preset_fills_only_the_sizes_left_unset():
    parse = lambda *a: bench.resolve_preset(cli.build_parser().parse_args(["bench", *a]))
    args = parse()
    assert (args.size, args.small_n, args.multi_k, args.multi_size, args.repeats) == (10**8, 10_000, 8, 2 * 10**7, 5)
    assert not args.no_compile and not args.quick
    args = parse("--quick")
    assert (args.size, args.small_n, args.multi_k, args.multi_size, args.repeats) == (5 * 10**6, 2000, 4, 10**6, 3)
    assert args.no_compile  # torch.compile's first call alone takes longer than the quick run
    args = parse("--quick", "--size", "5000", "--repeats", "7")
    assert (args.size, args.small_n, args.repeats) == (5000, 2000, 7)


def test_help_states_the_cost_of_the_default_and_quick_runs():
    res = subprocess.run([sys.executable, "-m", "pathgeom_fast.cli", "bench", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert f"the default run takes {bench.COST['default']}" in text and f"--quick takes {bench.COST['quick']}" in text


def test_quick_run_at_test_sizes_times_the_torch_backend_beside_the_loop(tmp_path):
    """--quick with test sizes: on the CPU every case has the pure-torch backend's row (within
    1e-6 of fp64) beside the per-tensor loop (and the compiled kernel where it is built), the
    lines under the table give their ratios, the JSON records the preset and the backends that
    ran, and the progress goes to stderr."""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "pathgeom_fast.cli", "bench", "--quick", "--device", "cpu", "--size", "30000",
         "--small-n", "40", "--multi-size", "20000", "--multi-k", "3", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    env, rows = data["environment"], data["rows"]
    assert env["preset"] == "quick" and env["seconds"] > 0
    compiled = ["cpu"] if pg.extension_available() else []
    assert list(env["backends"]) == compiled + ["torch"]
    methods = {(r["case"], r["method"]) for r in rows if "ms" in r}
    suffix = {"large_fp32": "", "large_bf16g_fp32": "", "small_40_fp32": "", "multi_k3_fp32": "_multi", "gram_k2_fp32": "_gram"}
    for case, sfx in suffix.items():
        assert (case, "loop") in methods and (case, "probe") in methods, case
        for b in compiled + ["torch"]:
            assert (case, f"fused_{b}{sfx}") in methods, (case, b)
        assert not any(m.startswith("compiled") for c, m in methods if c == case)  # --quick: no torch.compile
    for r in rows:
        if r["method"].startswith("fused_torch"):
            assert r["rel_err"] <= 1e-6 and r["ms"] > 0 and r["extra_mb"] is not None, r
    timed = next(line for line in run.stdout.splitlines() if line.startswith("backends timed: "))
    assert [part.split(" (")[0] for part in timed[len("backends timed: "):].split("), ")] == compiled + ["torch"]
    lines = [line for line in run.stdout.splitlines() if line.startswith("torch backend, ")]
    assert len(lines) == len(suffix)
    assert all("x the speed of the per-tensor loop" in line and "MB extra" in line for line in lines)
    if compiled:
        assert all("x the time of the compiled kernel" in line for line in lines)
    assert "large_fp32: " in run.stderr and "steps" in run.stderr  # the progress bar
    quiet = subprocess.run(
        [sys.executable, "-m", "pathgeom_fast.cli", "bench", "--quick", "--device", "cpu", "--size", "3000",
         "--cases", "large_fp32", "--repeats", "1", "--no-progress", "--json", ""],
        capture_output=True, text=True, timeout=600,
    )
    assert quiet.returncode == 0 and "steps" not in quiet.stderr, quiet.stderr


def test_torch_backend_lines_compare_within_each_case():
    rows = [
        {"case": "c", "method": "loop", "ms": 30.0},
        {"case": "c", "method": "fused_cpu", "ms": 5.0},
        {"case": "c", "method": "fused_torch", "ms": 20.0, "extra_mb": 2.5},
        {"case": "g", "method": "loop", "ms": 10.0},
        {"case": "g", "method": "fused_torch_gram", "ms": 40.0, "extra_mb": None},
        {"case": "n", "method": "loop", "ms": 10.0},
    ]
    assert bench.torch_backend_lines(rows) == [
        "torch backend, c: 20.0 ms, 1.50x the speed of the per-tensor loop (30.0 ms), 4.0x the time of the compiled "
        "kernel (5.0 ms), 2.5 MB extra",
        "torch backend, g: 40.0 ms, 0.25x the speed of the per-tensor loop (10.0 ms)",
    ]


@pytest.mark.parametrize("extension", [True, False])
def test_default_backends_always_time_the_torch_fallback_on_cpu(monkeypatch, extension):
    monkeypatch.setattr(bench.pg, "extension_available", lambda: extension)
    assert bench.default_backends(torch.device("cpu")) == (["cpu", "torch"] if extension else ["torch"])
    assert bench.default_backends(torch.device("cuda")) == (["cuda", "triton"] if extension else ["triton"])


def test_bench_host_case_rows(tmp_path):
    """`pathgeom bench --cases host`: rows host_cuda (with the extension) and host_triton for
    10^2 and 10^4 tensors laid out like device tensors (and 10^4 plain CPU tensors), with
    positive times and ns per tensor = ms / tensors; the table's header is printed, and no
    timed case runs beside it."""
    out = tmp_path / "host.json"
    run = subprocess.run(
        [sys.executable, "-m", "pathgeom_fast.cli", "bench", "--device", "cpu", "--cases", "host",
         "--repeats", "2", "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    methods = {"host_triton"} | ({"host_cuda"} if pg.extension_available() else set())
    expected = {(m, t, d) for m in methods for t, d in bench.HOST_CASES}
    assert {(r["method"], r["tensors"], r["data"]) for r in rows} == expected
    assert {(t, d) for t, d in bench.HOST_CASES} >= {(t, "pooled") for t in bench.HOST_TENSORS}
    for r in rows:
        assert r["ms"] > 0 and r["ms_cold"] > 0
        assert abs(r["ns_per_tensor"] - r["ms"] * 1e6 / r["tensors"]) <= 1e-6 * r["ns_per_tensor"]
    assert "ns/tensor" in run.stdout and "of probe" not in run.stdout


def test_host_inputs_pooled_are_separate_tensors_over_one_buffer():
    """The host rows' stand-ins for device tensors: every tensor has a storage of its own (as a
    CUDA tensor does), their data are consecutive slices of one buffer per list, no two lists
    share data, and the op reads them right (against an fp64 sum written out here)."""
    g, x, r = bench.host_inputs(50, 40)
    for lst in (g, x, r):
        storages = {t.untyped_storage()._cdata for t in lst}
        assert len(storages) == len(lst)
        ptrs = [t.data_ptr() for t in lst]
        assert all(b - a == 40 * 4 for a, b in zip(ptrs, ptrs[1:]))
    assert not torch.equal(g[0], x[0]) and not torch.equal(x[0], r[0])
    gd = torch.cat([t.double() for t in g])
    d = torch.cat([t.double() for t in x]) - torch.cat([t.double() for t in r])
    want = torch.stack([(gd * d).sum(), (gd * gd).sum(), (d * d).sum()])
    got = pg.secant_stats(g, x, r).double().reshape(-1)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want[1:].prod().sqrt()))
    with pytest.raises(ValueError, match="data must be 'pooled' or 'heap'"):
        bench.host_inputs(2, 4, "device")


def test_host_work_checks_inputs_like_a_call():
    """The measured host work is the real one: bad input raises the op's own message."""
    from pathgeom_fast import _ext, triton_kernels

    x = [torch.randn(5), torch.randn(7)]
    g = [torch.randn(5), torch.randn(6)]
    if pg.extension_available():
        with pytest.raises(ValueError, match=r"index 1: grads\[1\] has shape \[6\]"):
            _ext._C.cuda_host_work(g, x, [t.clone() for t in x], 1, False)
        with pytest.raises(ValueError, match=r"index 1: grads\[1\] has shape \[6\]"):
            triton_kernels.host_work(g, x, [t.clone() for t in x])


def test_gpu_end_to_end_script_runs_tiny_on_cpu(tmp_path):
    """bench/gpu_e2e.py (the GPU script's end-to-end step) at its tiny size on the CPU: three
    modes timed, and the measurer of each recorded the rows of exactly its measured steps (a
    gradient and an update row per step divisible by `every`, warm-up steps included)."""
    out = tmp_path / "e2e.json"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "gpu_e2e.py")
    run = subprocess.run([sys.executable, script, "--device", "cpu", "--size", "tiny", "--steps", "4", "--block", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    steps = 5 + 4  # warm-up and timed steps of each mode
    assert res["steps_per_mode"] == 4 and set(res["median_step_ms"]) == {"none", "every_10", "every_1"}
    assert all(v > 0 for v in res["median_step_ms"].values())
    assert res["rows_recorded"] == {"every_10": 2 * len(range(0, steps, 10)), "every_1": 2 * steps}
    assert "every_1" in run.stdout and "ms per step" in run.stdout
