"""Launch plan of the Triton backend: torch-free (standard library and NumPy), tested on CPU.

One planner for every Triton op of the package: ``secant_stats`` (``triton_kernels``, rows of
3 K values) and ``secant_gram`` (``triton_gram``, rows of (K + 1)^2 values, K <= 8 so one
pass); the plan does not depend on the op, only on what is listed below, so both ops share
cached plans and argument buffers. "Gradient lists" below are ``secant_gram``'s vector lists.

A plan says which programs (one per chunk of ``chunk`` elements of one tensor) each launch
runs, which partial row each program writes, and where every kernel argument lives in one
int64 buffer. It depends only on the tensor sizes, a group key per tensor (the dtype
combination and the alignment, one kernel specialisation each) and K; the tensor addresses
are written into the buffer afterwards, at the slots the plan lists, by one NumPy scatter.
So a plan is cached by (sizes, keys, K, per_tensor), and the per-call host work for T
tensors is reading each tensor's address, dtype, size and contiguity plus a few NumPy array
operations, whatever T.

Layout (what the kernels and the tests rely on):

* Partial rows: ``total_rows`` rows (float64; 3 K values for secant_stats, (K + 1)^2 for
  secant_gram), laid out **by tensor**: tensor i owns rows ``first[i] .. first[i+1]``, one
  per chunk, chunk q of tensor i (elements ``q * chunk .. min((q+1) * chunk, numel[i])``) in
  row ``first[i] + q``. Empty tensors own no row (and their per-tensor result is the empty
  sum, 0).
* Passes: the K gradient lists are read in passes of at most ``max_grads_per_pass`` (8)
  lists, each re-reading x and x*: pass p covers lists ``k0 .. k0 + kc`` and writes columns
  ``3 k0 .. 3 (k0 + kc)`` of the rows, so every (row, k) is written exactly once. Bounding
  the lists per pass bounds the accumulators, hence the registers, of every specialisation
  (the compiled-kernel checks cover kc = 1 and 8 and prove no spills).
* Launches: one per (group, pass), split at tensor boundaries so that no launch has more than
  ``max_programs`` programs (the CUDA grid limit, 2^31 - 1). A tensor is never split across
  launches, so each tensor's rows are written by one launch per pass.
* Every pass of a launch group reads x and x* with the same kernel configuration (the
  kernel's step depends on the dtypes and the alignment, not on kc), so the c = ||x - x*||^2
  that every pass recomputes is bitwise the same in every k column.
* Buffer: per launch, in this order: the address ``table`` [ntensors, kcp + 2] (kc gradient
  addresses padded with zeros to kcp = next power of two of kc, then x, then x*), ``numel``
  [ntensors], then per program ``chunk_local`` (row of the table), ``chunk_index`` (chunk
  number q within the tensor: the kernel starts at q * chunk, a multiple of the chunk, so an
  aligned base stays aligned) and ``chunk_row`` (partial row); at the end the ``segments``
  array of the final sum ([T + 1] row bounds per tensor, or [0, total_rows]). Every array
  starts at an even int64 offset, so each argument is as 16-byte aligned as the buffer.

The CUDA backend plans in C++ (csrc/plan.h), exposed as ``pathgeom_fast._C.plan_cuda``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

CHUNK = 1 << 16  # elements per program
MAX_GRADS_PER_PASS = 8
MAX_PROGRAMS = 2**31 - 1  # CUDA grid x limit

__all__ = [
    "CHUNK",
    "MAX_GRADS_PER_PASS",
    "MAX_PROGRAMS",
    "TritonLaunch",
    "TritonPlan",
    "next_pow2",
    "plan_triton",
]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class TritonLaunch:
    """One kernel launch. Offsets are int64-element offsets into the plan's buffer."""

    key: Hashable  # the group key of its tensors (one kernel specialisation)
    k0: int  # first gradient list of the pass
    kc: int  # gradient lists in the pass (<= max_grads_per_pass)
    kcp: int  # kc padded to a power of two (table row: kcp + 2 addresses)
    tensors: np.ndarray  # int64 [ntensors]: positions in the caller's list
    programs: int  # = number of chunks
    table: int  # offset of the address table [ntensors, kcp + 2]
    numel: int  # offset of numel [ntensors]
    chunk_local: int  # offset of [programs]: row of the table
    chunk_index: int  # offset of [programs]: chunk number within the tensor
    chunk_row: int  # offset of [programs]: partial row

    @property
    def ntensors(self) -> int:
        return int(self.tensors.shape[0])


@dataclass(frozen=True)
class TritonPlan:
    T: int
    K: int
    chunk: int
    per_tensor: bool
    total_rows: int
    first: np.ndarray  # int64 [T + 1]: tensor i owns rows first[i] .. first[i+1]
    launches: tuple[TritonLaunch, ...]
    segments: int  # offset of the segment bounds ([T + 1] or [2]) in the buffer
    nsegments: int  # T (per_tensor) or 1
    static: np.ndarray  # int64 buffer with every entry but the addresses filled in
    addr_slots: np.ndarray  # int64 positions in the buffer that receive an address ...
    addr_src: np.ndarray  # ... namely addrs[addr_src], addrs = grads (k * T + i), params, refs
    extra: dict = field(default_factory=dict)

    def fill(self, addrs: Sequence[int] | np.ndarray) -> np.ndarray:
        """The buffer for these addresses (K * T gradients, then T params, then T refs)."""
        buf = self.static.copy()
        if self.addr_slots.size:
            a = np.asarray(addrs, dtype=np.uint64).view(np.int64)
            buf[self.addr_slots] = a[self.addr_src]
        return buf


def plan_triton(
    numels: Sequence[int],
    keys: Sequence[Hashable],
    K: int,
    per_tensor: bool,
    *,
    chunk: int = CHUNK,
    max_grads_per_pass: int = MAX_GRADS_PER_PASS,
    max_programs: int = MAX_PROGRAMS,
) -> TritonPlan:
    """Plan one call of the Triton backend (see the module docstring for the layout).

    Args:
        numels: elements of each tensor position (the K gradients, x and x* of position i
            all have numel[i]); any size, 0 included, beyond 2^31 included.
        keys: one hashable group key per tensor, or an integer NumPy array of keys (then
            grouped without a Python loop); tensors with equal keys share launches (groups in
            order of first appearance, tensors in increasing order).
        K: gradient lists (any K >= 1; read in passes of at most ``max_grads_per_pass``).
        per_tensor: segments per tensor instead of one total.
    """
    T = len(numels)
    if len(keys) != T:
        raise ValueError(f"plan_triton: {len(keys)} keys for {T} tensors")
    if K < 1:
        raise ValueError(f"plan_triton: K must be >= 1, got {K}")
    if chunk < 1 or max_grads_per_pass < 1 or max_programs < 1:
        raise ValueError("plan_triton: chunk, max_grads_per_pass and max_programs must be >= 1")
    numel = np.asarray(numels, dtype=np.int64).reshape(T)
    if T and int(numel.min()) < 0:
        raise ValueError("plan_triton: negative numel")
    nchunks = (numel + (chunk - 1)) // chunk
    if T and int(nchunks.max()) > max_programs:
        i = int(np.argmax(nchunks))
        raise ValueError(f"plan_triton: tensor {i} has {int(nchunks[i])} chunks, more than {max_programs} per launch")
    first = np.zeros(T + 1, dtype=np.int64)
    np.cumsum(nchunks, out=first[1:])
    total = int(first[-1])
    passes = [(k0, min(max_grads_per_pass, K - k0)) for k0 in range(0, K, max_grads_per_pass)]

    # Groups in order of first appearance; only tensors with at least one chunk get programs.
    group_of: dict[Hashable, np.ndarray] = {}
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":  # vectorised grouping
        live = np.flatnonzero(nchunks)
        uniq, first_at, inverse = np.unique(keys[live], return_index=True, return_inverse=True)
        for g in np.argsort(first_at, kind="stable"):
            group_of[int(uniq[g])] = live[inverse == g]
    else:
        lists: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            if nchunks[i]:
                lists.setdefault(key, []).append(i)
        group_of = {key: np.asarray(m, dtype=np.int64) for key, m in lists.items()}

    pieces: list[np.ndarray] = []
    slot_parts: list[np.ndarray] = []
    src_parts: list[np.ndarray] = []
    size = 0

    def put(arr: np.ndarray) -> int:
        # Every array starts at a 16-byte boundary of the buffer: the kernels then see the same
        # pointer alignment on every call (one specialisation, and aligned table loads).
        nonlocal size
        off = size
        a = arr.astype(np.int64, copy=False).ravel()
        pieces.append(a)
        size += a.size
        if size % 2:
            pieces.append(np.zeros(1, dtype=np.int64))
            size += 1
        return off

    launches = []
    for key, idx in group_of.items():
        counts = nchunks[idx]
        # Split at tensor boundaries into launches of at most max_programs programs.
        splits = [0]
        if int(counts.sum()) > max_programs:
            run = 0
            for j, n in enumerate(counts.tolist()):
                if run + n > max_programs:
                    splits.append(j)
                    run = 0
                run += n
        splits.append(len(idx))
        for s, e in zip(splits[:-1], splits[1:]):
            ts, cs = idx[s:e], counts[s:e]
            n = int(cs.sum())
            local = np.repeat(np.arange(e - s, dtype=np.int64), cs)
            starts = np.cumsum(cs) - cs
            within = np.arange(n, dtype=np.int64) - np.repeat(starts, cs)
            rows = first[ts][local] + within
            for k0, kc in passes:
                kcp = next_pow2(kc)
                width = kcp + 2
                table = np.zeros((e - s, width), dtype=np.int64)
                off_table = put(table)
                # address slots: gradient k of tensor t at column k - k0, x at kcp, x* at kcp + 1
                cols = np.concatenate([np.arange(kc), [kcp, kcp + 1]]).astype(np.int64)
                slot = off_table + np.arange(e - s, dtype=np.int64)[:, None] * width + cols[None, :]
                src = np.concatenate(
                    [(k0 + np.arange(kc, dtype=np.int64))[None, :] * T + ts[:, None], (K * T + ts)[:, None], ((K + 1) * T + ts)[:, None]],
                    axis=1,
                )
                slot_parts.append(slot.ravel())
                src_parts.append(src.ravel())
                launches.append(
                    TritonLaunch(
                        key=key,
                        k0=k0,
                        kc=kc,
                        kcp=kcp,
                        tensors=ts,
                        programs=n,
                        table=off_table,
                        numel=put(numel[ts]),
                        chunk_local=put(local),
                        chunk_index=put(within),
                        chunk_row=put(rows),
                    )
                )
    seg = first if per_tensor else np.array([0, total], dtype=np.int64)
    off_seg = put(seg)
    static = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    return TritonPlan(
        T=T,
        K=K,
        chunk=chunk,
        per_tensor=per_tensor,
        total_rows=total,
        first=first,
        launches=tuple(launches),
        segments=off_seg,
        nsegments=T if per_tensor else 1,
        static=static,
        addr_slots=np.concatenate(slot_parts) if slot_parts else empty,
        addr_src=np.concatenate(src_parts) if src_parts else empty,
    )
