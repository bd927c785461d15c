"""The one implementation behind the framework callbacks and the plain-loop hook.

A :class:`StepMeasurer` decides on which optimizer steps to measure, builds the
:class:`~pathgeom_fast.tracker.PathTracker` lazily once it sees the model and optimizer, saves
snapshots for a later ``pathgeom analyze``, and turns rows into logging scalars. Plain loop::

    from pathgeom_fast.integrations import StepMeasurer

    geo = StepMeasurer(reference="xstar.safetensors", every=10)
    for step, (x, y) in enumerate(loader):
        loss = loss_fn(model(x), y)
        loss.backward()
        with geo.step(model, optimizer, step, loss):   # gradient before, update after
            optimizer.step()
        optimizer.zero_grad()
        if geo.last:
            print(step, geo.scalars())   # {"pathgeom/rsi": ..., "pathgeom/eb": ..., ...}

Measure the gradient before clipping by calling ``geo.before_step(...)`` before
``clip_grad_norm_`` and ``geo.after_step()`` after ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ..checkpoints import Reference
from ..snapshots import SnapshotRecorder
from ..tracker import PathTracker

KEYS = ("rsi", "eb", "cos", "eta_star")


class StepMeasurer:
    """Measure every ``every`` optimizer steps against the reference x*.

    Args:
        reference: safetensors file of x* (e.g. written by ``pathgeom demo``, a
            ``SnapshotRecorder`` or ``pathgeom_fast.snapshots.save_snapshot`` at the end of run 1),
            or a :class:`Reference`.
        every: measure at optimizer steps divisible by this.
        weight_decay, per_tensor, update, backend: as in :class:`PathTracker`.
        snapshot_dir, snapshot_every: also save the model every ``snapshot_every`` steps.
    """

    def __init__(
        self,
        reference: str | Reference,
        every: int = 1,
        *,
        weight_decay: float | None = None,
        per_tensor: bool = False,
        update: str = "auto",
        backend: str = "auto",
        snapshot_dir: str | None = None,
        snapshot_every: int = 0,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if isinstance(reference, str) and not os.path.isfile(reference):
            raise FileNotFoundError(f"reference snapshot {reference} does not exist")
        if snapshot_dir is not None and snapshot_every < 1:
            raise ValueError("snapshot_dir needs snapshot_every >= 1")
        self.reference = reference
        self.every = every
        self.kw = dict(weight_decay=weight_decay, per_tensor=per_tensor, update=update, backend=backend)
        self.snapshot_dir, self.snapshot_every = snapshot_dir, snapshot_every
        self.tracker: PathTracker | None = None
        self.recorder: SnapshotRecorder | None = None
        self._pending = False
        self._seen_step: int | None = None
        self._measured_step: int | None = None

    def _setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> PathTracker:
        if self.tracker is None or self.tracker.model is not model or self.tracker.optimizer is not optimizer:
            ref = self.reference if isinstance(self.reference, Reference) else Reference.from_file(model, self.reference)
            self.tracker = PathTracker(model, ref, optimizer, **self.kw)
            if self.snapshot_dir:
                self.recorder = SnapshotRecorder(model, self.snapshot_dir, every=self.snapshot_every)
        return self.tracker

    def wants(self, step: int) -> bool:
        return step % self.every == 0

    def before_step(self, model, optimizer, step: int, loss=None) -> dict | None:
        """Measure the gradient now in ``.grad`` (call after backward, before the step)."""
        if step == self._seen_step:  # frameworks may reach this twice in one step
            return None
        self._seen_step = step
        tracker = self._setup(model, optimizer)
        if self.recorder is not None:
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
            self.recorder.maybe_save(step, lr)
        if not self.wants(step):
            return None
        tracker.measure(step, loss)
        self._pending = True
        self._measured_step = step
        return None

    def after_step(self) -> bool:
        """Measure the update just taken (call after ``optimizer.step()``); True when this
        optimizer step was measured."""
        if not self._pending:
            return False
        self._pending = False
        self.tracker.after_step()
        return True

    @property
    def last(self) -> dict[str, Any] | None:
        """Rows of the last measured step, by kind (reading them converts pending rows)."""
        if self.tracker is None or self._measured_step is None:
            return None
        self.tracker.flush()
        ref = self.tracker.ref.name
        out = {}
        for row in reversed(self.tracker._records):
            if row["step"] != self._measured_step:
                break
            if row["reference"] == ref and row["sample"] == 0 and row["kind"] not in out:
                out[row["kind"]] = row
        return out or None

    @contextlib.contextmanager
    def step(self, model, optimizer, step: int, loss=None):
        self.before_step(model, optimizer, step, loss)
        yield self
        self.after_step()

    def scalars(self, prefix: str = "pathgeom/") -> dict[str, float]:
        """The last measured step's metrics as flat scalars for a logger."""
        out: dict[str, float] = {}
        for kind, row in sorted((self.last or {}).items()):
            tag = "" if kind == "minibatch" else f"{kind}_"
            for k in KEYS:
                out[f"{prefix}{tag}{k}"] = float(row[k])
        return out

    @property
    def records(self) -> list[dict]:
        return self.tracker.records if self.tracker is not None else []
