"""The Triton backend's two specialisations (16-byte aligned, and general) and its host side.

Runs under the Triton interpreter on CPU (tests/conftest.py), or on a GPU when there is one.
Which specialisation ran is read from the cached plan of the call (its launches' group keys).
"""

from __future__ import annotations

import pytest
import torch

import pathgeom_fast as pg
from pathgeom_fast import triton_kernels as tk

from utils import HAS_CUDA, assert_stats_close, make_lists, ref_multi

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not tk.available() or not (HAS_CUDA or tk.INTERPRET), reason="needs triton, and a GPU or TRITON_INTERPRET=1"
)
SIZES = [1000, 70001, 333, 0, 4096]


def offset_views(lists):
    """Same values, addresses shifted by one element: contiguous, but not 16-byte aligned."""

    def shift(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)

    return [shift(t) for t in lists]


def launch_alignment(grads, params, refs, K, per_tensor=False):
    plan, *_ = tk.prepare(grads, params, refs, K, per_tensor)
    return {tk.unpack_key(L.key)[3] for L in plan.launches}


@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32), (torch.float16,) * 3, (torch.float64,) * 3],
    ids=["f32", "bf16-f32-f32", "f16", "f64"],
)
def test_aligned_and_misaligned_match_reference(dtypes):
    g, x, r = make_lists(SIZES, dtypes, device=DEVICE, seed=30)
    ref = pg.reference_secant_stats(g, x, r, per_tensor=True)
    assert launch_alignment(g, x, r, 1) == {True}
    aligned = pg.secant_stats(g, x, r, backend="triton", per_tensor=True)
    assert_stats_close(aligned, ref, what="aligned")
    g2, x2, r2 = offset_views(g), offset_views(x), offset_views(r)
    assert launch_alignment(g2, x2, r2, 1) == {False}
    misaligned = pg.secant_stats(g2, x2, r2, backend="triton", per_tensor=True)
    assert_stats_close(misaligned, ref, what="misaligned")


def test_mixed_alignment_in_one_call_multi_pass_weight_decay():
    # K = 11: two passes (8 + 3); one misaligned tensor goes to its own launch
    grads, x, r = make_lists([70001, 1000, 5, 0], device=DEVICE, seed=31, K=11)
    x[1] = offset_views([x[1]])[0]
    assert launch_alignment([t for g in grads for t in g], x, r, 11) == {True, False}
    out = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True, weight_decay=0.01)
    assert_stats_close(out, ref_multi(grads, x, r, per_tensor=True, weight_decay=0.01))
    # every pass recomputes c = ||x - x*||^2 the same way: bitwise equal across k
    assert torch.equal(out[:, :, 2], out[:1, :, 2].expand(11, -1))
    total = pg.secant_stats_multi(grads, x, r, backend="triton", weight_decay=0.01)
    assert_stats_close(total, ref_multi(grads, x, r, weight_decay=0.01))


def test_plans_and_buffers_are_cached_by_content():
    tk.clear_caches()
    g, x, r = make_lists([300, 70000], device=DEVICE, seed=32)
    first = pg.secant_stats(g, x, r, backend="triton")
    assert tk.cache_info()["plans"] == 1 and tk.cache_info()["buffers"] == 1
    again = pg.secant_stats(g, x, r, backend="triton")
    assert torch.equal(first, again) and tk.cache_info()["buffers"] == 1  # no new buffer
    g2 = [t.clone() for t in g]  # same sizes, new addresses: same plan, new buffer
    assert_stats_close(pg.secant_stats(g2, x, r, backend="triton"), pg.reference_secant_stats(g2, x, r))
    assert tk.cache_info()["plans"] == 1 and tk.cache_info()["buffers"] == 2
    g[0].mul_(3.0)  # new values at the same addresses: the cached buffer stays valid
    assert_stats_close(pg.secant_stats(g, x, r, backend="triton"), pg.reference_secant_stats(g, x, r))


def test_kernel_config_vector_width():
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    assert tk.kernel_config(tk.group_key(f32, f32, f32, True))["V"] == 8
    assert tk.kernel_config(tk.group_key(bf16, f32, f32, True))["V"] == 8
    assert tk.kernel_config(tk.group_key(f64, f64, f64, True))["V"] == 2
    assert tk.kernel_config(tk.group_key(f32, f32, f32, False))["V"] == 2
    for key in range(128):
        assert tk.group_key(*tk.unpack_key(key)) == key
