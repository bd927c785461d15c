"""Triton backend: the CUDA kernel's algorithm written in Triton.

Kept whole at over 500 lines: bench/ scripts rebind its globals (NUM_WARPS...), read at launch.

One program per chunk of ``CHUNK`` elements of one tensor; tensors are reached through an
int64 table of addresses, one kernel specialisation per (grad, param, ref) dtype combination
and alignment. Each program writes one fp64 partial row per gradient list; a second kernel
sums each tensor's rows (or all rows) in a fixed order, so results are bitwise reproducible.
The launch plan (which programs, which rows, where each argument lives) is
``pathgeom_fast.plan.plan_triton``, torch-free and unit-tested on CPU.

Kernel. Each program walks its chunk in steps of BLOCK = V x threads elements. Every stream
is loaded as a [BLOCK / V, V] tile whose row t is thread t's V elements (``_step_lanes``), so
each product is summed over V inside the thread and every accumulator is one register per
thread: a_k = sum h_k d and b_k = sum h_k h_k for the KC gradient lists of the pass (tuples
unrolled at compile time; h_k = g_k + wd x, h_k = g_k exactly when wd == 0), and c = sum d d,
with d = x - x*. Products and these sums are in fp32 (fp64 when an input of the tensor is fp64).
The hot loop has no shuffle, barrier or shared-memory access (``compile_check`` verifies it).
At the end of its chunk the program sums its 3 KC values across threads in fp64, ``GROUP`` per
reduction (``_sum_across_threads``, shared with the Gram kernel), and writes one row; c is
computed with the same operations in every pass (V does not depend on KC), so it is bitwise
equal across the passes of ``secant_stats_multi``.

Vector loads. The addresses come from a table, so Triton cannot infer their alignment. When
every address of a launch is 16-byte aligned (``data_ptr() % 16 == 0``; chunk starts are
multiples of CHUNK, so aligned bases stay aligned), the launch uses the ``ALIGNED``
specialisation: the addresses carry ``tl.multiple_of(.., 16)``, each thread's V elements are
consecutive (V = 16 bytes of the narrowest stream, ``aligned_width``) and the hot loop runs
over whole blocks without a mask, so it compiles to 16-byte loads; the last partial block of
a chunk is masked. Tensors that are not aligned (views at an odd offset) go to a separate
launch of the general specialisation, whose V elements per thread are strided by BLOCK / V
(scalar loads, coalesced across threads). ``pathgeom_fast.compile_check`` proves the 16-byte
loads, the thread-local hot loop, the register counts and the absence of spills from the PTX,
without a GPU.

Host work per call: the checks and tables in one C++ pass (``_C.triton_inputs``: the CPU
kernels' parallel check pass, group keys, digests), the rest on a cached plan; all kernel
arguments live in one int64 buffer, copied to the device with one non-blocking copy from
pinned memory, and that device buffer is itself cached, keyed by digests and verified by
content (sizes, group keys, addresses, plan). ``host_work`` runs all of it on CPU tensors
(``pathgeom bench --cases host``).

CUDA graphs: capture after one warm-up call with the same tensors (same addresses, sizes,
dtypes, K, per_tensor). The captured call then finds its argument buffer in the cache and
does no host-to-device copy, no synchronisation and no allocation besides its partial and
output tensors (from the graph's pool); buffers used during a capture are kept for the life
of the process, since a graph may replay them at any time. A call whose buffer is not cached
raises a clear error during capture instead of capturing a copy from host memory that could
change. Non-contiguous inputs are copied on every call, so their addresses change: make
them contiguous before capturing. (Reasoned from the code; no GPU has run this yet.)

Shared with ``secant_gram``'s kernel (``pathgeom_fast.triton_gram``): the plan and its cache
(a plan depends on sizes, group keys, K and per_tensor, not on the op, so both ops' calls on
the same tensors share it), ``prepare`` (addresses, dtype and alignment grouping),
``launch_setup`` (the cached argument buffer and the CUDA-graph rules above), ``_table_ptr``
(typed, alignment-annotated pointers from the table), ``_step_lanes`` (the [BLOCK / V, V]
tile of a step), ``_sum_across_threads`` (the end-of-chunk reduction), ``aligned_width``,
``segment_sum`` (the fixed-order second pass) and ``on_device``. Launches run on the current
stream of the inputs' device.

Runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before import),
which is how CI tests it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict

import numpy as np
import torch

from . import extension as _ext
from . import triton_plan as _plan

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = _plan.CHUNK
ROWS = 64  # partial rows summed per step by the segment kernel
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


def available() -> bool:
    return HAVE_TRITON


NUM_WARPS = 4
# Software-pipelining stages of the partials kernel's loop (Triton's num_stages); None: Triton's
# default. bench/triton_tune.py sweeps NUM_WARPS and NUM_STAGES on a GPU.
NUM_STAGES: int | None = None
# Under the interpreter a step costs the same whatever its length (it pays per operation), so
# it runs steps 8x longer. The kernels' logic does not depend on BLOCK (a power of two dividing
# CHUNK); the tests also run the GPU's BLOCK under the interpreter by setting this to NUM_WARPS.
INTERPRET_WARPS = 32
GROUP = 16  # values per cross-thread reduction at the end of a chunk (_sum_across_threads): 32 fp64 registers


def aligned_width(gd: torch.dtype, xd: torch.dtype, rd: torch.dtype) -> int:
    """Elements per thread and step of an aligned launch, for both ops' kernels: 16 bytes of the
    narrowest stream (fp32 4, fp64 2, 8 when a stream is 16-bit), at most 4 when accumulating in
    fp64 (a 16-bit stream beside an fp64 one: not a shipped combination). Each stream then takes
    one 16-byte load per step, two for a stream twice as wide. Wider is not possible without
    crossing threads: Triton's layout gives each thread as many consecutive elements as the
    widest 16-byte load of the step covers (4 for fp32), and a thread's row of V elements must
    be exactly what it holds for the sums over V to stay inside it (V = 8 with fp32 streams
    only put each row on two threads: shuffles in the hot loop)."""
    v = 16 // min(dt.itemsize for dt in (gd, xd, rd))
    return min(v, 4) if torch.float64 in (gd, xd, rd) else v


def kernel_config(key: int, warps: int | None = None) -> dict:
    """Constexprs of the partials kernel for a group key (see ``group_key``), less KC/KCP/GS.

    V elements per thread and step (the step is BLOCK = V x 32 x warps): aligned,
    ``aligned_width`` (fp32 4, bf16 gradients with fp32 params 8, fp16 8, fp64 2); misaligned, 2
    (scalar loads anyway, K + 2 registers more per element). V depends on the dtypes and the
    alignment only, not on the number of gradient lists of a pass, so every pass of
    ``secant_stats_multi`` computes c = ||x - x*||^2 with the same operations: bitwise equal
    across passes. ``warps``: 4 on a GPU; under the interpreter ``INTERPRET_WARPS`` unless given.
    """
    gd, xd, rd, aligned = unpack_key(key)
    any64 = torch.float64 in (gd, xd, rd)
    v = aligned_width(gd, xd, rd) if aligned else 2
    cfg = dict(G_DT=gd, X_DT=xd, R_DT=rd, ACC=torch.float64 if any64 else torch.float32, ALIGNED=aligned)
    if warps is None:
        warps = INTERPRET_WARPS if INTERPRET else NUM_WARPS
    cfg.update(V=v, BLOCK=v * 32 * warps, num_warps=warps)
    return cfg


def reduce_group(kc: int) -> int:
    """GS of a pass of kc gradient lists: its 3 kc output values are summed across threads
    GS at a time (one reduction at K = 1, two at K = 8)."""
    return min(GROUP, _plan.next_pow2(3 * kc))


def group_key(gd: torch.dtype, xd: torch.dtype, rd: torch.dtype, aligned: bool) -> int:
    """One integer per kernel specialisation: the dtype combination and the alignment."""
    return ((_CODE[gd] * 4 + _CODE[xd]) * 4 + _CODE[rd]) * 2 + int(aligned)


def unpack_key(key: int) -> tuple:
    key = int(key)
    return _DTYPES[key // 32], _DTYPES[(key // 8) % 4], _DTYPES[(key // 2) % 4], bool(key & 1)


if HAVE_TRITON:
    _TL = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }

    @triton.jit
    def _table_ptr(table_ptr, addr, DT: tl.constexpr, ALIGNED: tl.constexpr):
        """A typed pointer (or tensor of pointers) from input addresses read from the argument
        table. Shared by every partials kernel of the package.

        ALIGNED (every address of the launch is 16-byte aligned): Triton's alignment analysis
        does not follow an integer cast to a pointer (tt.int_to_ptr), but it does follow
        pointer + offset, so the address is table_ptr (a 16-byte aligned argument) plus an
        element offset marked as a multiple of 16 bytes (an exact division: both addresses are
        16-byte aligned). Loads through it can then be 16-byte vector loads."""
        if ALIGNED:
            S: tl.constexpr = DT.primitive_bitwidth // 8
            base = table_ptr.to(tl.int64, bitcast=True)
            return table_ptr.to(tl.pointer_type(DT), bitcast=True) + tl.multiple_of((addr - base) // S, 16 // S)
        else:
            return addr.to(tl.pointer_type(DT))

    @triton.jit
    def _step_lanes(BLOCK: tl.constexpr, V: tl.constexpr, ALIGNED: tl.constexpr):
        """Offsets [BLOCK // V, V] of one step of BLOCK elements; row t is thread t's V elements
        (the blocked layout gives each thread one row), so a sum over axis 1 stays inside a
        thread. Shared by every partials kernel of the package.

        ALIGNED: the V elements are consecutive (16-byte loads); otherwise strided by
        BLOCK // V, so that each of the V scalar loads is coalesced across the threads."""
        t = tl.arange(0, BLOCK // V)[:, None]
        u = tl.arange(0, V)[None, :]
        if ALIGNED:
            return t * V + u
        else:
            return t + u * (BLOCK // V)

    @triton.jit
    def _sum_across_threads(entries, G0: tl.constexpr, GS: tl.constexpr, BT: tl.constexpr):
        """float64 [GS]: element e is the sum over the BT threads of entries[G0 + e] (0 past
        the end of the tuple). entries: a tuple of per-thread accumulators [BT], placed side
        by side as columns of [BT, GS] (in each thread's registers) and reduced across threads
        in fp64 in one reduction: GS entries per shuffle/shared-memory round instead of one.
        Shared by every partials kernel of the package; called once per chunk, after the loop."""
        es = tl.arange(0, GS)[None, :]
        tot = tl.zeros([BT, GS], dtype=tl.float64)
        for e in tl.static_range(GS):
            if G0 + e < len(entries):
                tot = tl.where(es == e, entries[G0 + e].to(tl.float64)[:, None], tot)
        return tl.sum(tot, axis=0)

    @triton.jit
    def _stats_step(acc_a, acc_b, acc_c, x_ptr, r_ptr, g_ptrs, offs, m, wd,
                    KC: tl.constexpr, ACC: tl.constexpr, HAS_WD: tl.constexpr, MASKED: tl.constexpr):
        # offs [BLOCK // V, V] (see _step_lanes): every sum over axis 1 is over one thread's V
        # elements, so the accumulators are one register per thread and nothing crosses threads.
        # Every byte is read once, hence evict_first. Products in ACC (fp32, or fp64 when an
        # input is fp64), summed over V and over the chunk's steps in ACC.
        if MASKED:
            xv = tl.load(x_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
            d = xv - tl.load(r_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
        else:
            xv = tl.load(x_ptr + offs, eviction_policy="evict_first").to(ACC)
            d = xv - tl.load(r_ptr + offs, eviction_policy="evict_first").to(ACC)
        new_a = ()
        new_b = ()
        for k in tl.static_range(KC):
            if MASKED:
                h = tl.load(g_ptrs[k] + offs, mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
                if HAS_WD:  # masked lanes stay 0 whatever wd is (wd * 0 is NaN for an infinite wd)
                    h = tl.where(m, h + wd * xv, 0.0)
            else:
                h = tl.load(g_ptrs[k] + offs, eviction_policy="evict_first").to(ACC)
                if HAS_WD:
                    h = h + wd * xv
            new_a = new_a + (acc_a[k] + tl.sum(h * d, axis=1),)
            new_b = new_b + (acc_b[k] + tl.sum(h * h, axis=1),)
        return new_a, new_b, acc_c + tl.sum(d * d, axis=1)

    @triton.jit
    def _partials_kernel(
        table_ptr,  # int64 [ntensors, KCP + 2]: KC gradient addresses (padded to KCP), x, x*
        numel_ptr,  # int64 [ntensors]
        chunk_local_ptr,  # int64 [programs]: table row of program c
        chunk_index_ptr,  # int64 [programs]: chunk number q within the tensor (starts at q * CHUNK)
        chunk_row_ptr,  # int64 [programs]: partial row of program c
        out_ptr,  # float64 partials, offset to column 3 * k0 of row 0; rows of W values
        wd,
        W,  # row width of out_ptr: 3 K
        KC: tl.constexpr,
        KCP: tl.constexpr,  # KC rounded up to a power of two: the table row is KCP + 2 addresses
        GS: tl.constexpr,  # output values summed across threads per reduction (a power of two)
        G_DT: tl.constexpr,
        X_DT: tl.constexpr,
        R_DT: tl.constexpr,
        ACC: tl.constexpr,
        HAS_WD: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address of the launch is 16-byte aligned
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        V: tl.constexpr,  # elements per thread and step
    ):
        c = tl.program_id(0)
        j = tl.load(chunk_local_ptr + c)
        begin = tl.load(chunk_index_ptr + c) * CHUNK  # a multiple of CHUNK: aligned stays aligned
        end = tl.minimum(begin + CHUNK, tl.load(numel_ptr + j))
        row = table_ptr + j * (KCP + 2)
        x_ptr = _table_ptr(table_ptr, tl.load(row + KCP), X_DT, ALIGNED)
        r_ptr = _table_ptr(table_ptr, tl.load(row + KCP + 1), R_DT, ALIGNED)
        g_ptrs = ()  # the KC gradient pointers, unrolled at compile time: no padding rows read
        for k in tl.static_range(KC):
            g_ptrs = g_ptrs + (_table_ptr(table_ptr, tl.load(row + k), G_DT, ALIGNED),)
        lane = _step_lanes(BLOCK, V, ALIGNED)
        zero = tl.zeros([BLOCK // V], dtype=ACC)
        acc_a = ()
        acc_b = ()
        for k in tl.static_range(KC):
            acc_a = acc_a + (zero,)
            acc_b = acc_b + (zero,)
        acc_c = zero
        nfull = (end - begin) // BLOCK
        for i in range(0, nfull):  # whole blocks, no mask: 16-byte loads when ALIGNED
            offs = begin + i * BLOCK + lane
            acc_a, acc_b, acc_c = _stats_step(acc_a, acc_b, acc_c, x_ptr, r_ptr, g_ptrs, offs, offs < end, wd,
                                              KC, ACC, HAS_WD, False)
        tail = begin + nfull * BLOCK
        if tail < end:
            offs = tail + lane
            acc_a, acc_b, acc_c = _stats_step(acc_a, acc_b, acc_c, x_ptr, r_ptr, g_ptrs, offs, offs < end, wd,
                                              KC, ACC, HAS_WD, True)
        # The row's 3 KC values in output order (a_k, b_k, c for each k: c repeated, reduced
        # the same way each time, so bitwise equal), summed across threads in fp64 GS at a time.
        entries = ()
        for k in tl.static_range(KC):
            entries = entries + (acc_a[k], acc_b[k], acc_c)
        out = out_ptr + tl.load(chunk_row_ptr + c) * W
        es = tl.arange(0, GS)
        for g in tl.static_range((3 * KC + GS - 1) // GS):
            s = _sum_across_threads(entries, g * GS, GS, BLOCK // V)
            tl.store(out + g * GS + es, s, mask=es < 3 * KC - g * GS)

    @triton.jit
    def _segment_sum_kernel(
        rows_ptr,  # float64 [nrows, W]
        first_ptr,  # int64 [S + 1]: segment s is rows first[s] .. first[s+1]
        out_ptr,  # float64 [S, W]
        W: tl.constexpr,
        WP: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        s = tl.program_id(0)
        lo = tl.load(first_ptr + s)
        hi = tl.load(first_ptr + s + 1)
        ws = tl.arange(0, WP)
        acc = tl.zeros([ROWS, WP], dtype=tl.float64)
        for r0 in range(lo, hi, ROWS):
            rs = r0 + tl.arange(0, ROWS)
            m = (rs < hi)[:, None] & (ws < W)[None, :]
            acc += tl.load(rows_ptr + rs[:, None] * W + ws[None, :], mask=m, other=0.0)
        tl.store(out_ptr + s * W + ws, tl.sum(acc, axis=0), mask=ws < W)


# --------------------------------------------------------------------------------------
# Host side: plans and argument buffers, cached
# --------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_PLANS: OrderedDict = OrderedDict()  # (T, K, per_tensor, digest) -> (TritonPlan, (numels, keys))
_BUFFERS: OrderedDict = OrderedDict()  # (device, *plan key, digest of addrs) -> (device int64 buffer, (addrs, plan))
_CAPTURED: dict = {}  # buffers used during a CUDA graph capture: never evicted
_MAX_PLANS = 32
_MAX_BUFFERS = 32


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def clear_caches() -> None:
    """Forget cached plans and device buffers (not those a CUDA graph captured)."""
    with _LOCK:
        _PLANS.clear()
        _BUFFERS.clear()


def cache_info() -> dict:
    with _LOCK:
        return {"plans": len(_PLANS), "buffers": len(_BUFFERS), "captured": len(_CAPTURED)}


def checks_inputs() -> bool:
    """True when :func:`prepare` checks the inputs itself (in C++, with the messages of the
    compiled kernels): the compiled extension is loaded. Otherwise the caller must run
    ``inputs._validate`` first."""
    return _ext.available()


def prepare(grads, params, refs, K: int, per_tensor: bool, gram: bool = False):
    """(plan, key, addresses, copies): the cached plan of this call, the key of its argument
    buffer (digests of the sizes, group keys and addresses, with T, K and per_tensor), the K * T + 2 T input
    addresses (grads[k * T + i], then params, then refs) and the contiguous copies made of
    non-contiguous inputs (keep them alive until the launches are queued).

    With the compiled extension, the inputs are checked and the tables gathered in one C++ pass
    (``_C.triton_inputs``: the parallel check pass of the CPU kernels, group keys and digests
    for the caches included: no per-tensor Python work); without it, in Python (several us per
    tensor), after the caller's ``inputs._validate``. ``gram`` names the lists ``vecs`` in
    messages."""
    T = len(params)
    if checks_inputs():
        # lists as they are: a copy would touch (incref, then decref) every tensor object
        a, n, k, keep, digests = _ext._C.triton_inputs(_as_list(grads), _as_list(params), _as_list(refs), K, gram)
        addrs, numel, keys = a.numpy(), n.numpy(), k.numpy()
        plan, plan_key = _plan_of(numel, keys, K, per_tensor, digests[0])
        return plan, plan_key + (digests[1],), addrs, keep
    keep = []

    def addr(t: torch.Tensor) -> int:
        if not t.is_contiguous():
            t = t.contiguous()
            keep.append(t)
        return t.data_ptr()

    members = list(grads) + list(params) + list(refs)
    addrs = np.fromiter((addr(t) for t in members), dtype=np.uint64, count=len(members))
    numel = np.fromiter((p.numel() for p in params), dtype=np.int64, count=T)
    code = np.fromiter((_CODE[t.dtype] for t in members[:T] + members[K * T :]), dtype=np.int64, count=3 * T)
    # group key (see group_key): dtype combination (grad of list 0, param, ref) and whether all
    # K + 2 addresses of the tensor are 16-byte aligned
    aligned = ((addrs.reshape(K + 2, T) % 16) == 0).all(axis=0)
    keys = ((code[:T] * 4 + code[T : 2 * T]) * 4 + code[2 * T :]) * 2 + aligned
    plan, plan_key = _plan_of(numel, keys, K, per_tensor, hash((numel.tobytes(), keys.tobytes())))
    return plan, plan_key + (hash(addrs.tobytes()),), addrs, keep


def _as_list(seq) -> list:
    return seq if type(seq) is list else list(seq)


def _checked_cache(cache: OrderedDict, key, content: tuple, make, limit: int):
    """(value, hit) of ``cache`` under ``key``, a digest of ``content`` (NumPy arrays, compared
    by value, and other objects, by identity): a hit must also hold the same content (a digest
    may collide: then the entry is rebuilt, never misused)."""

    def same(a, b) -> bool:
        if not isinstance(a, np.ndarray):
            return a is b
        if checks_inputs() and a.flags.c_contiguous and b.flags.c_contiguous:
            return _ext._C.same_bytes(a, b)  # one memcmp
        return np.array_equal(a, b)

    with _LOCK:
        hit = cache.get(key)
        if hit is not None and all(same(a, b) for a, b in zip(hit[1], content)):
            cache.move_to_end(key)
            return hit[0], True
    value = make()
    with _LOCK:
        cache[key] = (value, content)
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)
    return value, False


def _plan_of(numel: np.ndarray, keys: np.ndarray, K: int, per_tensor: bool, digest: int):
    """(plan, plan key): the cached launch plan for these tables (``digest``: of numel and keys)."""
    plan_key = (len(numel), K, bool(per_tensor), digest)
    make = lambda: _plan.plan_triton(numel, keys, K, per_tensor)  # noqa: E731
    plan, _ = _checked_cache(_PLANS, plan_key, (numel, keys), make, _MAX_PLANS)
    return plan, plan_key


def on_device(device: torch.device):
    """Context of the launches: Triton launches on the current device's current stream, so the
    inputs' device is made current (a no-op when it already is, and on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_device(device: torch.device) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "backend='triton' got CPU tensors; Triton runs on GPUs, or on CPU tensors only under "
            "the interpreter (set TRITON_INTERPRET=1 before importing pathgeom_fast)"
        )


def launch_setup(lists, params, refs, K: int, per_tensor: bool, gram: bool = False):
    """(plan, buf, keep) of one call of any Triton op of this package (``secant_stats`` and
    ``secant_gram`` share it): the cached plan, the device int64 argument buffer (cached by
    content, addresses included; see the module docstring on CUDA graphs) and the contiguous
    copies of non-contiguous inputs (keep them alive until the launches are queued; they may be
    freed then: the caching allocator reuses memory in stream order, after the kernels)."""
    check_device(params[0].device)
    return _setup(lists, params, refs, K, per_tensor, gram)


def _setup(lists, params, refs, K: int, per_tensor: bool, gram: bool = False):
    """launch_setup without the device check (host_work runs it on CPU tensors)."""
    device = params[0].device
    plan, plan_key, addrs, keep = prepare(lists, params, refs, K, per_tensor, gram)
    capturing = _capturing(device)
    buf_key = (str(device),) + plan_key  # the plan key ends with the digest of the addresses

    def make_buffer() -> torch.Tensor:
        if capturing:
            raise RuntimeError(
                "backend='triton' under CUDA graph capture: its argument buffer for these tensors is not "
                "cached, and copying it from host memory during capture is not safe. Call the op once with "
                "the same tensors before capturing (see pathgeom_fast.triton_kernels)."
            )
        host = torch.from_numpy(plan.fill(addrs))
        if device.type == "cpu":
            return host
        # one copy from pinned memory, asynchronous: no synchronisation with the host
        return host.pin_memory().to(device, non_blocking=True)

    # the buffer is the plan's layout filled with these addresses: both must be the same
    buf, _ = _checked_cache(_BUFFERS, buf_key, (addrs, plan), make_buffer, _MAX_BUFFERS)
    if capturing:
        with _LOCK:
            _CAPTURED[buf_key] = buf
    return plan, buf, keep


def host_work(grads, params, refs, K: int = 1, per_tensor: bool = False) -> None:
    """The host work of one ``secant_stats`` call of this backend, up to the kernel launches
    (checks, tables, cached plan and argument buffer, the partial and output tensors), on
    tensors of any device, CPU included, without Triton's own launcher: what
    ``pathgeom bench --cases host`` times per tensor. The inputs must be valid (with the
    compiled extension they are checked here, as in a real call)."""
    device = params[0].device
    plan, buf, keep = _setup(grads, params, refs, K, per_tensor)
    torch.empty(plan.total_rows, K, 3, dtype=torch.float64, device=device)
    torch.empty(plan.nsegments, K, 3, dtype=torch.float64, device=device)
    del buf, keep


def segment_sum(partials: torch.Tensor, buf: torch.Tensor, plan, out: torch.Tensor) -> torch.Tensor:
    """out [nsegments, ...] (W values per segment) = the sums, in row order, of the plan's
    segments of ``partials`` [total_rows, ...] (W float64 values per row): per tensor, or all."""
    if plan.nsegments:
        if plan.total_rows == 0:
            out.zero_()
        else:
            W = out[0].numel()
            with on_device(out.device):
                _segment_sum_kernel[(plan.nsegments,)](partials, buf[plan.segments :], out, W=W, WP=_plan.next_pow2(W), ROWS=ROWS)
    return out


def triton_rows(grads, params, refs, num_grads: int, per_tensor: bool, weight_decay: float) -> torch.Tensor:
    """[T or 1, K, 3] float64 rows. Inputs checked by :func:`prepare` (with the extension) or
    already by ``inputs._validate`` (see :func:`checks_inputs`)."""
    check_device(params[0].device)
    K = num_grads
    device = params[0].device
    plan, buf, keep = launch_setup(grads, params, refs, K, per_tensor)
    partials = torch.empty(plan.total_rows, K, 3, dtype=torch.float64, device=device)
    flat = partials.view(-1)
    wd = float(weight_decay)
    with on_device(device):
        for L in plan.launches:
            cfg = kernel_config(L.key)
            _partials_kernel[(L.programs,)](
                buf[L.table :],
                buf[L.numel :],
                buf[L.chunk_local :],
                buf[L.chunk_index :],
                buf[L.chunk_row :],
                flat[3 * L.k0 :],
                wd,
                3 * K,
                KC=L.kc,
                KCP=L.kcp,
                GS=reduce_group(L.kc),
                G_DT=_TL[cfg["G_DT"]],
                X_DT=_TL[cfg["X_DT"]],
                R_DT=_TL[cfg["R_DT"]],
                ACC=_TL[cfg["ACC"]],
                HAS_WD=wd != 0.0,
                ALIGNED=cfg["ALIGNED"],
                CHUNK=plan.chunk,
                BLOCK=cfg["BLOCK"],
                V=cfg["V"],
                num_warps=cfg["num_warps"],
                **({} if NUM_STAGES is None else {"num_stages": NUM_STAGES}),
            )
    del keep
    out = torch.empty(plan.nsegments, K, 3, dtype=torch.float64, device=device)
    return segment_sum(partials, buf, plan, out)


# --------------------------------------------------------------------------------------
# What the compiled-kernel checks build (pathgeom_fast.compile_check)
# --------------------------------------------------------------------------------------

# The dtype combinations we ship as fast paths: (grad, param, ref).
SHIPPED_DTYPES = {
    "f32": (torch.float32, torch.float32, torch.float32),
    "bf16g-f32": (torch.bfloat16, torch.float32, torch.float32),
    "f16": (torch.float16, torch.float16, torch.float16),
    "f64": (torch.float64, torch.float64, torch.float64),
}


def compile_specs() -> list[dict]:
    """Every specialisation that ``pathgeom_fast.compile_check`` compiles ahead of time.

    Each spec: kernel (name of the @triton.jit function in this module), variant (a label),
    signature (runtime argument -> Triton type; pointer arguments get 16-byte divisibility,
    as every buffer passed here is 16-byte aligned), constexprs, num_warps, vector16: the
    hot loop must use only 16-byte loads, and thread_local (the check's default: True): no
    shuffle, barrier or shared-memory access inside a loop. Every shipped dtype combination,
    K = 1 and 8 (K = 8 also with weight decay), aligned and misaligned. A new kernel whose
    name ends in ``_kernel`` must be listed here, or the check fails and names it.
    """
    if not HAVE_TRITON:
        return []
    specs = []
    partials_sig = dict(
        table_ptr="*i64", numel_ptr="*i64", chunk_local_ptr="*i64", chunk_index_ptr="*i64",
        chunk_row_ptr="*i64", out_ptr="*fp64", wd="fp32", W="i32",
    )
    for name, (gd, xd, rd) in SHIPPED_DTYPES.items():
        for aligned in (True, False):
            cfg = kernel_config(group_key(gd, xd, rd, aligned), NUM_WARPS)
            for kc, wd in ((1, False), (8, False), (8, True)):
                specs.append(
                    dict(
                        kernel="_partials_kernel",
                        variant=f"{name} K={kc}{' wd' if wd else ''} {'aligned' if aligned else 'misaligned'} V={cfg['V']}",
                        signature=partials_sig,
                        constexprs=dict(
                            KC=kc, KCP=_plan.next_pow2(kc), GS=reduce_group(kc), G_DT=_TL[gd], X_DT=_TL[xd], R_DT=_TL[rd], ACC=_TL[cfg["ACC"]],
                            HAS_WD=wd, ALIGNED=aligned, CHUNK=CHUNK, BLOCK=cfg["BLOCK"], V=cfg["V"],
                        ),
                        num_warps=cfg["num_warps"],
                        vector16=aligned,
                        thread_local=True,  # no shuffle, barrier or shared memory in the hot loop
                    )
                )
    for K in (1, 8):
        specs.append(
            dict(
                kernel="_segment_sum_kernel",
                variant=f"K={K}",
                signature=dict(rows_ptr="*fp64", first_ptr="*i64", out_ptr="*fp64"),
                constexprs=dict(W=3 * K, WP=_plan.next_pow2(3 * K), ROWS=ROWS),
                num_warps=4,
                vector16=False,
            )
        )
    return specs
