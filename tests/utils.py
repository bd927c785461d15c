"""Shared test helpers: random inputs (never zeros) and the DESIGN.md tolerance check."""

from __future__ import annotations

import math

import torch

import pathgeom_fast as pg
from pathgeom_fast import _ext, triton_kernels

HAS_CUDA = torch.cuda.is_available()
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def backends_for(device: str) -> list[str]:
    """Backends that can run on `device` in this environment."""
    out = ["torch"]
    if _ext.available() and device == "cpu":
        out.append("cpu")
    if _ext.available() and _ext.WITH_CUDA and device == "cuda":
        out.append("cuda")
    if triton_kernels.available() and (device == "cuda" or triton_kernels.INTERPRET):
        out.append("triton")
    return out


def make_lists(sizes, dtypes=(torch.float32,) * 3, device="cpu", seed=0, K=1):
    """K gradient lists, params and refs of the given numels; random normal, distinct scales."""
    gen = torch.Generator().manual_seed(seed)
    gd, xd, rd = dtypes

    def rnd(n, dt, scale):
        return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    params = [rnd(n, xd, 1.0) for n in sizes]
    refs = [rnd(n, rd, 1.0) + 0.5 * p.to(rd) for n, p in zip(sizes, params)]
    grads = [[rnd(n, gd, 0.1 * (k + 1)) + 0.05 * (p - r.to(xd)).to(gd) for n, p, r in zip(sizes, params, refs)] for k in range(K)]
    return (grads[0] if K == 1 else grads), params, refs


def assert_stats_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-6, what: str = "") -> None:
    """|a - a_ref| <= rel * sqrt(b c); b and c within `rel` relative (DESIGN.md section 2)."""
    assert out.dtype == torch.float64, out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.cpu(), ref.cpu()
    b, c = ref[..., 1], ref[..., 2]
    tiny = 1e-300
    err = (out - ref).abs()
    ok = torch.stack(
        [err[..., 0] <= rel * torch.sqrt(b * c) + tiny, err[..., 1] <= rel * b + tiny, err[..., 2] <= rel * c + tiny], -1
    )
    if not bool(ok.all()):
        bad = (~ok).nonzero().tolist()[:10]
        lines = [f"  at {tuple(i)}: got {out[tuple(i)].item()!r}, expected {ref[tuple(i)].item()!r}" for i in bad]
        raise AssertionError(f"{what} stats differ from the fp64 reference ({int((~ok).sum())} entries):\n" + "\n".join(lines))


def ref_multi(grads_lists, params, refs, per_tensor=False, weight_decay=0.0):
    rows = [pg.reference_secant_stats(g, params, refs, per_tensor=per_tensor, weight_decay=weight_decay) for g in grads_lists]
    return torch.stack(rows)


def sqrt(x):
    return math.sqrt(x)


class WrapperTensor(torch.Tensor):
    """A wrapper subclass: no memory of its own (a null data pointer), its data in an inner
    tensor that every op reaches through __torch_dispatch__."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        tree_map = torch.utils._pytree.tree_map

        def unwrap(v):
            return v.inner if isinstance(v, WrapperTensor) else v

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        return tree_map(lambda v: WrapperTensor(v) if isinstance(v, torch.Tensor) else v, out)
