"""pg.secant_gram, every backend, against an fp64 oracle built here from flattened copies."""

import math

import pytest
import torch

import pathgeom_fast as pg
from pathgeom_fast import _ext, triton_kernels
from pathgeom_fast import triton_gram as tg

from utils import HAS_CUDA, backends_for, make_lists

CPU_BACKENDS = backends_for("cpu")
ODD_SIZES = [1, 3, 1023, 65537, 0, 8, 70001]


def flat_oracle(vec_lists, params, refs):
    """G of (v_0, ..., v_{K-1}, x - x*) from torch.cat of float64 copies: independent of the package."""
    # on the CPU whatever the inputs' device (an H100 run found the CPU zeros(0) mixed with CUDA)
    flat = lambda ts: torch.cat([t.detach().cpu().reshape(-1).double() for t in ts] + [torch.zeros(0, dtype=torch.float64)])
    rows = [flat(v) for v in vec_lists]
    x, r = flat(params), flat(refs)
    rows.append(x - r)
    M = len(rows)
    G = torch.empty(M, M, dtype=torch.float64)
    for i in range(M):
        for j in range(M):
            G[i, j] = (rows[i] * rows[j]).sum()
    return G


def per_tensor_oracle(vec_lists, params, refs):
    return torch.stack([flat_oracle([[v[i]] for v in vec_lists], [params[i]], [refs[i]]) for i in range(len(params))])


def assert_gram_close(out, ref, rel=1e-6, what=""):
    """|G_ij - ref_ij| <= rel * sqrt(ref_ii ref_jj): the DESIGN tolerance of a (and of b, c on the diagonal)."""
    assert out.dtype == torch.float64, out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.cpu(), ref.cpu()
    diag = torch.diagonal(ref, dim1=-2, dim2=-1)
    scale = torch.sqrt(diag[..., :, None] * diag[..., None, :])
    err = (out - ref).abs()
    ok = err <= rel * scale + 1e-300
    if not bool(ok.all()):
        bad = (~ok).nonzero().tolist()[:10]
        lines = [f"  at {tuple(i)}: got {out[tuple(i)].item()!r}, expected {ref[tuple(i)].item()!r}" for i in bad]
        raise AssertionError(f"{what} Gram differs from the fp64 oracle ({int((~ok).sum())} entries):\n" + "\n".join(lines))
    assert torch.equal(out, out.transpose(-1, -2)), f"{what}: not exactly symmetric"


def make_vecs(sizes, K, dtypes=(torch.float32,) * 3, seed=0):
    grads, params, refs = make_lists(sizes, dtypes, seed=seed, K=max(K, 2))
    return grads[:K], params, refs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 8])
def test_odd_sizes_against_flat_oracle(backend, K):
    vecs, x, r = make_vecs(ODD_SIZES, K, seed=K)
    out = pg.secant_gram(vecs, x, r, backend=backend)
    assert out.shape == (K + 1, K + 1)
    assert_gram_close(out, flat_oracle(vecs, x, r), what=backend)
    per = pg.secant_gram(vecs, x, r, backend=backend, per_tensor=True)
    assert per.shape == (len(ODD_SIZES), K + 1, K + 1)
    ref = per_tensor_oracle(vecs, x, r)
    keep = [i for i, n in enumerate(ODD_SIZES) if n]
    assert_gram_close(per[keep], ref[keep], what=backend)
    assert torch.equal(per[ODD_SIZES.index(0)], torch.zeros(K + 1, K + 1, dtype=torch.float64))


def test_matches_secant_stats_and_reference():
    """G[k][K] = a_k, G[k][k] = b_k, G[K][K] = c of secant_stats_multi; the package oracle agrees."""
    vecs, x, r = make_vecs([1023, 5, 65537], 3, seed=20)
    G = pg.secant_gram(vecs, x, r, backend="torch")
    s = pg.secant_stats_multi(vecs, x, r, backend="torch")
    for k in range(3):
        assert math.isclose(G[k, 3].item(), s[k, 0].item(), rel_tol=1e-12)
        assert math.isclose(G[k, k].item(), s[k, 1].item(), rel_tol=1e-12)
    assert math.isclose(G[3, 3].item(), s[0, 2].item(), rel_tol=1e-12)
    assert torch.allclose(pg.reference_secant_gram(vecs, x, r), flat_oracle(vecs, x, r), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.float64),
        (torch.float16, torch.bfloat16, torch.float16),
        (torch.float64,) * 3,
        (torch.float32, torch.float64, torch.bfloat16),
    ],
    ids=["bf16-f32-f32", "f16-f16-f64", "f16-bf16-f16", "f64", "f32-f64-bf16"],
)
def test_dtype_mixes(backend, dtypes):
    vecs, x, r = make_vecs([5, 1030, 17, 4099], 2, dtypes, seed=21)
    assert_gram_close(pg.secant_gram(vecs, x, r, backend=backend), flat_oracle(vecs, x, r), what=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtype_positions_in_one_list(backend):
    vecs, x, r = make_vecs([300, 70000, 9, 40], 2, seed=22)
    vecs[0][1], vecs[1][1] = vecs[0][1].bfloat16(), vecs[1][1].bfloat16()
    x[2], r[0], x[3] = x[2].double(), r[0].half(), x[3].half()
    ref = per_tensor_oracle(vecs, x, r)
    assert_gram_close(pg.secant_gram(vecs, x, r, backend=backend, per_tensor=True), ref, what=backend)
    # fp64 position: products in fp64, so much closer than fp32 allows
    out = pg.secant_gram(vecs, x, r, backend=backend, per_tensor=True)
    assert_gram_close(out[2], ref[2], rel=1e-13, what=backend + " fp64 position")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_views(backend):
    gen = torch.Generator().manual_seed(23)
    base = [torch.randn(67, 45, generator=gen) for _ in range(4)]
    v1, w1, x1, r1 = (t.t() for t in base)  # same strides: read in memory order, no copy
    v2 = torch.randn(40, 90, generator=gen)[:, ::2]  # sliced
    w2 = torch.randn(1800, generator=gen)
    x2 = torch.randn(45, 40, generator=gen).t()
    r2 = torch.randn(1800, generator=gen).reshape(40, 45)
    vecs, x, r = [[v1, v2], [w1, w2]], [x1, x2], [r1, r2]
    ref = per_tensor_oracle(vecs, x, r)
    assert_gram_close(pg.secant_gram(vecs, x, r, backend=backend, per_tensor=True), ref, what=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inf_propagate(backend):
    vecs, x, r = make_vecs([100, 2000], 2, seed=24)
    vecs[1][0][3] = float("nan")
    G = pg.secant_gram(vecs, x, r, backend=backend)
    nan = torch.isnan(G)
    assert nan[1].all() and nan[:, 1].all()  # row and column of v_1
    assert not nan[0, 0] and not nan[0, 2] and not nan[2, 2]
    vecs, x, r = make_vecs([100, 2000], 2, seed=24)
    x[1][1500] = float("inf")
    G = pg.secant_gram(vecs, x, r, backend=backend)
    assert torch.isinf(G[2, 2]) and torch.isfinite(G[:2, :2]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitwise_deterministic(backend):
    vecs, x, r = make_vecs([65537 * 3, 1023, 7] * 3, 3, seed=25)
    first = pg.secant_gram(vecs, x, r, backend=backend, per_tensor=True)
    total = pg.secant_gram(vecs, x, r, backend=backend)
    for _ in range(2):
        assert torch.equal(pg.secant_gram(vecs, x, r, backend=backend, per_tensor=True), first)
        assert torch.equal(pg.secant_gram(vecs, x, r, backend=backend), total)
    if backend == "cpu":  # and independent of the thread count
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(pg.secant_gram(vecs, x, r, backend=backend, per_tensor=True), first)
            assert torch.equal(pg.secant_gram(vecs, x, r, backend=backend), total)
        finally:
            torch.set_num_threads(n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_list_and_empty_tensors(backend):
    assert torch.equal(pg.secant_gram([[]], [], [], backend=backend), torch.zeros(2, 2, dtype=torch.float64))
    assert pg.secant_gram([[], []], [], [], per_tensor=True, backend=backend).shape == (0, 3, 3)
    e = [torch.empty(0), torch.empty(0, 5)]
    assert torch.equal(pg.secant_gram([e, e], e, e, backend=backend), torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_name_the_offender(backend):
    vecs, x, r = make_vecs([4, 6, 8], 2, seed=26)
    v0, v1 = vecs
    with pytest.raises(ValueError, match=r"between 1 and 8 vector lists"):
        pg.secant_gram([v0] * 9, x, r, backend=backend)
    with pytest.raises(ValueError, match=r"between 1 and 8 vector lists"):
        pg.secant_gram([], x, r, backend=backend)
    with pytest.raises(TypeError, match=r"vec_lists must be a sequence of K vector lists"):
        pg.secant_gram(v0[0], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"vec_lists\[1\] has 2 tensors but params has 3"):
        pg.secant_gram([v0, v1[:2]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"got 6 vecs \(expected num_vecs \* len\(params\) = 6\), 3 params and 2 refs"):
        pg.secant_gram(vecs, x, r[:2], backend=backend)
    with pytest.raises(ValueError, match=r"index 1: vecs\[1\]\[1\] has shape \[5\].*\(5 elements\).*params\[1\] has shape \[6\]"):
        pg.secant_gram([v0, [v1[0], torch.randn(5), v1[2]]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"index 2: refs\[2\] has shape \[2, 3\]"):
        pg.secant_gram(vecs, x, [r[0], r[1], torch.randn(2, 3)], backend=backend)
    with pytest.raises(TypeError, match=r"params\[0\] has shape \[4\], torch.int64, cpu; expected float16"):
        pg.secant_gram(vecs, [torch.ones(4, dtype=torch.long), x[1], x[2]], r, backend=backend)
    with pytest.raises(TypeError, match=r"vecs\[0\]\[2\] has shape \[8\], torch.complex64"):
        pg.secant_gram([[v0[0], v0[1], torch.randn(8, dtype=torch.complex64)], v1], x, r, backend=backend)
    with pytest.raises(TypeError, match=r"vecs\[1\]\[0\] is a list, not a torch.Tensor"):
        pg.secant_gram([v0, [[1.0] * 4, v1[1], v1[2]]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"vecs\[0\]\[1\] is None"):
        pg.secant_gram([[v0[0], None, v0[2]], v1], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"vecs\[0\] is None"):
        pg.secant_gram([[None, v0[1], v0[2]]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"vecs\[1\]\[1\] has layout torch.sparse_coo"):
        pg.secant_gram([v0, [v1[0], torch.randn(6).to_sparse(), v1[2]]], x, r, backend=backend)
    with pytest.raises(TypeError, match=r"index 1: vecs\[1\]\[1\] has shape \[6\], torch.float64.*the K vectors of one tensor must share a dtype"):
        pg.secant_gram([v0, [v1[0], v1[1].double(), v1[2]]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"params\[2\] is on meta but params\[0\] is on cpu"):
        pg.secant_gram(vecs, [x[0], x[1], torch.empty(8, device="meta")], r, backend=backend)


def test_backend_cuda_is_refused_with_a_pointer_to_triton():
    vecs, x, r = make_vecs([4], 1, seed=27)
    with pytest.raises(ValueError, match=r"secant_gram has no CUDA kernel \(backend='cuda'\); use backend='triton'"):
        pg.secant_gram(vecs, x, r, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        pg.secant_gram(vecs, x, r, backend="fast")


def test_raw_op_errors():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    vecs, x, r = make_vecs([4, 6], 1, seed=28)
    with pytest.raises(ValueError, match=r"num_vecs must be between 1 and 8, got 9"):
        torch.ops.pathgeom.secant_gram(vecs[0] * 9, x, r, 9)
    with pytest.raises(ValueError, match=r"got 3 vecs \(expected num_vecs \* len\(params\) = 4\), 2 params and 2 refs"):
        torch.ops.pathgeom.secant_gram(vecs[0] + vecs[0][:1], x, r, 2)
    with pytest.raises(ValueError, match=r"index 1: vecs\[1\]"):
        torch.ops.pathgeom.secant_gram([vecs[0][0], torch.randn(3)], x, r, 1)
    with pytest.raises(TypeError, match=r"torch.int32"):
        torch.ops.pathgeom.secant_gram(vecs[0], [x[0], torch.ones(6, dtype=torch.int32)], r, 1)


def test_opcheck():
    vecs, x, r = make_vecs([33, 1, 70000], 2, seed=29)
    flat = vecs[0] + vecs[1]
    for per_tensor in (False, True):
        torch.library.opcheck(torch.ops.pathgeom.secant_gram.default, (flat, x, r, 2), {"per_tensor": per_tensor})
    if "triton" in CPU_BACKENDS:
        torch.library.opcheck(torch.ops.pathgeom.secant_gram_triton.default, (flat, x, r, 2, True))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    vecs, x, r = make_vecs([1023, 65537, 3], 2, seed=30)

    @torch.compile(fullgraph=True)
    def lagged_cosines(v0, v1, x, r):
        G = pg.secant_gram([v0, v1], x, r)
        return G[0, 1] / torch.sqrt(G[0, 0] * G[1, 1]), G[0, 2] / torch.sqrt(G[0, 0] * G[2, 2])

    cos01, cos0d = lagged_cosines(vecs[0], vecs[1], x, r)
    ref = flat_oracle(vecs, x, r)
    assert math.isclose(cos01.item(), (ref[0, 1] / torch.sqrt(ref[0, 0] * ref[1, 1])).item(), rel_tol=1e-6)
    assert math.isclose(cos0d.item(), (ref[0, 2] / torch.sqrt(ref[0, 0] * ref[2, 2])).item(), rel_tol=1e-6)

    @torch.compile(fullgraph=True)
    def raw(flat, x, r):
        return torch.ops.pathgeom.secant_gram(flat, x, r, 2, per_tensor=True)

    assert_gram_close(raw(vecs[0] + vecs[1], x, r), per_tensor_oracle(vecs, x, r))


def test_module_and_generator_inputs():
    torch.manual_seed(31)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    ref_model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model(torch.randn(4, 7)).sum().backward()
    g = pg.grads_of(model)
    u = [torch.randn_like(t) for t in g]
    out = pg.secant_gram((v for v in (g, u)), model, tuple(ref_model.parameters()))
    assert_gram_close(out, flat_oracle([g, u], list(model.parameters()), list(ref_model.parameters())))


# --------------------------------------------------------------------------------------
# The Triton kernel's specialisations (pathgeom_fast.triton_gram): 16-byte aligned and general,
# every shipped dtype combination, K = 1, 2, 8, mixed in one call; under the interpreter on
# CPU, or on a GPU when there is one. Which specialisation ran is read from the cached plan.
# --------------------------------------------------------------------------------------

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not (triton_kernels.available() and (HAS_CUDA or triton_kernels.INTERPRET)),
    reason="needs triton, and a GPU or TRITON_INTERPRET=1",
)
SHIPPED = {
    "f32": (torch.float32,) * 3,
    "bf16v-f32": (torch.bfloat16, torch.float32, torch.float32),
    "f16": (torch.float16,) * 3,
    "f64": (torch.float64,) * 3,
}
# a chunk boundary with a tail (70001 = 65536 + 4465), whole blocks only (4096), tiny, empty
TRITON_SIZES = [1000, 70001, 3, 0, 4096]


def offset_copy(t):
    """Same values at an address one element further: contiguous, not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


def launches(vecs, x, r):
    """{(vector dtype, param dtype, ref dtype, aligned)} of the launches of this call's plan."""
    flat = [t for v in vecs for t in v]
    plan, *_ = triton_kernels.prepare(flat, x, r, len(vecs), True)
    return {triton_kernels.unpack_key(L.key) for L in plan.launches}


def gram_triton(vecs, x, r, per_tensor):
    return pg.secant_gram(vecs, x, r, backend="triton", per_tensor=per_tensor)


@needs_triton
@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("dtypes", list(SHIPPED.values()), ids=list(SHIPPED))
def test_triton_aligned_and_misaligned_against_flat_oracle(dtypes, K):
    vecs, x, r = make_vecs(TRITON_SIZES, K, dtypes, seed=40 + K)
    ref_per, ref_total = per_tensor_oracle(vecs, x, r), flat_oracle(vecs, x, r)
    live = [i for i, n in enumerate(TRITON_SIZES) if n]
    dev = lambda ts: [t.to(TRITON_DEVICE) for t in ts]
    vecs, x, r = [dev(v) for v in vecs], dev(x), dev(r)
    assert launches(vecs, x, r) == {(*dtypes, True)}
    per = gram_triton(vecs, x, r, True)
    assert_gram_close(per[live], ref_per[live], what="aligned")
    assert torch.equal(per[TRITON_SIZES.index(0)].cpu(), torch.zeros(K + 1, K + 1, dtype=torch.float64))
    assert_gram_close(gram_triton(vecs, x, r, False), ref_total, what="aligned total")
    # the same values at addresses that are not 16-byte aligned: the general specialisation
    vecs2, x2, r2 = [[offset_copy(t) for t in v] for v in vecs], [offset_copy(t) for t in x], [offset_copy(t) for t in r]
    assert launches(vecs2, x2, r2) == {(*dtypes, False)}
    assert_gram_close(gram_triton(vecs2, x2, r2, True)[live], ref_per[live], what="misaligned")
    assert_gram_close(gram_triton(vecs2, x2, r2, False), ref_total, what="misaligned total")


@needs_triton
@pytest.mark.parametrize("K", [8, 3])
def test_triton_mixed_alignment_and_dtypes_in_one_call(K):
    """Aligned and misaligned positions, four dtype combinations, in one call: five launches."""
    sizes = [70001, 1000, 4096, 333, 5, 0, 2048]
    vecs, x, r = make_vecs(sizes, K, seed=50 + K)
    for k in range(K):  # position 1: bf16 vectors with fp32 params; position 2: all fp16
        vecs[k][1] = vecs[k][1].bfloat16()
        vecs[k][2] = vecs[k][2].half()
    x[2], r[2] = x[2].half(), r[2].half()
    x[3], r[3] = x[3].double(), r[3].double()  # fp64 position: fp64 products
    vecs = [[t.to(TRITON_DEVICE) for t in v] for v in vecs]
    x, r = [t.to(TRITON_DEVICE) for t in x], [t.to(TRITON_DEVICE) for t in r]
    vecs[K - 1][0] = offset_copy(vecs[K - 1][0])  # one vector misaligned: its whole position goes general
    x[4] = offset_copy(x[4])  # positions 0 and 4 in one general launch; 6 in an aligned fp32 one
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    assert launches(vecs, x, r) == {
        (f32, f32, f32, False), (bf16, f32, f32, True), (f16, f16, f16, True), (f32, f64, f64, True), (f32, f32, f32, True)
    }
    ref = per_tensor_oracle(vecs, x, r)
    per = gram_triton(vecs, x, r, True)
    live = [i for i, n in enumerate(sizes) if n]
    assert_gram_close(per[live], ref[live], what="mixed")
    assert_gram_close(per[3], ref[3], rel=1e-13, what="fp64 position")
    assert_gram_close(gram_triton(vecs, x, r, False), flat_oracle(vecs, x, r), what="mixed total")


@needs_triton
def test_triton_deterministic_cached_and_shared_with_secant_stats():
    """Bitwise equal across calls and cache states; G symmetric; the plan and the argument
    buffer are secant_stats's (one planner, one cache)."""
    vecs, x, r = make_vecs([70001, 1000, 3, 4096], 2, seed=60)
    vecs = [[t.to(TRITON_DEVICE) for t in v] for v in vecs]
    x, r = [t.to(TRITON_DEVICE) for t in x], [t.to(TRITON_DEVICE) for t in r]
    triton_kernels.clear_caches()
    first = gram_triton(vecs, x, r, True)
    total = gram_triton(vecs, x, r, False)
    info = triton_kernels.cache_info()
    assert info["plans"] == 2 and info["buffers"] == 2  # per_tensor and total
    assert torch.equal(gram_triton(vecs, x, r, True), first) and torch.equal(gram_triton(vecs, x, r, False), total)
    assert triton_kernels.cache_info() == info  # nothing new: no plan, no copy
    pg.secant_stats_multi(vecs, x, r, backend="triton", per_tensor=True)  # same lists: same plan and buffer
    assert triton_kernels.cache_info() == info
    triton_kernels.clear_caches()
    assert torch.equal(gram_triton(vecs, x, r, True), first)
    for G in (first, total):
        assert torch.equal(G, G.transpose(-1, -2))
    s = pg.secant_stats_multi(vecs, x, r, backend="triton")  # diagonal and last column agree with secant_stats
    assert_gram_close(total, flat_oracle(vecs, x, r))
    for k in range(2):
        assert math.isclose(total[k, 2].item(), s[k, 0].item(), rel_tol=1e-6)
        assert math.isclose(total[k, k].item(), s[k, 1].item(), rel_tol=1e-6)


@needs_triton
def test_triton_many_small_tensors():
    sizes = [(7 * i) % 61 for i in range(300)]
    vecs, x, r = make_vecs(sizes, 2, seed=61)
    ref = per_tensor_oracle(vecs, x, r)
    dev = lambda ts: [t.to(TRITON_DEVICE) for t in ts]
    vecs, x, r = [dev(v) for v in vecs], dev(x), dev(r)
    live = [i for i, n in enumerate(sizes) if n]
    assert_gram_close(gram_triton(vecs, x, r, True)[live], ref[live])


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs this configuration in every test")
@pytest.mark.parametrize("K", [2, 8])
def test_triton_gpu_block_under_interpreter(monkeypatch, K):
    """The interpreter normally takes 8x longer steps (tg.INTERPRET_WARPS); here the
    GPU's own BLOCK (4 warps), aligned and misaligned."""
    monkeypatch.setattr(tg, "INTERPRET_WARPS", tg.NUM_WARPS)
    vecs, x, r = make_vecs([70001, 515], K, (torch.bfloat16, torch.float32, torch.float32), seed=62)
    r[1] = offset_copy(r[1])
    assert gram_config_blocks(vecs, x, r) == {8 * 32 * tg.NUM_WARPS, (4 if K <= 2 else 2) * 32 * tg.NUM_WARPS}
    assert_gram_close(gram_triton(vecs, x, r, True), per_tensor_oracle(vecs, x, r))


def gram_config_blocks(vecs, x, r):
    flat = [t for v in vecs for t in v]
    plan, *_ = triton_kernels.prepare(flat, x, r, len(vecs), True)
    return {tg.gram_config(L.key, len(vecs))["BLOCK"] for L in plan.launches}


def test_gram_config():
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    key = triton_kernels.group_key
    for K in (1, 2, 8):  # aligned: 16 bytes of the narrowest stream per thread and step
        assert tg.gram_config(key(f32, f32, f32, True), K, 4)["V"] == 4
        assert tg.gram_config(key(bf16, f32, f32, True), K, 4)["V"] == 8
        assert tg.gram_config(key(f16, f16, f16, True), K, 4)["V"] == 8
        assert tg.gram_config(key(f64, f64, f64, True), K, 4)["V"] == 2
        cfg = tg.gram_config(key(f32, f32, f32, False), K, 4)
        assert cfg["V"] == (4 if K <= 2 else 2) and cfg["BLOCK"] == cfg["V"] * 128 and cfg["num_warps"] == 4
    assert tg.gram_config(key(bf16, f64, f64, True), 8, 4)["ACC"] == f64
