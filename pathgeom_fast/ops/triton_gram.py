"""Triton backend of ``secant_gram``: the Gram matrix of K vectors and d = x - x*.

For K <= 8 vector lists v_0 .. v_{K-1} and M = K + 1::

    G[i][j] = sum v_i * v_j (i, j < K)     G[i][K] = sum v_i * d     G[K][K] = sum d * d

Everything but the kernel's arithmetic is shared with ``secant_stats``'s Triton path
(``triton_kernels``): the launch plan (``pathgeom_fast.plan.plan_triton``: one program per
chunk of ``CHUNK`` elements of one tensor, one launch per dtype combination and alignment,
partial rows laid out by tensor) and its cache, the grouping of tensors by dtype combination
and alignment (``prepare``), the one int64 argument buffer (filled by a NumPy scatter, copied
once, non-blocking, from pinned memory, cached by content: ``launch_setup``), the typed,
alignment-annotated pointers read from the table (``_table_ptr``) and the fixed-order segment
sum (``segment_sum``). Plans and buffers are the same objects for both ops when they are
called on the same tensors. K <= 8 is one pass of the plan: the table row of a tensor holds
its K vector addresses (padded with zeros to KP, K rounded up to a power of two), then x,
then x*.

Kernel. Each program walks its chunk in steps of BLOCK = V x threads elements; every stream
is loaded as a [BLOCK / V, V] tile whose row t is thread t's V elements, so each product is
summed over V inside the thread and every accumulator is one register per thread: the
K (K + 1) / 2 vector pairs a <= b (the upper triangle only, as a tuple of K (K + 1) / 2
tensors unrolled at compile time), the K vector-d products and d * d, in fp32 (fp64 when an
input of the tensor is fp64). The hot loop has no shuffle, barrier or shared-memory access
(``compile_check`` verifies it). At the end of its chunk the program sums the accumulators
across threads in fp64, ``GROUP`` entries per reduction, and writes one row of M * M values in
which G[a][b] and G[b][a] are stores of the same value: the matrix is exactly symmetric. The
second kernel sums each tensor's rows (or all rows) in a fixed order, so results are bitwise
reproducible.

Vector loads. When every address of a tensor is 16-byte aligned (``data_ptr() % 16 == 0``)
its launch uses the ``ALIGNED`` specialisation: addresses are table_ptr plus element offsets
marked ``tl.multiple_of``, each thread's V elements are consecutive and the hot loop runs over
whole blocks without a mask, so fp32, fp16, fp64 and bf16-vectors-with-fp32-params inputs are
read with 16-byte loads only (V = 16 bytes of the narrowest stream; wider streams take two).
Misaligned tensors go to their own launch of the general specialisation, whose V elements per
thread are strided by BLOCK / V (scalar loads, coalesced across threads). ``gram_config``
picks V, BLOCK and num_warps per K and dtypes; ``pathgeom_fast.compile_check`` compiles every
shipped specialisation (``compile_specs``) ahead of time for sm_80 and sm_90 and checks the
16-byte loads, the thread-local hot loop and the absence of register spills from the PTX.

Host work per call: one ``data_ptr()``/``dtype``/contiguity read per tensor, the rest in NumPy
on a cached plan; no per-tensor Python loop builds anything, and the argument buffer is copied
to the device at most once per set of tensors (addresses).

CUDA graphs: as for ``secant_stats`` (see ``triton_kernels``). Capture after one warm-up call
with the same tensors (same addresses, sizes, dtypes, K, per_tensor): the captured call then
finds its argument buffer in the cache and does no host-to-device copy, no synchronisation and
no allocation besides its partial and output tensors (from the graph's pool); a buffer used in
a capture is kept for the life of the process. Without the warm-up the call raises a clear
error during capture. Non-contiguous inputs are copied on every call (new addresses): make
them contiguous before capturing. (Reasoned from the code; no GPU has run this yet.)

The CUDA C++ backend has no Gram kernel; this one serves CUDA tensors. Runs on CPU tensors
under the Triton interpreter (``TRITON_INTERPRET=1`` set before import), which is how CI
tests it.
"""

from __future__ import annotations

import torch

from . import triton_plan as _plan
from . import triton_stats as _tk
from .triton_stats import HAVE_TRITON, INTERPRET, group_key, unpack_key  # noqa: F401

CHUNK = _plan.CHUNK

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_stats import _TL, _step_lanes, _sum_across_threads, _table_ptr

    @triton.jit
    def _gram_step(acc_vv, acc_vd, acc_dd, x_ptr, r_ptr, v_ptrs, offs, m,
                   K: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
        # offs [BLOCK // V, V]: row t is thread t's V elements, so every sum over axis 1 stays
        # inside a thread and each accumulator is one register per thread. Every byte is read
        # once, hence evict_first. (Loads written out here rather than in a helper: under the
        # interpreter each nested @triton.jit call costs a fraction of a millisecond.)
        vals = ()
        if MASKED:
            d = (tl.load(x_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(ACC)
                 - tl.load(r_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(ACC))
            for k in tl.static_range(K):
                vals = vals + (tl.load(v_ptrs[k] + offs, mask=m, other=0.0, eviction_policy="evict_first").to(ACC),)
        else:
            d = (tl.load(x_ptr + offs, eviction_policy="evict_first").to(ACC)
                 - tl.load(r_ptr + offs, eviction_policy="evict_first").to(ACC))
            for k in tl.static_range(K):
                vals = vals + (tl.load(v_ptrs[k] + offs, eviction_policy="evict_first").to(ACC),)
        new_vv = ()  # upper triangle, row by row: pair (a, b), a <= b, is entry a K - a (a - 1) / 2 + b - a
        for a in tl.static_range(K):
            for b in tl.static_range(a, K):
                new_vv = new_vv + (acc_vv[a * K - a * (a - 1) // 2 + b - a] + tl.sum(vals[a] * vals[b], axis=1),)
        new_vd = ()
        for a in tl.static_range(K):
            new_vd = new_vd + (acc_vd[a] + tl.sum(vals[a] * d, axis=1),)
        return new_vv, new_vd, acc_dd + tl.sum(d * d, axis=1)

    @triton.jit
    def _gram_partials_kernel(
        table_ptr,  # int64 [ntensors, KP + 2]: K vector addresses (padded to KP), x, x*
        numel_ptr,  # int64 [ntensors]
        chunk_local_ptr,  # int64 [programs]: table row of program c
        chunk_index_ptr,  # int64 [programs]: chunk number q within the tensor (starts at q * CHUNK)
        chunk_row_ptr,  # int64 [programs]: partial row of program c
        out_ptr,  # float64 partials [rows, (K + 1)^2]
        K: tl.constexpr,
        KP: tl.constexpr,  # K rounded up to a power of two: the table row is KP + 2 addresses
        GS: tl.constexpr,  # entries of G summed across threads per reduction (a power of two)
        V_DT: tl.constexpr,
        X_DT: tl.constexpr,
        R_DT: tl.constexpr,
        ACC: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address of the launch is 16-byte aligned
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        V: tl.constexpr,  # elements per thread and step
    ):
        M: tl.constexpr = K + 1
        P: tl.constexpr = K * (K + 1) // 2  # vector pairs a <= b
        c = tl.program_id(0)
        j = tl.load(chunk_local_ptr + c)
        begin = tl.load(chunk_index_ptr + c) * CHUNK  # a multiple of CHUNK: aligned stays aligned
        end = tl.minimum(begin + CHUNK, tl.load(numel_ptr + j))
        row = table_ptr + j * (KP + 2)
        x_ptr = _table_ptr(table_ptr, tl.load(row + KP), X_DT, ALIGNED)
        r_ptr = _table_ptr(table_ptr, tl.load(row + KP + 1), R_DT, ALIGNED)
        v_ptrs = ()
        for k in tl.static_range(K):
            v_ptrs = v_ptrs + (_table_ptr(table_ptr, tl.load(row + k), V_DT, ALIGNED),)
        lane = _step_lanes(BLOCK, V, ALIGNED)  # [BLOCK // V, V]: row t is thread t's V elements
        zero = tl.zeros([BLOCK // V], dtype=ACC)
        acc_vv = ()
        for p in tl.static_range(P):
            acc_vv = acc_vv + (zero,)
        acc_vd = ()
        for a in tl.static_range(K):
            acc_vd = acc_vd + (zero,)
        acc_dd = zero
        nfull = (end - begin) // BLOCK
        for i in range(0, nfull):  # whole blocks, no mask: 16-byte loads when ALIGNED
            offs = begin + i * BLOCK + lane
            acc_vv, acc_vd, acc_dd = _gram_step(acc_vv, acc_vd, acc_dd, x_ptr, r_ptr, v_ptrs, offs, offs < end,
                                                K, ACC, False)
        tail = begin + nfull * BLOCK
        if tail < end:
            offs = tail + lane
            acc_vv, acc_vd, acc_dd = _gram_step(acc_vv, acc_vd, acc_dd, x_ptr, r_ptr, v_ptrs, offs, offs < end,
                                                K, ACC, True)
        # The E = P + K + 1 distinct entries of G, GS at a time side by side ([BLOCK // V, GS],
        # column e in each thread's registers), summed across threads in fp64, one reduction per
        # group (GS bounds the registers this needs). pos/mirror: where entry q goes in the
        # row-major M x M row; G[i][j] and G[j][i] are stores of the same value.
        E: tl.constexpr = P + K + 1
        entries = acc_vv + acc_vd + (acc_dd,)
        pos_q = ()
        mirror_q = ()
        for a in tl.static_range(K):
            for b in tl.static_range(a, K):
                pos_q = pos_q + (a * M + b,)
                mirror_q = mirror_q + (b * M + a,)
        for a in tl.static_range(K):
            pos_q = pos_q + (a * M + K,)
            mirror_q = mirror_q + (K * M + a,)
        pos_q = pos_q + (K * M + K,)
        mirror_q = mirror_q + (K * M + K,)
        out = out_ptr + tl.load(chunk_row_ptr + c) * (M * M)
        es = tl.arange(0, GS)
        for g in tl.static_range((E + GS - 1) // GS):
            s = _sum_across_threads(entries, g * GS, GS, BLOCK // V)  # [GS]
            pos = tl.zeros([GS], dtype=tl.int32)
            mirror = tl.zeros([GS], dtype=tl.int32)
            for e in tl.static_range(GS):
                if g * GS + e < E:
                    pos = tl.where(es == e, pos_q[g * GS + e], pos)
                    mirror = tl.where(es == e, mirror_q[g * GS + e], mirror)
            live = es < E - g * GS
            tl.store(out + pos, s, mask=live)
            tl.store(out + mirror, s, mask=live)


def available() -> bool:
    return HAVE_TRITON


NUM_WARPS = _tk.NUM_WARPS
# Under the interpreter a step costs the same whatever its length (it pays per operation, and
# tl.sum, a @triton.jit function, re-patches the language on every call), so it runs steps 8x
# longer (as secant_stats' kernel). The kernel's logic does not depend on BLOCK (a power of two
# dividing CHUNK); tests/ops/test_gram.py also runs the GPU's BLOCK under the interpreter by setting
# this to NUM_WARPS.
INTERPRET_WARPS = _tk.INTERPRET_WARPS
GROUP = _tk.GROUP  # entries of G per cross-thread reduction at the end of a chunk: 32 fp64 registers


def gram_config(key: int, K: int, warps: int | None = None) -> dict:
    """Constexprs of the Gram partials kernel for a group key (``triton_kernels.group_key``) and K.

    V elements per thread and step (the step is BLOCK = V x 32 x warps):
    aligned: 16 bytes of the narrowest stream (fp32 4, fp64 2, 8 when a stream is 16-bit: one
    16-byte load per stream and step, two for wider streams), at most 4 when accumulating in
    fp64 with a 16-bit stream (not a shipped combination: 16 fp64 registers per stream);
    misaligned: 4 for K <= 2, else 2 (scalar loads; each adds K + 2 registers).
    Register pressure is K (K + 1) / 2 + K + 1 accumulators plus (K + 2) V values of a step,
    largest at K = 8; the compiled-kernel checks prove no spills for K = 1, 2 and 8.
    ``warps``: 4 on a GPU; under the interpreter ``INTERPRET_WARPS`` unless given.
    """
    vd, xd, rd, aligned = unpack_key(key)
    any64 = torch.float64 in (vd, xd, rd)
    kp = _plan.next_pow2(K)
    if aligned:
        v = _tk.aligned_width(vd, xd, rd)
    else:
        v = 4 if kp <= 2 else 2
    cfg = dict(V_DT=vd, X_DT=xd, R_DT=rd, ACC=torch.float64 if any64 else torch.float32, ALIGNED=aligned)
    if warps is None:
        warps = INTERPRET_WARPS if INTERPRET else NUM_WARPS
    cfg.update(V=v, BLOCK=v * 32 * warps, num_warps=warps)
    return cfg


def gram_rows(vecs, params, refs, num_vecs: int, per_tensor: bool) -> torch.Tensor:
    """[T or 1, K + 1, K + 1] float64 Gram rows. Inputs checked as in ``triton_kernels.triton_rows``."""
    _tk.check_device(params[0].device)
    K = num_vecs
    if not 1 <= K <= _plan.MAX_GRADS_PER_PASS:
        raise ValueError(f"secant_gram (triton): num_vecs must be between 1 and {_plan.MAX_GRADS_PER_PASS}, got {K}")
    M = K + 1
    device = params[0].device
    plan, buf, keep = _tk.launch_setup(vecs, params, refs, K, per_tensor, gram=True)
    partials = torch.empty(plan.total_rows, M, M, dtype=torch.float64, device=device)
    with _tk.on_device(device):
        for L in plan.launches:  # one pass (K <= 8): k0 = 0, kc = K
            cfg = gram_config(L.key, K)
            _gram_partials_kernel[(L.programs,)](
                buf[L.table :],
                buf[L.numel :],
                buf[L.chunk_local :],
                buf[L.chunk_index :],
                buf[L.chunk_row :],
                partials,
                K=K,
                KP=L.kcp,
                GS=GROUP,
                V_DT=_TL[cfg["V_DT"]],
                X_DT=_TL[cfg["X_DT"]],
                R_DT=_TL[cfg["R_DT"]],
                ACC=_TL[cfg["ACC"]],
                ALIGNED=cfg["ALIGNED"],
                CHUNK=plan.chunk,
                BLOCK=cfg["BLOCK"],
                V=cfg["V"],
                num_warps=cfg["num_warps"],
            )
    del keep
    out = torch.empty(plan.nsegments, M, M, dtype=torch.float64, device=device)
    return _tk.segment_sum(partials, buf, plan, out)


# --------------------------------------------------------------------------------------
# What the compiled-kernel checks build (pathgeom_fast.compile_check)
# --------------------------------------------------------------------------------------

SPEC_KS = (1, 2, 8)


def compile_specs() -> list[dict]:
    """Every specialisation of this module's kernels that ``pathgeom_fast.compile_check``
    compiles ahead of time (same format as ``triton_kernels.compile_specs``): the shipped dtype
    combinations (fp32, bf16 vectors with fp32 params and x*, fp16, fp64), K = 1, 2 and 8,
    aligned (16-byte loads required) and misaligned; every one must keep its hot loop
    thread-local (no shuffle, barrier or shared memory). The segment sum is
    ``triton_kernels``'s."""
    if not HAVE_TRITON:
        return []
    specs = []
    sig = dict(table_ptr="*i64", numel_ptr="*i64", chunk_local_ptr="*i64", chunk_index_ptr="*i64",
               chunk_row_ptr="*i64", out_ptr="*fp64")
    for name, (vd, xd, rd) in _tk.SHIPPED_DTYPES.items():
        for aligned in (True, False):
            for K in SPEC_KS:
                cfg = gram_config(group_key(vd, xd, rd, aligned), K, NUM_WARPS)
                specs.append(
                    dict(
                        kernel="_gram_partials_kernel",
                        variant=f"{name} K={K} {'aligned' if aligned else 'misaligned'} V={cfg['V']}",
                        signature=sig,
                        constexprs=dict(
                            K=K, KP=_plan.next_pow2(K), GS=GROUP, V_DT=_TL[vd], X_DT=_TL[xd], R_DT=_TL[rd], ACC=_TL[cfg["ACC"]],
                            ALIGNED=aligned, CHUNK=CHUNK, BLOCK=cfg["BLOCK"], V=cfg["V"],
                        ),
                        num_warps=cfg["num_warps"],
                        vector16=aligned,
                        thread_local=True,  # no shuffle, barrier or shared memory in the hot loop
                    )
                )
    return specs
