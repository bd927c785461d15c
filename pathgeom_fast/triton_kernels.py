"""Triton backend: the CUDA kernel's algorithm written in Triton.

One program per chunk of ``CHUNK`` elements of one tensor; tensors are reached through an
int64 table of addresses, one kernel specialisation per (grad, param, ref) dtype combination.
Each program writes one fp64 partial row per gradient list; a second kernel sums each
tensor's rows (or all rows) in a fixed order, so results are bitwise reproducible.

Runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before import),
which is how CI tests it.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 1 << 16
BLOCK = 1024  # elements per step for one gradient list; divided by K (padded) for more
ROWS = 64  # partial rows summed per step by the segment kernel


def available() -> bool:
    return HAVE_TRITON


if HAVE_TRITON:
    _TL = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }

    @triton.jit
    def _partials_kernel(
        ptr_table,  # int64 [T, KP + 2]: K gradient addresses (padded to KP), x, x*
        numel_ptr,  # int64 [T]
        chunk_tensor_ptr,  # int64 [nchunks]
        chunk_begin_ptr,  # int64 [nchunks]
        chunk_row_ptr,  # int64 [nchunks]: row of `out_ptr` that chunk c writes
        out_ptr,  # float64 [nchunks_total, K, 3]
        wd,
        K: tl.constexpr,
        KP: tl.constexpr,
        G_DT: tl.constexpr,
        X_DT: tl.constexpr,
        R_DT: tl.constexpr,
        ACC: tl.constexpr,
        HAS_WD: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        begin = tl.load(chunk_begin_ptr + c)
        end = tl.minimum(begin + CHUNK, tl.load(numel_ptr + t))
        row = ptr_table + t * (KP + 2)
        x_ptr = tl.load(row + KP).to(tl.pointer_type(X_DT))
        r_ptr = tl.load(row + KP + 1).to(tl.pointer_type(R_DT))
        ks = tl.arange(0, KP)
        kmask = ks < K
        g_ptrs = tl.load(row + ks).to(tl.pointer_type(G_DT))  # [KP]
        acc_a = tl.zeros([KP, BLOCK], dtype=ACC)
        acc_b = tl.zeros([KP, BLOCK], dtype=ACC)
        acc_c = tl.zeros([BLOCK], dtype=ACC)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < end
            xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
            d = xv - tl.load(r_ptr + offs, mask=m, other=0.0).to(ACC)
            acc_c += d * d
            gm = kmask[:, None] & m[None, :]
            h = tl.load(g_ptrs[:, None] + offs[None, :], mask=gm, other=0.0).to(ACC)
            if HAS_WD:
                h = tl.where(gm, h + wd * xv[None, :], 0.0)
            acc_a += h * d[None, :]
            acc_b += h * h
        a = tl.sum(acc_a.to(tl.float64), axis=1)  # [KP]
        b = tl.sum(acc_b.to(tl.float64), axis=1)
        cc = tl.sum(acc_c.to(tl.float64), axis=0)
        out = out_ptr + tl.load(chunk_row_ptr + c) * (3 * K) + ks * 3
        tl.store(out, a, mask=kmask)
        tl.store(out + 1, b, mask=kmask)
        tl.store(out + 2, tl.zeros([KP], dtype=tl.float64) + cc, mask=kmask)

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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def triton_rows(grads, params, refs, num_grads: int, per_tensor: bool, weight_decay: float) -> torch.Tensor:
    """[T or 1, K, 3] float64 rows. Inputs already validated (see ops._validate)."""
    if not HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    T, K = len(params), num_grads
    device = params[0].device
    if device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "backend='triton' got CPU tensors; Triton runs on GPUs, or on CPU tensors only under "
            "the interpreter (set TRITON_INTERPRET=1 before importing pathgeom_fast)"
        )
    KP = _next_pow2(K)
    # Contiguous copies of non-contiguous inputs (only those). They may be freed once the launches
    # are queued: the caching allocator reuses memory in stream order, after the kernels.
    keep = []

    def addr(t: torch.Tensor) -> int:
        if t.numel() and not t.is_contiguous():
            t = t.contiguous()
            keep.append(t)
        return t.data_ptr()

    i64 = dict(dtype=torch.int64, device=device)
    numel = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    nchunks = (numel + CHUNK - 1) // CHUNK
    first = torch.zeros(T + 1, dtype=torch.int64)
    first[1:] = torch.cumsum(nchunks, 0)
    total = int(first[-1])
    partials = torch.empty(total, K, 3, dtype=torch.float64, device=device)

    # Group by dtype combination: one kernel specialisation each. Chunk rows are laid out by
    # tensor (tensor i owns rows first[i] .. first[i+1]), whatever the groups.
    groups: dict[tuple, list[int]] = {}
    for i in range(T):
        groups.setdefault((grads[i].dtype, params[i].dtype, refs[i].dtype), []).append(i)
    for (gd, xd, rd), idx in groups.items():
        sel = torch.tensor(idx, dtype=torch.int64)
        counts = nchunks[sel]
        n = int(counts.sum())
        if n == 0:
            continue
        table = [[addr(grads[k * T + i]) for k in range(K)] + [0] * (KP - K) + [addr(params[i]), addr(refs[i])] for i in idx]
        local = torch.repeat_interleave(torch.arange(len(idx)), counts)
        within = torch.arange(n) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        any64 = torch.float64 in (gd, xd, rd)
        _partials_kernel[(n,)](
            torch.tensor(table, **i64),
            numel[sel].to(device),
            local.to(device),
            (within * CHUNK).to(device),
            (first[sel][local] + within).to(device),
            partials,
            float(weight_decay),
            K=K,
            KP=KP,
            G_DT=_TL[gd],
            X_DT=_TL[xd],
            R_DT=_TL[rd],
            ACC=tl.float64 if any64 else tl.float32,
            HAS_WD=weight_decay != 0.0,
            CHUNK=CHUNK,
            # two [KP, BLOCK] fp32 accumulators per program: keep them near 2 x 1024 values so
            # that K = 8 does not spill registers on a GPU
            BLOCK=max(128, BLOCK // KP),
        )

    W = 3 * K
    seg = (first if per_tensor else torch.tensor([0, total], dtype=torch.int64)).to(device)
    out = torch.empty(seg.numel() - 1, K, 3, dtype=torch.float64, device=device)
    if out.shape[0]:
        if total == 0:
            out.zero_()
        else:
            _segment_sum_kernel[(out.shape[0],)](partials, seg, out, W=W, WP=_next_pow2(W), ROWS=ROWS)
    return out
