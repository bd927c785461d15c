"""Benchmarks: the fused op against what users would write, and against the bandwidth limit.

Baselines (defined once, in :mod:`.bench_baselines`; bench/ suites take them from ``bench.BASELINES``):

* ``naive``: the paper's way: torch.cat of the flattened g, x and x*, then x - x*, a dot and
  two norms (fp32).
* ``loop``: a Python loop of torch.dot per tensor (fp32).
* ``foreach``: torch._foreach_sub + torch._foreach_norm + per-tensor dots.
* ``compiled``: torch.compile of the loop (large lists only: the graph of 10^4 tensors is
  too big to compile in reasonable time).
* ``probe``: the read-bandwidth limit: the faster of one ``sum`` and one ``dot`` over a single
  contiguous buffer of the same number of bytes as g, x and x* together.

The fused rows are named by the backend that ran (``fused_cpu``, ``fused_torch``, ...), never
"auto". On the CPU the pure-torch backend (what an install without a working compiler runs) is
always timed beside the compiled kernel, so that its ratio to the per-tensor ``loop`` and to
the compiled kernel is printed from one run (the lines under the table).

The Gram case (``pg.secant_gram`` of K vector lists and x - x*) has its own baselines:
``naive`` stacks the flattened [K + 1, D] fp32 rows and takes V V^T; ``loop`` does the same
per tensor.

Every method is first compared with the fp64 reference: the fused op must be within the
DESIGN tolerance (1e-6), baselines report their error (``rel err``; fp32 norms of 10^8
elements are off by percents). Reported: median time, effective GB/s (bytes of g, x, x* /
time), speed-up against naive and against the best baseline, fraction of the probe reached
(probe time / time), and the peak extra memory (CUDA: allocator peak; CPU: peak resident set, reset through
/proc/self/clear_refs, with glibc's mmap threshold pinned to 64 KiB so that every temporary of 64 KiB or more
is fresh pages that count; torch has no CPU allocator statistics, and tracemalloc does not see its memory).

Timing: medians over rounds of one call of each method (after a warm-up round): ``--repeats``
rounds for every method, and more for the fast ones (the probe, the fused op) as long as they
fit in 0.3 s each, up to 41, alternating still (``time_interleaved``). On the CPU each timed
call is preceded by an untimed read of a buffer larger than the last-level cache
(``CacheFlush``), so that every method, the probe included, reads its inputs from memory.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import time
from collections.abc import Callable

import torch

import pathgeom_fast as pg

from .bench_baselines import (  # noqa: F401  (re-exported: the bench/ suites and tests read them as bench.<name>)
    BASELINES, fused, fused_gram, fused_multi, gram_error, gram_loop, gram_naive, host_inputs, make_inputs,
    model_like_sizes, multi_loop_of, nbytes, probe_calls, rel_error,
)
from .bench_timing import (  # noqa: F401  (re-exported, as above)
    Progress, peak_extra_bytes, pin_mmap_threshold, time_interleaved, time_once,
)

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------
# The cache flush before each timed CPU call
# ------------------------------------------------------------------------------------------


def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs), or 0 when it cannot be read."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return best


class CacheFlush:
    """Reads a buffer of twice the last-level cache before each timed CPU call, so that every
    method reads its inputs from memory: otherwise what a method finds in the cache depends on
    the calls before it (the fused op ran right after ``foreach``, which had just read the same
    tensors; the probe's buffer stayed partly in a 300 MB L3 between rounds), which moved the
    fraction of the probe by +-0.05 from run to run. A no-op on CUDA (there the inputs are
    larger than L2) and where the cache size is unknown."""

    def __init__(self, device, data_bytes: int):
        size = last_level_cache_bytes() if device.type == "cpu" else 0
        # twice the cache, or four times the inputs where they are smaller (test sizes)
        flush_bytes = min(2 * size, 4 * data_bytes, 1 << 30)
        self.buf = torch.ones(flush_bytes // 4) if size and flush_bytes >= 4 else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.sum()


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------


def bench_case(name, inputs, methods: dict[str, Callable], device, repeats: int, multi: bool = False,
               gram: bool = False, progress: Progress | None = None) -> list[dict]:
    """Timings of one case (probe first); memory comes later, from ``memory_case``."""
    progress = progress or Progress(False)
    grads, params, refs = inputs
    total = nbytes(grads, params, refs)
    error = gram_error if gram else rel_error
    progress.stage(f"{name}: fp64 reference")
    if gram:
        ref = pg.reference_secant_gram(grads, params, refs)
    elif multi:
        ref = torch.stack([pg.reference_secant_stats(g, params, refs) for g in grads])
    else:
        ref = pg.reference_secant_stats(grads, params, refs)
    calls = probe_calls(total, device)
    rows = [{"case": name, "method": "probe", "extra_mb": 0.0}]
    progress.step()
    for mname, fn in methods.items():
        progress.stage(f"{name}: checking {mname}")
        progress.step()
        try:
            err = error(fn(grads, params, refs), ref)
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            rows.append({"case": name, "method": mname, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            continue
        # the fused op must meet the DESIGN tolerance; baselines report their error
        if mname.startswith("fused") and not err <= 1e-6:
            raise AssertionError(f"{name}/{mname}: error {err:.2e} against the fp64 reference exceeds 1e-6")
        rows.append({"case": name, "method": mname, "rel_err": err})
        calls[mname] = (fn, (grads, params, refs))
    progress.stage(f"{name}: timing")
    t = time_interleaved(calls, device, repeats, flush=CacheFlush(device, total), budget_s=0.3, progress=progress)
    t_probe = min(t.pop("probe_sum"), t.pop("probe_dot"))
    del calls
    for r in rows:
        if r["method"] == "probe":
            r["ms"] = t_probe * 1e3
        elif "error" not in r:
            r["ms"] = t[r["method"]] * 1e3
    base = {r["method"]: r["ms"] for r in rows if "ms" in r and r["method"] != "probe" and not r["method"].startswith("fused")}
    best = min(base.values()) if base else None
    for r in rows:
        if "ms" not in r:
            continue
        r["bytes"] = total
        r["gbps"] = total / r["ms"] / 1e6
        r["frac_probe"] = t_probe * 1e3 / r["ms"]
        r["x_naive"] = base["naive"] / r["ms"] if "naive" in base else None
        r["x_best_baseline"] = best / r["ms"] if best else None
    return rows


def memory_case(rows: list[dict], inputs, methods: dict[str, Callable], device, progress: Progress | None = None) -> None:
    """Fill ``extra_mb`` (peak extra memory of one call) into the timing rows of a case."""
    progress = progress or Progress(False)
    for r in rows:
        fn = methods.get(r["method"])
        if fn is not None and "ms" in r:
            progress.stage(f"{r['case']}: memory of {r['method']}")
            extra = peak_extra_bytes(fn, inputs, device)
            r["extra_mb"] = None if extra is None else extra / 1e6
            progress.step()


def format_rows(rows: list[dict]) -> str:
    head = f"{'case':<22}{'method':<16}{'ms':>10}{'GB/s':>9}{'of probe':>10}{'x naive':>9}{'x best':>8}{'extra MB':>10}{'rel err':>10}"
    out = [head, "-" * len(head)]
    f = lambda v, w, p: f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"
    for r in rows:
        if "error" in r:
            out.append(f"{r['case']:<22}{r['method']:<16}  {r['error']}")
            continue
        out.append(
            f"{r['case']:<22}{r['method']:<16}{f(r['ms'], 10, 2)}{f(r['gbps'], 9, 1)}{f(r['frac_probe'], 10, 2)}"
            f"{f(r['x_naive'], 9, 1)}{f(r['x_best_baseline'], 8, 2)}{f(r['extra_mb'], 10, 1)}"
            + (f"{r['rel_err']:>10.1e}" if r.get("rel_err") is not None else f"{'-':>10}")
        )
    return "\n".join(out)


def environment(device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "extension": pg.extension_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        model = platform.processor()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"{model}, {os.cpu_count()} cores"
    return info


def default_backends(dev: torch.device) -> list[str]:
    """The fused backends timed by default: the GPU kernels on CUDA; on the CPU the compiled
    kernel where it is built and always the pure-torch backend (the fallback's cost)."""
    if dev.type == "cuda":
        return ["cuda", "triton"] if pg.extension_available() else ["triton"]
    return (["cpu"] if pg.extension_available() else []) + ["torch"]


def run(device: str = "cpu", size: int = 10**8, small_n: int = 10_000, multi_k: int = 8, multi_size: int = 2 * 10**7,
        repeats: int = 5, backends=None, compile_baseline: bool = True, cases=None, gram_k: int = 2,
        progress: bool = False) -> tuple[list[dict], dict]:
    dev = torch.device(device)
    if backends is None:
        backends = default_backends(dev)
    f32, mixed = (torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32)
    singles = {f"fused_{b}": fused(b) for b in backends}
    all_cases = {
        "large_fp32": (model_like_sizes(size), f32, 1),
        "large_bf16g_fp32": (model_like_sizes(size), mixed, 1),
        f"small_{small_n // 1000}k_fp32" if small_n % 1000 == 0 else f"small_{small_n}_fp32": ([1000] * small_n, f32, 1),
        f"multi_k{multi_k}_fp32": (model_like_sizes(multi_size), f32, multi_k),
        f"gram_k{gram_k}_fp32": (model_like_sizes(multi_size), f32, gram_k),
    }
    def methods_for(name, K):
        if name.startswith("gram"):
            # the Gram op has no CUDA kernel: Triton serves CUDA tensors
            gram_backends = [b for b in backends if b != "cuda"] or ["triton"]
            return {"naive": gram_naive, "loop": gram_loop, **{f"fused_{b}_gram": fused_gram(b) for b in gram_backends}}
        base = dict(BASELINES)
        if not compile_baseline or name.startswith("small"):
            base.pop("compiled")
        if K == 1:
            return {**base, **singles}
        methods = {k: multi_loop_of(v) for k, v in base.items() if k in ("naive", "loop")}
        methods.update({f"fused_{b}_multi": fused_multi(b) for b in backends})
        methods.update({f"fused_{b}_1by1": multi_loop_of(fused(b)) for b in backends})
        return methods

    selected = {n: c for n, c in all_cases.items() if not cases or any(n.startswith(p) for p in cases)}
    host_rows = []
    if wants_host(cases):
        bar = Progress(progress)
        try:
            for T, data in HOST_CASES:
                bar.stage(host_case_name(T, data))
                host_rows += host_case(T, repeats, data=data, progress=bar)
        finally:
            bar.close()
    bar = Progress(progress)
    bar.add(sum(2 + len(methods_for(n, K)) for n, (_, _, K) in selected.items()))  # inputs, reference, checks
    per_case = {}
    try:
        for name, (sizes, dtypes, K) in selected.items():  # timings first, in normal conditions
            bar.stage(f"{name}: inputs")
            inputs = make_inputs(sizes, dtypes, dev, K=K)
            bar.step()
            per_case[name] = bench_case(name, inputs, methods_for(name, K), dev, repeats, multi=K > 1,
                                        gram=name.startswith("gram"), progress=bar)
            del inputs
        if dev.type == "cpu":
            pin_mmap_threshold()
        bar.add(sum(1 + sum("ms" in r and r["method"] != "probe" for r in per_case[n]) for n in selected))
        for name, (sizes, dtypes, K) in selected.items():  # then the memory pass
            bar.stage(f"{name}: inputs (memory pass)")
            inputs = make_inputs(sizes, dtypes, dev, K=K)
            bar.step()
            memory_case(per_case[name], inputs, methods_for(name, K), dev, progress=bar)
            del inputs
    finally:
        bar.close()
    rows = host_rows + [r for name in selected for r in per_case[name]]
    env = environment(dev)
    env["backends"] = {b: BACKEND_NAMES.get(b, b) for b in backends}
    if not pg.extension_available():
        env["extension_error"] = pg.extension_error()
    return rows, env


# ------------------------------------------------------------------------------------------
# Host work of the GPU backends (`--cases host`)
# ------------------------------------------------------------------------------------------

HOST_TENSORS = (100, 10_000)
# (tensors, where their data lives): the device-like layout for each count, and the CPU-heap
# layout once, for 10^4 tensors, to show what it costs (see host_inputs).
HOST_CASES = tuple((T, "pooled") for T in HOST_TENSORS) + ((HOST_TENSORS[-1], "heap"),)


def host_case_name(tensors: int, data: str) -> str:
    return f"host_{tensors}" + ("" if data == "pooled" else f"_{data}")


def host_methods() -> dict[str, Callable]:
    """The host work of each GPU backend's call, everything up to the kernel launches, on CPU
    tensors: ``host_cuda`` is ``_C.cuda_host_work`` (borrowing the lists, the parallel check
    pass, the plan and the device table the CUDA kernels read; the copy and the launches are
    left out), ``host_triton`` is ``triton_kernels.host_work`` (the same checks, the cached plan
    and argument buffer; Triton's own launcher, a constant cost per launch, is left out)."""
    from ..ops import extension as _ext
    from ..ops import triton_stats as triton_kernels

    methods = {}
    if pg.extension_available():
        methods["host_cuda"] = lambda g, x, r: _ext._C.cuda_host_work(g, x, r, 1, False)
    methods["host_triton"] = lambda g, x, r: triton_kernels.host_work(g, x, r)
    return methods


def host_case(tensors: int, repeats: int, numel: int = 1000, data: str = "pooled", progress=None) -> list[dict]:
    """Rows of the host work for ``tensors`` fp32 tensors of ``numel`` elements per list (K = 1),
    laid out as ``data`` says (see host_inputs): median ms and ns per tensor (per position: one
    gradient, param and x* each), warm (calls back to back: the metadata in cache, as for a call
    right after the optimizer step touched it) and cold (after reading a buffer of twice the
    last-level cache)."""
    cpu = torch.device("cpu")
    g, x, r = host_inputs(tensors, numel, data)
    calls = {name: (fn, (g, x, r)) for name, fn in host_methods().items()}
    warm = time_interleaved(calls, cpu, repeats, budget_s=0.3, progress=progress)
    cold = time_interleaved(calls, cpu, repeats, flush=CacheFlush(cpu, 1 << 40), budget_s=0.3, progress=progress)
    return [{"case": host_case_name(tensors, data), "method": name, "tensors": tensors, "data": data, "K": 1,
             "ms": warm[name] * 1e3,
             "ns_per_tensor": warm[name] / tensors * 1e9, "ms_cold": cold[name] * 1e3,
             "ns_per_tensor_cold": cold[name] / tensors * 1e9, "threads": torch.get_num_threads()}
            for name in calls]


def wants_host(cases) -> bool:
    """`--cases host` (or a prefix of it) asks for the host rows; they are not in the default run."""
    return bool(cases) and any("host".startswith(p) for p in cases if p)


def format_host_rows(rows: list[dict]) -> str:
    head = f"{'case':<18}{'method':<14}{'tensors':>8}{'ms':>9}{'ns/tensor':>11}{'cold ms':>9}{'cold ns/t':>11}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['case']:<18}{r['method']:<14}{r['tensors']:>8}{r['ms']:>9.3f}{r['ns_per_tensor']:>11.1f}"
                   f"{r['ms_cold']:>9.3f}{r['ns_per_tensor_cold']:>11.1f}")
    return "\n".join(out)


BACKEND_NAMES = {"cpu": "compiled C++ kernel", "cuda": "compiled CUDA kernel", "triton": "Triton kernel",
                 "torch": "pure torch, the fallback without the extension"}


def torch_backend_lines(rows: list[dict]) -> list[str]:
    """Per case, the pure-torch backend against the per-tensor loop and the compiled kernel, from
    the same run (the fallback's cost, and the bar it must clear: at least the loop's speed)."""
    out = []
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        if "ms" in r:
            by_case.setdefault(r["case"], {})[r["method"]] = r
    for case, m in by_case.items():
        torch_row = next((m[k] for k in ("fused_torch", "fused_torch_multi", "fused_torch_gram") if k in m), None)
        if torch_row is None:
            continue
        parts = [f"{torch_row['ms']:.1f} ms"]
        if "loop" in m:
            parts.append(f"{m['loop']['ms'] / torch_row['ms']:.2f}x the speed of the per-tensor loop ({m['loop']['ms']:.1f} ms)")
        compiled = next((m[k] for k in ("fused_cpu", "fused_cpu_multi", "fused_cpu_gram", "fused_cuda", "fused_cuda_multi")
                         if k in m), None)
        if compiled is not None:
            parts.append(f"{torch_row['ms'] / compiled['ms']:.1f}x the time of the compiled kernel ({compiled['ms']:.1f} ms)")
        if torch_row.get("extra_mb") is not None:
            parts.append(f"{torch_row['extra_mb']:.1f} MB extra")
        out.append(f"torch backend, {case}: " + ", ".join(parts))
    return out


# The sizes of the default run and of --quick (options given on the command line win).
PRESETS = {
    "default": {"size": 10**8, "small_n": 10_000, "multi_k": 8, "multi_size": 2 * 10**7, "repeats": 5, "gram_k": 2},
    "quick": {"size": 5 * 10**6, "small_n": 2_000, "multi_k": 4, "multi_size": 10**6, "repeats": 3, "gram_k": 2},
}
# Measured with `/usr/bin/time -v pathgeom bench [--quick]` on the shared 2-core CPU of
# bench/results/cpu-torch-backend-2026-12-05.txt (wall time, maximum resident set; load average 3-4,
# so less on an idle machine): 5 min 31 s and 4.5 GB; --quick 47 s and 1.0 GB.
COST = {"default": "about 6 minutes and 4.5 GB of memory", "quick": "about 50 s and 1 GB"}
DESCRIPTION = (
    "Times the fused op (each backend: on the CPU the compiled kernel and the pure-torch fallback) against naive "
    "PyTorch, a per-tensor loop, foreach ops, torch.compile and the bandwidth limit, after checking each against "
    f"the fp64 reference; prints a table and writes all rows as JSON. On a 2-core CPU the default run takes "
    f"{COST['default']}; --quick takes {COST['quick']}. Progress goes to stderr."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, q = PRESETS["default"], PRESETS["quick"]
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller sizes, fewer repeats, no torch.compile baseline: {COST['quick']} on a 2-core CPU "
                   f"(the default run: {COST['default']})")
    p.add_argument("--size", type=int, default=None,
                   help=f"elements of the large model-like list (default: {d['size']:.0e}; --quick: {q['size']:.0e})")
    p.add_argument("--small-n", type=int, default=None,
                   help=f"number of 1000-element tensors (default: {d['small_n']}; --quick: {q['small_n']})")
    p.add_argument("--multi-k", type=int, default=None,
                   help=f"K gradient lists of the multi case (default: {d['multi_k']}; --quick: {q['multi_k']})")
    p.add_argument("--multi-size", type=int, default=None,
                   help=f"elements per list of the multi case (default: {d['multi_size']:.0e}; --quick: {q['multi_size']:.0e})")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats (median) of every method, after one warm-up; fast methods get more, up to 41 "
                   f"within 0.3 s each (default: {d['repeats']}; --quick: {q['repeats']})")
    p.add_argument("--backends", nargs="*", default=None,
                   help="fused backends to time (default: cuda and triton on a GPU; on the CPU, cpu where the extension "
                   "is built, and torch)")
    p.add_argument("--gram-k", type=int, default=None, help="K vector lists of the Gram case (multi-size elements each) "
                   f"(default: {d['gram_k']})")
    p.add_argument("--cases", nargs="*", default=None,
                   help="case name prefixes (large, small, multi, gram; default: all of them), or host: the host work "
                   "of the GPU backends' calls (up to the launches) on CPU tensors laid out like device tensors, for "
                   "10^2 and 10^4 tensors, and 10^4 plain CPU tensors, in ns per tensor (a few seconds; not in "
                   "the default run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (--quick skips it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", default="pathgeom-bench.json", help="where to write all rows and the environment")


def resolve_preset(args) -> argparse.Namespace:
    """Fill the sizes left unset from the default or --quick preset."""
    preset = PRESETS["quick" if getattr(args, "quick", False) else "default"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if getattr(args, "quick", False):
        args.no_compile = True
    return args


def main(args) -> int:
    args = resolve_preset(args)
    t0 = time.perf_counter()
    rows, env = run(args.device, args.size, args.small_n, args.multi_k, args.multi_size, args.repeats, args.backends,
                    not args.no_compile, args.cases, args.gram_k, progress=not getattr(args, "no_progress", False))
    env["preset"] = "quick" if args.quick else "default"
    env["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}, {env['threads']} threads, {env['date']}")
    if any("ns_per_tensor" not in r for r in rows):
        print("backends timed: " + ", ".join(f"{b} ({what})" for b, what in env["backends"].items()))
    if "extension_error" in env:
        print(f"compiled extension not loaded: {env['extension_error']}")
    host = [r for r in rows if "ns_per_tensor" in r]
    if host:
        print(f"host work per call, CPU tensors standing in for device tensors (data pooled; _heap: each "
              f"tensor's data beside its metadata), {torch.get_num_threads()} threads:")
        print(format_host_rows(host))
    timed = [r for r in rows if "ns_per_tensor" not in r]
    if timed:
        print(format_rows(timed))
    for line in torch_backend_lines(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    print(f"{env['seconds']:.0f} s in all")
    return 0
