"""Pure-torch secant statistics and Gram matrices: the fallback backend and, in fp64, the oracle.

The backend (``oracle=False``) works by chunks: each tensor of ``SMALL`` elements or more by
chunks of ``BIG_CHUNK`` elements through batched Gram matrices of rows of ``ROW`` elements,
smaller tensors packed into groups of at most ``CHUNK`` elements (see ``_pair_sums``): its extra
memory is a few chunk buffers whatever the size of the list. The oracle (``oracle=True``) works one whole tensor at a time in fp64, in
the plainest code: its temporaries are the size of the largest single tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import extension as _ext

Tensor = torch.Tensor


def _compute_dtype(*ts: Tensor, oracle: bool) -> torch.dtype:
    if oracle or any(t.dtype == torch.float64 for t in ts):
        return torch.float64
    return torch.float32


def secant_rows(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    refs: Sequence[Tensor],
    num_grads: int = 1,
    *,
    per_tensor: bool = False,
    weight_decay: float = 0.0,
    oracle: bool = False,
) -> Tensor:
    """(a_k, b_k, c) rows, float64 of shape [T or 1, K, 3].

    ``grads`` holds ``num_grads`` lists of ``len(params)`` tensors back to back. Products in
    fp32 (fp64 when an input is fp64), per-chunk partials combined in fp64; with
    ``oracle=True``, everything in fp64, one tensor at a time.
    """
    if not oracle:
        return fast_secant_rows(grads, params, refs, num_grads, per_tensor, weight_decay)
    T, K = len(params), num_grads
    device = params[0].device if T else torch.device("cpu")
    rows = torch.zeros(T if per_tensor else 1, K, 3, dtype=torch.float64, device=device)
    for i in range(T):
        x, r = params[i], refs[i]
        gs = [grads[k * T + i] for k in range(K)]
        ct = _compute_dtype(x, r, *gs, oracle=oracle)
        xs = x.detach().reshape(-1).to(ct)
        d = xs - r.detach().reshape(-1).to(ct)
        row = rows[i if per_tensor else 0]
        c = (d * d).sum(dtype=torch.float64)
        for k, g in enumerate(gs):
            h = g.detach().reshape(-1).to(ct)
            if weight_decay != 0.0:
                h = h + weight_decay * xs
            row[k, 0] += (h * d).sum(dtype=torch.float64)
            row[k, 1] += (h * h).sum(dtype=torch.float64)
            row[k, 2] += c
    return rows


def reference_secant_stats(grads, params, refs, *, per_tensor: bool = False, weight_decay: float = 0.0) -> Tensor:
    """fp64 oracle for one gradient list: [3] or [T, 3]."""
    grads, params, refs = list(grads), list(params), list(refs)
    rows = secant_rows(grads, params, refs, 1, per_tensor=per_tensor, weight_decay=weight_decay, oracle=True)
    return rows[:, 0] if per_tensor else rows[0, 0]


def gram_rows(
    vecs: Sequence[Tensor],
    params: Sequence[Tensor],
    refs: Sequence[Tensor],
    num_vecs: int,
    *,
    per_tensor: bool = False,
    oracle: bool = False,
) -> Tensor:
    """Gram matrices of (v_0, ..., v_{K-1}, x - x*), float64 of shape [T or 1, K + 1, K + 1].

    ``vecs`` holds ``num_vecs`` lists of ``len(params)`` tensors back to back. Products in fp32
    (fp64 when an input of the tensor position is fp64), per-chunk partials combined in fp64;
    with ``oracle=True``, everything in fp64. Both halves of the matrix come from the same sum.
    """
    if not oracle:
        return fast_gram_rows(vecs, params, refs, num_vecs, per_tensor)
    T, K = len(params), num_vecs
    M = K + 1
    device = params[0].device if T else torch.device("cpu")
    rows = torch.zeros(T if per_tensor else 1, M, M, dtype=torch.float64, device=device)
    for i in range(T):
        x, r = params[i], refs[i]
        vs = [vecs[k * T + i] for k in range(K)]
        ct = _compute_dtype(x, r, *vs, oracle=oracle)
        d = x.detach().reshape(-1).to(ct) - r.detach().reshape(-1).to(ct)
        rs = [v.detach().reshape(-1).to(ct) for v in vs] + [d]
        row = rows[i if per_tensor else 0]
        for a in range(M):
            for b in range(a, M):
                s = (rs[a] * rs[b]).sum(dtype=torch.float64)
                row[a, b] += s
                if b != a:
                    row[b, a] += s
    return rows


def reference_secant_gram(vec_lists, params, refs, *, per_tensor: bool = False) -> Tensor:
    """fp64 oracle of ``secant_gram``: [K + 1, K + 1] or [T, K + 1, K + 1]."""
    lists = [list(v) for v in vec_lists]
    params, refs = list(params), list(refs)
    rows = gram_rows([t for v in lists for t in v], params, refs, len(lists), per_tensor=per_tensor, oracle=True)
    return rows if per_tensor else rows[0]


# --------------------------------------------------------------------------------------
# The fast path of the torch backend (oracle=False)
# --------------------------------------------------------------------------------------
#
# The arithmetic of the compiled kernels in eager torch ops over bounded chunks: per chunk of
# at most CHUNK elements, d = x - x* and h_k = g_k (+ wd x) in the compute dtype (fp32; fp64
# when an input of the position is fp64), products in that dtype, each product summed by
# torch.sum (a cascade sum, whose error does not grow with the chunk's length; a BLAS dot was
# off by 5e-6 of b on constant inputs), partials combined in fp64 in a fixed order. Tensors
# under SMALL elements are packed (flatten_dense_tensors) into groups of up to CHUNK elements,
# so that 10^4 small tensors cost a few hundred rounds of ops, not 10^4. Extra memory: a few
# chunk buffers (CHUNK elements each, K + 2 for secant_gram) and the partials, whatever the
# size of the list; non-contiguous tensors are read in memory order when the tensors of a
# position share their strides, else copied one chunk at a time.
#
# CHUNK is under torch's intra-op grain size (32768 elements), so every op runs on the calling
# thread: no parallel region per op. On a loaded machine (2 cores, load average 5-9) each
# parallel region of the 256K-element chunks first tried waited for a descheduled thread,
# which made the backend 2-7x slower than the per-tensor loop; with serial ops it is faster
# than the loop there, and its result does not depend on torch's thread count.

CHUNK = 32000  # elements per chunk: under at::internal::GRAIN_SIZE (32768), one thread per op
SMALL = 8000  # tensors under this many elements are packed into groups

# Chunks of one tensor (every tensor of SMALL elements or more) take a faster road: the K + 1
# streams d, h_0, ..., h_{K-1} of the chunk are written as the rows of one buffer S in the
# compute dtype, cut into rows of ROW elements, and one batched matrix product gives every
# row's (K + 1) x (K + 1) Gram matrix S_row S_row^T at once (d.d, h_k.d, h_k.h_k and the cross
# terms secant_gram needs). Each entry is a BLAS dot over ROW = 256 elements (at most 1.9e-7
# relative error on constant inputs, where a dot over a whole chunk was off by 5e-6); the rows'
# Gram matrices are summed in fp64 and the chunk's last partial row is computed in fp64. One
# subtraction, K copies and one product per chunk of up to BIG_CHUNK elements (fewer parallel regions
# than a per-tensor loop): on the 2-core CPU this reads a 54M-element fp32 list as fast as the
# per-tensor loop of BLAS dots, in half the time of chunked products (bench/results).
ROW = 256
BIG_CHUNK = 1 << 20  # elements per chunk of the batched-Gram road, at most
BIG_BYTES = 32 << 20  # and at most this many bytes of rows (K + 1 of them) in the compute dtype


def _memory_order_views(ts: list[Tensor]) -> list[Tensor] | None:
    """1-D views pairing the tensors element by element, or None: the tensors themselves when
    contiguous, or read in memory order when they share shape and strides (a transposed view)."""
    if all(t.is_contiguous() for t in ts):
        return [t.view(-1) for t in ts]
    first = ts[0]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in ts):
        return None
    perm = sorted(range(first.dim()), key=lambda i: (-first.stride(i), -first.shape[i]))
    views = [t.permute(perm) for t in ts]
    if not views[0].is_contiguous():
        return None  # overlapping or with gaps: read in logical order, chunk by chunk
    return [v.reshape(-1) for v in views]


def _flat_range(t: Tensor, s: int, e: int) -> Tensor:
    """Elements s..e-1 of ``t`` in row-major order, 1-D: a view where possible, else a copy
    of at most e - s elements (never of the whole tensor)."""
    if t.is_contiguous():
        return t.view(-1)[s:e]
    if t.dim() == 1:
        return t[s:e]
    R = t.numel() // t.shape[0]  # elements per index of dim 0
    i0, i1 = s // R, (e - 1) // R  # first and last index touched
    if i0 == i1:
        return _flat_range(t[i0], s - i0 * R, e - i0 * R)
    parts, lo, hi = [], i0, i1 + 1
    if s > i0 * R:
        parts.append(_flat_range(t[i0], s - i0 * R, R))
        lo += 1
    tail = e < (i1 + 1) * R
    if tail:
        hi -= 1
    if hi > lo:
        parts.append(t[lo:hi].reshape(-1))
    if tail:
        parts.append(_flat_range(t[i1], 0, e - i1 * R))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class _Buffers:
    """Chunk buffers by (name, dtype), allocated on first use and reused by every chunk."""

    def __init__(self, device):
        self.device, self.bufs = device, {}

    def __call__(self, name: str, dtype: torch.dtype, m: int) -> Tensor:
        b = self.bufs.get((name, dtype))
        if b is None:
            b = self.bufs[(name, dtype)] = torch.empty(CHUNK, dtype=dtype, device=self.device)
        return b[:m]

    def matrix(self, rows: int, dtype: torch.dtype) -> Tensor:
        """[rows, BIG_CHUNK]: the rows of the batched-Gram road."""
        b = self.bufs.get(("S", rows, dtype))
        if b is None:
            itemsize = torch.empty((), dtype=dtype).element_size()
            n = max(ROW, min(BIG_CHUNK, BIG_BYTES // (rows * itemsize)))
            b = self.bufs[("S", rows, dtype)] = torch.empty(rows, n, dtype=dtype, device=self.device)
        return b


def _in_dtype(t: Tensor, ct: torch.dtype, out: Tensor, wd: float, x: Tensor) -> Tensor:
    """``t`` + wd * x in dtype ct: ``t`` itself when nothing is to be done, else into ``out``."""
    if t.dtype == ct and not wd:
        return t
    out.copy_(t)
    return out.add_(x, alpha=wd) if wd else out


def _difference(x: Tensor, r: Tensor, ct: torch.dtype, out: Tensor) -> Tensor:
    """x - r computed in ct (not in a lower common dtype of x and r), into ``out``."""
    if torch.promote_types(x.dtype, r.dtype) == ct:
        return torch.sub(x, r, out=out)
    out.copy_(x)
    return out.sub_(r)


def _secant_products(vs, d, x, ct, buf, wd):
    """(d d, h_0 d, h_0 h_0, h_1 d, ...): 2K + 1 products, one at a time into one buffer."""
    m = d.numel()
    p = buf("p", ct, m)
    yield torch.mul(d, d, out=p)
    for v in vs:
        h = _in_dtype(v, ct, buf("h", ct, m), wd, x)
        yield torch.mul(h, d, out=p)
        yield torch.mul(h, h, out=p)


def _gram_products(vs, d, x, ct, buf, wd):
    """<v_a, v_b> for a <= b over (v_0, ..., v_{K-1}, d), row by row."""
    m = d.numel()
    p = buf("p", ct, m)
    rows = [_in_dtype(v, ct, buf(f"v{k}", ct, m), 0.0, x) for k, v in enumerate(vs)] + [d]
    for a in range(len(rows)):
        for b in range(a, len(rows)):
            yield torch.mul(rows[a], rows[b], out=p)


def _chunk_gram(vs, x, r, ct, wd: float, S: Tensor) -> Tensor:
    """float64 [K + 1, K + 1]: the Gram matrix of (x - x*, h_0, ..., h_{K-1}) over one chunk of
    one tensor (1-D pieces of equal length), h_k = v_k (+ wd x) in ct, by the batched road."""
    m = x.numel()
    _difference(x, r, ct, S[0, :m])
    for k, v in enumerate(vs):
        h = S[k + 1, :m]
        h.copy_(v)
        if wd:
            h.add_(x, alpha=wd)
    M = len(vs) + 1
    q = m - m % ROW
    G = None
    if q:
        B = S[:, :q].view(M, q // ROW, ROW).transpose(0, 1)  # [rows, K + 1, ROW]
        G = torch.bmm(B, B.transpose(1, 2)).sum(0, dtype=torch.float64)
    if q < m:
        t = S[:, q:m].double()
        G = t @ t.T if G is None else G + t @ t.T
    return G


def _secant_of_gram(M: int) -> list[int]:
    """Where (d d, h_0 d, h_0 h_0, h_1 d, ...), the order of _secant_products, sit in a
    flattened (K + 1) x (K + 1) Gram matrix of (d, h_0, ..., h_{K-1})."""
    out = [0]
    for k in range(1, M):
        out += [k * M, k * M + k]
    return out


def _gram_of_gram(M: int) -> list[int]:
    """Where <v_a, v_b> for a <= b over (v_0, ..., v_{K-1}, d), the order of _gram_products, sit."""
    idx = list(range(1, M)) + [0]  # v_k is row k + 1 of S, d is row 0
    return [idx[a] * M + idx[b] for a in range(M) for b in range(a, M)]


def _pair_sums(vecs, params, refs, K: int, products, P: int, per_tensor: bool, weight_decay: float) -> Tensor:
    """float64 [T or 1, P]: the P sums of ``products`` over every element of the lists."""
    with torch.no_grad():  # parameters that require grad are read, not differentiated (out= buffers)
        return _pair_sums_impl(vecs, params, refs, K, products, P, per_tensor, weight_decay)


def _pair_sums_impl(vecs, params, refs, K: int, products, P: int, per_tensor: bool, weight_decay: float) -> Tensor:
    T = len(params)
    device = params[0].device if T else torch.device("cpu")
    buf = _Buffers(device)
    fast_road = {_secant_products: _secant_of_gram, _gram_products: _gram_of_gram}.get(products)
    grams: list[Tensor] = []  # [K + 1, K + 1] of one chunk of one tensor (the batched road)
    gram_where: list[int] = []  # per tensor: the position of each of grams
    parts: list[Tensor] = []  # [P] of one chunk, or [n, P] of a packed group (per tensor)
    where: list[int] = []  # per tensor: the position of each row of parts
    groups: dict[tuple, list[int]] = {}  # small positions waiting, by their dtypes
    sizes: dict[tuple, int] = {}

    def run(vs, x, r, ct, lengths, positions):
        d = _difference(x, r, ct, buf("d", ct, x.numel()))
        prods = products(vs, d, x, ct, buf, weight_decay)
        if per_tensor and len(lengths) > 1:  # one sum per packed tensor, in fp64
            seg = torch.tensor(lengths, dtype=torch.int64, device=x.device)
            parts.append(torch.stack([torch.segment_reduce(q.double(), "sum", lengths=seg) for q in prods], 1))
        else:
            parts.append(torch.stack([q.sum() for q in prods]).double())
        if per_tensor:
            where.extend(positions)

    def flush(key):
        pos = groups.pop(key)
        sizes.pop(key)
        ct = key[0]
        flat = torch._utils._flatten_dense_tensors
        vs = [flat([vecs[k * T + i] for i in pos]) for k in range(K)]
        run(vs, flat([params[i] for i in pos]), flat([refs[i] for i in pos]), ct, [params[i].numel() for i in pos], pos)

    for i in range(T):
        x, r = params[i], refs[i]
        vs = [vecs[k * T + i] for k in range(K)]
        n = x.numel()
        if n == 0:
            continue
        ct = _compute_dtype(x, r, *vs, oracle=False)
        if n < SMALL:
            key = (ct, x.dtype, r.dtype, vs[0].dtype)
            if sizes.get(key, 0) + n > CHUNK:
                flush(key)
            groups.setdefault(key, []).append(i)
            sizes[key] = sizes.get(key, 0) + n
            continue
        ts = [x, r] + vs
        views = _memory_order_views(ts)
        if fast_road is not None:  # one tensor's chunks: the batched-Gram road
            S = buf.matrix(K + 1, ct)
            step = S.shape[1]
            for s in range(0, n, step):
                e = min(n, s + step)
                cx, cr, *cv = [v[s:e] for v in views] if views is not None else [_flat_range(t, s, e) for t in ts]
                grams.append(_chunk_gram(cv, cx, cr, ct, weight_decay, S))
                if per_tensor:
                    gram_where.append(i)
            continue
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            cx, cr, *cv = [v[s:e] for v in views] if views is not None else [_flat_range(t, s, e) for t in ts]
            run(cv, cx, cr, ct, [e - s], [i])
    for key in list(groups):
        flush(key)
    if grams:  # the batched road's chunks as [n, P] rows, in the order of the products
        pick = torch.tensor(fast_road(K + 1), dtype=torch.int64, device=device)
        rows_g = torch.stack(grams).view(len(grams), -1).index_select(1, pick)
        if per_tensor:
            parts.append(rows_g)
            where.extend(gram_where)
        else:
            parts.extend(rows_g.unbind(0))
    if not per_tensor:
        if not parts:
            return torch.zeros(1, P, dtype=torch.float64, device=device)
        # in chunk order, one thread (cumsum is a sequential scan): the same bits whatever the thread count
        return torch.stack(parts).cumsum(0)[-1:]
    rows = torch.zeros(T, P, dtype=torch.float64, device=device)
    if parts:
        vals = torch.cat([v.view(-1, P) for v in parts])
        rows.index_add_(0, torch.tensor(where, dtype=torch.int64, device=device), vals)
    return rows


def fast_secant_rows(grads, params, refs, K: int, per_tensor: bool, weight_decay: float) -> Tensor:
    """(a_k, b_k, c) rows, float64 [T or 1, K, 3], by chunks (see above)."""
    _ext.warn_fallback()
    sums = _pair_sums(grads, params, refs, K, _secant_products, 2 * K + 1, per_tensor, weight_decay)
    rows = torch.empty(sums.shape[0], K, 3, dtype=torch.float64, device=sums.device)
    rows[:, :, 0] = sums[:, 1::2]
    rows[:, :, 1] = sums[:, 2::2]
    rows[:, :, 2] = sums[:, :1]
    return rows


def fast_gram_rows(vecs, params, refs, K: int, per_tensor: bool) -> Tensor:
    """Gram matrices, float64 [T or 1, K + 1, K + 1], by chunks (see above)."""
    _ext.warn_fallback()
    M = K + 1
    sums = _pair_sums(vecs, params, refs, K, _gram_products, M * (M + 1) // 2, per_tensor, 0.0)
    iu = torch.triu_indices(M, M)
    rows = torch.empty(sums.shape[0], M, M, dtype=torch.float64, device=sums.device)
    rows[:, iu[0], iu[1]] = sums
    rows[:, iu[1], iu[0]] = sums
    return rows
