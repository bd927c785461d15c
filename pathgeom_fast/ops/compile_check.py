"""Compiled-kernel checks that need no GPU: registers, spills and 16-byte loads.

    python -m pathgeom_fast.compile_check [--archs 80,90] [--out TABLE.txt] [--json ROWS.json]
                                          [--no-cuda] [--no-triton] [--device] [--only TEXT]

* Triton: every module of the package that defines ``@triton.jit`` functions (found by
  scanning the package's sources: today ``triton_kernels`` and ``triton_gram``) must have a
  ``compile_specs()``; every specialisation it lists is compiled ahead of time for each
  architecture (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``).
  Registers and stack come from the cubin (cuobjdump), spill bytes from ptxas -v on Triton's
  PTX; the hot loop (the PTX loop bodies) is scanned for its global loads. A ``@triton.jit``
  function whose name ends in ``_kernel`` and that its module's specs do not list, or a
  kernel module without ``compile_specs()``, is reported as an error, so a new kernel cannot
  be left unchecked.
* CUDA: ``csrc/secant_cuda.cu`` through nvcc (``-cubin -Xptxas -v --keep``), per
  architecture: registers and spills of every kernel instantiation from the ptxas report,
  loads from the kept PTX.

A row fails on a compile error, any spill (or stack frame), or, where the row expects it
(aligned Triton launches; the CUDA partials kernel for fp32/bf16/fp16 inputs), a hot loop
whose global loads are not all 16-byte vector loads (for CUDA: no loop made only of them,
the vector path; its scalar loop is the misaligned fallback), or, for every Triton
specialisation (``secant_stats``' and ``secant_gram``'s partials kernels, the segment sum;
a spec may opt out only with ``thread_local=False``, which none does), any warp shuffle,
barrier or shared-memory access inside a loop: the hot loops keep every sum inside a thread
and reduce across threads once, after the loop (column ``xthr``, counted for every row, CUDA
included). Exit status 1 if any row fails.

Must run where TRITON_INTERPRET is not set (the interpreter replaces the kernels):
tests/ops/test_compiled_kernels.py runs this module in a subprocess with a clean environment.
Results are cached by content (sources, tool versions, options) under
$PATHGEOM_COMPILE_CACHE (default ~/.cache/pathgeom_fast/compile-check).
Column ``KB/SM``: an estimate of the bytes one SM can have in flight in a row's hot loop
(resident threads, from registers, block size and shared memory, times the 16-byte loads of
one loop iteration); the summary prints what Little's law needs per SM for each
architecture's data-centre part at an assumed DRAM latency (``LATENCY_NS``). Shown, not
checked.
``--device`` (on a GPU machine) adds the GPU's own architecture and the resource usage of the
built extension (cuobjdump of pathgeom_fast/_C*.so).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import inspect
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from .compile_cache import _cache_get, _cache_put, _digest
from .kernel_resources import (  # noqa: F401  (re-exported: tests and scripts read them as compile_check.<name>)
    GPU_SPECS, LATENCY_NS, _triton_bin, cuobjdump_usage, demangle, find_tool, inflight_bytes, load_bytes,
    loop_crossthread, loop_load_stats, loops, needed_bytes, parse_ptxas, ptx_functions, resident_threads,
)

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pathgeom_fast/ (this is ops/compile_check.py)
ROOT = os.path.dirname(PACKAGE)
CSRC = os.path.join(ROOT, "csrc")
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-std=c++17"]  # as setup.py's nvcc flags


@dataclass
class Row:
    backend: str  # "triton" or "cuda"
    kernel: str
    variant: str
    arch: int
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads (ptxas)
    stack: int | None = None  # stack frame bytes
    loop_loads: int | None = None  # global load instructions inside loops
    loop_loads16: int | None = None  # ... of which 16-byte vector loads
    vector16: bool = False  # expected: hot loop of 16-byte loads
    loop_xthread: int | None = None  # shuffles, barriers and shared-memory accesses inside loops
    thread_local: bool = False  # expected: none of them (every thread sums its own elements; Triton rows)
    threads: int | None = None  # per block (CUDA: kCudaThreads; Triton: num_warps * 32)
    shared: int | None = None  # static shared memory per block, bytes
    error: str | None = None
    notes: list = field(default_factory=list)

    def failures(self) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} bytes of register spills")
        if self.stack:
            out.append(f"{self.stack}-byte stack frame")
        if self.vector16 and not self.notes_ok_vector():
            out.append(f"hot loop loads not 16-byte vector loads ({self.loop_loads16}/{self.loop_loads})")
        if self.thread_local and self.loop_xthread:
            out.append(f"hot loop exchanges data between threads ({self.loop_xthread} shuffles/barriers/shared accesses)")
        return out

    def notes_ok_vector(self) -> bool:
        if self.backend == "cuda":
            return "vector-loop" in self.notes
        return bool(self.loop_loads) and self.loop_loads16 == self.loop_loads

    @property
    def ok(self) -> bool:
        return not self.failures()


# --------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------


def _triton_spec_label(spec: dict) -> dict:
    return {k: (str(v) if k == "constexprs" else v) for k, v in spec.items()}


def triton_modules() -> list[str]:
    """Modules of the package (``pathgeom_fast.ops.triton_stats``, ...) whose source defines
    Triton kernels, in every subpackage."""
    out = []
    for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        with open(path) as f:
            if re.search(r"(?m)^\s*@triton\.jit\b", f.read()):
                out.append("pathgeom_fast." + os.path.relpath(path, PACKAGE)[: -len(".py")].replace(os.sep, "."))
    return out


def _import(name: str):
    import importlib

    return importlib.import_module(name)


def spec_row(spec: dict, arch: int) -> Row:
    """The (not yet measured) row of a Triton spec: what it expects. Every Triton hot loop must
    be thread-local unless its spec says ``thread_local=False``."""
    return Row("triton", spec["kernel"], spec["variant"], arch, vector16=spec["vector16"],
               thread_local=spec.get("thread_local", True))


def _compile_triton(module: str, index: int, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton

    mod = _import(module)
    spec = mod.compile_specs()[index]
    row = spec_row(spec, arch)
    fn = getattr(mod, spec["kernel"])
    try:
        sig = {}
        attrs = {}
        for i, name in enumerate(fn.arg_names):
            if name in spec["constexprs"]:
                sig[name] = "constexpr"
            else:
                sig[name] = spec["signature"][name]
                if sig[name].startswith("*"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, spec["constexprs"], attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]})
        ptx = k.asm["ptx"]
        row.threads = spec["num_warps"] * 32
        row.shared = getattr(k.metadata, "shared", None)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(k.asm["cubin"])
            usage = cuobjdump_usage(cubin)
            for (name, _a), u in usage.items():
                row.registers, row.stack = u["registers"], u["stack"]
            ptxas = _triton_bin("ptxas") or find_tool("ptxas")
            if ptxas:
                ptx_path = os.path.join(tmp, "k.ptx")
                with open(ptx_path, "w") as f:
                    f.write(ptx)
                gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                res = subprocess.run([ptxas, "-v", "-lineinfo", f"--gpu-name={gpu}", ptx_path, "-o", os.path.join(tmp, "k.o")],
                                     capture_output=True, text=True)
                info = next(iter(parse_ptxas(res.stderr).values()), {})
                row.spill_bytes = info.get("spill_bytes")
                if row.registers is None:
                    row.registers, row.stack = info.get("registers"), info.get("stack")
        fn_ptx = next(iter(ptx_functions(ptx).values()))
        total, wide, _ = loop_load_stats(fn_ptx)
        row.loop_loads, row.loop_loads16 = total, wide
        row.loop_xthread = loop_crossthread(fn_ptx)
    except Exception as exc:  # a compile error is a failing row, not a crash of the check
        row.error = f"compile error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return asdict(row)


def _is_jit_function(obj) -> bool:
    import triton

    kinds = [triton.runtime.JITFunction]
    try:  # what @triton.jit returns under TRITON_INTERPRET=1
        from triton.runtime.interpreter import InterpretedFunction

        kinds.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(obj, tuple(kinds))


def registry_errors(mod) -> list[Row]:
    """Failing rows for a Triton kernel module whose kernels are not all registered: no
    ``compile_specs()``, or a ``@triton.jit`` function defined in it whose name ends in
    ``_kernel`` and that no spec lists (helpers, and kernels imported from other modules, are
    not its to list)."""
    name = mod.__name__
    short = name.rsplit(".", 1)[-1]
    if not callable(getattr(mod, "compile_specs", None)):
        return [Row("triton", short, "-", 0, error=f"{name} defines Triton kernels but no compile_specs()")]
    registered = {s["kernel"] for s in mod.compile_specs()}
    rows = []
    for kname, obj in vars(mod).items():
        if (_is_jit_function(obj) and kname.endswith("_kernel") and kname not in registered
                and getattr(getattr(obj, "fn", None), "__module__", name) == name):
            rows.append(Row("triton", kname, "-", 0, error=f"no compile spec: add it to {short}.compile_specs()"))
    return rows


def triton_rows(archs: list[int], jobs: int, only: str | None = None) -> list[Row]:
    try:
        import triton
    except ImportError:
        return [Row("triton", "-", "-", 0, error="triton is not installed")]
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [Row("triton", "-", "-", 0, error="TRITON_INTERPRET=1 is set: run this check without it")]

    rows: list[Row] = []
    todo = []
    modules = triton_modules()
    # Kernels call helpers across modules (triton_gram uses triton_kernels' addressing): a
    # cached row is valid for the sources of all kernel modules together.
    sources = [inspect.getsource(_import(name)) for name in modules]
    for name in modules:
        mod = _import(name)
        errors = registry_errors(mod)
        rows += errors
        if not callable(getattr(mod, "compile_specs", None)):
            continue
        for i, spec in enumerate(mod.compile_specs()):
            if only and only not in f"{spec['kernel']} {spec['variant']}":
                continue
            for arch in archs:
                key = _digest("triton", triton.__version__, sources, _triton_spec_label(spec), arch)
                hit = _cache_get(key)
                if hit is not None:
                    rows.append(Row(**hit))
                else:
                    todo.append((name, i, arch, key))
    if todo:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
            futs = [(pool.submit(_compile_triton, name, i, arch), key) for name, i, arch, key in todo]
            for fut, key in futs:
                r = fut.result()
                if not r["error"]:
                    _cache_put(key, r)
                rows.append(Row(**r))
    return rows


# --------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------


def _cuda_arch(arch: int) -> list[dict]:
    nvcc = find_tool("nvcc")
    src = os.path.join(CSRC, "secant_cuda.cu")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", *NVCC_FLAGS, f"-I{CSRC}", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-Xptxas", "-v", "--keep", f"--keep-dir={tmp}", src, "-o", os.path.join(tmp, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            return [asdict(Row("cuda", "secant_cuda.cu", "-", arch, error="nvcc failed: " + (res.stderr.strip()[-600:] or "?")))]
        info = parse_ptxas(res.stderr + res.stdout)
        ptx_files = glob.glob(os.path.join(tmp, "*.ptx"))
        fns = {}
        for p in ptx_files:
            with open(p) as f:
                fns.update(ptx_functions(f.read()))
    pretty = demangle(sorted(info))
    threads = cuda_threads()
    rows = []
    for name, u in sorted(info.items(), key=lambda kv: pretty[kv[0]]):
        label = pretty[name]
        kernel, _, targs = label.partition("<")
        variant = ("<" + targs) if targs else "-"
        # fp32-accumulating instantiations (no fp64 input) must have their 16-byte vector loop
        vec = kernel == "partials_kernel" and not variant.startswith("<f64")
        row = Row("cuda", kernel, variant, arch, registers=u.get("registers"), spill_bytes=u.get("spill_bytes"),
                  stack=u.get("stack"), vector16=vec, threads=threads, shared=u.get("shared"))
        if name in fns:
            total, wide, vloop = loop_load_stats(fns[name])
            row.loop_loads, row.loop_loads16 = total, wide
            row.loop_xthread = loop_crossthread(fns[name])
            if vloop:
                row.notes.append("vector-loop")
        rows.append(asdict(row))
    return rows


def cuda_threads() -> int:
    """Threads per block of the CUDA kernels (kCudaThreads in csrc/secant_core.h)."""
    with open(os.path.join(CSRC, "secant_core.h")) as f:
        m = re.search(r"constexpr int kCudaThreads = (\d+);", f.read())
    if not m:
        raise RuntimeError("kCudaThreads not found in csrc/secant_core.h")
    return int(m.group(1))


def cuda_rows(archs: list[int], jobs: int) -> list[Row]:
    nvcc = find_tool("nvcc")
    if not nvcc:
        return [Row("cuda", "-", "-", 0, error="nvcc not found (set CUDA_HOME)")]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    sources = []
    for name in ("secant_cuda.cu", "secant_core.h"):
        with open(os.path.join(CSRC, name)) as f:
            sources.append(f.read())
    rows: list[Row] = []
    todo = []
    for arch in archs:
        key = _digest("cuda", version, sources, NVCC_FLAGS, arch)
        hit = _cache_get(key)
        if hit is not None:
            rows += [Row(**r) for r in hit]
        else:
            todo.append((arch, key))
    if todo:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for (arch, key), result in zip(todo, pool.map(lambda t: _cuda_arch(t[0]), todo)):
                if not any(r["error"] for r in result):
                    _cache_put(key, result)
                rows += [Row(**r) for r in result]
    return rows


def built_extension_rows() -> list[Row]:
    """Resource usage of the CUDA kernels inside the built pathgeom_fast/_C*.so."""
    libs = glob.glob(os.path.join(PACKAGE, "_C*.so"))
    if not libs:
        return [Row("cuda-built", "-", "-", 0, error="pathgeom_fast/_C*.so not found")]
    usage = cuobjdump_usage(libs[0])
    pretty = demangle(sorted({n for n, _ in usage}))
    rows = []
    for (name, arch), u in sorted(usage.items(), key=lambda kv: (pretty[kv[0][0]], kv[0][1] or 0)):
        kernel, _, targs = pretty[name].partition("<")
        rows.append(Row("cuda-built", kernel, ("<" + targs) if targs else "-", arch or 0, registers=u["registers"], stack=u["stack"]))
    return rows


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    head = (f"{'backend':<10} {'kernel':<28} {'variant':<34} {'arch':>5} {'regs':>5} {'spill':>6} {'stack':>6} "
            f"{'16B loop loads':>15} {'xthr':>5} {'KB/SM':>6}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        loads = "-" if r.loop_loads is None else f"{r.loop_loads16}/{r.loop_loads}"
        if r.backend == "cuda" and r.vector16:
            loads += " v" if "vector-loop" in r.notes else " !"
        fails = r.failures()
        status = "ok" if not fails else "FAIL: " + "; ".join(fails)
        na = lambda v: "-" if v is None else str(v)
        kb = lambda v: "-" if v is None else f"{v / 1024:.0f}"
        lines.append(
            f"{r.backend:<10} {r.kernel[:28]:<28} {r.variant[:34]:<34} {('sm_%d' % r.arch) if r.arch else '-':>5} "
            f"{na(r.registers):>5} {na(r.spill_bytes):>6} {na(r.stack):>6} {loads:>15} {na(r.loop_xthread):>5} "
            f"{kb(inflight_bytes(r)):>6}  {status}"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    out = []
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.backend, r.kernel, r.arch), []).append(r)
    for (b, k, a), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        regs = [r.registers for r in rs if r.registers is not None]
        spills = sum(r.spill_bytes or 0 for r in rs)
        bad = sum(not r.ok for r in rs)
        rng = f"{min(regs)}-{max(regs)}" if regs else "-"
        flight = [v for v in map(inflight_bytes, rs) if v is not None]
        fl = f", in flight {min(flight) // 1024}-{max(flight) // 1024} KB/SM" if flight else ""
        out.append(f"{b:<10} {k[:28]:<28} sm_{a:<3} {len(rs):>3} variants, registers {rng:>7}, spill bytes {spills}{fl}, failing {bad}")
    for arch in sorted({r.arch for r in rows if r.arch in GPU_SPECS}):
        spec = GPU_SPECS[arch]
        out.append(f"KB/SM: bytes one SM can have in flight in the hot loop (resident threads x its 16-byte loads); "
                   f"sm_{arch} ({spec['part']}, {spec['bandwidth'] / 1e12:.2f} TB/s, {spec['sms']} SMs) needs about "
                   f"{needed_bytes(arch) // 1024} KB at an assumed {LATENCY_NS} ns of DRAM latency")
    return "\n".join(out)


def environment() -> str:
    parts = [f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", f"python {platform.python_version()}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton -")
    nvcc = find_tool("nvcc")
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", v)
        parts.append(f"nvcc {m.group(2) if m else '?'}")
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"device {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
        else:
            parts.append("no GPU (ahead-of-time compilation only)")
    except ImportError:
        pass
    return ", ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pathgeom_fast.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--out", help="write the table here")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--device", action="store_true", help="also the GPU's own arch and the built extension")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles (processes)")
    ap.add_argument("--only", help="Triton specialisations whose 'kernel variant' contains this text (while iterating)")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    if args.device:
        import torch

        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            archs = sorted(set(archs) | {cap[0] * 10 + cap[1]})
    rows: list[Row] = []
    if not args.no_triton:
        rows += triton_rows(archs, args.jobs, args.only)
    if not args.no_cuda:
        rows += cuda_rows(archs, min(args.jobs, len(archs)))
    if args.device:
        rows += built_extension_rows()
    rows.sort(key=lambda r: (r.backend, r.kernel, r.variant, r.arch))
    text = "\n".join([f"# compiled-kernel checks: {environment()}", f"# command: python -m pathgeom_fast.compile_check {' '.join(argv if argv is not None else sys.argv[1:])}", "", format_table(rows), "", summary(rows)])
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"ok": r.ok, "failures": r.failures()} for r in rows], f, indent=1)
    failing = [r for r in rows if not r.ok and r.backend != "cuda-built"]
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
