"""The one implementation behind the framework callbacks and the plain-loop hook.

A :class:`StepMeasurer` follows an optimizer's steps, measures every ``every`` steps against
the reference x* (a :class:`~pathgeom_fast.tracker.PathTracker` built once it sees the model
and the optimizer), saves snapshots for a later ``pathgeom analyze``, keeps the loss of every
step, and turns the measured statistics into logging scalars. The paper's two-run protocol
in a plain loop, with the same loop for both runs::

    from pathgeom_fast.integrations import StepMeasurer

    geo = StepMeasurer.recorder("run1/xstar.safetensors")              # run 1
    geo = StepMeasurer(reference="run1/xstar.safetensors", every=10)   # run 2 (same seed, data)
    for step, (x, y) in enumerate(loader):
        loss = loss_fn(model(x), y)
        loss.backward()
        with geo.step(model, optimizer, step, loss):   # gradient before, update after
            optimizer.step()
        optimizer.zero_grad()
        if geo.measured:
            print(step, geo.scalars())   # {"pathgeom/rsi": ..., "pathgeom/eb": ..., ...}
    geo.finish()   # run 1: writes x* and its loss trajectory; run 2: ||x_T - x*|| / ||x_0 - x*||

Run 1 (``record_to=`` or :meth:`StepMeasurer.recorder`) writes, in :meth:`finish`, the final
point x_T as a safetensors snapshot (``save_snapshot``) and beside it ``<name>.trajectory.json``
with the loss of every optimizer step. Run 2 (``reference=``) reads that trajectory
automatically and warns at the first step whose loss differs from run 1's (checked whenever
values are read: :meth:`scalars`, :meth:`check_losses`, :meth:`finish`), and :meth:`finish`
returns the final distance ratio ||x_T - x*|| / ||x_0 - x*||, warning when it is not ~0 (the
run did not retrace run 1). The loss of a step is the one given to :meth:`before_step`: with
gradient accumulation, the mean over the micro-batches of that optimizer step (the
framework callbacks pass the loss the framework computed; see their docs).

Measure the gradient before clipping by calling :meth:`before_step` before
``clip_grad_norm_`` and :meth:`after_step` after ``optimizer.step()`` (or clip inside
``with geo.step(...)``): the gradient rows are the unclipped gradient, the ``update`` rows the
step the optimizer took with the clipped one, whether or not ``grad_clipping`` is set.

No synchronisation while training: statistics and losses stay on the device until they are
read (:meth:`scalars`: one copy of the step's scalars and the pending losses together;
:meth:`tensor_scalars` gives device tensors for loggers that take them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..path.batches import check_not_empty, full_batch_list, to_device
from ..checkpoints.discovery import trajectory_path
from ..checkpoints.keys import match_keys, trainable
from ..checkpoints.reference import Reference, check_reference_file
from ..checkpoints.snapshots import SnapshotRecorder, save_snapshot
from ..path.tracker import PathTracker
from .helpers import _dist, _reference_specs, _unwrap_optimizer, read_trajectory, unwrap_model
from .loss_replay import LossReplay
from .readings import Readings

Tensor = torch.Tensor
TRAJECTORY_FORMAT = "pathgeom-trajectory/1"

__all__ = ["StepMeasurer"]

# The measurer's set-up, its steps and its end are here; the losses and their replay check
# (loss_replay.LossReplay), what is read of it (readings.Readings: scalars, records, the
# report) and the helpers shared by the integrations (helpers) are beside it.


class StepMeasurer(LossReplay, Readings):
    """Measure every ``every`` optimizer steps against x* (run 2), or record x* (run 1).

    Args:
        reference: x* for run 2: a checkpoint path (our safetensors snapshot written by run 1's
            ``record_to=``, ``pathgeom demo`` or ``save_snapshot``; or any format
            ``pathgeom analyze`` reads: a Lightning ``.ckpt``, a ``torch.save`` state dict (read
            with weights_only=True), a Hugging Face folder, a DCP folder), a :class:`Reference`,
            or a mapping name -> path/Reference (the first is primary; the others' scalars get an
            ``@name`` suffix). A file is checked at once (a readable checkpoint with
            floating-point tensors), and key by key against the model (prefixes such as a
            Lightning module's attribute matched as in ``pathgeom analyze``; missing keys, keys
            the model does not have, shapes, dtypes, lower precision) as soon as the model is known: ``model=`` here, the framework's
            set-up hook, or at the latest the first step, before anything is measured.
        every: measure at optimizer steps divisible by this.
        record_to: run 1: at :meth:`finish`, write x_T here (safetensors) and the loss of every
            step to ``trajectory_path(record_to)``. May be combined with ``reference``.
        model: check the reference against this model now (optional).
        loss_fn: ``loss_fn(model, batch) -> loss`` for the probe and full-batch gradients;
            default :func:`pathgeom_fast.batches.default_loss` (dict batches: ``model(**batch).loss``,
            Hugging Face style; ``(inputs, targets)``: the output's ``.loss`` or cross-entropy).
            The Hugging Face callback's default is the Trainer's own ``compute_loss``.
        probe_batches, probe_every: K fixed batches measured every ``probe_every`` measured
            steps' multiples (rows ``probe``, scalars: median over the K, ``probe_rsi_min``,
            ``probe_cos_min``, ``probe_eb_max``); moved to the model's device.
        full_batch: batches covering the training set: the full-batch gradient (``full_*``)
            with the probes.
        weight_decay: also g + wd * x (``minibatch_wd_*``, ``probe_wd_*``, ``full_wd_*``).
        per_tensor: keep per-tensor rows and log them as ``pathgeom/tensor/<name>/<metric>``.
        update: as in :class:`PathTracker` ("auto", "copy", "off").
        grad_clipping: the gradient is clipped between :meth:`before_step` and the optimizer
            step (the framework callbacks set it from their configuration). Informational: the
            update rows follow the clipped gradient either way.
        backend: passed to :func:`pathgeom_fast.secant_stats`.
        snapshot_dir, snapshot_every: save x_t every ``snapshot_every`` steps and, at
            :meth:`finish`, the final point x_T.
        expected_losses: run 1's losses {step: loss} to check this run against; "auto" (default)
            reads ``trajectory_path(reference)`` (or the demo's ``trajectory.json``) when it
            exists; None: no check.
        drift_rtol: relative (and absolute) tolerance of that check.
        final_rtol: :meth:`finish` warns when ||x_T - x*|| / ||x_0 - x*|| exceeds this
            (None: no warning, e.g. for a reference that is not this run's end point).
    """

    #: names the caller in messages (the callbacks set their own)
    framework = "StepMeasurer"
    #: what the recorded loss of a step is (written into the trajectory file)
    loss_definition = "the loss passed to before_step/step for each optimizer step"

    def __init__(
        self,
        reference: str | Reference | Mapping | None = None,
        every: int = 1,
        *,
        record_to: str | None = None,
        model: torch.nn.Module | None = None,
        loss_fn=None,
        probe_batches: Sequence[Any] | None = None,
        probe_every: int = 0,
        full_batch: Sequence[Any] | None = None,
        weight_decay: float | None = None,
        per_tensor: bool = False,
        update: str = "auto",
        grad_clipping: bool = False,
        backend: str = "auto",
        snapshot_dir: str | None = None,
        snapshot_every: int = 0,
        expected_losses: Mapping[int, float] | str | None = "auto",
        drift_rtol: float = 1e-5,
        final_rtol: float | None = 1e-4,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if probe_every < 0:
            raise ValueError(f"probe_every must be >= 0, got {probe_every}")
        if probe_every and not probe_batches and full_batch is None:
            raise ValueError("probe_every is set but there are no probe_batches and no full_batch to measure")
        if (probe_batches or full_batch is not None) and not probe_every:
            raise ValueError("probe_batches/full_batch need probe_every >= 1 (measure them every probe_every steps)")
        if snapshot_dir is not None and snapshot_every < 1:
            raise ValueError("snapshot_dir needs snapshot_every >= 1")
        if update not in ("auto", "copy", "off"):
            raise ValueError(f"update must be 'auto', 'copy' or 'off', got {update!r}")
        self.refs = _reference_specs(reference)
        if not self.refs and record_to is None:
            raise ValueError("give reference= (measure against x*, run 2) or record_to= (write x*, run 1), or both")
        self._headers = {name: check_reference_file(r) for name, r in self.refs.items() if isinstance(r, str)}
        self.record_to = os.fspath(record_to) if record_to is not None else None
        if self.record_to is not None and not self.record_to.endswith(".safetensors"):
            raise ValueError(f"record_to must name a .safetensors file, got {self.record_to!r}")
        self.every = every
        self.loss_fn = loss_fn
        self.probe_batches = list(probe_batches or [])
        check_not_empty(self.probe_batches, "probe batch")
        self.probe_every = probe_every
        self.full_batch = full_batch_list(full_batch)
        self.weight_decay = weight_decay
        self.per_tensor = per_tensor
        self.update = update
        self.grad_clipping = grad_clipping
        self.backend = backend
        self.snapshot_dir, self.snapshot_every = snapshot_dir, snapshot_every
        self.drift_rtol = drift_rtol
        self.final_rtol = final_rtol
        self.trajectory: dict[str, Any] | None = None
        if isinstance(expected_losses, str):
            if expected_losses != "auto":
                raise ValueError(f"expected_losses must be a mapping, 'auto' or None, got {expected_losses!r}")
            self.trajectory = self._find_trajectory()
        elif expected_losses is not None:
            self.trajectory = {"losses": {int(k): float(v) for k, v in expected_losses.items()}, "path": "expected_losses"}

        self.tracker: PathTracker | None = None
        self.recorder: SnapshotRecorder | None = None
        self.final_distance_ratio: float | None = None
        self.finished = False
        self._model: torch.nn.Module | None = None
        self._optimizer = None
        self._checked: torch.nn.Module | None = None
        self._pending = False
        self._seen_step: int | None = None
        self._last_step: int | None = None
        self._measured_step: int | None = None
        self._losses: dict[int, float] = {}  # on the host
        self._pending_losses: dict[int, Tensor] = {}  # still on the device
        self._expected: dict[int, float] | None = None
        self._drift_warned = False
        self._drift_checked = -1
        if model is not None:
            self.check_model(model)

    @classmethod
    def recorder(cls, path: str, **kwargs) -> "StepMeasurer":
        """Run 1: record x* (at :meth:`finish`) and the loss trajectory to ``path``; nothing is measured."""
        return cls(None, record_to=path, **kwargs)

    # -- references ---------------------------------------------------------------------

    def _find_trajectory(self) -> dict[str, Any] | None:
        primary = next(iter(self.refs.values()), None)
        if not isinstance(primary, str):
            return None
        beside = trajectory_path(primary)
        if os.path.isfile(beside):
            return read_trajectory(beside)
        demo = os.path.join(os.path.dirname(os.path.abspath(primary)), "trajectory.json")
        if os.path.isfile(demo):  # `pathgeom demo` writes xstar.safetensors + trajectory.json
            traj = read_trajectory(demo)
            if traj.get("reference") in (None, os.path.basename(primary)):
                return traj
        return None

    def check_model(self, model: torch.nn.Module) -> None:
        """Check every reference against ``model`` now (the file's header: no tensor is read):
        one error naming the file and the key for a missing key, a key the model does not have,
        a shape, a non-float dtype; a warning for lower precision."""
        model = unwrap_model(model)
        if model is self._checked:
            return
        for name, r in self.refs.items():
            if isinstance(r, str):
                # key prefixes (a Lightning module's attribute, DDP's module.) matched as analyze does
                match_keys(model, self._headers[name], f"file {r}", role="reference")
            else:
                r.check_matches(model)
        self._checked = model

    def _setup(self, model: torch.nn.Module, optimizer) -> PathTracker:
        if self.tracker is not None and self.tracker.model is model and self.tracker.optimizer is optimizer:
            return self.tracker
        if self.tracker is not None:
            warnings.warn(
                f"{self.framework}: the model or optimizer changed after step {self._measured_step}; "
                "measuring from here with a new tracker (earlier rows are in the previous tracker's records)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.check_model(model)
        with warnings.catch_warnings():
            # check_model has warned about a lower-precision file already: say it once
            warnings.filterwarnings("ignore", message=r".* in lower precision than the model's parameters", category=UserWarning)
            refs = {n: r if isinstance(r, Reference) else Reference.from_file(model, r, name=n) for n, r in self.refs.items()}
        params = [p for _, p in trainable(model)]
        device = params[0].device if params else torch.device("cpu")
        # the update identities follow the gradient the optimizer used (clipped or not) and are
        # checked against the realised step when rows are read: no special case for clipping
        update = self.update
        self.tracker = PathTracker(
            model,
            refs,
            optimizer,
            loss_fn=self.loss_fn,
            probe_batches=[to_device(b, device) for b in self.probe_batches],
            probe_every=self.probe_every,
            full_batch=[to_device(b, device) for b in self.full_batch] if self.full_batch is not None else None,
            weight_decay=self.weight_decay,
            per_tensor=self.per_tensor,
            update=update,
            backend=self.backend,
        )
        return self.tracker

    # -- the steps ----------------------------------------------------------------------

    def wants(self, step: int) -> bool:
        return bool(self.refs) and step % self.every == 0

    @property
    def measured(self) -> bool:
        """Whether the latest step seen was measured."""
        return self._measured_step is not None and self._measured_step == self._last_step

    @property
    def measured_step(self) -> int | None:
        return self._measured_step

    def before_step(self, model, optimizer, step: int, loss=None) -> None:
        """At optimizer step ``step`` (0-based), after backward and before the optimizer step
        (and before clipping): keep ``loss`` (this step's loss; with accumulation the mean over
        its micro-batches), save a snapshot when due, measure the gradient now in ``.grad``
        when ``step`` is a multiple of ``every``. Nothing is copied to the host."""
        step = int(step)
        if step == self._seen_step:  # frameworks may reach this twice in one step
            return
        if self.finished:
            raise RuntimeError(f"{self.framework}: finish() was called; build a new measurer for another run")
        if self._pending:
            raise RuntimeError(f"{self.framework}: before_step({step}) without after_step() for step {self._seen_step}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"{self.framework}: steps must increase, got {step} after {self._last_step}")
        model, optimizer = unwrap_model(model), _unwrap_optimizer(optimizer)
        self.check_model(model)  # a bad reference fails here, before anything is recorded
        self._seen_step = self._last_step = step
        self._model, self._optimizer = model, optimizer
        if loss is not None:
            self._keep_loss(step, loss)
        if self.snapshot_dir is not None:
            if self.recorder is None or self.recorder.model is not model:
                self.recorder = SnapshotRecorder(model, self.snapshot_dir, every=self.snapshot_every)
            self.recorder.maybe_save(step, self._lr())
        if not self.wants(step):
            return
        tracker = self._setup(model, optimizer)
        try:
            tracker.measure(step, self._pending_losses.get(step, loss if not isinstance(loss, Tensor) else None))
        except RuntimeError as exc:
            if "no gradient at all" in str(exc):
                raise RuntimeError(f"{self.framework}: optimizer step {step}: {exc}") from None
            raise
        self._pending = True
        self._measured_step = step

    def after_step(self) -> bool:
        """Measure the update just taken (call after ``optimizer.step()``); True when this
        optimizer step was measured."""
        if not self._pending:
            return False
        self._pending = False
        self.tracker.after_step()
        return True

    @contextlib.contextmanager
    def step(self, model, optimizer, step: int, loss=None):
        """``with geo.step(model, optimizer, t, loss): optimizer.step()``."""
        self.before_step(model, optimizer, step, loss)
        yield self
        self.after_step()

    def _lr(self) -> float | None:
        if self._optimizer is None or not getattr(self._optimizer, "param_groups", None):
            return None
        lr = self._optimizer.param_groups[0].get("lr")
        return float(lr) if lr is not None else None

    # -- the end ------------------------------------------------------------------------

    def finish(self, model: torch.nn.Module | None = None) -> float | None:
        """End of training: check every loss against run 1's; with a reference, return (and
        keep in ``final_distance_ratio``) ||x_T - x*|| / ||x_0 - x*|| of the primary reference,
        warning when it exceeds ``final_rtol``; with ``record_to``, write x_T and the loss
        trajectory; with ``snapshot_dir``, save x_T. Call it on every rank. Idempotent."""
        if self.finished:
            return self.final_distance_ratio
        if self._pending:
            raise RuntimeError(f"{self.framework}: finish() between before_step() and after_step()")
        model = unwrap_model(model) if model is not None else self._model
        if model is None or self._last_step is None:
            raise RuntimeError(f"{self.framework}: finish() before any step")
        self.finished = True
        steps = self._last_step + 1
        self.check_losses()
        if self.tracker is not None:
            self.final_distance_ratio = ratio = self.tracker.finish(rtol=math.inf)  # warned about below
            if self.final_rtol is not None and not ratio <= self.final_rtol:
                run1_steps = (self.trajectory or {}).get("steps")
                warnings.warn(
                    f"{self.framework}: ||x_T - x*|| / ||x_0 - x*|| = {ratio:.3e} after {steps} optimizer steps, "
                    f"not ~0: this run did not end at the reference x* ({self.tracker.ref.source}), so it did not "
                    "retrace the run that wrote it"
                    + (f" (that run took {run1_steps} optimizer steps)" if run1_steps not in (None, steps) else ""),
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self.recorder is not None or self.snapshot_dir is not None:
            if self.recorder is None:
                self.recorder = SnapshotRecorder(model, self.snapshot_dir, every=self.snapshot_every)
            self.recorder.finish(steps, self._lr())
        if self.record_to is not None:
            self._write_reference(model, steps)
        return self.final_distance_ratio

    def _write_reference(self, model: torch.nn.Module, steps: int) -> None:
        from ..checkpoints.snapshots import _replicated_non_writer

        rank, world = _dist()
        losses = dict(sorted(self._losses.items()))
        by_rank = None
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, losses)
            by_rank = gathered
            common = set.intersection(*(set(g) for g in gathered))
            losses = {s: sum(g[s] for g in gathered) / world for s in sorted(common)}
        meta = {"pathgeom_role": "reference (x_T of run 1)", "steps": str(steps)}
        if not _replicated_non_writer(model):
            save_snapshot(model, self.record_to, steps, self._lr(), meta=meta)  # a collective when sharded
        if rank != 0:
            return
        data = {
            "format": TRAJECTORY_FORMAT,
            "reference": os.path.basename(self.record_to),
            "steps": steps,
            "framework": self.framework,
            "loss": getattr(self, "loss_definition", "the loss given for each optimizer step"),
            "losses": {str(s): v for s, v in losses.items()},
        }
        if by_rank is not None:
            data["losses_by_rank"] = [{str(s): v for s, v in g.items()} for g in by_rank]
        path = trajectory_path(self.record_to)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
