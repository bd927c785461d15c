"""Snapshots of a path (safetensors, never unpickled).

``SnapshotRecorder`` saves the trainable parameters on a schedule as
``DIR/step_00000120.safetensors`` (metadata: step, lr). Their post-hoc analysis (and that of
other libraries' checkpoints) lives in :mod:`pathgeom_fast.analyze`; ``analyze_snapshots`` is
re-exported here for code written against this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from .cli.analyze import analyze_snapshots  # noqa: F401  (moved to analyze; name kept here)
from .checkpoints.core import (  # noqa: F401  (the snapshot I/O lives in checkpoints; names kept here)
    Reference,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_keys,
    snapshot_meta,
    snapshot_path,
)

Tensor = torch.Tensor


def _replicated_non_writer(model: torch.nn.Module) -> bool:
    """True on ranks other than 0 of a process group whose parameters are whole copies (DDP):
    there one rank writes. Sharded (DTensor) parameters need every rank (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    from .ops.distributed import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        return False
    return dist.get_rank() != 0


class SnapshotRecorder:
    """Save the model every ``every`` steps (or at the steps in ``steps``), and at the end.

    ``maybe_save(step, lr)`` is called at the start of optimizer step ``step`` (it saves x_step,
    the point the step starts from); ``finish(T, lr)`` saves the final point x_T after the last
    step (always, so that a later ``pathgeom analyze`` takes the true end of training as x*).
    In a process group of whole-model replicas (DDP) rank 0 alone writes; sharded (DTensor)
    models are gathered and written by rank 0 (every rank must call).
    """

    def __init__(self, model: torch.nn.Module, directory: str, every: int = 0, steps: Iterable[int] | None = None):
        if every <= 0 and steps is None:
            raise ValueError("SnapshotRecorder needs every > 0 or an explicit list of steps")
        self.model, self.dir, self.every = model, directory, every
        self.steps = set(steps or [])
        self.saved: list[int] = []
        os.makedirs(directory, exist_ok=True)

    def maybe_save(self, step: int, lr: float | None = None, force: bool = False) -> str | None:
        if force or step in self.steps or (self.every and step % self.every == 0):
            path = snapshot_path(self.dir, step)
            if not _replicated_non_writer(self.model):
                save_snapshot(self.model, path, step, lr)
            self.saved.append(step)
            return path
        return None

    def finish(self, step: int, lr: float | None = None) -> str:
        """Save the final point as ``step`` (the number of optimizer steps taken), unless it was
        just saved; returns its path."""
        if self.saved and self.saved[-1] == step:
            return snapshot_path(self.dir, step)
        return self.maybe_save(step, lr, force=True)

