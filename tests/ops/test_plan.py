"""Launch plans of the GPU backends, on CPU: plans only, no memory, no GPU.

Each plan is checked against an independent model of what the kernels do with it: every
program/block is mapped to (tensor, elements, partial row, gradient lists) the way the kernel
code maps it, and the tests assert that every element of every tensor is covered exactly once
per gradient list, that every (row, k) is written exactly once, that rows are laid out as
documented, and that the caps hold. Expectations are derived from the sizes, never copied
from the planner.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pathgeom_fast import _ext
from pathgeom_fast.plan import TritonPlan, plan_triton

# Sizes: empty tensors, one element, chunk edges, and beyond 2^31 elements (plans only).
BIG = [2**31 + 5, 3 * 2**32 + 1, 2**31 - 1]


def _cases():
    rng = random.Random(0)
    yield "small", [1, 3, 0, 16, 17, 32, 0, 5], 1
    yield "k9", [1, 3, 0, 16, 17, 32, 0, 5], 9
    yield "k20", [40, 0, 7, 33], 20
    yield "k8", [rng.randrange(0, 100) for _ in range(50)], 8
    yield "many", [rng.randrange(0, 70) for _ in range(1000)], 3
    yield "all_empty", [0, 0, 0], 2
    yield "none", [], 1


CHUNK = 16  # small chunks so that the tests see many chunks per tensor


# --------------------------------------------------------------------------------------
# Triton plan (pathgeom_fast.plan)
# --------------------------------------------------------------------------------------


def check_triton(plan: TritonPlan, numels, keys, K, per_tensor, chunk, max_grads_per_pass=8, max_programs=2**31 - 1):
    T = len(numels)
    # Fake addresses, distinct per (list, position): what each table slot must hold.
    addrs = np.array([(1 << 40) + 16 * j for j in range((K + 2) * T)], dtype=np.uint64)
    buf = plan.fill(addrs)
    n_chunks = [math.ceil(n / chunk) for n in numels]
    first = [0]
    for n in n_chunks:
        first.append(first[-1] + n)
    assert plan.total_rows == first[-1]
    assert plan.first.tolist() == first
    covered = {}  # (tensor, k) -> list of (begin, end)
    written = {}  # (row, k) -> count
    launches_of = {}  # (tensor, k) -> launches
    for li, L in enumerate(plan.launches):
        assert 1 <= L.kc <= max_grads_per_pass and L.kcp >= L.kc and L.kcp & (L.kcp - 1) == 0
        assert 0 < L.programs <= max_programs
        for off in (L.table, L.numel, L.chunk_local, L.chunk_index, L.chunk_row):
            assert off % 2 == 0  # 16-byte aligned arguments
        ts = L.tensors.tolist()
        assert ts == sorted(ts) and len(set(keys[t] for t in ts)) == 1 and keys[ts[0]] == L.key
        width = L.kcp + 2
        table = buf[L.table : L.table + len(ts) * width].reshape(len(ts), width)
        for j, t in enumerate(ts):  # the table row of tensor t: its gradients, padding, x, x*
            want = [int(addrs[k * T + t]) for k in range(L.k0, L.k0 + L.kc)] + [0] * (L.kcp - L.kc)
            want += [int(addrs[K * T + t]), int(addrs[(K + 1) * T + t])]
            assert [int(v) for v in table[j].view(np.uint64)] == want
            assert int(buf[L.numel + j]) == numels[t]
        n = L.programs
        local = buf[L.chunk_local : L.chunk_local + n]
        index = buf[L.chunk_index : L.chunk_index + n]
        rows = buf[L.chunk_row : L.chunk_row + n]
        for c in range(n):  # what program c does in the kernel
            t = ts[int(local[c])]
            begin = int(index[c]) * chunk
            end = min(begin + chunk, numels[t])
            assert begin < end, "a program without elements"
            assert int(rows[c]) == first[t] + begin // chunk  # rows laid out by tensor, chunk order
            for k in range(L.k0, L.k0 + L.kc):
                covered.setdefault((t, k), []).append((begin, end))
                written[(int(rows[c]), k)] = written.get((int(rows[c]), k), 0) + 1
                launches_of.setdefault((t, k), set()).add(li)
    for t in range(T):
        for k in range(K):
            spans = sorted(covered.get((t, k), []))
            pos = 0
            for b, e in spans:
                assert b == pos, f"tensor {t}, k {k}: gap or overlap at {pos}"
                pos = e
            assert pos == numels[t]
            if numels[t]:
                assert len(launches_of[(t, k)]) == 1  # a tensor is never split across launches
    assert set(written.values()) <= {1}
    assert len(written) == plan.total_rows * K
    seg = buf[plan.segments : plan.segments + plan.nsegments + 1].tolist()
    assert seg == (first if per_tensor else [0, first[-1]])


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("name,numels,K", list(_cases()), ids=[c[0] for c in _cases()])
def test_triton_plan_covers_every_element_once(name, numels, K, per_tensor):
    rng = random.Random(len(numels) * 31 + K)
    keys = [rng.choice(["f32", ("bf16", "f32", "f32"), 7]) for _ in numels]
    plan = plan_triton(numels, keys, K, per_tensor, chunk=CHUNK)
    check_triton(plan, numels, keys, K, per_tensor, CHUNK)
    assert plan.nsegments == (len(numels) if per_tensor else 1)


def test_triton_plan_integer_keys_vectorised_grouping():
    rng = np.random.default_rng(1)
    numels = rng.integers(0, 50, size=400).tolist()
    keys = rng.integers(0, 5, size=400)
    plan = plan_triton(numels, keys, 10, True, chunk=CHUNK)
    check_triton(plan, numels, keys.tolist(), 10, True, CHUNK)
    # groups in order of first appearance (among tensors with elements)
    order = []
    for n, k in zip(numels, keys.tolist()):
        if n and k not in order:
            order.append(k)
    seen = []
    for L in plan.launches:
        if L.key not in seen:
            seen.append(L.key)
    assert seen == order


def test_triton_plan_splits_at_max_programs():
    numels = [16 * 5, 16 * 3, 1, 16 * 7, 0, 16 * 2]
    plan = plan_triton(numels, [0] * 6, 3, True, chunk=16, max_programs=8)
    check_triton(plan, numels, [0] * 6, 3, True, 16, max_programs=8)
    assert len(plan.launches) > 1
    with pytest.raises(ValueError, match="chunks"):
        plan_triton([16 * 9], [0], 1, False, chunk=16, max_programs=8)


def test_triton_plan_passes_of_at_most_8():
    plan = plan_triton([100, 5], [0, 0], 19, False, chunk=CHUNK)
    passes = sorted({(L.k0, L.kc) for L in plan.launches})
    assert passes == [(0, 8), (8, 8), (16, 3)]
    check_triton(plan, [100, 5], [0, 0], 19, False, CHUNK)
    plan = plan_triton([100, 5], [0, 0], 5, False, chunk=CHUNK, max_grads_per_pass=2)
    check_triton(plan, [100, 5], [0, 0], 5, False, CHUNK, max_grads_per_pass=2)


def test_triton_plan_beyond_2_31_elements():
    # Real chunk size; 2^31+ elements per tensor: plans only (about 2 x 10^5 programs).
    numels = [BIG[0], 0, 70000, BIG[2]]
    plan = plan_triton(numels, [1, 1, 0, 1], 1, True)
    assert plan.total_rows == sum(math.ceil(n / 2**16) for n in numels)
    buf = plan.fill(np.arange(3 * len(numels), dtype=np.uint64) * 16)
    # vectorised version of the coverage check for the big launch
    for L in plan.launches:
        local = buf[L.chunk_local : L.chunk_local + L.programs]
        index = buf[L.chunk_index : L.chunk_index + L.programs]
        rows = buf[L.chunk_row : L.chunk_row + L.programs]
        for j, t in enumerate(L.tensors.tolist()):
            q = np.sort(index[local == j])
            assert q.tolist() == list(range(math.ceil(numels[t] / 2**16)))
            assert (q.max() + 1) * 2**16 >= numels[t] > q.max() * 2**16  # last chunk is partial or full
            assert np.array_equal(np.sort(rows[local == j]), plan.first[t] + q)
    assert int(buf[plan.launches[0].numel]) in numels


def test_triton_plan_rejects_bad_arguments():
    with pytest.raises(ValueError):
        plan_triton([1, 2], [0], 1, False)
    with pytest.raises(ValueError):
        plan_triton([1], [0], 0, False)
    with pytest.raises(ValueError):
        plan_triton([-1], [0], 1, False)


# --------------------------------------------------------------------------------------
# CUDA plan (csrc/plan.h, through pathgeom_fast._C.plan_cuda; compiled in every build)
# --------------------------------------------------------------------------------------

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"compiled extension not loaded: {_ext.load_error()}")


def check_cuda(plan: dict, numels, keys, K):
    lim = plan["limits"]
    chunk = lim["chunk"]
    T = len(numels)
    passes = plan["passes"]
    # passes: consecutive, of at most max_grads_per_pass lists, covering 0..K
    pos = 0
    for k0, kc in passes:
        assert k0 == pos and 1 <= kc <= lim["max_grads_per_pass"]
        pos += kc
    assert pos == K
    kc_max = max(kc for _, kc in passes)
    covered = {}
    written = {}
    finalised = {}
    next_row = 0
    seen_tensors = []
    prev_key = None
    for L in plan["launches"]:
        ts, cs = L["tensors"], L["chunk_start"]
        nt = len(ts)
        assert 1 <= nt <= lim["max_tensors"] and nt * (kc_max + 2) <= lim["max_ptrs"]  # argument caps
        assert len(cs) == nt + 1 and cs[0] == 0
        assert cs[-1] <= lim["max_blocks"]
        assert L["chunk_offset"] == next_row  # launches take consecutive row ranges
        next_row += cs[-1]
        assert all(keys[t] == L["key"] for t in ts) and ts == sorted(ts)
        assert prev_key is None or L["key"] >= prev_key  # groups in increasing key order
        prev_key = L["key"]
        seen_tensors += ts
        for j, t in enumerate(ts):
            assert cs[j + 1] - cs[j] == math.ceil(numels[t] / chunk)
        nblocks = cs[-1]
        for b in range(nblocks):
            # the kernel's search: the largest j with chunk_start[j] <= b
            j = max(i for i in range(nt) if cs[i] <= b)
            t = ts[j]
            begin = (b - cs[j]) * chunk
            end = min(begin + chunk, numels[t])
            assert begin < end
            for k0, kc in passes:
                for k in range(k0, k0 + kc):
                    covered.setdefault((t, k), []).append((begin, end))
                    row = L["chunk_offset"] + b
                    written[(row, k)] = written.get((row, k), 0) + 1
        for j, t in enumerate(ts):  # the per-tensor finalisation of this launch
            finalised[t] = (L["chunk_offset"] + cs[j], L["chunk_offset"] + cs[j + 1])
    assert sorted(seen_tensors) == list(range(T))  # every tensor (empty ones too) in one launch
    assert next_row == plan["total_chunks"] == sum(math.ceil(n / chunk) for n in numels)
    for t in range(T):
        lo, hi = finalised[t]
        for k in range(K):
            spans = sorted(covered.get((t, k), []))
            pos = 0
            for b, e in spans:
                assert b == pos
                pos = e
            assert pos == numels[t]
            # the finalisation of tensor t sums exactly the rows its blocks wrote
            rows_t = sorted(r for (r, kk) in written if kk == k and lo <= r < hi)
            assert rows_t == list(range(lo, hi))
    assert set(written.values()) <= {1} and len(written) == plan["total_chunks"] * K


@needs_ext
def test_cuda_plan_defaults_match_header():
    lim = _ext._C.cuda_plan_limits()
    assert lim["max_grads_per_pass"] == 8 and lim["chunk"] == 2**16
    # the tables live in device memory: no cap on tensors or pointers binds (one launch per
    # dtype combination and pass), only the grid limit
    assert lim["max_tensors"] == 2**31 - 1 and lim["max_ptrs"] == 2**62 and lim["max_blocks"] == 2**31 - 1


@needs_ext
@pytest.mark.parametrize("name,numels,K", list(_cases()), ids=[c[0] for c in _cases()])
def test_cuda_plan_covers_every_element_once(name, numels, K):
    rng = random.Random(len(numels) + K)
    keys = [rng.choice([10, 42, 63]) for _ in numels]
    plan = _ext._C.plan_cuda(numels, keys, K, {"chunk": CHUNK})
    check_cuda(plan, numels, keys, K)


@needs_ext
@pytest.mark.parametrize("K", [1, 2, 8, 9, 20])
def test_cuda_plan_splits_at_tensor_and_pointer_caps(K):
    # > 320 tensors: several launches per group; the pointer cap binds first for K >= 3
    numels = [(i * 7) % 40 for i in range(1000)]
    keys = [42 if i % 3 else 10 for i in range(1000)]
    plan = _ext._C.plan_cuda(numels, keys, K, {"chunk": CHUNK, "max_tensors": 320, "max_ptrs": 1536})
    check_cuda(plan, numels, keys, K)
    per_launch = min(320, 1536 // (min(K, 8) + 2))
    sizes = [len(L["tensors"]) for L in plan["launches"]]
    assert max(sizes) == per_launch
    n10 = keys.count(10)
    assert len(plan["launches"]) == math.ceil(n10 / per_launch) + math.ceil((1000 - n10) / per_launch)


@needs_ext
def test_cuda_plan_small_caps():
    numels = [5, 0, 33, 16, 1, 0, 48]
    lim = {"chunk": 16, "max_tensors": 3, "max_ptrs": 12, "max_grads_per_pass": 2, "max_blocks": 4}
    plan = _ext._C.plan_cuda(numels, [0] * 7, 5, lim)
    check_cuda(plan, numels, [0] * 7, 5)
    with pytest.raises(ValueError, match="more chunks"):
        _ext._C.plan_cuda([16 * 5], [0], 1, lim)


@needs_ext
def test_cuda_plan_beyond_2_31_elements():
    numels = BIG + [0, 3]
    plan = _ext._C.plan_cuda(numels, [1, 0, 1, 1, 0], 3)
    assert plan["total_chunks"] == sum(math.ceil(n / 2**16) for n in numels)
    for L in plan["launches"]:
        for j, t in enumerate(L["tensors"]):
            n = L["chunk_start"][j + 1] - L["chunk_start"][j]
            assert n == math.ceil(numels[t] / 2**16)
            assert (n - 1) * 2**16 < numels[t] or numels[t] == 0


@needs_ext
def test_cuda_plan_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _ext._C.plan_cuda([1, 2], [0], 1)
    with pytest.raises(ValueError):
        _ext._C.plan_cuda([1], [0], 0)
    with pytest.raises(ValueError):
        _ext._C.plan_cuda([-5], [0], 1)
    with pytest.raises(TypeError):
        _ext._C.plan_cuda([1.5], [0], 1)


# --------------------------------------------------------------------------------------
# The CUDA backend's device table, read on the CPU the way its kernels read it
# --------------------------------------------------------------------------------------

_NP = {0: np.float16, 2: np.float32, 3: np.float64}


def _read(address: int, n: int, code: int) -> np.ndarray:
    """n values of dtype `code` (float16 0, bfloat16 1, float32 2, float64 3) at `address`, as fp64."""
    import ctypes

    width = 2 if code < 2 else 4 if code == 2 else 8
    raw = np.frombuffer((ctypes.c_char * (n * width)).from_address(address), dtype=np.uint8)
    if code == 1:  # bfloat16: the high half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.view(_NP[code]).astype(np.float64)


@needs_ext
@pytest.mark.parametrize("K", [1, 3, 9])
def test_cuda_device_table_read_as_the_kernels_read_it(K):
    """_C.cuda_host_work builds the table the CUDA kernels read (the same host code as a CUDA
    call). Read here as the kernels read it: block b of a launch takes tensor
    j = block_tensor[b], elements [(b - chunk_start[j]) * chunk, ...) of the addresses in row j
    of ptrs (K gradients, x, x*) with the launch's dtypes; the finalisation sums tensor j's rows
    into output row tensor_index[j]. The sums in fp64 must equal the fp64 reference of every
    tensor, every element covered once; mixed dtypes make several launches, a strided view a
    copy."""
    import torch

    from utils import make_lists

    chunk = _ext._C.cuda_plan_limits()["chunk"]
    sizes = [3, 0, chunk, chunk + 1, 2 * chunk + 7, 1000, 1]
    g16, x16, r16 = make_lists(sizes[:3], (torch.bfloat16, torch.float32, torch.float32), seed=1, K=K)
    g32, x32, r32 = make_lists(sizes[3:], (torch.float32, torch.float32, torch.float64), seed=2, K=K)
    lists16 = g16 if K > 1 else [g16]
    lists32 = g32 if K > 1 else [g32]
    grads = [lists16[k] + lists32[k] for k in range(K)]
    x, r = x16 + x32, r16 + r32
    x[5] = torch.empty(2 * sizes[5])[::2].copy_(x[5])  # not contiguous: the table holds a copy's address
    flat = [t for gl in grads for t in gl]
    table, launches, passes, total_chunks, copies = _ext._C.cuda_host_work(flat, x, r, K, True)
    assert len(copies) == 1 and torch.equal(copies[0], x[5])
    w = table.numpy()
    T = len(x)
    sums = np.zeros((T, K, 3))
    covered = {}
    offset = 0
    assert [kc for _, kc in passes] == [min(8, K - k0) for k0 in range(0, K, 8)]
    assert len(launches) == 2  # one launch per dtype combination, whatever the tensor count
    for L in launches:
        key = L["key"]
        gd, xd, rd = key // 16, key // 4 % 4, key % 4
        nt, nb = L["ntensors"], L["nblocks"]
        cs = w[L["chunk_start"] : L["chunk_start"] + nt + 1]
        assert cs[0] == 0 and cs[-1] == nb and L["chunk_offset"] == offset
        offset += nb
        for b in range(nb):
            j = int(w[L["block_tensor"] + b])
            assert cs[j] <= b < cs[j + 1]  # what a search of chunk_start would give
            n = int(w[L["numel"] + j])
            begin = (b - int(cs[j])) * chunk
            end = min(begin + chunk, n)
            pos = int(w[L["tensor_index"] + j])
            row = w[L["ptrs"] + j * (K + 2) : L["ptrs"] + (j + 1) * (K + 2)]
            xv = _read(int(row[K]) + begin * (8 if xd == 3 else 4 if xd == 2 else 2), end - begin, xd)
            rv = _read(int(row[K + 1]) + begin * (8 if rd == 3 else 4 if rd == 2 else 2), end - begin, rd)
            d = xv - rv
            for k in range(K):
                gv = _read(int(row[k]) + begin * (8 if gd == 3 else 4 if gd == 2 else 2), end - begin, gd)
                sums[pos, k] += (gv @ d, gv @ gv, d @ d)
            covered.setdefault(pos, []).append((begin, end))
    assert offset == total_chunks
    for t in range(T):
        assert sorted(covered.get(t, [])) == [(q * chunk, min((q + 1) * chunk, sizes[t])) for q in range(math.ceil(sizes[t] / chunk))]
        for k in range(K):
            g, xt, rt = grads[k][t].double(), x[t].double(), r[t].double()
            want = [float(g @ (xt - rt)), float(g @ g), float((xt - rt) @ (xt - rt))]
            np.testing.assert_allclose(sums[t, k], want, rtol=1e-12, atol=1e-12)
