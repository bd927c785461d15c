"""Helpers shared by the integrations: the model and optimizer inside a framework's wrappers,
the process group's rank, run 1's loss trajectory, the references given to a measurer, and
the metrics of statistics as device tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checkpoints.reader import CheckpointError
from ..checkpoints.reference import Reference

Tensor = torch.Tensor

__all__ = ["unwrap_model", "read_trajectory", "metric_tensors"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names are those of x*: without DDP / DataParallel wrappers
    (``module.``) and ``torch.compile`` (``_orig_mod.``)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _unwrap_optimizer(opt):
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` or a ``LightningOptimizer``."""
    for attr in ("_optimizer", "optimizer"):
        inner = getattr(opt, attr, None)
        if isinstance(inner, torch.optim.Optimizer):
            return inner
    return opt


def _dist():
    """(rank, world) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def read_trajectory(path: str) -> dict[str, Any]:
    """Read a trajectory written by run 1 (or the demo's ``trajectory.json``): a dict with
    ``losses`` {step: loss} (int keys), and, when known, ``steps``, ``losses_by_rank``."""
    try:
        with open(path) as f:
            data = json.load(f)
        losses = {int(k): float(v) for k, v in data["losses"].items()}
        by_rank = [{int(k): float(v) for k, v in r.items()} for r in data.get("losses_by_rank", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"loss trajectory {path} is not readable ({type(exc).__name__}: {exc})") from exc
    out = dict(data)
    out.update(losses=losses, losses_by_rank=by_rank, path=path)
    return out


def _reference_specs(reference) -> dict[str, str | Reference]:
    """name -> path or Reference, in order (the first is the primary reference)."""
    if reference is None:
        return {}
    if isinstance(reference, (str, os.PathLike)):
        return {"xstar": os.fspath(reference)}
    if isinstance(reference, Reference):
        return {reference.name: reference}
    if isinstance(reference, Mapping):
        items = list(reference.items())
    elif isinstance(reference, Sequence):
        items = [(r.name, r) if isinstance(r, Reference) else (None, r) for r in reference]
        if any(n is None for n, _ in items):
            raise TypeError("a list of references must hold Reference objects; name files in a mapping {name: path}")
    else:
        raise TypeError(
            f"reference must be a safetensors path, a Reference, or a mapping name -> path/Reference, "
            f"got {type(reference).__name__}"
        )
    out: dict[str, str | Reference] = {}
    for name, r in items:
        if name in out:
            raise ValueError(f"two references are named {name!r}")
        if isinstance(r, os.PathLike):
            r = os.fspath(r)
        if not isinstance(r, (str, Reference)):
            raise TypeError(f"reference {name!r} is a {type(r).__name__}; give a safetensors path or a Reference")
        out[str(name)] = r
    if not out:
        raise ValueError("reference mapping is empty")
    return out


def metric_tensors(stats: Tensor) -> dict[str, Tensor]:
    """rsi, eb, cos, eta* of stats [..., 3] as tensors (no transfer), torch's rules for 0 and nan
    (the same values as :func:`pathgeom_fast.tracker.metrics`)."""
    a, b, c = stats.unbind(-1)
    return {"rsi": a / c, "eb": torch.sqrt(b / c), "cos": a / torch.sqrt(b * c), "eta_star": a / b}
