"""Pure-torch secant statistics and Gram matrices: the fallback backend and, in fp64, the oracle.

The backend (``oracle=False``) works by chunks of at most ``CHUNK`` elements, small tensors
packed into groups (see ``_pair_sums``): its extra memory is a few chunk buffers whatever the
size of the list. The oracle (``oracle=True``) works one whole tensor at a time in fp64, in
the plainest code: its temporaries are the size of the largest single tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ext

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


def _pair_sums(vecs, params, refs, K: int, products, P: int, per_tensor: bool, weight_decay: float) -> Tensor:
    """float64 [T or 1, P]: the P sums of ``products`` over every element of the lists."""
    with torch.no_grad():  # parameters that require grad are read, not differentiated (out= buffers)
        return _pair_sums_impl(vecs, params, refs, K, products, P, per_tensor, weight_decay)


def _pair_sums_impl(vecs, params, refs, K: int, products, P: int, per_tensor: bool, weight_decay: float) -> Tensor:
    T = len(params)
    device = params[0].device if T else torch.device("cpu")
    buf = _Buffers(device)
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
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            cx, cr, *cv = [v[s:e] for v in views] if views is not None else [_flat_range(t, s, e) for t in ts]
            run(cv, cx, cr, ct, [e - s], [i])
    for key in list(groups):
        flush(key)
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
