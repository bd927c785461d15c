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

from .analyze import analyze_snapshots  # noqa: F401  (moved to analyze; name kept here)
from .checkpoints import (  # noqa: F401  (the snapshot I/O lives in checkpoints; names kept here)
    Reference,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_keys,
    snapshot_meta,
    snapshot_path,
)

Tensor = torch.Tensor


class SnapshotRecorder:
    """Save the model every ``every`` steps (or at the steps in ``steps``), and at the end."""

    def __init__(self, model: torch.nn.Module, directory: str, every: int = 0, steps: Iterable[int] | None = None):
        if every <= 0 and steps is None:
            raise ValueError("SnapshotRecorder needs every > 0 or an explicit list of steps")
        self.model, self.dir, self.every = model, directory, every
        self.steps = set(steps or [])
        os.makedirs(directory, exist_ok=True)

    def maybe_save(self, step: int, lr: float | None = None, force: bool = False) -> str | None:
        if force or step in self.steps or (self.every and step % self.every == 0):
            path = snapshot_path(self.dir, step)
            save_snapshot(self.model, path, step, lr)
            return path
        return None
