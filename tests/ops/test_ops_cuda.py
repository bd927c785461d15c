"""CUDA and compiled-Triton backends on a GPU. Skipped (with the reason) without one."""

import pytest
import torch

import pathgeom_fast as pg
from pathgeom_fast import _ext

from utils import HAS_CUDA, assert_stats_close, backends_for, make_lists, ref_multi

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is visible")]
GPU_BACKENDS = backends_for("cuda") if HAS_CUDA else []
DTYPE_CASES = [
    (torch.float32,) * 3,
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.float64),
    (torch.float64,) * 3,
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_gpu_matches_reference(backend, dtypes):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend} unavailable: {_ext.load_error()}")
    sizes = [1, 3, 1023, 65537, 0, 8, 3 * 65536 + 5, 1_000_003]
    g, x, r = make_lists(sizes, dtypes, device="cuda", seed=20)
    assert_stats_close(pg.secant_stats(g, x, r, backend=backend), pg.reference_secant_stats(g, x, r), what=backend)
    per = pg.secant_stats(g, x, r, backend=backend, per_tensor=True)
    assert_stats_close(per[[0, 1, 2, 3, 5, 6, 7]], pg.reference_secant_stats(g, x, r, per_tensor=True)[[0, 1, 2, 3, 5, 6, 7]])
    assert torch.equal(per[4].cpu(), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_misaligned_views_and_multi(backend):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend} unavailable")
    grads, x, r = make_lists([1000, 70001, 333], device="cuda", seed=21, K=9)
    # offset views: 4-byte aligned, not 16-byte aligned -> scalar path
    x = [t[1:] for t in x]
    r = [t[1:] for t in r]
    grads = [[t[1:] for t in g] for g in grads]
    for K in (1, 3, 9):
        out = pg.secant_stats_multi(grads[:K], x, r, backend=backend, per_tensor=True, weight_decay=0.01)
        assert_stats_close(out, ref_multi(grads[:K], x, r, per_tensor=True, weight_decay=0.01), what=f"{backend} K={K}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_many_small_tensors_deterministic(backend):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend} unavailable")
    g, x, r = make_lists([1000] * 10_000 + [5_000_000], device="cuda", seed=22)
    first = pg.secant_stats(g, x, r, backend=backend)
    assert_stats_close(first, pg.reference_secant_stats(g, x, r))
    for _ in range(5):
        assert torch.equal(pg.secant_stats(g, x, r, backend=backend), first)


def test_cuda_graph_capture_and_side_stream():
    if "cuda" not in GPU_BACKENDS:
        pytest.skip("CUDA kernel not built")
    g, x, r = make_lists([4096, 70001], device="cuda", seed=23)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.ops.pathgeom.secant_stats(g, x, r)  # warm-up on the side stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = torch.ops.pathgeom.secant_stats(g, x, r)
    for t in g:
        t.mul_(2.0)  # new values in the same memory
    graph.replay()
    torch.cuda.synchronize()
    assert_stats_close(out, pg.reference_secant_stats(g, x, r))


def test_triton_graph_capture_after_warmup():
    if "triton" not in GPU_BACKENDS:
        pytest.skip("triton unavailable")
    from pathgeom_fast import triton_kernels

    g, x, r = make_lists([4096, 70001, 5], device="cuda", seed=26)
    x[2] = torch.empty(6, device="cuda")[1:].copy_(x[2])  # one misaligned tensor: both specialisations
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pg.secant_stats(g, x, r, backend="triton")  # warm-up: compiles, caches plan and buffer
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = pg.secant_stats(g, x, r, backend="triton")
    for t in g:
        t.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert_stats_close(out, pg.reference_secant_stats(g, x, r))
    # not warmed up: a clear error instead of capturing a host copy
    g2 = [t.clone() for t in g]
    with torch.cuda.stream(stream):
        graph2 = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError) as err:
            with torch.cuda.graph(graph2, stream=stream):
                pg.secant_stats(g2, x, r, backend="triton")
    # ours, or the capture's own error raised on top of it
    assert "before capturing" in str(err.value) + str(err.value.__context__)
    assert triton_kernels.cache_info()["captured"] >= 1


def test_triton_gram_graph_capture_after_warmup():
    if "triton" not in GPU_BACKENDS:
        pytest.skip("triton unavailable")
    from pathgeom_fast import triton_kernels

    grads, x, r = make_lists([4096, 70001, 5], device="cuda", seed=27, K=3)
    x[2] = torch.empty(6, device="cuda")[1:].copy_(x[2])  # one misaligned tensor: both specialisations
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pg.secant_gram(grads, x, r, backend="triton")  # warm-up: compiles, caches plan and buffer
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = pg.secant_gram(grads, x, r, backend="triton")
    for g in grads:
        for t in g:
            t.mul_(2.0)  # new values in the same memory
    graph.replay()
    torch.cuda.synchronize()
    ref = pg.reference_secant_gram(grads, x, r).cpu()
    scale = torch.sqrt(torch.diagonal(ref)[:, None] * torch.diagonal(ref)[None, :])
    assert bool(((out.cpu() - ref).abs() <= 1e-6 * scale).all()) and torch.equal(out, out.T)
    g2 = [[t.clone() for t in g] for g in grads]  # not warmed up: a clear error, not a host copy
    with torch.cuda.stream(stream):
        graph2 = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError) as err:
            with torch.cuda.graph(graph2, stream=stream):
                pg.secant_gram(g2, x, r, backend="triton")
    assert "before capturing" in str(err.value) + str(err.value.__context__)
    assert triton_kernels.cache_info()["captured"] >= 1


def test_cuda_mixed_devices_error():
    if "cuda" not in GPU_BACKENDS:
        pytest.skip("CUDA kernel not built")
    g, x, r = make_lists([10, 20], device="cuda", seed=24)
    with pytest.raises(ValueError, match=r"params\[1\] is on cpu but params\[0\] is on cuda:0"):
        pg.secant_stats(g, [x[0], x[1].cpu()], r, backend="cuda")


@pytest.mark.bigmem
def test_over_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 4099
    if free < n * 7 + (4 << 30):
        pytest.skip(f"needs about {n * 7 / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(25)
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    r = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.5
    ref = torch.zeros(3, dtype=torch.float64, device="cuda")
    step = 1 << 28
    for s in range(0, n, step):  # fp64 reference in slices
        gi, xi, ri = (t[s : s + step].double() for t in (g, x, r))
        d = xi - ri
        ref += torch.stack([(gi * d).sum(), (gi * gi).sum(), (d * d).sum()])
    for backend in GPU_BACKENDS:
        assert_stats_close(pg.secant_stats([g], [x], [r], backend=backend), ref, what=backend)


def test_cuda_direct_entry_checks_with_the_gil_and_reentrant_copies():
    """The direct entry point on CUDA tensors: a tensor-like mock and a bad entry late in a
    long list raise with the GIL held (no other Python thread runs during the call); a tensor
    subclass whose __torch_dispatch__ calls the op again, reached by the copy of a
    non-contiguous input, gives the reference result."""
    if "cuda" not in GPU_BACKENDS:
        pytest.skip(f"the CUDA kernels are not built: {_ext.load_error()}")
    import unittest.mock

    from test_ops import _gil_probe, _Reentrant

    T = 3000
    g, x, r = make_lists([200] * T, device="cuda", seed=22)
    with pytest.raises(TypeError, match=r"grads\[7\] is a MagicMock"):
        pg.secant_stats(g[:7] + [unittest.mock.MagicMock(spec=torch.Tensor)] + g[8:], x, r, backend="cuda")
    bad = r[:T - 2] + [torch.randn(200, device="cuda").to(torch.int32)] + r[T - 1:]
    err, ran = _gil_probe(lambda: _ext._C.secant_stats_direct(g, x, bad, 1, False, 0.0, 0))
    assert isinstance(err, TypeError) and f"refs[{T - 2}]" in str(err), err
    assert not ran, "the GIL was released before the error was raised"
    strided = torch.empty(400, device="cuda")[::2].copy_(x[5])
    args = [list(g), list(x), list(r)]
    args[1][5] = _Reentrant(strided)
    _Reentrant.nested.clear()
    out = pg.secant_stats(*args, backend="cuda", per_tensor=True)
    assert _Reentrant.nested, "the copy did not reach __torch_dispatch__"
    assert_stats_close(out.cpu(), pg.reference_secant_stats(g, x, r, per_tensor=True).cpu())
    for res, ref in _Reentrant.nested:
        assert_stats_close(res, ref)
