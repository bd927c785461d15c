"""Compiled-kernel checks without a GPU (pathgeom_fast.compile_check), and its PTX parsing.

The check runs in a subprocess with TRITON_INTERPRET removed (conftest sets it, and the
interpreter replaces the kernels). It compiles every Triton specialisation listed by the
compile_specs() of each module holding Triton kernels (triton_kernels, triton_gram) for sm_80
and sm_90 and the CUDA kernels through nvcc, and fails on a compile error, a register spill, a
hot loop without 16-byte loads where they are expected, or a Triton hot loop that exchanges
data between threads (shuffles, barriers, shared memory: column xthr). The table is printed (pytest -s, or in the failure message) and written to
the pytest temporary directory; bench/results/compiled-kernels-*.txt keeps a recorded one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pathgeom_fast import compile_check as cc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def run_check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out_json = tmp_path / "rows.json"
    table = tmp_path / "compiled-kernels.txt"
    res = subprocess.run(
        [sys.executable, "-m", "pathgeom_fast.compile_check", "--json", str(out_json), "--out", str(table), *args],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    print(res.stdout)
    rows = json.loads(out_json.read_text()) if out_json.exists() else []
    return res, rows


@pytest.mark.slow
@pytest.mark.skipif(not _have_triton(), reason="triton is not installed")
def test_triton_kernels_compile_vectorised_without_spills(tmp_path):
    res, rows = run_check(tmp_path, "--no-cuda", "--archs", "80,90")
    assert rows, f"no rows; stderr:\n{res.stderr[-3000:]}"
    bad = [r for r in rows if not r["ok"]]
    assert not bad and res.returncode == 0, "failing rows:\n" + "\n".join(f"{r['kernel']} {r['variant']} sm_{r['arch']}: {r['failures']}" for r in bad) + f"\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
    # what the check must have covered: both specialisations, K = 1 and 8, every shipped dtype, both archs
    partials = [r for r in rows if r["kernel"] == "_partials_kernel"]
    for dt in ("f32 ", "bf16g-f32 ", "f16 ", "f64 "):
        for k in ("K=1 ", "K=8 "):
            for al in ("aligned", "misaligned"):
                for arch in (80, 90):
                    hits = [r for r in partials if r["variant"].startswith(dt + k) and f" {al} " in r["variant"] + " " and r["arch"] == arch]
                    assert hits, (dt, k, al, arch)
    # aligned: every load of the hot loop is a 16-byte load (fp32 and bf16 included); every
    # variant: thread-local hot loop (no shuffle, barrier or shared memory), no spill, no stack
    for r in partials:
        assert r["spill_bytes"] == 0 and r["stack"] == 0 and r["loop_xthread"] == 0 and r["thread_local"], r
        if " aligned" in r["variant"]:
            assert r["loop_loads"] and r["loop_loads16"] == r["loop_loads"], r
    for dt in ("f32 ", "bf16g-f32 ", "f16 ", "f64 "):  # weight decay, both specialisations
        assert len([r for r in partials if r["variant"].startswith(dt + "K=8 wd ")]) == 4, dt
    assert all(r["thread_local"] and r["loop_xthread"] == 0 for r in rows if r["kernel"] == "_segment_sum_kernel")
    assert {r["kernel"] for r in rows} >= {"_partials_kernel", "_segment_sum_kernel", "_gram_partials_kernel"}
    # the Gram kernel: every shipped dtype combination, K = 1, 2, 8, both specialisations, both
    # archs; aligned hot loops of 16-byte loads only; no hot loop exchanges data between threads
    gram = [r for r in rows if r["kernel"] == "_gram_partials_kernel"]
    for dt in ("f32 ", "bf16g-f32 ", "f16 ", "f64 "):
        for k in ("K=1 ", "K=2 ", "K=8 "):
            for al in ("aligned", "misaligned"):
                for arch in (80, 90):
                    hits = [r for r in gram if r["variant"].startswith(dt + k) and f" {al} " in r["variant"] + " " and r["arch"] == arch]
                    assert len(hits) == 1, (dt, k, al, arch)
    for r in gram:
        assert r["spill_bytes"] == 0 and r["stack"] == 0 and r["loop_xthread"] == 0 and r["thread_local"], r
        if " aligned" in r["variant"]:
            assert r["loop_loads"] and r["loop_loads16"] == r["loop_loads"], r


@pytest.mark.slow
@pytest.mark.skipif(cc.find_tool("nvcc") is None, reason="nvcc not found (set CUDA_HOME; /usr/local/cuda is tried)")
def test_cuda_kernels_compile_without_spills(tmp_path):
    res, rows = run_check(tmp_path, "--no-triton", "--archs", "80,90")
    assert rows, f"no rows; stderr:\n{res.stderr[-3000:]}"
    bad = [r for r in rows if not r["ok"]]
    assert not bad and res.returncode == 0, "failing rows:\n" + "\n".join(f"{r['kernel']} {r['variant']} sm_{r['arch']}: {r['failures']}" for r in bad)
    for arch in (80, 90):
        partials = [r for r in rows if r["kernel"] == "partials_kernel" and r["arch"] == arch]
        # every (acc, grad, param, ref) instantiation, for one gradient list and for passes of 8
        assert len(partials) == 128
        assert sum(r["variant"].endswith(",1>") for r in partials) == sum(r["variant"].endswith(",8>") for r in partials) == 64
        fp32_acc = [r for r in partials if not r["variant"].startswith("<f64")]
        # 16-byte loads for every stream of the hot loop: the bf16-gradient and K = 8 variants included
        assert len(fp32_acc) == 54 and all("vector-loop" in r["notes"] for r in fp32_acc)
        assert all(r["loop_loads16"] == r["loop_loads"] for r in fp32_acc if "bf16" in r["variant"] or r["variant"].endswith(",8>"))
        assert {"finalize_total_kernel", "finalize_per_tensor_kernel"} <= {r["kernel"] for r in rows if r["arch"] == arch}


# --------------------------------------------------------------------------------------
# The PTX parsing itself, on hand-written PTX
# --------------------------------------------------------------------------------------

PTX = """
.visible .entry k(
)
{
	ld.global.b64 	%rd1, [%rd2];
$L__BB0_2:
	ld.global.L1::evict_first.L2::cache_hint.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ], %rd9;
	ld.global.v2.b64 	{%rd4, %rd5}, [%rd6];
	ld.global.cs.v4.u32 	{%r5, %r6, %r7, %r8}, [%rd7];
	@%p1 bra 	$L__BB0_2;
$L__BB0_3:
	ld.global.b32 	%r9, [%rd8];
	@%p2 bra 	$L__BB0_3;
	ret;
}
"""


def test_loop_crossthread():
    assert cc.loop_crossthread(cc.ptx_functions(PTX)["k"]) == 0
    ptx = PTX.replace("ld.global.b32 \t%r9, [%rd8];", "shfl.sync.bfly.b32 %r9, %r8, 16, 31, -1;\n\tbar.sync 0;\n\tst.shared.b32 [%r1], %r9;")
    assert cc.loop_crossthread(cc.ptx_functions(ptx)["k"]) == 3
    row = cc.Row("triton", "k", "-", 90, registers=40, spill_bytes=0, stack=0, loop_xthread=3, thread_local=True)
    assert not row.ok and any("between threads" in f for f in row.failures())
    assert cc.Row("triton", "k", "-", 90, registers=40, spill_bytes=0, stack=0, loop_xthread=3).ok  # not expected: shown only
    # Triton specs expect a thread-local hot loop unless they opt out
    spec = {"kernel": "k", "variant": "-", "vector16": False}
    assert cc.spec_row(spec, 90).thread_local and not cc.spec_row({**spec, "thread_local": False}, 90).thread_local
    if _have_triton():
        from pathgeom_fast import triton_gram, triton_kernels

        specs = triton_kernels.compile_specs() + triton_gram.compile_specs()
        assert specs and all(cc.spec_row(s, 90).thread_local for s in specs)


def test_every_triton_module_is_scanned_and_unregistered_kernels_fail():
    assert {"pathgeom_fast.ops.triton_stats", "pathgeom_fast.ops.triton_gram"} <= set(cc.triton_modules())  # where they live since the move
    if not _have_triton():
        pytest.skip("triton is not installed")
    import types

    import triton
    import triton.language as tl

    from pathgeom_fast import triton_gram, triton_kernels

    for mod in (triton_kernels, triton_gram):  # the shipped modules register every kernel they define
        assert cc.registry_errors(mod) == []

    def _new_kernel(x_ptr, N: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, N), 0.0)

    def _helper(x):
        return x

    fake = types.ModuleType("pathgeom_fast.fake_kernels")
    fake._new_kernel = triton.jit(_new_kernel)
    fake._helper = triton.jit(_helper)
    fake._segment_sum_kernel = triton_kernels._segment_sum_kernel  # imported: not its to list
    for f in (fake._new_kernel, fake._helper):
        f.fn.__module__ = fake.__name__
    no_specs = cc.registry_errors(fake)
    assert len(no_specs) == 1 and "no compile_specs()" in no_specs[0].error and not no_specs[0].ok
    fake.compile_specs = lambda: []
    errors = cc.registry_errors(fake)
    assert [(r.kernel, r.ok) for r in errors] == [("_new_kernel", False)] and "fake_kernels.compile_specs()" in errors[0].error
    fake.compile_specs = lambda: [{"kernel": "_new_kernel"}]
    assert cc.registry_errors(fake) == []


def test_load_bytes():
    assert cc.load_bytes(".L1::evict_first.L2::cache_hint.v4.b32") == 16
    assert cc.load_bytes(".v2.b64") == 16
    assert cc.load_bytes(".nc.v4.f32") == 16
    assert cc.load_bytes(".cs.v4.u32") == 16
    assert cc.load_bytes(".v2.b32") == 8
    assert cc.load_bytes(".b16") == 2
    assert cc.load_bytes(".L2::128B.b32") == 4


def test_loop_load_stats_and_ptxas_parsing():
    fns = cc.ptx_functions(PTX)
    assert list(fns) == ["k"]
    total, wide, vector_loop = cc.loop_load_stats(fns["k"])
    assert (total, wide, vector_loop) == (4, 3, True)  # the load before the loops is not counted
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 64 bytes smem\n"
    )
    assert cc.parse_ptxas(log) == {"_Z3fooPf": {"stack": 8, "spill_bytes": 8, "registers": 96, "shared": 64}}
    row = cc.Row("cuda", "k", "-", 90, registers=96, spill_bytes=8, stack=8)
    assert not row.ok and any("spill" in f for f in row.failures())


def test_bytes_in_flight_estimate_by_hand():
    """The KB/SM column: resident threads (registers per warp rounded to 256, 64 warps, 32
    blocks, shared memory with 1 KB reserved per block) x the hot loop's 16-byte loads, checked
    against figures worked out by hand; none for rows without a 16-byte hot loop or registers."""
    # 46 registers -> 1536 per warp -> 42 warps by registers -> 5 blocks of 8 warps -> 1280 threads
    row = cc.Row("cuda", "partials_kernel", "-", 90, registers=46, vector16=True, loop_loads16=3, threads=256, shared=64)
    assert cc.resident_threads(row) == 1280
    assert cc.inflight_bytes(row) == 1280 * 16 * 3
    # 84 registers -> 2816 per warp -> 23 warps -> 2 blocks -> 512 threads; 10 loads -> 80 KB
    row = cc.Row("cuda", "partials_kernel", "-", 90, registers=84, vector16=True, loop_loads16=10, threads=256)
    assert cc.inflight_bytes(row) == 512 * 160
    # 32 registers, 4 warps: the 64-warp limit gives 16 blocks; 40 KB of shared memory per block
    # (41 KB with the reserve) leaves room for 5 on sm_90 (228 KB) and 4 on sm_80 (164 KB)
    row = cc.Row("triton", "k", "-", 90, registers=32, vector16=True, loop_loads16=2, threads=128)
    assert cc.resident_threads(row) == 16 * 128
    row.shared = 40 * 1024
    assert cc.resident_threads(row) == 5 * 128
    row.arch = 80
    assert cc.resident_threads(row) == 4 * 128
    assert cc.inflight_bytes(cc.Row("cuda", "k", "-", 90, registers=40, threads=256, loop_loads16=3)) is None  # no 16-byte loop expected
    assert cc.inflight_bytes(cc.Row("cuda", "k", "-", 90, vector16=True, threads=256, loop_loads16=3)) is None  # registers unknown
    # Little's law: H100 SXM, 3.35 TB/s x 600 ns / 132 SMs
    assert cc.needed_bytes(90) == int(3.35e12 * 600e-9 / 132)
    assert "KB/SM" in cc.format_table([row]) and "needs about" in cc.summary([row])
