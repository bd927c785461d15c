"""Triton backend of ``secant_gram``: the Gram matrix of K vectors and d = x - x*.

Same design as ``triton_kernels`` (one program per chunk of ``CHUNK`` elements of one tensor,
tensors reached through an int64 address table, one specialisation per (vector, param, ref)
dtype combination, fp64 partial rows, a fixed-order second pass), with M = K + 1 rows:

    G[i][j] = sum v_i * v_j (i, j < K)     G[i][K] = sum v_i * d     G[K][K] = sum d * d

Each program keeps fp32 lanes (fp64 when an input is fp64) of shape [KP, KP, BLOCK] for the
vector pairs, [KP, BLOCK] for the vector-d products and [BLOCK] for d * d (KP = K rounded up
to a power of two), sums them in fp64 at the end of its chunk, and writes one row of M * M
values in which G[i][j] and G[j][i] are stores of the same register: the matrix is exactly
symmetric. The CUDA C++ backend has no Gram kernel; this one serves CUDA tensors.

Runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before import),
which is how CI tests it.
"""

from __future__ import annotations

import torch

from . import triton_kernels

HAVE_TRITON = triton_kernels.HAVE_TRITON
INTERPRET = triton_kernels.INTERPRET
CHUNK = 1 << 16
ROWS = 64  # partial rows summed per step by the segment kernel

if HAVE_TRITON:
    import triton
    import triton.language as tl

    _TL = {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }

    @triton.jit
    def _gram_partials_kernel(
        ptr_table,  # int64 [T, KP + 2]: K vector addresses (padded to KP), x, x*
        numel_ptr,  # int64 [T]
        chunk_tensor_ptr,  # int64 [nchunks]
        chunk_begin_ptr,  # int64 [nchunks]
        chunk_row_ptr,  # int64 [nchunks]: row of `out_ptr` that chunk c writes
        out_ptr,  # float64 [nchunks_total, M * M]
        K: tl.constexpr,
        KP: tl.constexpr,
        V_DT: tl.constexpr,
        X_DT: tl.constexpr,
        R_DT: tl.constexpr,
        ACC: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        M: tl.constexpr = K + 1
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        begin = tl.load(chunk_begin_ptr + c)
        end = tl.minimum(begin + CHUNK, tl.load(numel_ptr + t))
        row = ptr_table + t * (KP + 2)
        x_ptr = tl.load(row + KP).to(tl.pointer_type(X_DT))
        r_ptr = tl.load(row + KP + 1).to(tl.pointer_type(R_DT))
        ks = tl.arange(0, KP)
        kmask = ks < K
        v_ptrs = tl.load(row + ks).to(tl.pointer_type(V_DT))  # [KP]
        acc_vv = tl.zeros([KP, KP, BLOCK], dtype=ACC)
        acc_vd = tl.zeros([KP, BLOCK], dtype=ACC)
        acc_dd = tl.zeros([BLOCK], dtype=ACC)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < end
            d = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC) - tl.load(r_ptr + offs, mask=m, other=0.0).to(ACC)
            v = tl.load(v_ptrs[:, None] + offs[None, :], mask=kmask[:, None] & m[None, :], other=0.0).to(ACC)
            acc_vv += v[:, None, :] * v[None, :, :]
            acc_vd += v * d[None, :]
            acc_dd += d * d
        vv = tl.sum(acc_vv.to(tl.float64), axis=2)  # [KP, KP]
        vd = tl.sum(acc_vd.to(tl.float64), axis=1)  # [KP]
        dd = tl.sum(acc_dd.to(tl.float64), axis=0)
        out = out_ptr + tl.load(chunk_row_ptr + c) * (M * M)
        i = ks[:, None]
        j = ks[None, :]
        upper = (i <= j) & (j < K)
        tl.store(out + i * M + j, vv, mask=upper)  # G[i][j], i <= j < K
        tl.store(out + j * M + i, vv, mask=upper)  # G[j][i]: the same values
        tl.store(out + ks * M + K, vd, mask=kmask)  # G[i][K]
        tl.store(out + K * M + ks, vd, mask=kmask)  # G[K][i]
        tl.store(out + K * M + K, dd)


def available() -> bool:
    return HAVE_TRITON


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block(KP: int) -> int:
    # about 4096 fp32 accumulators of vector pairs per program (K = 8: BLOCK = 64), so that they
    # stay in registers on a GPU; long blocks when K is small
    return max(64, min(1024, 4096 // (KP * KP)))


def gram_rows(vecs, params, refs, num_vecs: int, per_tensor: bool) -> torch.Tensor:
    """[T or 1, K + 1, K + 1] float64 Gram rows. Inputs already validated (see ops._validate)."""
    if not HAVE_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    T, K = len(params), num_vecs
    M = K + 1
    device = params[0].device
    if device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "backend='triton' got CPU tensors; Triton runs on GPUs, or on CPU tensors only under "
            "the interpreter (set TRITON_INTERPRET=1 before importing pathgeom_fast)"
        )
    KP = _next_pow2(K)
    # Contiguous copies of non-contiguous inputs (only those), freed after the launches are
    # queued (the caching allocator reuses memory in stream order).
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
    partials = torch.empty(total, M * M, dtype=torch.float64, device=device)

    # One specialisation per dtype combination; chunk rows laid out by tensor.
    groups: dict[tuple, list[int]] = {}
    for i in range(T):
        groups.setdefault((vecs[i].dtype, params[i].dtype, refs[i].dtype), []).append(i)
    for (vd, xd, rd), idx in groups.items():
        sel = torch.tensor(idx, dtype=torch.int64)
        counts = nchunks[sel]
        n = int(counts.sum())
        if n == 0:
            continue
        table = [[addr(vecs[k * T + i]) for k in range(K)] + [0] * (KP - K) + [addr(params[i]), addr(refs[i])] for i in idx]
        local = torch.repeat_interleave(torch.arange(len(idx)), counts)
        within = torch.arange(n) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        any64 = torch.float64 in (vd, xd, rd)
        _gram_partials_kernel[(n,)](
            torch.tensor(table, **i64),
            numel[sel].to(device),
            local.to(device),
            (within * CHUNK).to(device),
            (first[sel][local] + within).to(device),
            partials,
            K=K,
            KP=KP,
            V_DT=_TL[vd],
            X_DT=_TL[xd],
            R_DT=_TL[rd],
            ACC=tl.float64 if any64 else tl.float32,
            CHUNK=CHUNK,
            BLOCK=_block(KP),
        )

    W = M * M
    seg = (first if per_tensor else torch.tensor([0, total], dtype=torch.int64)).to(device)
    out = torch.empty(seg.numel() - 1, M, M, dtype=torch.float64, device=device)
    if out.shape[0]:
        if total == 0:
            out.zero_()
        else:
            triton_kernels._segment_sum_kernel[(out.shape[0],)](
                partials, seg, out, W=W, WP=_next_pow2(W), ROWS=ROWS
            )
    return out
