"""pytest-benchmark suites: `pytest bench/` (sizes: PATHGEOM_BENCH_SIZE, PATHGEOM_BENCH_DEVICE).

Baselines come from pathgeom_fast.bench, the one place they are defined; `pathgeom bench`
prints the same comparisons as one table with ratios and peak memory.
"""

import pytest
import torch

from pathgeom_fast import bench

from conftest import DEVICE, SIZE

DEV = torch.device(DEVICE)
BACKENDS = ["cuda", "triton"] if DEV.type == "cuda" else ["cpu"]
SINGLE = {**bench.BASELINES, **{f"fused_{b}": bench.fused(b) for b in BACKENDS}}
SINGLE.pop("compiled")  # compile time would dominate a benchmark round; see `pathgeom bench`


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def large():
    return bench.make_inputs(bench.model_like_sizes(SIZE), (torch.float32,) * 3, DEV)


@pytest.fixture(scope="module")
def large_mixed():
    return bench.make_inputs(bench.model_like_sizes(SIZE), (torch.bfloat16, torch.float32, torch.float32), DEV)


@pytest.fixture(scope="module")
def small():
    return bench.make_inputs([1000] * 10_000, (torch.float32,) * 3, DEV)


@pytest.fixture(scope="module")
def multi():
    return bench.make_inputs(bench.model_like_sizes(SIZE // 5), (torch.float32,) * 3, DEV, K=8)


def _run(benchmark, fn, inputs):
    def call():
        fn(*inputs)
        _sync()

    benchmark.extra_info["bytes"] = bench.nbytes(*inputs)
    benchmark.extra_info["peak_extra_mb"] = (bench.peak_extra_bytes(fn, inputs, DEV) or 0) / 1e6
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("method", list(SINGLE))
def test_large_fp32(benchmark, large, method):
    benchmark.group = "large fp32"
    _run(benchmark, SINGLE[method], large)


@pytest.mark.parametrize("method", list(SINGLE))
def test_large_bf16_grads(benchmark, large_mixed, method):
    benchmark.group = "large bf16 grads, fp32 params/refs"
    _run(benchmark, SINGLE[method], large_mixed)


@pytest.mark.parametrize("method", list(SINGLE))
def test_small_tensors(benchmark, small, method):
    benchmark.group = "10^4 x 10^3 fp32"
    _run(benchmark, SINGLE[method], small)


@pytest.mark.parametrize("method", ["naive", "loop"] + [f"fused_{b}" for b in BACKENDS] + [f"multi_{b}" for b in BACKENDS])
def test_multi_k8(benchmark, multi, method):
    benchmark.group = "K=8 gradient lists"
    if method.startswith("multi_"):
        fn = bench.fused_multi(method[len("multi_"):])
    else:
        fn = bench.multi_loop_of(SINGLE[method])
    _run(benchmark, fn, multi)


def test_probe(benchmark, large):
    benchmark.group = "large fp32"
    buf = torch.randn(bench.nbytes(*large) // 4, device=DEV)
    benchmark.pedantic(lambda: (buf.sum(), _sync()), rounds=5, warmup_rounds=1)
