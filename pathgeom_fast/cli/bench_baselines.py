"""What ``pathgeom bench`` times the fused op against, and on what: the baselines (``naive``,
``loop``, ``foreach``, ``compiled``, the Gram case's ``gram_naive``/``gram_loop``), the fused
methods per backend, the read-bandwidth probe, the model-like inputs, and the errors against
the fp64 reference. Described in :mod:`.bench`, which re-exports these names for the bench/
suites.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.wrappers import secant_gram, secant_stats, secant_stats_multi

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------


def naive(grads, params, refs):
    g = torch.cat([t.reshape(-1) for t in grads]).float()
    x = torch.cat([t.reshape(-1) for t in params]).float()
    r = torch.cat([t.reshape(-1) for t in refs]).float()
    d = x - r
    return torch.stack([torch.dot(g, d), g.norm() ** 2, d.norm() ** 2])


def loop(grads, params, refs):
    a = b = c = 0.0
    for g, x, r in zip(grads, params, refs):
        gf = g.reshape(-1).float()
        d = x.reshape(-1).float() - r.reshape(-1).float()
        a = a + torch.dot(gf, d)
        b = b + torch.dot(gf, gf)
        c = c + torch.dot(d, d)
    return torch.stack([torch.as_tensor(a), torch.as_tensor(b), torch.as_tensor(c)])


def foreach(grads, params, refs):
    d = torch._foreach_sub(params, refs)
    gn = torch._foreach_norm(grads)
    dn = torch._foreach_norm(d)
    a = torch.stack([torch.dot(g.reshape(-1).float(), di.reshape(-1).float()) for g, di in zip(grads, d)]).sum()
    return torch.stack([a, (torch.stack(gn).float() ** 2).sum(), (torch.stack(dn).float() ** 2).sum()])


_compiled_loop = None


def compiled(grads, params, refs):
    global _compiled_loop
    if _compiled_loop is None:
        _compiled_loop = torch.compile(loop, dynamic=False)
    return _compiled_loop(grads, params, refs)


def fused(backend: str) -> Callable:
    def run(grads, params, refs):
        return secant_stats(grads, params, refs, backend=backend)

    run.__name__ = f"fused_{backend}"
    return run


def fused_multi(backend: str) -> Callable:
    def run(grads_lists, params, refs):
        return secant_stats_multi(grads_lists, params, refs, backend=backend)

    return run


def multi_loop_of(single: Callable) -> Callable:
    """K gradient lists measured one by one with a single-list baseline."""

    def run(grads_lists, params, refs):
        return torch.stack([single(g, params, refs) for g in grads_lists])

    return run


BASELINES = {"naive": naive, "loop": loop, "foreach": foreach, "compiled": compiled}


# Gram matrix of K vector lists and x - x* (pg.secant_gram)


def gram_naive(vec_lists, params, refs):
    """The flattening way: [K + 1, D] fp32 rows (K vectors and x - x*), then V V^T."""
    rows = [torch.cat([t.reshape(-1) for t in v]).float() for v in vec_lists]
    x = torch.cat([t.reshape(-1) for t in params]).float()
    rows.append(x - torch.cat([t.reshape(-1) for t in refs]).float())
    V = torch.stack(rows)
    return V @ V.T


def gram_loop(vec_lists, params, refs):
    """Per tensor: stack its K + 1 rows in fp32 and add V V^T."""
    G = 0.0
    for i in range(len(params)):
        V = torch.stack([v[i].reshape(-1).float() for v in vec_lists] + [params[i].reshape(-1).float() - refs[i].reshape(-1).float()])
        G = G + V @ V.T
    return G


def fused_gram(backend: str) -> Callable:
    def run(vec_lists, params, refs):
        return secant_gram(vec_lists, params, refs, backend=backend)

    return run


def gram_error(out: Tensor, ref: Tensor) -> float:
    """Largest |G_ij - G*_ij| / sqrt(G*_ii G*_jj) against the fp64 reference."""
    out, ref = out.double().cpu(), ref.double().cpu()
    d = torch.diagonal(ref)
    return float(((out - ref).abs() / torch.sqrt(d[:, None] * d[None, :])).max())


# ------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------


def model_like_sizes(total: int, n: int = 100, seed: int = 0) -> list[int]:
    """About ``n`` tensors of mixed sizes (matrices, vectors, a few large ones) summing to ~total."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(n, generator=gen) * 1.5)
    sizes = (w / w.sum() * total).long().clamp(min=1)
    small = torch.randint(1, 4096, (n // 5,), generator=gen)  # biases and norms
    sizes[: n // 5] = small
    return sizes.tolist()


def make_inputs(sizes, dtypes, device, K: int = 1, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    gd, xd, rd = dtypes

    def rnd(n, dt):
        return torch.randn(n, generator=gen, device=device, dtype=torch.float32).to(dt)

    params = [rnd(n, xd) for n in sizes]
    refs = [rnd(n, rd) for n in sizes]
    grads = [[rnd(n, gd) for n in sizes] for _ in range(K)]
    return (grads[0] if K == 1 else grads), params, refs


def nbytes(grads, params, refs) -> int:
    glist = grads if grads and isinstance(grads[0], Tensor) else [t for g in grads for t in g]
    return sum(t.numel() * t.element_size() for t in glist + list(params) + list(refs))


def host_inputs(tensors: int, numel: int, data: str = "pooled"):
    """(grads, params, refs): ``tensors`` fp32 CPU tensors of ``numel`` elements per list,
    standing in for device tensors in the host-work rows.

    ``pooled`` (the default): each tensor has its own storage, as a CUDA tensor does, but its
    data is a slice of one buffer per list, as device memory lies away from the host heap. The
    metadata the host work reads (the Python object, TensorImpl and StorageImpl of each tensor)
    then lies on the heap as densely as that of CUDA tensors. ``heap``: plain CPU tensors, each
    allocated with its data, so that every tensor's metadata sits between 4 KB data blocks, on
    a page of its own: a TLB miss per object that device tensors do not have (on this 2-core VM,
    10^4 tensors: 54-115 ns per tensor against 39-63 pooled)."""
    if data == "heap":
        return make_inputs([numel] * tensors, (torch.float32,) * 3, torch.device("cpu"))
    if data != "pooled":
        raise ValueError(f"host_inputs: data must be 'pooled' or 'heap', got {data!r}")
    gen = torch.Generator().manual_seed(0)

    def one_list():
        pool = torch.randn(tensors * numel, generator=gen).untyped_storage()
        step = numel * 4
        return [torch.empty(0).set_(pool[i * step : (i + 1) * step], 0, (numel,)) for i in range(tensors)]

    params, refs, grads = one_list(), one_list(), one_list()
    return grads, params, refs


# ------------------------------------------------------------------------------------------
# The read-bandwidth probe and the errors against the fp64 reference
# ------------------------------------------------------------------------------------------


def probe_calls(total_bytes: int, device) -> dict[str, tuple[Callable, tuple]]:
    """The read-bandwidth probe: a sum and a dot over one buffer of ``total_bytes``."""
    buf = torch.randn(total_bytes // 4, device=device)
    half = buf.numel() // 2
    return {"probe_sum": (torch.sum, (buf,)), "probe_dot": (torch.dot, (buf[:half], buf[half : 2 * half]))}


def rel_error(out: Tensor, ref: Tensor) -> float:
    """Largest error against the fp64 reference, relative to the DESIGN scales:
    |a - a*| / sqrt(b c), |b - b*| / b, |c - c*| / c."""
    out, ref = out.double().cpu(), ref.double().cpu()
    scale = torch.stack([torch.sqrt(ref[..., 1] * ref[..., 2]), ref[..., 1], ref[..., 2]], -1)
    return float(((out - ref).abs() / scale).max())
