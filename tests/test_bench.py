"""`pathgeom bench` end to end at test sizes, and the cache flush of its CPU timing."""

import json
import subprocess
import sys

import torch

from pathgeom_fast import bench


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
        assert fused, case
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
