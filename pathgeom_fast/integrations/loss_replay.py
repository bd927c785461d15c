"""The loss replay check of a :class:`~pathgeom_fast.integrations.step_measurer.StepMeasurer`:
the loss of every optimizer step, kept on the device until it is read, and the warning at the
first step whose loss differs from run 1's (its trajectory file).

A mixin of ``StepMeasurer`` (never imported from here): it reads the measurer's
``_losses``, ``_pending_losses``, ``trajectory``, ``drift_rtol`` and ``framework``.
"""

from __future__ import annotations

import math
import warnings

import torch

from .helpers import _dist

Tensor = torch.Tensor
#: pending losses are copied to the host in one transfer at least this often (memory bound)
_MAX_PENDING_LOSSES = 1024


class LossReplay:
    """The losses of the steps seen (``losses``), and their check against run 1's."""

    def _keep_loss(self, step: int, loss) -> None:
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"{self.framework}: the loss of step {step} has shape {list(loss.shape)}; give one number")
            if len(self._pending_losses) >= _MAX_PENDING_LOSSES:
                self.check_losses()  # bounded memory: one transfer every _MAX_PENDING_LOSSES steps
            # kept as it is (no copy): a callback may still add the last micro-batch to it in place
            self._pending_losses[step] = loss.detach().reshape(())
        else:
            self._losses[step] = float(loss)

    def _expected_losses(self) -> dict[int, float] | None:
        if self._expected is None and self.trajectory is not None:
            rank, world = _dist()
            by_rank = self.trajectory.get("losses_by_rank") or []
            self._expected = by_rank[rank] if world > 1 and len(by_rank) == world else self.trajectory["losses"]
        return self._expected

    def to_host(self, tensors: list[Tensor]) -> list[float]:
        """``tensors`` (0-dim) and the pending losses to the host in one transfer per device;
        then the loss-drift check. Returns the values of ``tensors``."""
        steps = sorted(self._pending_losses)
        vals = list(tensors) + [self._pending_losses[s] for s in steps]
        out: list[float] = [math.nan] * len(vals)
        by_dev: dict[torch.device, list[int]] = {}
        for i, v in enumerate(vals):
            by_dev.setdefault(v.device, []).append(i)
        for idx in by_dev.values():
            host = torch.stack([vals[i].to(torch.float64).reshape(()) for i in idx]).cpu().tolist()
            for i, h in zip(idx, host):
                out[i] = h
        n = len(tensors)
        for s, v in zip(steps, out[n:]):
            self._losses[s] = v
        self._pending_losses = {}
        self._check_drift()
        return out[:n]

    def check_losses(self) -> None:
        """Copy the pending losses to the host (one transfer) and check them against run 1's."""
        if self._pending_losses:
            self.to_host([])
        else:
            self._check_drift()

    def _check_drift(self) -> None:
        """Warn once, at the first step whose loss differs from run 1's."""
        expected = self._expected_losses()
        if self._drift_warned or not expected:
            return
        for s in sorted(k for k in self._losses if k > self._drift_checked):
            self._drift_checked = s
            if s not in expected:
                continue
            got, want = self._losses[s], expected[s]
            if not math.isclose(got, want, rel_tol=self.drift_rtol, abs_tol=self.drift_rtol):
                self._drift_warned = True
                warnings.warn(
                    f"{self.framework}: this run drifts from run 1 at optimizer step {s}: loss {got!r} here, "
                    f"{want!r} in run 1 ({self.trajectory.get('path')}). From this step on the measurements are "
                    "along another path than the one that ended at x*: both runs need the same seed, data order, "
                    "hyper-parameters (learning rate, schedule, accumulation, clipping) and deterministic algorithms.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return

    @property
    def losses(self) -> dict[int, float]:
        """The loss of every step seen, {step: loss} (reading converts the pending ones)."""
        self.check_losses()
        return dict(sorted(self._losses.items()))
