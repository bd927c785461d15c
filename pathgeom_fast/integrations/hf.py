"""Hugging Face ``transformers.Trainer`` integration: the two-run protocol with one line per run.

Run 1 records x* and its loss trajectory; run 2 (same seed, data, arguments) measures against it::

    from pathgeom_fast.integrations.hf import PathGeometryCallback

    trainer = Trainer(model=model, args=args, train_dataset=train_set)
    PathGeometryCallback.record_reference(trainer, "run1/xstar.safetensors")      # run 1
    # or, in run 2:
    PathGeometryCallback.attach(trainer, reference="run1/xstar.safetensors", every=1)
    trainer.train()

**Logging, without touching the Trainer's own logs.** At the end of every measured optimizer
step (``on_step_end``) the callback calls ``trainer.log({"pathgeom/rsi": ..., ...})``, so the
scalars reach ``trainer.state.log_history``, TensorBoard, W&B and whatever ``report_to`` names,
under the Trainer's step number (``state.global_step``: the measured gradient is the one at
x_t with t = step - 1). ``Trainer.log`` runs the callbacks' ``on_log``, and the
``CallbackHandler`` resets ``control.should_log`` there, which would make the Trainer skip its
own log (loss, grad_norm, learning_rate) at that step; the callback restores ``should_log`` to
its value before the call, so the Trainer's own entries are exactly those of a run without the
callback (same steps, same values). Each measured step adds one entry of its own, holding the
``pathgeom/*`` scalars plus the ``epoch`` the Trainer adds to every entry (TensorBoard thus sees
``train/epoch`` once more at that step, same value). Copies to the host: one per measured step,
in that log call.

**Before clipping.** ``Trainer`` calls its callbacks' ``on_pre_optimizer_step`` only after
``clip_grad_norm_``, so :meth:`PathGeometryCallback.attach` wraps the trainer's
``accelerator.clip_grad_norm_`` and measures just before it clips (without clipping, in
``on_pre_optimizer_step``). With gradient accumulation this is the gradient of the whole
effective batch, once per optimizer step. fp16 training with a GradScaler is refused (its
gradients are still scaled there); bf16 and fp32 work.

**DeepSpeed** (``TrainingArguments(deepspeed=...)``, ZeRO 1, 2, 3): Accelerate runs
``engine.backward`` and ``engine.step`` (which clips) inside ``training_step``, and the
gradients live in ZeRO's partitions, so the callback hooks the engine instead (in
``on_train_begin``, once the Trainer has built it) with
:class:`~pathgeom_fast.integrations.deepspeed.DeepSpeedMeasurer`: each rank's partitions,
before DeepSpeed clips, one all-reduce; same scalars, same loss of a step. What it refuses
(NVMe offload, probes, ...) is refused in ``attach``, or for the engine's settings in
``on_train_begin``, before any step.

**The loss of a step** (recorded by run 1, compared by run 2) is the sum over the optimizer
step's micro-batches of what ``Trainer.training_step`` returns: each micro-batch's loss divided
by the number of accumulation steps (or normalised by the number of target tokens when the
model takes ``num_items_in_batch``), i.e. the mean over the micro-batches, the quantity whose
average over ``logging_steps`` steps the Trainer logs as ``loss``. ``attach`` wraps
``trainer.training_step`` to add it up, on the device.

**The end.** At the last optimizer step (``control.should_training_stop`` in ``on_step_end``,
before ``load_best_model_at_end`` could replace the weights) run 1 writes x_T and
``xstar.trajectory.json``; run 2 logs ``pathgeom/final_distance_ratio`` = ||x_T - x*|| /
||x_0 - x*|| (also ``callback.final_distance_ratio``) and warns when it is not ~0; a run 2
whose loss differs from run 1's at some step is warned about at the first such step (checked at
each measured step). ``snapshot_dir=`` always includes the final point. If training stops
otherwise (early stopping), the same happens in ``on_train_end``, without the log entry.

**Probes, full batch, per tensor.** ``probe_batches`` (K fixed batches), ``full_batch``
(batches covering the training set) and ``probe_every``: each element is a collated batch
(a dict of tensors, moved to the model's device) or a list of examples, collated with
``trainer.data_collator``. The default loss is the Trainer's own: ``trainer.compute_loss(model,
batch)`` under ``trainer.compute_loss_context_manager()``, so a Trainer subclass's
``compute_loss``, ``compute_loss_func=`` and ``label_smoothing_factor`` apply to the probes as to
training (called on a shallow copy of the batch: ``compute_loss`` pops ``labels`` from the dict it
is given); ``loss_fn(model, batch)`` replaces it. Probes run in the model's current (training) mode, with a forked RNG and
restored buffers, so the run is not perturbed. ``per_tensor=True`` logs
``pathgeom/tensor/<parameter name>/<metric>``. All arguments: :class:`~pathgeom_fast.integrations.common.StepMeasurer`.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pathgeom_fast.integrations.hf needs transformers: pip install transformers accelerate (or, from the checkout, pip install --no-build-isolation '.[hf]')"
    ) from exc

from collections.abc import Mapping

from .helpers import unwrap_model
from .step_measurer import StepMeasurer


def _collate(trainer, batch):
    """A list of examples (dicts) -> one batch, with the trainer's collator; batches as they are."""
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(e, Mapping) for e in batch):
        return trainer.data_collator(list(batch))
    return batch


def _trainer_loss(trainer):
    """loss_fn(model, batch) of the probes: the Trainer's own compute_loss, as training_step
    calls it (without num_items_in_batch: a probe batch is its own normaliser)."""

    def loss_fn(model, batch):
        inputs = dict(batch) if isinstance(batch, Mapping) else batch
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(model, inputs)

    return loss_fn


class PathGeometryCallback(TrainerCallback):
    """Measure RSI, EB, cos and eta* against x* during ``Trainer.train`` (run 2), or record x*
    (run 1). Build it with :meth:`attach` or :meth:`record_reference` (the callback needs the
    trainer to measure before clipping and to log). Arguments as
    :class:`~pathgeom_fast.integrations.common.StepMeasurer`."""

    def __init__(self, reference=None, every: int = 1, **kwargs):
        self.measurer = StepMeasurer(reference, every, **kwargs)
        self.measurer.framework = "PathGeometryCallback (transformers.Trainer)"
        self.measurer.loss_definition = (
            "transformers.Trainer: the sum over the optimizer step's micro-batches of what training_step returns "
            "(the mean over the micro-batches)"
        )
        self.trainer = None
        self._step_loss = None
        self._init_args = (reference, every, dict(kwargs))
        self._deepspeed = False  # True: measured by a DeepSpeedMeasurer hooked on the engine

    @classmethod
    def attach(cls, trainer, reference=None, every: int = 1, **kwargs) -> "PathGeometryCallback":
        """Build the callback, check the reference against ``trainer.model`` now (before any
        training step) and add it to the trainer."""
        cb = cls(reference, every, **kwargs)
        cb.bind(trainer)
        trainer.add_callback(cb)
        return cb

    @classmethod
    def record_reference(cls, trainer, path: str, **kwargs) -> "PathGeometryCallback":
        """Run 1: write x_T to ``path`` and the loss trajectory beside it when training ends."""
        return cls.attach(trainer, None, record_to=path, **kwargs)

    @property
    def final_distance_ratio(self) -> float | None:
        return self.measurer.final_distance_ratio

    def write_report(self, out_dir: str, title: str = "") -> dict:
        """The report of the measured steps (records.csv, summary.json, geometry.png,
        findings.md): :meth:`~pathgeom_fast.integrations.common.StepMeasurer.write_report`."""
        return self.measurer.write_report(out_dir, title)

    def bind(self, trainer) -> None:
        if self.trainer is not None:
            raise RuntimeError("this PathGeometryCallback is already bound to a trainer")
        m = self.measurer
        if getattr(trainer, "is_deepspeed_enabled", False):
            from .deepspeed import hf_check

            hf_check(trainer, self._init_args[0], self._init_args[2])
            self._deepspeed = True
        else:
            m.check_model(unwrap_model(trainer.accelerator.unwrap_model(trainer.model)))
        m.probe_batches = [_collate(trainer, b) for b in m.probe_batches]
        if m.full_batch is not None:
            m.full_batch = [_collate(trainer, b) for b in m.full_batch]
        m.grad_clipping = bool(trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0)
        if m.loss_fn is None:
            m.loss_fn = _trainer_loss(trainer)
        self.trainer = trainer
        acc = trainer.accelerator
        clip = acc.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            self._measure()
            return clip(parameters, max_norm, *args, **kwargs)

        acc.clip_grad_norm_ = clip_grad_norm_
        training_step = trainer.training_step

        def training_step_and_keep_loss(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            part = loss.detach()
            self._step_loss = part if self._step_loss is None else self._step_loss + part
            return loss

        trainer.training_step = training_step_and_keep_loss

    def _measure(self) -> None:
        if self._deepspeed:
            return  # measured inside engine.backward, before DeepSpeed's step clipped
        tr = self.trainer
        if getattr(tr.accelerator, "scaler", None) is not None:
            raise RuntimeError(
                "PathGeometryCallback: fp16 with a GradScaler keeps gradients scaled until clipping; "
                "measure with bf16 or fp32 training"
            )
        model = tr.accelerator.unwrap_model(tr.model)
        self.measurer.before_step(model, tr.optimizer, tr.state.global_step, self._step_loss)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "PathGeometryCallback must be attached with PathGeometryCallback.attach(trainer, reference=...) "
                "or PathGeometryCallback.record_reference(trainer, path)"
            )
        engine = getattr(self.trainer, "deepspeed", None)
        if self._deepspeed and getattr(self.measurer, "engine", None) is not engine:
            from .deepspeed import hf_measurer

            self.measurer = hf_measurer(self.trainer, *self._init_args, framework="PathGeometryCallback (transformers.Trainer + DeepSpeed)")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._measure()  # no clipping configured: nothing measured yet this step

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.measurer.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_loss = None
        m = self.measurer
        logs = {}
        if m.measured and m.measured_step == state.global_step - 1:
            logs.update(m.scalars())
        if control.should_training_stop and not m.finished:  # the last step: x_T is final now
            ratio = m.finish(unwrap_model(self.trainer.accelerator.unwrap_model(self.trainer.model)))
            if ratio is not None:
                logs["pathgeom/final_distance_ratio"] = ratio
        if logs:
            should_log = control.should_log
            self.trainer.log(logs)
            # Trainer.log -> CallbackHandler.on_log resets should_log: the Trainer would skip its own log
            control.should_log = should_log
            self.trainer.control.should_log = should_log
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if not self.measurer.finished and self.measurer._last_step is not None:
            self.measurer.finish(unwrap_model(self.trainer.accelerator.unwrap_model(self.trainer.model)))
