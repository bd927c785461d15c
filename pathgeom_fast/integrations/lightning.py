"""Lightning integration: the two-run protocol with one callback per run.

::

    from pathgeom_fast.integrations.lightning import PathGeometryCallback

    Trainer(callbacks=[PathGeometryCallback.record_reference("run1/xstar.safetensors")])   # run 1
    Trainer(callbacks=[PathGeometryCallback("run1/xstar.safetensors", every=1)])           # run 2

**Logging.** ``pathgeom/rsi``, ``pathgeom/eb``, ``pathgeom/cos``, ``pathgeom/eta_star`` (and
``pathgeom/update_*``, ``pathgeom/probe_*``, ``pathgeom/full_*``, per tensor
``pathgeom/tensor/<name>/*``) of every measured optimizer step t are written to the trainer's
loggers under step t (Lightning's own logger step), and nothing else: the scalars stay on the
device as tensors until Lightning writes its own metrics (every ``log_every_n_steps`` steps, at
the end of an epoch and of training); then all of them since the last write are copied to the
host at once (one transfer, together with the step losses) and written, each under its own
step, by ``logger.log_metrics`` like ``LearningRateMonitor`` does. (``LightningModule.log``
is not used: within an epoch Lightning writes a step metric again at every later logging
step until it is logged anew, which would repeat stale values at the steps not measured.)
``callback.latest`` holds the last written scalars; all rows are in
``callback.measurer.records``.

**Before clipping.** The gradient is measured in ``on_before_optimizer_step``, which Lightning
calls once the gradients are accumulated (and unscaled, with AMP) and **before** gradient
clipping; the update after the step. Automatic optimization with one optimizer.

**The loss of a step** (recorded by run 1, compared by run 2) is the mean over the optimizer
step's micro-batches of the loss ``training_step`` returns: the sum of the losses Lightning
hands to ``on_train_batch_end`` (``outputs["loss"]``, already divided by
``accumulate_grad_batches``), added up on the device in float64.

**Checks.** The reference file is checked when the callback is built (format, dtypes) and key by
key against the module in ``on_fit_start``, before any training step. Run 2's losses are
compared with run 1's whenever the scalars are written and at the end (a warning names the
first step that differs). At the end of ``fit`` run 1 writes x_T and its trajectory; run 2
computes ``final_distance_ratio`` = ||x_T - x*|| / ||x_0 - x*||, writes it to the trainer's
loggers as ``pathgeom/final_distance_ratio`` and warns when it is not ~0. Probe and full
batches (``probe_batches``, ``full_batch``, ``probe_every``) are moved to the module's device;
the default loss is the model's own ``.loss`` for dict batches, cross-entropy for
``(inputs, targets)``; pass ``loss_fn(module, batch)`` otherwise. All arguments:
:class:`~pathgeom_fast.integrations.common.StepMeasurer`.

**Sharded models** (``ModelParallelStrategy``: FSDP2 ``fully_shard`` and/or tensor parallel
applied in ``configure_model``; it runs on CPU with gloo too). The callback sees the DTensor
parameters and gradients, before clipping as above. Every rank computes the statistics on its
local shards and sums them over the ranks with one all-reduce of a few numbers per computation,
so every rank holds the same scalars; the loggers are written on rank 0 alone. Run 1 gathers
each parameter (``full_tensor()``, a collective on every rank) and rank 0 writes the whole x*
to one safetensors file; run 2 reads only each rank's slice of it. A Lightning distributed
checkpoint folder (``save_distributed_checkpoint=True``) also works as a reference. Refused in
``on_fit_start``, before any step: trainable parameters that mix DTensors and plain tensors, or
DTensors on different device meshes (the plain ones are one copy per rank, which one reduction
over the ranks cannot add up right; pathgeom's ops reduce over one mesh). See
docs/lightning-fsdp2.md.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "pathgeom_fast.integrations.lightning needs lightning: pip install lightning (or, from the checkout, pip install --no-build-isolation '.[lightning]')"
        ) from exc

from collections.abc import Mapping

import torch

from ..checkpoints.keys import trainable
from ..ops.distributed import is_dtensor
from .step_measurer import StepMeasurer


def _loss_of(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


def _check_sharding(module) -> None:
    """Refuse trainable parameters that one reduction cannot add up right: DTensors next to
    plain tensors (each rank's plain copy would be counted once per rank, or not at all), or
    DTensors on different device meshes."""
    named = trainable(module)
    sharded = [(n, p) for n, p in named if is_dtensor(p)]
    if not sharded:
        return
    if len(sharded) != len(named):
        plain = next(n for n, p in named if not is_dtensor(p))
        raise ValueError(
            f"PathGeometryCallback: {len(sharded)} of the module's {len(named)} trainable parameters are DTensors "
            f"(first {sharded[0][0]!r}) and the others plain tensors (first {plain!r}): each rank holds its own "
            "copy of a plain parameter, and one sum over the ranks cannot count those once while adding up the "
            "shards. Make every trainable parameter a DTensor in configure_model (fully_shard the root module "
            "too, or parallelize every layer that has parameters)"
        )
    mesh = sharded[0][1].device_mesh
    other = next(((n, p) for n, p in sharded if p.device_mesh != mesh), None)
    if other is not None:
        raise ValueError(
            f"PathGeometryCallback: parameter {other[0]!r} lives on {other[1].device_mesh} but {sharded[0][0]!r} on "
            f"{mesh}: pathgeom's ops reduce the statistics over one device mesh; shard every trainable parameter "
            "on the same mesh (with FSDP2 + tensor parallel: tensor-parallelize every layer that has parameters "
            "before fully_shard, so that all of them end on the 2-D mesh)"
        )


class PathGeometryCallback(pl.Callback):
    """Measure RSI, EB, cos and eta* against x* every ``every`` optimizer steps (run 2), or
    record x* (run 1, :meth:`record_reference`). Arguments as
    :class:`~pathgeom_fast.integrations.common.StepMeasurer`."""

    def __init__(self, reference=None, every: int = 1, **kwargs):
        super().__init__()
        self.measurer = StepMeasurer(reference, every, **kwargs)
        self.measurer.framework = "PathGeometryCallback (Lightning)"
        self.measurer.loss_definition = (
            "Lightning: the sum of outputs['loss'] over the optimizer step's micro-batches "
            "(the mean of training_step's loss over them)"
        )
        self._loss = None
        self._step_at_start = None
        self._unwritten: list = []  # (step, {tag: device tensor}) not yet written to the loggers
        self.latest: dict[str, float] = {}

    @classmethod
    def record_reference(cls, path: str, **kwargs) -> "PathGeometryCallback":
        """Run 1: write x_T to ``path`` and the loss trajectory beside it at the end of ``fit``."""
        return cls(None, record_to=path, **kwargs)

    @property
    def final_distance_ratio(self) -> float | None:
        return self.measurer.final_distance_ratio

    def write_report(self, out_dir: str, title: str = "") -> dict:
        """The report of the measured steps (records.csv, summary.json, geometry.png,
        findings.md): :meth:`~pathgeom_fast.integrations.common.StepMeasurer.write_report`."""
        return self.measurer.write_report(out_dir, title)

    def on_fit_start(self, trainer, pl_module):
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            raise ValueError(
                "PathGeometryCallback measures runs with automatic optimization and one optimizer; this "
                f"module has automatic_optimization={pl_module.automatic_optimization} and "
                f"{len(trainer.optimizers)} optimizers. Use pathgeom_fast.integrations.StepMeasurer in the training step "
                "(before_step(model, optimizer, step, loss) / after_step()) instead"
            )
        _check_sharding(pl_module)  # ModelParallelStrategy: before any training step
        self.measurer.check_model(pl_module)
        self.measurer.grad_clipping = bool(trainer.gradient_clip_val)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_start = trainer.global_step
        if self._loss is None:  # the first micro-batch of an optimizer step
            self._loss = torch.zeros((), dtype=torch.float64, device=pl_module.device)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # the last micro-batch's loss is added to self._loss in on_train_batch_end, after this
        # hook; the tracker keeps the tensor itself and reads it later
        self.measurer.before_step(pl_module, optimizer, trainer.global_step, self._loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = _loss_of(outputs)
        if loss is not None and self._loss is not None:
            self._loss.add_(loss.detach().to(self._loss.device, torch.float64))
        if trainer.global_step == self._step_at_start:
            return  # accumulating: no optimizer step in this batch
        self._loss = None
        if self.measurer.after_step():
            self._unwritten.append((self.measurer.measured_step, self.measurer.tensor_scalars()))
        if trainer.log_every_n_steps and trainer.global_step % trainer.log_every_n_steps == 0:
            self._write(trainer)  # Lightning writes its own step metrics after this hook

    def on_train_epoch_end(self, trainer, pl_module):
        self._write(trainer)

    def _write(self, trainer, extra: dict | None = None) -> None:
        """Copy the unwritten scalars (and the pending step losses) to the host in one transfer,
        check the losses against run 1's, write every step's scalars under its own step."""
        batches, self._unwritten = self._unwritten, []
        flat = [v for _, d in batches for v in d.values()]
        values = iter(self.measurer.to_host(flat))
        rows = [(step, {k: next(values) for k in d}) for step, d in batches]
        if extra:
            rows.append(extra)
        if rows:
            self.latest = dict(rows[-1][1])
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            for step, metrics in rows:
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer, pl_module):
        if self.measurer.finished or self.measurer._last_step is None:
            return
        self._write(trainer)
        ratio = self.measurer.finish(pl_module)
        if ratio is not None:
            self._write(trainer, extra=(trainer.global_step, {"pathgeom/final_distance_ratio": ratio}))
