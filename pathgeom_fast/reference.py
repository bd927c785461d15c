"""Pure-torch secant statistics and Gram matrices: the fallback backend and, in fp64, the oracle.

Works one tensor at a time (no flattening of the model): the temporaries are the size of
the largest single tensor, never of the whole list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
    fp32 (fp64 when an input is fp64, or everything in fp64 with ``oracle=True``), sums in fp64.
    """
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
    (fp64 when an input of the tensor position is fp64, or everything in fp64 with
    ``oracle=True``), sums in fp64; both halves of the matrix come from the same sum.
    """
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
