"""Snapshots of a path (safetensors, never unpickled) and their post-hoc analysis.

``SnapshotRecorder`` saves the trainable parameters on a schedule as
``DIR/step_00000120.safetensors`` (metadata: step, lr). ``analyze_snapshots`` loads each one
into a model and measures, against the last snapshot or a given reference, K minibatch
gradients and the full-batch gradient at every snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .checkpoints import (  # noqa: F401  (the snapshot I/O lives in checkpoints; names kept here)
    Reference,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    snapshot_keys,
    snapshot_meta,
    snapshot_path,
)
from .tracker import PathTracker

Tensor = torch.Tensor


def _replicated_non_writer(model: torch.nn.Module) -> bool:
    """True on ranks other than 0 of a process group whose parameters are whole copies (DDP):
    there one rank writes. Sharded (DTensor) parameters need every rank (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    from .distributed import is_dtensor

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


def analyze_snapshots(
    directory: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], Tensor],
    probe_batches: Sequence[Any],
    full_batch: Iterable[Any] | None = None,
    reference: str | None = None,
    backend: str = "auto",
    per_tensor: bool = False,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Rows (as PathTracker.records) for every snapshot in ``directory``.

    ``reference``: a safetensors path; default: the last snapshot of the directory.
    Works on sharded (FSDP2) models too: each rank reads its slices of every snapshot.
    Returns (records, per_tensor_records).
    """
    snaps = list_snapshots(directory)
    ref_path = reference or snaps[-1][1]
    ref = Reference.from_file(model, ref_path)
    tracker = PathTracker(
        model, ref, None, loss_fn=loss_fn, probe_batches=probe_batches, probe_every=1,
        full_batch=full_batch, per_tensor=per_tensor, update="off", backend=backend,
    )
    from tqdm.auto import tqdm

    for step, path in tqdm(snaps, desc="snapshots", disable=not progress):
        meta = snapshot_meta(path)
        state = Reference.from_file(model, path)  # sharded models read only their slices
        with torch.no_grad():
            for p, t in zip(tracker.params, state.tensors):
                p.copy_(t)
        for p in tracker.params:
            p.grad = None
        # the "minibatch" row here is the first probe batch's gradient (sharding-aware)
        for p, g in zip(tracker.params, tracker._one_grad(probe_batches[0])):
            p.grad = g
        lr = float(meta["lr"]) if meta.get("lr") else None
        tracker._lr = lambda lr=lr: lr  # snapshots carry their own lr
        tracker.measure(step)
        tracker.after_step()
    for p in tracker.params:
        p.grad = None
    return tracker.records, tracker.per_tensor_records
