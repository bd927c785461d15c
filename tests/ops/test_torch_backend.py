"""The torch backend's chunked path (what an install without a compiler runs) against the fp64
oracle: chunk and group boundaries, dtypes, non-contiguous tensors, constant inputs, NaN,
determinism, and its bounded extra memory."""

import json
import subprocess
import sys

import pytest
import torch

import pathgeom_fast as pg
from pathgeom_fast import reference

from utils import assert_stats_close, make_lists

SIZES = [1, 3, 1023, 65537, 0, 8, 70001, 5000, 4096, 4097, 300]
DTYPES = [
    (torch.float32,) * 3,
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16,) * 3,
    (torch.float16, torch.float16, torch.float64),
    (torch.float64,) * 3,
]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4096 elements, tensors under 512 packed, batched-Gram chunks of 3000 elements
    (not a multiple of its rows of 256: a partial row at every chunk's end): more boundaries."""
    monkeypatch.setattr(reference, "CHUNK", 1 << 12)
    monkeypatch.setattr(reference, "SMALL", 1 << 9)
    monkeypatch.setattr(reference, "BIG_CHUNK", 3000)


def gram_error(out, ref):
    d = torch.diagonal(ref, dim1=-2, dim2=-1)
    return float(((out - ref).abs() / torch.sqrt(d[..., :, None] * d[..., None, :])).max())


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("K", [1, 3])
def test_chunks_and_groups_match_the_oracle(small_chunks, dtypes, K):
    g, x, r = make_lists(SIZES, dtypes, K=K, seed=3)
    lists = [g] if K == 1 else g
    keep = [i for i, n in enumerate(SIZES) if n]
    for wd in (0.0, 0.05):
        for per_tensor in (False, True):
            out = pg.secant_stats_multi(lists, x, r, backend="torch", per_tensor=per_tensor, weight_decay=wd)
            ref = torch.stack([pg.reference_secant_stats(h, x, r, per_tensor=per_tensor, weight_decay=wd) for h in lists])
            if per_tensor:
                assert torch.equal(out[:, SIZES.index(0)], torch.zeros(K, 3, dtype=torch.float64))
                out, ref = out[:, keep], ref[:, keep]
            assert_stats_close(out, ref, what=f"wd={wd} per_tensor={per_tensor}")
    vecs = lists + [[2 * t - 1 for t in lists[0]]]
    assert gram_error(pg.secant_gram(vecs, x, r, backend="torch"), pg.reference_secant_gram(vecs, x, r)) < 1e-6
    per = pg.secant_gram(vecs, x, r, backend="torch", per_tensor=True)
    assert gram_error(per[keep], pg.reference_secant_gram(vecs, x, r, per_tensor=True)[keep]) < 1e-6
    assert torch.equal(per, per.transpose(-1, -2))


def test_constant_inputs_stay_within_the_error_target():
    """Equal terms make rounding errors add up in one direction: a BLAS dot over chunks of 64K
    elements was off by 5e-6 of b here; dots over rows of 256 elements summed in fp64 (and the
    packed groups' cascade sums) stay within 1e-6."""
    n = 1_500_000
    g, x, r = [torch.full((n,), 0.001)], [torch.full((n,), 1.1)], [torch.full((n,), 1.0)]
    assert_stats_close(pg.secant_stats(g, x, r, backend="torch"), pg.reference_secant_stats(g, x, r))
    g, x, r = [1 + 0.01 * torch.randn(n)], [3 + 0.1 * torch.randn(n)], [2 + 0.1 * torch.randn(n)]
    assert_stats_close(pg.secant_stats(g, x, r, backend="torch"), pg.reference_secant_stats(g, x, r))


def test_non_contiguous_tensors(small_chunks):
    gen = torch.Generator().manual_seed(4)
    g1, x1, r1 = (torch.randn(670, 45, generator=gen).t() for _ in range(3))  # same strides: memory order
    g2 = torch.randn(400, 90, generator=gen)[:, ::2]  # each its own view: chunk copies
    x2 = torch.randn(18000, generator=gen)
    r2 = torch.randn(45, 400, generator=gen).t()
    g3 = torch.randn(30, 40, 50, generator=gen).permute(2, 0, 1)
    x3 = torch.randn(50, 30, 40, generator=gen)
    r3 = torch.randn(30, 50, 40, generator=gen).transpose(0, 1)
    g4, x4, r4 = (torch.randn(60, 10, generator=gen)[::2] for _ in range(3))  # small, packed
    g, x, r = [g1, g2, g3, g4], [x1, x2, x3, x4], [r1, r2, r3, r4]
    ref = pg.reference_secant_stats(g, x, r, per_tensor=True)
    assert_stats_close(pg.secant_stats(g, x, r, backend="torch", per_tensor=True), ref)
    assert_stats_close(pg.secant_stats(g, x, r, backend="torch"), ref.sum(0))


def test_flat_range_is_the_row_major_slice():
    t = torch.randn(7, 9, 11).permute(1, 2, 0)
    flat = t.reshape(-1)
    for s, e in [(0, 5), (3, 200), (90, 693), (0, 693), (98, 99), (10, 600), (77, 154)]:
        assert torch.equal(reference._flat_range(t, s, e), flat[s:e]), (s, e)


def test_nan_stays_in_its_tensor_and_results_are_bitwise_repeatable(small_chunks):
    g, x, r = make_lists(SIZES, seed=9)
    g[5][2] = float("nan")  # a packed small tensor
    per = pg.secant_stats(g, x, r, backend="torch", per_tensor=True)
    assert torch.isnan(per[5, :2]).all() and not torch.isnan(per[5, 2])
    assert not torch.isnan(per[[i for i in range(len(SIZES)) if i != 5]]).any()
    total = pg.secant_stats(g, x, r, backend="torch")
    assert torch.isnan(total[:2]).all() and torch.isfinite(total[2])
    g, x, r = make_lists([65537 * 3, 1023, 7] * 4, seed=8)
    first = pg.secant_stats(g, x, r, backend="torch", per_tensor=True)
    for _ in range(2):
        assert torch.equal(pg.secant_stats(g, x, r, backend="torch", per_tensor=True), first)


_MEMORY_PROBE = """
import json, torch
import pathgeom_fast as pg
from pathgeom_fast import bench
n = 1 << 23
gen = torch.Generator().manual_seed(0)
g, x, r = ([torch.randn(n, generator=gen), torch.randn(3000, generator=gen)] for _ in range(3))
pg.secant_stats(g, x, r, backend="torch")  # warm-up
bench.pin_mmap_threshold()
dev = torch.device("cpu")
out = {k: bench.peak_extra_bytes(fn, (g, x, r), dev) for k, fn in [
    ("torch", lambda *a: pg.secant_stats(*a, backend="torch")),
    ("torch_per_tensor", lambda *a: pg.secant_stats(*a, backend="torch", per_tensor=True)),
    ("oracle", pg.reference_secant_stats)]}
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident set from /proc")
def test_extra_memory_is_bounded_by_the_chunks():
    """A 2^23-element fp32 list (32 MiB per tensor): the peak resident set grows by a few chunk
    buffers, not by copies of the tensor (the fp64 oracle, which makes them, shows that the
    measure sees such copies)."""
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    if peaks["oracle"] is None:
        pytest.skip("the peak resident set cannot be reset here")
    assert peaks["oracle"] > 64 << 20, peaks  # two fp64 copies of 2^23 elements at least
    assert peaks["torch"] < 12 << 20 and peaks["torch_per_tensor"] < 12 << 20, peaks


def test_parameters_that_require_grad(small_chunks):
    model = torch.nn.Sequential(torch.nn.Linear(70, 90), torch.nn.Linear(90, 3))
    model(torch.randn(5, 70)).sum().backward()
    refs = [p.detach() + 0.1 for p in model.parameters()]
    out = pg.secant_stats(pg.grads_of(model), model, refs, backend="torch", per_tensor=True)
    assert not out.requires_grad
    assert_stats_close(out, pg.reference_secant_stats(pg.grads_of(model), list(model.parameters()), refs, per_tensor=True))


def test_same_bits_whatever_the_thread_count():
    """Chunks under torch's intra-op grain size run each op on one thread, and the partials are
    added in chunk order: the thread count does not change the result."""
    g, x, r = make_lists([200_000, 70001, 5000, 300] * 3, seed=10)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = pg.secant_stats(g, x, r, backend="torch"), pg.secant_stats(g, x, r, backend="torch", per_tensor=True)
        torch.set_num_threads(1)
        one = pg.secant_stats(g, x, r, backend="torch"), pg.secant_stats(g, x, r, backend="torch", per_tensor=True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
