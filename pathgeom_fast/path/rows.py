"""Rows of a :class:`~pathgeom_fast.path.tracker.PathTracker` still on the device (one
``_Block`` per measurement call), and their one transfer to the host when they are read."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _is_dtensor(t) -> bool:
    from ..ops.distributed import is_dtensor

    return is_dtensor(t)


class _Block:
    """Rows of one measurement call, still on the device: stats [n, 3] and one key per row."""

    __slots__ = ("stats", "keys", "lr", "loss", "per_tensor", "check")

    def __init__(self, stats: Tensor, keys: list[tuple], lr, loss, per_tensor: bool = False, check=None):
        self.stats, self.keys, self.lr, self.loss, self.per_tensor = stats, keys, lr, loss, per_tensor
        # identity-derived update rows: [c_next, tolerance] (device), checked when read
        self.check = check


def _to_host(values: list) -> list:
    """Tensors (any device) -> CPU float64 tensors, in one transfer per device; others as they are."""
    out = list(values)
    by_dev: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            if _is_dtensor(v):
                out[i] = v = v.to_local()
            by_dev.setdefault(v.device, []).append(i)
    for idx in by_dev.values():
        shapes = [out[i].shape for i in idx]
        flat = [out[i].detach().reshape(-1).to(torch.float64) for i in idx]
        host = torch.cat(flat).cpu() if len(flat) > 1 else flat[0].cpu()
        pos = 0
        for i, f, shape in zip(idx, flat, shapes):
            out[i] = host[pos : pos + f.numel()].reshape(shape)
            pos += f.numel()
    return out
