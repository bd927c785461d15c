"""What a compiled kernel uses and does, read from the compilers' output: the PTX analysis
(global loads and their widths, loops, cross-thread instructions inside loops), the CUDA tools
(ptxas reports, cuobjdump resource usage, c++filt) and the bytes-in-flight estimate per SM
(Little's law). :mod:`.compile_check` builds its table from these.

``resident_threads`` and ``inflight_bytes`` take a row of that table
(:class:`pathgeom_fast.ops.compile_check.Row`: ``arch``, ``threads``, ``registers``,
``shared``, ``vector16``, ``loop_loads16``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess


# --------------------------------------------------------------------------------------
# PTX analysis
# --------------------------------------------------------------------------------------

_LD = re.compile(r"\bld\.global((?:\.[\w:]+)*)\s")
_WIDTH = re.compile(r"\.v(\d)\.[bfsu](\d+)$|\.[bfsu](\d+)$")


def load_bytes(quals: str) -> int:
    """Bytes read by one ld.global with these qualifiers (".L1::evict_first.v4.b32" -> 16)."""
    quals = re.sub(r"\.L\d::[\w:]+|\.L2::\d+B", "", quals)
    m = _WIDTH.search(quals)
    if not m:
        return 0
    if m.group(1):
        return int(m.group(1)) * int(m.group(2)) // 8
    return int(m.group(3)) // 8


def ptx_functions(ptx: str) -> dict[str, str]:
    """Entry name -> its PTX text."""
    out = {}
    parts = re.split(r"(?m)^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+", ptx)
    for part in parts[1:]:
        name = re.match(r"([\w$]+)", part).group(1)
        out[name] = part
    return out


def loops(ptx_fn: str) -> list[tuple[int, int]]:
    """Loop bodies as line ranges: from a label to a later branch back to it."""
    lines = ptx_fn.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\$?[\w$]+):", line)
        if m:
            labels[m.group(1)] = i
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$?[\w$]+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            out.append((labels[m.group(1)], i + 1))
    return out


def loop_load_stats(ptx_fn: str) -> tuple[int, int, bool]:
    """(global loads inside loops, of which 16-byte, whether some loop has only 16-byte loads).
    A load inside nested loops counts once."""
    lines = ptx_fn.splitlines()
    sizes = {}
    vector_loop = False
    for lo, hi in loops(ptx_fn):
        body = {}
        for i in range(lo, hi):
            m = _LD.search(lines[i])
            if m:
                body[i] = load_bytes(m.group(1))
        if body and all(v == 16 for v in body.values()):
            vector_loop = True
        sizes.update(body)
    return len(sizes), sum(v == 16 for v in sizes.values()), vector_loop


_XTHREAD = re.compile(r"\b(?:shfl\.|bar\.|barrier\.|ld\.shared|st\.shared|atom\.shared|red\.shared)")


def loop_crossthread(ptx_fn: str) -> int:
    """Instructions inside loops that move data between threads (warp shuffles, barriers,
    shared-memory loads/stores): a layout conversion or a cross-thread reduction in the hot
    loop. A line inside nested loops counts once."""
    lines = ptx_fn.splitlines()
    hits = set()
    for lo, hi in loops(ptx_fn):
        hits.update(i for i in range(lo, hi) if _XTHREAD.search(lines[i]))
    return len(hits)


# --------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------


def _triton_bin(name: str) -> str | None:
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return None


def find_tool(name: str) -> str | None:
    cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for cand in (os.path.join(cuda, "bin", name), shutil.which(name), _triton_bin(name)):
        if cand and os.path.exists(cand):
            return cand
    return None


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v report -> {function: {registers, spill_bytes, stack, shared}}."""
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"] = int(m.group(1))
            cur["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["shared"] = int(m.group(1))
    return out


def cuobjdump_usage(path: str) -> dict[str, dict]:
    """cuobjdump --dump-resource-usage -> {function: {registers, stack}} (last arch wins)."""
    tool = find_tool("cuobjdump")
    if not tool:
        return {}
    res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    out = {}
    cur = None
    arch = None
    for line in res.stdout.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.search(r"Function ([\w$]+):", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if m and cur:
            out[(cur, arch)] = {"registers": int(m.group(1)), "stack": int(m.group(2))}
    return out


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    pretty = {}
    for n, d in zip(names, out):
        d = re.sub(r"pathgeom::\(anonymous namespace\)::", "", d)
        d = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", d).replace("void ", "")
        d = d.replace("BFloat16", "bf16").replace("Half", "f16").replace("double", "f64").replace("float", "f32")
        pretty[n] = d.replace(", ", ",")
    return pretty


# --------------------------------------------------------------------------------------
# Bytes in flight per SM (an estimate from a row of the compile_check table)
# --------------------------------------------------------------------------------------

# Per architecture: the data-centre part it is built for, its SMs and DRAM bandwidth (the
# vendor's figures), and the limits of one SM (CUDA programming guide, compute capabilities).
GPU_SPECS = {
    80: {"part": "A100 SXM 80GB", "sms": 108, "bandwidth": 2.04e12, "shared": 164 * 1024},
    90: {"part": "H100 SXM", "sms": 132, "bandwidth": 3.35e12, "shared": 228 * 1024},
}
# DRAM latency under load assumed for Little's law (bytes in flight = bandwidth x latency):
# an assumption, not a measurement; a GPU session can refine it.
LATENCY_NS = 600
SM_REGISTERS, SM_MAX_WARPS, SM_MAX_BLOCKS, REG_UNIT = 65536, 64, 32, 256


def resident_threads(row) -> int | None:
    """Threads of ``row``'s kernel resident on one SM: blocks limited by registers (allocated
    per warp in units of 256), warps (64), blocks (32) and shared memory (1 KB reserved per
    block). None where the registers or the block size are unknown."""
    spec = GPU_SPECS.get(row.arch)
    if spec is None or not row.registers or not row.threads:
        return None
    warps = -(-row.threads // 32)
    regs_per_warp = -(-row.registers * 32 // REG_UNIT) * REG_UNIT
    blocks = min(SM_MAX_BLOCKS, SM_MAX_WARPS // warps, (SM_REGISTERS // regs_per_warp) // warps)
    if row.shared is not None:
        blocks = min(blocks, spec["shared"] // (row.shared + 1024))
    return blocks * row.threads


def inflight_bytes(row) -> int | None:
    """Bytes one SM can have in flight in ``row``'s hot loop: resident threads x the 16-byte
    loads of one loop iteration (all issued before the first is used, as the kernels are
    written to do). Only for rows whose hot loop is of 16-byte loads."""
    threads = resident_threads(row)
    if threads is None or not row.vector16 or not row.loop_loads16:
        return None
    return threads * 16 * row.loop_loads16


def needed_bytes(arch: int) -> int | None:
    """Bytes in flight per SM that keep DRAM busy (Little's law), for arch's part."""
    spec = GPU_SPECS.get(arch)
    return None if spec is None else int(spec["bandwidth"] * LATENCY_NS * 1e-9 / spec["sms"])
