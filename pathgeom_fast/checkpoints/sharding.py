"""Path measurement on sharded models (FSDP2 ``fully_shard``, DTensor parameters).

The reference x* is held sharded exactly like the model's parameters: each rank reads only
its own slice, from a tensor already in memory or straight from a safetensors file (which
supports sliced reads), so x* is never materialised whole on one rank.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _local_slices(p) -> tuple[slice, ...]:
    """The global index ranges of DTensor ``p``'s local shard (one slice per dimension)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def _from_local(local: Tensor, p) -> Tensor:
    from torch.distributed.tensor import DTensor

    local = local.to(device=p.to_local().device).contiguous()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def shard_like(full: Tensor, p) -> Tensor:
    """A DTensor laid out like DTensor ``p``, holding this rank's slice of the full ``full``."""
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"shard_like: full tensor has shape {list(full.shape)} but the parameter has {list(p.shape)}")
    return _from_local(full.detach()[_local_slices(p)].clone(), p)


def read_sharded(path: str, name: str, p) -> Tensor:
    """This rank's slice of tensor ``name`` of safetensors file ``path``, as a DTensor like ``p``."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        sl = f.get_slice(name)
        shape = tuple(sl.get_shape())
        if shape != tuple(p.shape):
            raise ValueError(f"reference file {path}: {name!r} has shape {list(shape)} but the model's parameter has {list(p.shape)}")
        idx = _local_slices(p)
        local = sl[idx] if idx else sl[:]
    return _from_local(local, p)
