"""pg.secant_stats / secant_stats_multi, every backend, against the fp64 reference."""

import itertools
import math
import subprocess
import sys

import pytest
import torch

import pathgeom_fast as pg
from pathgeom_fast import _ext

from utils import ALL_DTYPES, WrapperTensor, assert_stats_close, backends_for, make_lists, ref_multi

CPU_BACKENDS = backends_for("cpu")
ODD_SIZES = [1, 3, 1023, 65537, 0, 8, 70001]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_sizes_fp32(backend):
    g, x, r = make_lists(ODD_SIZES)
    out = pg.secant_stats(g, x, r, backend=backend)
    assert_stats_close(out, pg.reference_secant_stats(g, x, r), what=backend)
    per = pg.secant_stats(g, x, r, backend=backend, per_tensor=True)
    ref_per = pg.reference_secant_stats(g, x, r, per_tensor=True)
    assert per.shape == (len(ODD_SIZES), 3)
    assert_stats_close(per[[0, 1, 2, 3, 5, 6]], ref_per[[0, 1, 2, 3, 5, 6]], what=backend)
    assert torch.equal(per[4], torch.zeros(3, dtype=torch.float64))  # the empty tensor


@pytest.mark.parametrize("dtypes", list(itertools.product(ALL_DTYPES, repeat=3)), ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_every_dtype_combination_cpu_kernel(dtypes):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    g, x, r = make_lists([5, 1030, 17], dtypes, seed=1)
    assert_stats_close(pg.secant_stats(g, x, r, backend="cpu"), pg.reference_secant_stats(g, x, r))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "cpu"])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.float32, torch.float32), (torch.float16, torch.float16, torch.float64), (torch.float64,) * 3],
    ids=["bf16-f32-f32", "f16-f16-f64", "f64"],
)
def test_mixed_dtypes_other_backends(backend, dtypes):
    g, x, r = make_lists([5, 1030, 17], dtypes, seed=2)
    assert_stats_close(pg.secant_stats(g, x, r, backend=backend), pg.reference_secant_stats(g, x, r))


def test_mixed_dtype_groups_in_one_list():
    # Tensors of one list with different dtype combinations (grouped per combination).
    g, x, r = make_lists([300, 70000, 9], seed=3)
    g[1], x[2], r[0] = g[1].bfloat16(), x[2].double(), r[0].half()
    ref = pg.reference_secant_stats(g, x, r, per_tensor=True)
    for backend in CPU_BACKENDS:
        assert_stats_close(pg.secant_stats(g, x, r, backend=backend, per_tensor=True), ref, what=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_views(backend):
    gen = torch.Generator().manual_seed(4)
    base = [torch.randn(67, 45, generator=gen) for _ in range(3)]
    # same strides on all three (transposed): read in memory order, no copy
    g1, x1, r1 = (t.t() for t in base)
    # different views: sliced grads, reshaped params
    g2 = torch.randn(40, 90, generator=gen)[:, ::2]
    x2 = torch.randn(1800, generator=gen)
    r2 = torch.randn(45, 40, generator=gen).t()
    g, x, r = [g1, g2], [x1, x2], [r1, r2]
    ref = pg.reference_secant_stats(g, x, r, per_tensor=True)
    assert_stats_close(pg.secant_stats(g, x, r, backend=backend, per_tensor=True), ref, what=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", [1, 3, 9])
def test_multi(backend, K):
    grads, x, r = make_lists([1, 1023, 65537, 0], K=max(K, 2), seed=5)
    grads = grads[:K]
    out = pg.secant_stats_multi(grads, x, r, backend=backend)
    assert out.shape == (K, 3)
    assert_stats_close(out, ref_multi(grads, x, r), what=backend)
    per = pg.secant_stats_multi(grads, x, r, backend=backend, per_tensor=True)
    assert per.shape == (K, 4, 3)
    assert_stats_close(per[:, :3], ref_multi(grads, x, r, per_tensor=True)[:, :3], what=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_decay(backend):
    g, x, r = make_lists([1023, 5, 65537], seed=6)
    ref = pg.reference_secant_stats(g, x, r, weight_decay=0.05)
    # the reference itself: explicit g + wd x in fp64
    explicit = pg.reference_secant_stats([gi.double() + 0.05 * xi.double() for gi, xi in zip(g, x)], x, r)
    assert torch.allclose(ref, explicit, rtol=1e-12)
    assert_stats_close(pg.secant_stats(g, x, r, weight_decay=0.05, backend=backend), ref, what=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_inf_propagate(backend):
    g, x, r = make_lists([100, 2000], seed=7)
    g[0][3] = float("nan")
    out = pg.secant_stats(g, x, r, backend=backend)
    assert torch.isnan(out[0]) and torch.isnan(out[1]) and torch.isfinite(out[2])
    g, x, r = make_lists([100, 2000], seed=7)
    x[1][1500] = float("inf")
    out = pg.secant_stats(g, x, r, backend=backend)
    ref = pg.reference_secant_stats(g, x, r)
    assert torch.isinf(out[2]) and torch.isinf(ref[2])
    assert torch.isfinite(out[1])  # ||g||^2 does not see x without weight decay
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitwise_deterministic(backend):
    g, x, r = make_lists([65537 * 3, 1023, 7] * 4, seed=8)
    first = pg.secant_stats(g, x, r, backend=backend, per_tensor=True)
    for _ in range(3):
        assert torch.equal(pg.secant_stats(g, x, r, backend=backend, per_tensor=True), first)
    if backend == "cpu":  # and independent of the thread count
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(pg.secant_stats(g, x, r, backend=backend, per_tensor=True), first)
        finally:
            torch.set_num_threads(n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_list_and_empty_tensors(backend):
    assert torch.equal(pg.secant_stats([], [], [], backend=backend), torch.zeros(3, dtype=torch.float64))
    assert pg.secant_stats([], [], [], per_tensor=True).shape == (0, 3)
    e = [torch.empty(0), torch.empty(0, 5)]
    assert torch.equal(pg.secant_stats(e, e, e, backend=backend), torch.zeros(3, dtype=torch.float64))


def test_input_kinds_module_generator_tuple():
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    ref_model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model(torch.randn(4, 7)).sum().backward()
    grads = pg.grads_of(model)
    expected = pg.reference_secant_stats(grads, list(model.parameters()), list(ref_model.parameters()))
    out = pg.secant_stats((g for g in grads), model, tuple(ref_model.parameters()))
    assert_stats_close(out, expected)
    assert_stats_close(pg.secant_stats(grads[0], model.parameters().__next__(), ref_model[0].weight),
                       pg.reference_secant_stats([grads[0]], [model[0].weight], [ref_model[0].weight]))


def test_grads_of_missing_grad_names_parameter():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"parameter 'weight' \(shape \[2, 3\]\) has no .grad"):
        pg.grads_of(model)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs_name_the_offender(backend):
    g, x, r = make_lists([4, 6, 8], seed=10)
    with pytest.raises(ValueError, match=r"3 grads, 3 params and 2 refs"):
        pg.secant_stats(g, x, r[:2], backend=backend)
    with pytest.raises(ValueError, match=r"index 1: grads\[1\] has shape \[5\].*\(5 elements\).*params\[1\] has shape \[6\]"):
        pg.secant_stats([g[0], torch.randn(5), g[2]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"index 2: refs\[2\] has shape \[2, 3\]"):
        pg.secant_stats(g, x, [r[0], r[1], torch.randn(2, 3)], backend=backend)
    with pytest.raises(TypeError, match=r"params\[0\] has shape \[4\], torch.int64, cpu; expected float16"):
        pg.secant_stats(g, [torch.ones(4, dtype=torch.long), x[1], x[2]], r, backend=backend)
    with pytest.raises(TypeError, match=r"grads\[2\] has shape \[8\], torch.complex64"):
        pg.secant_stats([g[0], g[1], torch.randn(8, dtype=torch.complex64)], x, r, backend=backend)
    with pytest.raises(TypeError, match=r"refs\[1\] is a list, not a torch.Tensor"):
        pg.secant_stats(g, x, [r[0], [1.0] * 6, r[2]], backend=backend)
    with pytest.raises(ValueError, match=r"grads\[0\] is None"):
        pg.secant_stats([None, g[1], g[2]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] has layout torch.sparse_coo"):
        pg.secant_stats([g[0], torch.randn(6).to_sparse(), g[2]], x, r, backend=backend)
    with pytest.raises(TypeError, match=r"params is a dict"):
        pg.secant_stats(g, {"a": x[0]}, r, backend=backend)
    K2 = [g, [g[0], g[1].double(), g[2]]]
    with pytest.raises(TypeError, match=r"grads\[1\]\[1\] has shape \[6\], torch.float64.*share a dtype"):
        pg.secant_stats_multi(K2, x, r, backend=backend)
    with pytest.raises(ValueError, match=r"grads_lists\[1\] has 2 tensors but params has 3"):
        pg.secant_stats_multi([g, g[:2]], x, r, backend=backend)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        pg.secant_stats(g, x, r, backend="fast")


def test_raw_op_errors_are_value_and_type_errors():
    g, x, r = make_lists([4, 6], seed=11)
    with pytest.raises(ValueError, match=r"index 1: grads\[1\]"):
        torch.ops.pathgeom.secant_stats([g[0], torch.randn(3)], x, r)
    with pytest.raises(TypeError, match=r"torch.int32"):
        torch.ops.pathgeom.secant_stats(g, [x[0], torch.ones(6, dtype=torch.int32)], r)
    with pytest.raises(ValueError, match=r"expected num_grads \* len\(params\) = 6"):
        torch.ops.pathgeom.secant_stats_multi(g, x, r, 3)


def test_opcheck_each_op():
    g, x, r = make_lists([33, 1, 70000], seed=12)
    grads2, _, _ = make_lists([33, 1, 70000], seed=13, K=2)
    flat2 = grads2[0] + grads2[1]
    for per_tensor in (False, True):
        torch.library.opcheck(torch.ops.pathgeom.secant_stats.default, (g, x, r), {"per_tensor": per_tensor})
        torch.library.opcheck(torch.ops.pathgeom.secant_stats_multi.default, (flat2, x, r, 2), {"per_tensor": per_tensor, "weight_decay": 0.1})
    if "triton" in CPU_BACKENDS:
        torch.library.opcheck(torch.ops.pathgeom.secant_stats_triton.default, (flat2, x, r, 2, True, 0.0))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    g, x, r = make_lists([1023, 65537, 3], seed=14)

    @torch.compile(fullgraph=True)
    def step(g, x, r):
        s = torch.ops.pathgeom.secant_stats(g, x, r)
        return s[0] / s[2], torch.sqrt(s[1] / s[2])

    rsi, eb = step(g, x, r)
    ref = pg.reference_secant_stats(g, x, r)
    assert math.isclose(rsi.item(), (ref[0] / ref[2]).item(), rel_tol=1e-6)
    assert math.isclose(eb.item(), math.sqrt((ref[1] / ref[2]).item()), rel_tol=1e-6)


def test_ten_million_mixed_list_cpu_kernel():
    """The error target at scale: 10^7 mixed elements within 1e-6 sqrt(bc) of fp64."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    sizes = [3_000_000, 2_500_000, 1_999_999, 1_000_003, 1_000_000, 500_000, 1_000_000, 7, 1]
    g, x, r = make_lists(sizes, seed=15)
    g[1], g[3] = g[1].bfloat16(), g[3].half()
    x[4], r[4] = x[4].bfloat16(), r[4].bfloat16()
    x[6] = x[6].double()
    assert sum(sizes) >= 10**7
    assert_stats_close(pg.secant_stats(g, x, r, backend="cpu"), pg.reference_secant_stats(g, x, r))
    assert_stats_close(pg.secant_stats(g, x, r, backend="cpu", per_tensor=True), pg.reference_secant_stats(g, x, r, per_tensor=True))


def test_missing_or_mismatched_extension_is_explained():
    code = (
        "import torch; torch.__version__ = '0.0.0-other'\n"
        "import pathgeom_fast as pg\n"
        "assert not pg.extension_available()\n"
        "assert 'but torch 0.0.0-other is installed' in pg.extension_error(), pg.extension_error()\n"
        "x = [torch.randn(10)]\n"
        "s = pg.secant_stats(x, x, [torch.zeros(10)])\n"  # auto -> torch path
        "assert torch.allclose(s, torch.ops.pathgeom.secant_stats(x, x, [torch.zeros(10)]))\n"
        "try:\n"
        "    pg.secant_stats(x, x, x, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'but torch 0.0.0-other is installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('OK')\n"
    )
    if not _ext.available():
        pytest.skip("the extension is not built here")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_cpu_kernel_paths_give_bitwise_equal_results():
    """Many positions (several parallel blocks), small and large tensors, some needing a contiguous
    copy (a strided view among contiguous members): whatever path a position takes (checked and
    computed in the block pass, or flagged and computed from prepare_inputs' copy in the chunk
    pass), and whatever the thread count, the result is bitwise the same."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    gen = torch.Generator().manual_seed(16)
    sizes = torch.randint(1, 3000, (600,), generator=gen).tolist()
    sizes[17], sizes[100], sizes[101], sizes[199], sizes[300] = 70001, 4097, 40000, 0, 4096
    g, x, r = make_lists(sizes, seed=16)
    first = pg.secant_stats(g, x, r, backend="cpu", per_tensor=True)
    total = pg.secant_stats(g, x, r, backend="cpu")
    assert_stats_close(first, pg.reference_secant_stats(g, x, r, per_tensor=True))

    def strided(t):  # the same values, as a non-contiguous view
        return torch.empty(2 * t.numel(), dtype=t.dtype)[::2].copy_(t)

    xs = [strided(t) if i % 7 == 3 or i in (17, 101) else t for i, t in enumerate(x)]
    assert not xs[17].is_contiguous() and xs[18].is_contiguous()
    n = torch.get_num_threads()
    try:
        for threads in (1, n):
            torch.set_num_threads(threads)
            for xi in (x, xs):
                assert torch.equal(pg.secant_stats(g, xi, r, backend="cpu", per_tensor=True), first)
                assert torch.equal(pg.secant_stats(g, xi, r, backend="cpu"), total)
    finally:
        torch.set_num_threads(n)


def test_cpu_kernel_names_the_first_offender_across_blocks():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    g, x, r = make_lists([50] * 700, seed=17)
    bad_g = list(g)
    bad_g[650] = torch.randn(49)
    bad_g[300] = torch.randn(3, 7)
    with pytest.raises(ValueError, match=r"index 300: grads\[300\] has shape \[3, 7\]"):
        pg.secant_stats(bad_g, x, r, backend="cpu")
    bad_r = list(r)
    bad_r[699] = r[699].to(torch.int32)
    with pytest.raises(TypeError, match=r"refs\[699\] has shape \[50\], torch.int32"):
        pg.secant_stats(g, x, bad_r, backend="cpu")


def test_cpu_tables_kept_between_calls_carry_nothing_over():
    """The CPU pass keeps its tables per calling thread between calls (only the flags are
    cleared). Calls of different lengths, K, per-tensor or not, after a failing call, with copies
    of strided inputs, a list past the kept size, and from several Python threads at once: each
    result equals the fp64 reference and is bitwise what a fresh process would give."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")
    import threading

    big = make_lists([3] * 300000, seed=21)  # tables of more than the 8 MiB kept
    cases = [make_lists([1000] * 900, seed=18), make_lists([7, 5000, 30], seed=19), make_lists([64] * 300, seed=20, K=3)]
    strided = [torch.empty(2 * t.numel())[::2].copy_(t) for t in cases[0][1]]
    refs = [pg.reference_secant_stats(*cases[0], per_tensor=True), pg.reference_secant_stats(*cases[1]),
            ref_multi(*cases[2], per_tensor=True), pg.reference_secant_stats(*big)]

    def run_all():
        out = [pg.secant_stats(*cases[0], backend="cpu", per_tensor=True), pg.secant_stats(*cases[1], backend="cpu")]
        with pytest.raises(ValueError, match=r"grads\[2\] has shape \[31\]"):
            pg.secant_stats(cases[1][0][:2] + [torch.randn(31)], cases[1][1], cases[1][2], backend="cpu")
        out.append(pg.secant_stats_multi(*cases[2], backend="cpu", per_tensor=True))
        out.append(pg.secant_stats(*big, backend="cpu"))
        out.append(pg.secant_stats(cases[0][0], strided, cases[0][2], backend="cpu", per_tensor=True))
        return out

    first = run_all()
    for o, ref in zip(first, refs):
        assert_stats_close(o, ref)
    assert torch.equal(first[4], first[0])  # copies of the strided params: the same values
    results = [None] * 3

    def worker(j):
        results[j] = [run_all() for _ in range(2)]

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        for again in res:
            assert all(torch.equal(a, b) for a, b in zip(again, first))
    fresh = subprocess.run(
        [sys.executable, "-c", "import sys, torch, pathgeom_fast as pg; sys.path.insert(0, 'tests');"
         "from utils import make_lists; g, x, r = make_lists([7, 5000, 30], seed=19);"
         "print(repr(pg.secant_stats(g, x, r, backend='cpu').tolist()))"],
        capture_output=True, text=True, cwd=__file__.rsplit("/tests/", 1)[0],
    )
    assert fresh.returncode == 0, fresh.stderr
    assert eval(fresh.stdout) == first[1].tolist()


def test_parallel_borrow_of_long_lists_matches_the_serial_one():
    """Lists of 8192 objects or more in all are borrowed from Python by the intra-op threads,
    which take plain tensors and Parameters only; anything else (None, another type, a Tensor
    subclass) sends the call to the serial borrow. Bad entries anywhere in the three lists are
    named as the serial borrow names them, Parameters and subclasses are read, and the results
    equal the fp64 reference and, bitwise, those of one thread."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")

    class Sub(torch.Tensor):
        pass

    T = 4000  # 12000 objects
    g, x, r = make_lists([5] * (T - 3) + [0, 1000, 33], seed=31)
    out = pg.secant_stats(g, x, r, backend="cpu", per_tensor=True)
    assert_stats_close(out, pg.reference_secant_stats(g, x, r, per_tensor=True))
    params = [torch.nn.Parameter(t.clone()) for t in x]
    assert torch.equal(pg.secant_stats(g, params, r, backend="cpu", per_tensor=True), out)
    for where in (0, T // 2, T - 1):
        sub = list(x)
        sub[where] = x[where].as_subclass(Sub)
        assert torch.equal(pg.secant_stats(g, sub, r, backend="cpu", per_tensor=True), out)
    for name, lst, pos in [("grads", g, 0), ("params", x, 1), ("refs", r, 2)]:
        for where in (0, T // 2 + 7, T - 1):
            bad = list(lst)
            bad[where] = None
            args = [g, x, r]
            args[pos] = bad
            with pytest.raises(ValueError, match=rf"{name}\[{where}\] is None"):
                pg.secant_stats(*args, backend="cpu")
            bad[where] = 2.5
            with pytest.raises(TypeError, match=rf"{name}\[{where}\] is a float, not a torch.Tensor"):
                pg.secant_stats(*args, backend="cpu")
    # the .grad hint is for gradients only; a first entry that is not a tensor is named too
    # (it was an AttributeError from the Python layer), by the Gram op as well
    with pytest.raises(ValueError, match=r"refs\[5\] is None$"):
        pg.secant_stats(g, x, r[:5] + [None] + r[6:], backend="cpu")
    with pytest.raises(ValueError, match=r"params\[0\] is None$"):
        pg.secant_gram([g], [None] + x[1:], r, backend="cpu")
    with pytest.raises(TypeError, match=r"params\[0\] is a str, not a torch.Tensor"):
        pg.secant_stats(g, ["w"] + x[1:], r)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pg.secant_stats(g, x, r, backend="cpu", per_tensor=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, out)
    assert torch.equal(pg.secant_stats(g, x, r, backend="cpu", per_tensor=True), out)  # after the errors


def test_weight_decay_must_be_finite():
    """NaN or infinite weight decay is refused (it made every sum NaN); negative is allowed."""
    g, x, r = make_lists([5, 7], seed=3)
    for wd in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"weight_decay must be a finite number"):
            pg.secant_stats(g, x, r, weight_decay=wd)
        with pytest.raises(ValueError, match=r"secant_stats_multi: weight_decay must be a finite number"):
            pg.secant_stats_multi([g], x, r, weight_decay=wd)
    h = [gi - 0.5 * xi for gi, xi in zip(g, x)]
    assert_stats_close(pg.secant_stats(g, x, r, weight_decay=-0.5), pg.reference_secant_stats(h, x, r))


def test_interrupted_build_is_explained(monkeypatch):
    """_build_info.py written (the build started) but no _C library: 'not built', not the
    import system's 'partially initialized module (circular import)' (seen on a GPU machine)."""
    if not _ext.available():
        pytest.skip("the extension is not built here")
    saved = (_ext._C, _ext._ERROR, _ext.WITH_CUDA)

    def no_library():
        raise ImportError("cannot import name '_C' from partially initialized module 'pathgeom_fast'")

    monkeypatch.setattr(_ext, "_import_library", no_library)
    monkeypatch.setattr(_ext, "_library_present", lambda: False)
    try:
        _ext._C = None
        _ext._load()
        assert not _ext.available()
        assert "is not built: the package has no _C library" in _ext.load_error(), _ext.load_error()
        monkeypatch.setattr(_ext, "_library_present", lambda: True)  # present but broken
        _ext._load()
        assert "failed to load (cannot import name" in _ext.load_error(), _ext.load_error()
    finally:
        _ext._C, _ext._ERROR, _ext.WITH_CUDA = saved
    assert _ext.available() and _ext._library_present()


# --------------------------------------------------------------------------------------
# Native entry points: objects that are not tensors, re-entrant calls, the GIL, autograd
# --------------------------------------------------------------------------------------


def _needs_ext():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip(f"compiled extension not loaded: {_ext.load_error()}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_like_objects_are_refused(backend):
    """An object that passes isinstance(o, torch.Tensor) through its __class__ (a mock with
    spec=torch.Tensor) is not a tensor the kernels can read: a TypeError naming it (it was
    read as one by the C++ entry point, and the process died)."""
    import unittest.mock

    g, x, r = make_lists([4, 6, 8], seed=40)
    mock = unittest.mock.MagicMock(spec=torch.Tensor)
    assert isinstance(mock, torch.Tensor)
    for pos, name in ((0, "grads"), (1, "params"), (2, "refs")):
        for where in (0, 2):
            args = [list(g), list(x), list(r)]
            args[pos][where] = mock
            with pytest.raises(TypeError, match=rf"{name}\[{where}\] is a MagicMock, not a torch.Tensor"):
                pg.secant_stats(*args, backend=backend)
    with pytest.raises(TypeError, match=r"grads\[0\]\[1\] is a MagicMock, not a torch.Tensor"):
        pg.secant_stats_multi([[g[0], mock, g[2]], g], x, r, backend=backend)
    if backend == "cpu":  # the compiled entry points themselves, and a long list (parallel borrow)
        with pytest.raises(TypeError, match=r"grads\[1\] is a MagicMock"):
            _ext._C.secant_stats_direct([g[0], mock, g[2]], x, r, 1, False, 0.0, 0)
        with pytest.raises(TypeError, match=r"refs\[2\] is a MagicMock"):
            _ext._C.triton_inputs(g, x, [r[0], r[1], mock], 1, False)
        G, X, R = make_lists([3] * 5000, seed=41)
        X[4321] = mock
        with pytest.raises(TypeError, match=r"params\[4321\] is a MagicMock"):
            pg.secant_stats(G, X, R, backend="cpu")


def test_direct_entry_checks_lengths_before_naming_entries():
    """num_grads > 1 with no params: a length error (naming an entry divided by len(params),
    zero: the process died of SIGFPE); K out of range, non-list arguments: clean errors."""
    _needs_ext()
    C = _ext._C
    with pytest.raises(ValueError, match=r"matching lengths, got 1 grads \(expected num_grads \* len\(params\) = 0\), 0 params"):
        C.secant_stats_direct([None], [], [], 2, False, 0.0, 1)
    with pytest.raises(ValueError, match=r"matching lengths"):
        C.secant_stats_direct([None], [], [], 2, False, 0.0, 2)
    with pytest.raises(ValueError, match=r"matching lengths"):
        C.triton_inputs([None], [], [], 2, False)
    with pytest.raises(ValueError, match=r"needs at least one tensor"):
        C.secant_stats_direct([], [], [], 3, False, 0.0, 1)
    g, x, r = make_lists([4, 6], seed=42)
    with pytest.raises(ValueError, match=r"num_grads must be >= 1, got 0"):
        C.secant_stats_direct(g, x, r, 0, False, 0.0, 1)
    with pytest.raises(ValueError, match=r"num_grads must be at most"):
        C.secant_stats_direct(g, x, r, 2**62, False, 0.0, 1)
    with pytest.raises(ValueError, match=r"num_grads must be at most"):
        torch.ops.pathgeom.secant_stats_multi(g, x, r, 2**62)
    with pytest.raises(ValueError, match=r"num_vecs must be between 1 and 8, got 9"):
        C.secant_stats_direct(g * 9, x, r, 9, False, 0.0, 2)
    with pytest.raises(TypeError, match=r"params must be a list, got tuple"):
        C.secant_stats_direct(g, tuple(x), r, 1, False, 0.0, 0)
    with pytest.raises(ValueError, match=r"mode must be 0, 1 or 2"):
        C.secant_stats_direct(g, x, r, 1, False, 0.0, 3)
    with pytest.raises(ValueError, match=r"no compiled kernel for tensors on meta \(params\[0\] is on meta\)"):
        C.secant_stats_direct([t.to("meta") for t in g], [t.to("meta") for t in x], [t.to("meta") for t in r], 1, False, 0.0, 0)


class _Reentrant(torch.Tensor):
    """A tensor subclass with memory of its own whose __torch_dispatch__ (reached by the copy
    the kernels make of a non-contiguous input) calls secant_stats again, on other lists,
    in the middle of the outer call, on the same thread."""

    nested = []  # (result, reference) of each nested call

    @staticmethod
    def __new__(cls, t):
        return torch.Tensor._make_subclass(cls, t)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        g, x, r = make_lists([3, 5000, 7] * 4, seed=43 + len(cls.nested))
        cls.nested.append((pg.secant_stats(g, x, r, backend="cpu", per_tensor=True),
                           pg.reference_secant_stats(g, x, r, per_tensor=True)))

        with torch._C._DisableTorchDispatch():
            return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [40, 3000])
def test_reentrant_call_from_torch_dispatch(T):
    """The kept per-thread tables of the direct entry point and of the CPU pass are not
    shared with a call made in the middle of theirs (Python code run by a check or a copy):
    the outer and the nested results both equal the fp64 reference."""
    _needs_ext()
    g, x, r = make_lists([9, 70, 4100] * (T // 3) + [12] * (T % 3), seed=44)
    want = pg.reference_secant_stats(g, x, r, per_tensor=True)
    for pos in (0, 1, 2):
        for where in (0, T // 2, T - 1):
            args = [list(g), list(x), list(r)]
            t = args[pos][where]
            strided = torch.empty(2 * t.numel(), dtype=t.dtype)[::2].copy_(t)  # not contiguous
            args[pos][where] = _Reentrant(strided)
            _Reentrant.nested.clear()
            out = pg.secant_stats(*args, backend="cpu", per_tensor=True)
            assert _Reentrant.nested, "the copy did not reach __torch_dispatch__"
            assert_stats_close(out, want)
            for res, ref in _Reentrant.nested:
                assert_stats_close(res, ref)
            _Reentrant.nested.clear()
            out = _ext._C.triton_inputs(*args, 1, False)  # the Triton host tables, same checks
            assert _Reentrant.nested
            assert out[1].tolist() == [t.numel() for t in x]
    # the multi and Gram kernels, and the dispatcher's op, with the subclass
    args = [list(g), list(x), list(r)]
    args[1][1] = _Reentrant(torch.empty(2 * x[1].numel())[::2].copy_(x[1]))
    assert_stats_close(pg.secant_stats_multi([args[0], args[0]], args[1], args[2], backend="cpu")[1],
                       pg.reference_secant_stats(g, x, r))
    gram = pg.secant_gram([args[0]], args[1], args[2], backend="cpu")  # [[<g,g>, <g,d>], [<d,g>, <d,d>]]
    assert_stats_close(torch.stack([gram[0, 1], gram[0, 0], gram[1, 1]]), pg.reference_secant_stats(g, x, r))


def _gil_probe(call):
    """(exception raised by call(), whether another Python thread ran during the call). With
    a long switch interval, the other thread runs only when the call releases the GIL."""
    import threading
    import time

    count = [0]
    stop = threading.Event()
    started = threading.Event()

    def spin():
        started.set()
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)  # releases the GIL at once

    interval = sys.getswitchinterval()
    th = threading.Thread(target=spin)
    th.start()
    started.wait()
    sys.setswitchinterval(100.0)
    try:
        time.sleep(0.01)
        c0 = count[0]
        err = None
        try:
            call()
        except Exception as e:  # noqa: BLE001 - returned to the test
            err = e
        ran = count[0] != c0
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        th.join()
    return err, ran


def test_bad_input_is_refused_before_the_gil_is_released():
    """Every check of the direct entry point runs with the GIL held: a bad entry anywhere in
    a long list raises before any GIL-free work (another Python thread never runs during the
    call), while a good call releases the GIL for its kernels (the probe does see that)."""
    _needs_ext()
    T = 6000
    g, x, r = make_lists([200] * T, seed=45)
    # the other thread must be scheduled within the kernels' few milliseconds: on a busy
    # machine it may miss one call, so the good call is probed up to 5 times, on larger tensors
    gb, xb, rb = make_lists([2000] * 2000, seed=44)
    seen = [_gil_probe(lambda: pg.secant_stats(gb, xb, rb, backend="cpu")) for _ in range(5)]
    assert all(err is None for err, _ in seen) and any(ran for _, ran in seen), \
        "the probe cannot see the GIL released during the kernels"
    late = T - 5
    bad_inputs = [  # the bad inputs of test_bad_inputs_name_the_offender, late in a long list
        ((g, x, r[:-1]), ValueError),
        ((g[:late] + [torch.randn(5)] + g[late + 1:], x, r), ValueError),
        ((g, x, r[:late] + [torch.randn(2, 3)] + r[late + 1:]), ValueError),
        ((g, x[:late] + [torch.ones(200, dtype=torch.long)] + x[late + 1:], r), TypeError),
        ((g[:late] + [torch.randn(200, dtype=torch.complex64)] + g[late + 1:], x, r), TypeError),
        ((g, x, r[:late] + [[1.0] * 6] + r[late + 1:]), TypeError),
        ((g[:late] + [None] + g[late + 1:], x, r), ValueError),
        ((g[:late] + [torch.randn(200).to_sparse()] + g[late + 1:], x, r), ValueError),
        ((g, x, r[:late] + [torch.randn(200, device="meta")] + r[late + 1:]), ValueError),
        ((g, x, r[:late] + [torch.randn(200, dtype=torch.float64).to(torch.bool)] + r[late + 1:]), TypeError),
    ]
    for args, exc in bad_inputs:
        for multi in (0, 1):
            err, ran = _gil_probe(lambda: _ext._C.secant_stats_direct(*args, 1, False, 0.0, multi))
            assert isinstance(err, exc), err
            assert not ran, f"the GIL was released before {err!r} was raised"
    K2 = [g, g[:late] + [g[late].double()] + g[late + 1:]]
    err, ran = _gil_probe(lambda: pg.secant_stats_multi(K2, x, r, backend="cpu"))
    assert isinstance(err, TypeError) and "share a dtype" in str(err) and not ran


@pytest.mark.slow
def test_compile_with_requires_grad_inputs_does_not_warn():
    """Inputs that require grad (parameters) in a compiled step: no 'autograd kernel was not
    registered' warning; the op's output is marked non-differentiable, and the rest of the
    loss back-propagates."""
    import warnings

    g, x, r = make_lists([33, 70000, 3], seed=46)
    params = [torch.nn.Parameter(t.clone()) for t in x]
    grads = [t.clone().requires_grad_() for t in g]

    def step(grads, params, refs):
        s = torch.ops.pathgeom.secant_stats(grads, params, refs)
        m = torch.ops.pathgeom.secant_stats_multi(grads + grads, params, refs, 2)
        q = torch.ops.pathgeom.secant_gram(grads, params, refs, 1)
        return s[0] / s[2] + m[1, 0] + q[0, 1] + sum((p.double() ** 2).sum() for p in params)  # fp64: no fp32 sum order

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = step(grads, params, r)
        compiled = torch.compile(step, fullgraph=True)(grads, params, r)
        compiled.backward()
        pub = torch.compile(lambda a, b, c: pg.secant_stats(a, b, c), fullgraph=True)(grads, params, r)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "autograd kernel was not registered" in m], messages
    assert not pub.requires_grad and not torch.ops.pathgeom.secant_stats(grads, params, r).requires_grad
    for p in params:  # d/dp of sum p^2 only
        torch.testing.assert_close(p.grad, 2 * p.detach())
    ref = pg.reference_secant_stats(g, x, r)
    assert math.isclose(compiled.item(), eager.item(), rel_tol=1e-9)
    assert_stats_close(pub, ref)
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        torch.ops.pathgeom.secant_stats(grads, params, r).sum().backward()


def test_wrapper_subclass_without_memory_is_named():
    """A wrapper tensor subclass (no memory of its own: its data lives in an inner tensor)
    cannot be read by the compiled kernels: a TypeError naming it, not a RuntimeError from
    deep inside; the pure-torch backend computes through its __torch_dispatch__."""
    _needs_ext()
    g, x, r = make_lists([4, 6, 8], seed=47)
    for where, strided in ((1, False), (2, True)):
        t = torch.empty(16)[::2].copy_(r[2]) if strided else r[where]
        bad = list(r)
        bad[where] = WrapperTensor(t)
        with pytest.raises(TypeError, match=rf"refs\[{where}\] \(shape \[\d+\], torch.float32, cpu\) has no memory"):
            pg.secant_stats(g, x, bad, backend="cpu")
        out = pg.secant_stats(g, x, bad, backend="torch")
        assert_stats_close(torch.as_tensor(out.inner if isinstance(out, WrapperTensor) else out),
                           pg.reference_secant_stats(g, x, r))
