"""The probe rows of a :class:`~pathgeom_fast.path.tracker.PathTracker`: ``probe`` (K fixed
minibatches) and ``full`` (the full batch), every ``probe_every`` steps, computed so that the
replayed path is not changed (see the tracker module's documentation).

A mixin of ``PathTracker`` (never imported from here): it reads the tracker's model, params,
loss_fn, batches and references, and queues rows with ``_add`` (``full`` rows through the
``_stats`` hook).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from .batches import batch_size
from ..ops.wrappers import secant_stats_multi

Tensor = torch.Tensor


class Probes:
    """``probe`` and ``full`` rows, and the isolated gradient computations they use."""

    def _one_grad(self, batch) -> list[Tensor]:
        with torch.enable_grad():
            loss = self.loss_fn(self.model, batch)
            if not self.sharded:
                return list(torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True))
            # FSDP2 moves gradients to the sharded parameters in its own backward hooks, which
            # autograd.grad bypasses: run backward() with the training .grad set aside.
            saved = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
            try:
                loss.backward()
                return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            finally:
                for p, g in zip(self.params, saved):
                    p.grad = g

    def gradient_of(self, batches: Sequence[Any]) -> list[Tensor]:
        """Mean gradient over batches (weighted by batch size), leaving ``.grad`` as it was."""
        sizes = [batch_size(b) for b in batches]
        total = sum(sizes)
        if total == 0:
            raise ValueError(f"gradient_of: the {len(batches)} batch(es) hold 0 samples; a mean gradient over none is undefined")
        acc = None
        for b, n in zip(batches, sizes):
            gs = self._one_grad(b)
            w = n / total
            if acc is None:
                acc = [g * w for g in gs] if len(batches) > 1 else gs
            else:
                for a, g in zip(acc, gs):
                    a.add_(g, alpha=w)
        return acc

    @contextlib.contextmanager
    def isolated(self):
        """Gradient computations that leave no trace on the run: forked RNG, restored buffers."""
        devices = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)

    def _probes(self, step: int, lr) -> None:
        with self.isolated():
            if self.probe_batches:
                grads = [self.gradient_of([b]) for b in self.probe_batches]
                for name, ref in self.refs.items():
                    s = secant_stats_multi(grads, self.params, ref.tensors, **self.kw)
                    self._add(step, "probe", name, s, lr, None, samples=len(grads))
                    if self.weight_decay:
                        s = secant_stats_multi(grads, self.params, ref.tensors, weight_decay=self.weight_decay, **self.kw)
                        self._add(step, "probe_wd", name, s, lr, None, samples=len(grads))
                del grads
            if self.full_batch is not None:
                g = self.gradient_of(self.full_batch)
                for name, ref in self.refs.items():
                    self._add(step, "full", name, self._stats(g, ref), lr, None)
                    if self.weight_decay:
                        self._add(step, "full_wd", name, self._stats(g, ref, weight_decay=self.weight_decay), lr, None)
