"""Sharded inputs: DTensors (FSDP2, tensor parallel) and plain local shards with ``group=``.

The kernels run on local shards; one all-reduce (SUM) of the small result then gives the
global sums (DESIGN.md section 3):

* DTensor lists: the reduction spans every mesh dimension on which some tensor is sharded.
  A tensor *replicated* on such a dimension would be counted once per replica, so only the
  rank at coordinate 0 of those dimensions feeds it to the kernel (the others add zero).
  Mesh dimensions on which every tensor is replicated (e.g. the replicate dimension of HSDP)
  are not reduced over at all: each replica already holds the whole answer.
* ``group=``: the local results are summed over that process group.

Exactly one collective per call, whatever the number of tensors or vector lists. The same
logic serves every op (secant_stats, secant_stats_multi, secant_gram): results are sums over
elements, so local results add up; ``_shapes`` says where the per-tensor axis is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import shapes as _shapes

Tensor = torch.Tensor


def is_dtensor(t) -> bool:
    # No DTensor can exist unless its module was imported: checking sys.modules keeps the
    # (slow) import of torch.distributed.tensor off the path of plain-tensor calls.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Partial, Replicate, Shard


def _check_dtensors(op: str, lists, params, refs):
    """Mesh and placements shared by triple i; raises on mixes we cannot reduce correctly."""
    T, K = len(params), len(lists)
    name_of = lambda k, i: _shapes.entry_name(op, k * T + i, T, K)
    named = [(f"params[{i}]", params[i]) for i in range(T)] + [(f"refs[{i}]", refs[i]) for i in range(T)]
    for k, g in enumerate(lists):
        named += [(name_of(k, i), g[i]) for i in range(T)]
    kinds = {is_dtensor(t) for _, t in named}
    if len(kinds) > 1:
        bad = next(n for n, t in named if is_dtensor(t) != is_dtensor(params[0]))
        raise ValueError(
            f"{op}: {bad} is {'a DTensor' if not is_dtensor(params[0]) else 'a plain tensor'} but params[0] is "
            f"{'a DTensor' if is_dtensor(params[0]) else 'a plain tensor'}; pass all DTensors (global reduction) "
            "or all local tensors (with group= for shards)"
        )
    Partial, _, _ = _placements()
    mesh = params[0].device_mesh
    for name, t in named:
        if t.device_mesh != mesh:
            raise ValueError(f"{op}: {name} lives on {t.device_mesh} but params[0] on {mesh}; use one device mesh")
        if any(isinstance(p, Partial) for p in t.placements):
            raise ValueError(
                f"{op}: {name} has a Partial placement {t.placements}; redistribute it to Shard/Replicate first"
            )
    for i in range(T):
        pl = params[i].placements
        others = [(f"refs[{i}]", refs[i])] + [(name_of(k, i), g[i]) for k, g in enumerate(lists)]
        for name, t in others:
            if t.placements != pl or t.shape != params[i].shape:
                raise ValueError(
                    f"{op}: index {i}: {name} has shape {list(t.shape)} and placements {t.placements} but "
                    f"params[{i}] has shape {list(params[i].shape)} and placements {pl}; local shards "
                    "must correspond element for element"
                )
    return mesh


def _mesh_group(mesh, dims: list[int]):
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    names = [mesh.mesh_dim_names[d] for d in dims] if mesh.mesh_dim_names else None
    if names is None:
        raise ValueError(
            "pathgeom: tensors sharded on several dimensions of an unnamed sub-mesh; give the "
            "DeviceMesh mesh_dim_names so that the dimensions can be flattened into one group"
        )
    return mesh[tuple(names)]._flatten().get_group()


def dispatch(op: str, lists, params, refs, per_tensor: bool, group, compute: Callable) -> Tensor:
    """Local compute, then for sharded inputs one all-reduce (SUM) of the small result.

    ``lists`` are the K vector lists (gradients, or the vectors of secant_gram);
    ``compute(flat, params, refs)`` returns ``op``'s result over plain local tensors, with the
    K lists given back to back in ``flat`` (zeros of the right shape, on the CPU, for empty
    lists).
    """
    T = len(params)
    if T and any(is_dtensor(t) for t in (params[0], refs[0], lists[0][0])):
        if group is not None:
            raise ValueError(f"{op}: group= is for plain local shards; DTensors carry their own mesh")
        return _dtensor(op, lists, params, refs, per_tensor, compute)
    # one list: passed as it is (copying a list of 10^4 tensors costs as much as the kernel
    # on some of them)
    flat = lists[0] if len(lists) == 1 else [t for g in lists for t in g]
    out = compute(flat, params, refs)
    if group is not None:
        out = out.contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _dtensor(op, lists, params, refs, per_tensor, compute):
    K, T = len(lists), len(params)
    mesh = _check_dtensors(op, lists, params, refs)
    _, Replicate, Shard = _placements()
    sharded = sorted({d for p in params for d, pl in enumerate(p.placements) if isinstance(pl, Shard)})
    coord = mesh.get_coordinate()
    # Tensor i contributes here unless it is replicated on a reduced dimension where this
    # rank is not at coordinate 0.
    keep = [
        i
        for i in range(T)
        if all(coord[d] == 0 or not isinstance(params[i].placements[d], Replicate) for d in sharded)
    ]
    loc = lambda t: t.to_local()
    sub_lists = [[loc(g[i]) for i in keep] for g in lists]
    sub_p = [loc(params[i]) for i in keep]
    sub_r = [loc(refs[i]) for i in keep]
    device = params[0].to_local().device
    # with nothing kept here, compute() returns zeros of the right shape (on the CPU)
    part = compute([t for g in sub_lists for t in g], sub_p, sub_r).to(device)
    if per_tensor:  # scatter the kept rows to their positions; other rows come from other ranks
        full = torch.zeros(_shapes.out_shape(op, T, K, True), dtype=torch.float64, device=device)
        idx = torch.tensor(keep, dtype=torch.long, device=device)
        full.index_copy_(_shapes.tensor_axis(op), idx, part)
        part = full
    part = part.contiguous()
    if sharded:
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=_mesh_group(mesh, sharded))
    return part
