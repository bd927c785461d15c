"""The Triton backend's two specialisations (16-byte aligned, and general) and its host side.

Runs under the Triton interpreter on CPU (tests/conftest.py), or on a GPU when there is one.
Which specialisation ran is read from the cached plan of the call (its launches' group keys).
"""

from __future__ import annotations

import numpy as np
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
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    # aligned: 16 bytes of the narrowest stream per thread and step (fp32 8 would put a
    # thread's row on two threads: shuffles in the hot loop), the same rule as the Gram kernel's
    assert tk.kernel_config(tk.group_key(f32, f32, f32, True))["V"] == 4
    assert tk.kernel_config(tk.group_key(bf16, f32, f32, True))["V"] == 8
    assert tk.kernel_config(tk.group_key(f16, f16, f16, True))["V"] == 8
    assert tk.kernel_config(tk.group_key(f64, f64, f64, True))["V"] == 2
    assert tk.kernel_config(tk.group_key(f32, f32, f32, False))["V"] == 2
    for key in range(128):
        for warps in (None, tk.NUM_WARPS):
            cfg = tk.kernel_config(key, warps)
            assert cfg["BLOCK"] == cfg["V"] * 32 * cfg["num_warps"] and tk.CHUNK % cfg["BLOCK"] == 0
        assert tk.kernel_config(key, tk.NUM_WARPS)["num_warps"] == 4
        assert tk.group_key(*tk.unpack_key(key)) == key
    assert [tk.reduce_group(k) for k in (1, 2, 3, 5, 6, 8)] == [4, 8, 16, 16, 16, 16]


# --------------------------------------------------------------------------------------
# The thread-local kernel's edges: V-tiles cut by the end of a tensor or chunk, the masked
# tail, no whole step at all, gradient counts that are not powers of two (no padding row is
# read), one or two cross-thread reductions per chunk, against an fp64 oracle built here
# --------------------------------------------------------------------------------------


def flat_oracle(grads_lists, params, refs, weight_decay=0.0, per_tensor=False):
    """[K, 3] (or [K, T, 3]) float64 from flattened float64 copies: independent of the package."""

    def stats(gl, xl, rl):
        f = lambda ts: torch.cat([t.detach().cpu().reshape(-1).double() for t in ts] + [torch.zeros(0, dtype=torch.float64)])
        x = f(xl)
        d = x - f(rl)
        out = []
        for g in gl:
            h = f(g) + weight_decay * x if weight_decay else f(g)
            out.append(torch.stack([(h * d).sum(), (h * h).sum(), (d * d).sum()]))
        return torch.stack(out)

    if per_tensor:
        return torch.stack([stats([[g[i]] for g in grads_lists], [params[i]], [refs[i]]) for i in range(len(params))], 1)
    return stats(grads_lists, params, refs)


def edge_sizes(dtypes, aligned):
    """Sizes around the step's edges for this specialisation: inside one V-tile, one past it,
    one short of and one past a whole step (BLOCK), a step plus a cut V-tile, and one past a
    chunk (the next chunk holds a single element)."""
    cfg = tk.kernel_config(tk.group_key(*dtypes, aligned))
    V, B = cfg["V"], cfg["BLOCK"]
    return [1, V - 1, V + 1, B - 1, B, B + V + 3, 3 * B + 1, tk.CHUNK + 1]


SHIPPED = [tk.SHIPPED_DTYPES[n] for n in ("f32", "bf16g-f32", "f16", "f64")]


@pytest.mark.parametrize("dtypes", SHIPPED, ids=["f32", "bf16-f32-f32", "f16", "f64"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_step_edges_per_tensor(dtypes, aligned):
    sizes = edge_sizes(dtypes, aligned)
    grads, x, r = make_lists(sizes, dtypes, device=DEVICE, seed=33, K=3)
    if not aligned:
        grads, x, r = [offset_views(g) for g in grads], offset_views(x), offset_views(r)
    flat = [t for g in grads for t in g]
    assert launch_alignment(flat, x, r, 3, per_tensor=True) == {aligned}
    out = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True)
    assert_stats_close(out, flat_oracle(grads, x, r, per_tensor=True))
    assert torch.equal(out[:, :, 2], out[:1, :, 2].expand(3, -1))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs this configuration in every test")
@pytest.mark.parametrize("dtypes", [SHIPPED[1], SHIPPED[0]], ids=["bf16-f32-f32", "f32"])
def test_gpu_block_under_interpreter(monkeypatch, dtypes):
    """The interpreter normally takes 8x longer steps (tk.INTERPRET_WARPS); here the GPU's own
    BLOCK (4 warps), aligned and misaligned tensors in one call, K = 8 with weight decay."""
    monkeypatch.setattr(tk, "INTERPRET_WARPS", tk.NUM_WARPS)
    sizes = edge_sizes(dtypes, True)[:-1] + [5 * 2 * 32 * tk.NUM_WARPS + 1]  # the last one misaligned
    assert sizes[4] == tk.kernel_config(tk.group_key(*dtypes, True), tk.NUM_WARPS)["BLOCK"]
    grads, x, r = make_lists(sizes, dtypes, device=DEVICE, seed=37, K=8)
    r[-1] = offset_views([r[-1]])[0]
    flat = [t for g in grads for t in g]
    plan, *_ = tk.prepare(flat, x, r, 8, True)
    blocks = {(tk.unpack_key(L.key)[3], tk.kernel_config(L.key)["BLOCK"]) for L in plan.launches}
    assert blocks == {(True, sizes[4]), (False, 2 * 32 * tk.NUM_WARPS)}
    out = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True, weight_decay=0.02)
    assert_stats_close(out, flat_oracle(grads, x, r, weight_decay=0.02, per_tensor=True))
    assert torch.equal(out[:, :, 2], out[:1, :, 2].expand(8, -1))


@pytest.mark.parametrize("K", [1, 5, 6, 8])
def test_gradient_counts_and_weight_decay(K):
    # K = 5, 6: table rows padded to 8 (the padding is never read); 3 K = 15 values in one
    # cross-thread reduction, 18 and 24 in two (the second partly empty)
    sizes = [2 * tk.kernel_config(tk.group_key(*SHIPPED[0], True))["BLOCK"] + 7, 13, 300]
    grads, x, r = make_lists(sizes, device=DEVICE, seed=34, K=max(K, 2))
    grads = grads[:K]
    out = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True, weight_decay=0.03)
    assert_stats_close(out, flat_oracle(grads, x, r, weight_decay=0.03, per_tensor=True))
    plain = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True)
    assert_stats_close(plain, flat_oracle(grads, x, r, per_tensor=True))
    # h = g exactly when wd == 0: the same bits as the call without weight decay
    assert torch.equal(pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True, weight_decay=0.0), plain)
    # c does not see the weight decay: the same bits under the interpreter. Compiled, the wd
    # launch is another specialisation, and on an H100 (Triton 3.6, 2026-11-27) its c differed
    # from the plain one's in the last bits for K = 6: within rounding, not bitwise.
    if tk.INTERPRET:
        assert torch.equal(out[:, :, 2], plain[:, :, 2])
    else:
        torch.testing.assert_close(out[:, :, 2], plain[:, :, 2], rtol=1e-6, atol=0)


def test_c_bitwise_equal_across_passes_and_lists():
    # K = 10: passes of 8 and 2 lists; K = 2 alone: the same c for every tensor, to the bit
    grads, x, r = make_lists([70001, 1000, 4099], device=DEVICE, seed=35, K=10)
    x[2] = offset_views([x[2]])[0]
    ten = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True)
    two = pg.secant_stats_multi(grads[:2], x, r, backend="triton", per_tensor=True)
    assert_stats_close(ten, flat_oracle(grads, x, r, per_tensor=True))
    assert torch.equal(ten[:, :, 2], ten[:1, :, 2].expand(10, -1))
    assert torch.equal(ten[:2], two)


def test_nan_inf_in_hot_loop_and_tail():
    B = tk.kernel_config(tk.group_key(*SHIPPED[0], True))["BLOCK"]
    grads, x, r = make_lists([3 * B + 5, 50], device=DEVICE, seed=36, K=3)
    grads[1][0][B + 7] = float("nan")  # in a whole step of tensor 0: list 1 only
    grads[2][0][3 * B + 2] = float("inf")  # in the masked tail of tensor 0: list 2 only
    x[1][49] = float("inf")  # tensor 1's only (tail) step: c and every a of tensor 1
    out = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True).cpu()
    ref = flat_oracle(grads, x, r, per_tensor=True)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.isnan(out[1, 0, :2]).all() and torch.isinf(out[2, 0, 1]) and torch.isfinite(out[0, 0]).all()
    assert torch.isinf(out[:, 1, 2]).all() and torch.isfinite(out[:, 1, 1]).all()
    finite = torch.isfinite(ref)
    assert torch.allclose(out[finite], ref[finite], rtol=1e-5)


def test_host_tables_cpp_equal_python():
    """The checked tables of the compiled extension (_C.triton_inputs) equal the Python ones:
    addresses (lists back to back, then params, then refs), numels, group keys, plan; a
    non-contiguous input is copied by both, and both paths give the same bits."""
    from pathgeom_fast import _ext

    if not _ext.available():
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    grads, x, r = make_lists([1000, 0, 333, 70001], (torch.bfloat16, torch.float32, torch.float64), device=DEVICE, seed=37, K=3)
    x[2] = offset_views([x[2]])[0]  # misaligned
    r[0] = torch.empty(2000, dtype=r[0].dtype, device=DEVICE)[::2].copy_(r[0])  # non-contiguous: a copy
    flat = [t for gl in grads for t in gl]  # the K lists back to back
    plan_c, key_c, addrs_c, keep_c = tk.prepare(flat, x, r, 3, True)
    original = tk.checks_inputs
    try:
        tk.checks_inputs = lambda: False
        plan_p, key_p, addrs_p, keep_p = tk.prepare(flat, x, r, 3, True)
        python = pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True)
    finally:
        tk.checks_inputs = original
    T = len(x)
    # same numels, dtype codes and alignment: the same plan (the two paths' cache digests differ)
    assert [(L.key, L.kc, L.tensors.tolist(), L.programs) for L in plan_c.launches] == \
        [(L.key, L.kc, L.tensors.tolist(), L.programs) for L in plan_p.launches]
    assert (plan_c.static == plan_p.static).all() and (plan_c.addr_src == plan_p.addr_src).all()
    assert key_c[:3] == key_p[:3] == (T, 3, True)
    assert len(keep_c) == len(keep_p) == 1 and keep_c[0].is_contiguous() and torch.equal(keep_c[0], r[0])
    same = [i for i in range(len(addrs_c)) if i != 3 * T + T + 0]  # all but the copied ref's (a fresh copy each time)
    assert (addrs_c.astype("int64")[same] == addrs_p.astype("int64")[same]).all()
    assert int(addrs_c[3 * T + 1]) in (0, x[1].data_ptr())  # empty tensor
    assert int(addrs_c[0]) == flat[0].data_ptr() and int(addrs_c[3 * T + 2]) == x[2].data_ptr()
    assert torch.equal(pg.secant_stats_multi(grads, x, r, backend="triton", per_tensor=True), python)
    with pytest.raises(ValueError, match=r"index 1: grads\[2\]\[1\] has shape \[5\]"):  # the C++ checks' message
        tk.prepare(flat[:9] + [torch.randn(5, device=DEVICE)] + flat[10:], x, r, 3, False)


def test_python_checks_without_extension(monkeypatch):
    """Without the compiled extension the Triton op checks its inputs in Python (ops._validate)."""
    monkeypatch.setattr(tk, "checks_inputs", lambda: False)
    g, x, r = make_lists([10, 20], device=DEVICE, seed=38)
    assert_stats_close(pg.secant_stats(g, x, r, backend="triton", per_tensor=True), pg.reference_secant_stats(g, x, r, per_tensor=True))
    with pytest.raises(ValueError, match=r"index 1: refs\[1\] has shape \[3\]"):
        pg.secant_stats(g, x, [r[0], torch.randn(3, device=DEVICE)], backend="triton")
    with pytest.raises(ValueError, match=r"grads\[0\] is None"):
        pg.secant_stats([None, g[1]], x, r, backend="triton")


def test_cache_digest_collisions_rebuild_never_misuse(monkeypatch):
    """The plan and buffer caches are keyed by 64-bit digests; a hit must also hold the same
    sizes, group keys, addresses and plan. Forced to collide (every digest 0), calls on views
    of one storage with the same addresses but other sizes still give the fp64 reference."""
    from pathgeom_fast import _ext

    if not _ext.available():
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    module = _ext._C

    class Colliding:
        def __getattr__(self, name):
            return getattr(module, name)

        @staticmethod
        def triton_inputs(*args):
            a, n, k, keep, _ = module.triton_inputs(*args)
            return a, n, k, keep, (0, 0)

    monkeypatch.setattr(_ext, "_C", Colliding())
    tk.clear_caches()
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(3000, generator=gen, device=DEVICE) for _ in range(3)]
    for n in (3000, 1000, 2999):  # same addresses, other sizes: other plans and buffers
        g, x, r = ([t[:n]] for t in base)
        assert_stats_close(pg.secant_stats(g, x, r, backend="triton"), pg.reference_secant_stats(g, x, r), what=str(n))
    tk.clear_caches()


def test_same_bytes_compares_format_shape_and_every_byte():
    """The caches' content check (one memcmp): equal only for the same format, shape and bytes;
    a difference in the last word, a shorter array, another dtype or shape are all told apart."""
    from pathgeom_fast import _ext

    if not _ext.available():
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    same = _ext._C.same_bytes
    gen = np.random.default_rng(3)
    a = gen.integers(-(2**62), 2**62, size=30_001, dtype=np.int64)
    assert same(a, a.copy())
    b = a.copy()
    b[-1] ^= 1
    assert not same(a, b)
    assert not same(a, a[:-1].copy())
    assert not same(a, a.view(np.float64))
    assert not same(a[:30_000].reshape(100, 300), a[:30_000].copy())
    assert same(np.zeros(0, np.int64), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="not C-contiguous"):
        same(a[::2], a[::2])  # not C-contiguous: refused, not misread
