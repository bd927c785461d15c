"""Hugging Face ``transformers.Trainer`` integration.

One line after building the trainer::

    from pathgeom_fast.integrations.hf import PathGeometryCallback
    PathGeometryCallback.attach(trainer, reference="xstar.safetensors", every=1)
    trainer.train()

Scalars ``pathgeom/rsi``, ``pathgeom/eb``, ``pathgeom/cos``, ``pathgeom/eta_star`` (and
``pathgeom/update_*`` for the step the optimizer took) go through ``Trainer.log``, so they
reach TensorBoard, W&B or whatever ``report_to`` names, and ``trainer.state.log_history``.

The gradient is measured **before clipping**: ``Trainer`` calls its callbacks'
``on_pre_optimizer_step`` only after ``clip_grad_norm_``, so ``attach`` wraps the trainer's
``accelerator.clip_grad_norm_`` and measures the accumulated gradient just before it clips
(without clipping, in ``on_pre_optimizer_step``). With gradient accumulation this is the
gradient of the whole effective batch, once per optimizer step. fp16 training with a
GradScaler is refused (its gradients are still scaled there); bf16 and fp32 work.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pathgeom_fast.integrations.hf needs transformers: pip install 'pathgeom_fast[hf]'"
    ) from exc

from .common import StepMeasurer


class PathGeometryCallback(TrainerCallback):
    """Measure RSI, EB, cos and eta* of the training gradient against x* during ``Trainer.train``.

    Arguments as :class:`~pathgeom_fast.integrations.common.StepMeasurer` (``reference``,
    ``every``, ``weight_decay``, ``per_tensor``, ``snapshot_dir``, ``snapshot_every``, ...).
    Use :meth:`attach`; the callback needs the trainer to wrap clipping and to log.
    """

    def __init__(self, reference, every: int = 1, **kwargs):
        self.measurer = StepMeasurer(reference, every, **kwargs)
        self.trainer = None

    @classmethod
    def attach(cls, trainer, reference, every: int = 1, **kwargs) -> "PathGeometryCallback":
        cb = cls(reference, every, **kwargs)
        cb.bind(trainer)
        trainer.add_callback(cb)
        return cb

    def bind(self, trainer) -> None:
        self.trainer = trainer
        acc = trainer.accelerator
        original = acc.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            self._measure()
            return original(parameters, max_norm, *args, **kwargs)

        acc.clip_grad_norm_ = clip_grad_norm_

    def _measure(self) -> None:
        tr = self.trainer
        if getattr(tr.accelerator, "scaler", None) is not None:
            raise RuntimeError(
                "PathGeometryCallback: fp16 with a GradScaler keeps gradients scaled until clipping; "
                "measure with bf16 or fp32 training"
            )
        model = tr.accelerator.unwrap_model(tr.model)
        self.measurer.before_step(model, tr.optimizer, tr.state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "PathGeometryCallback must be attached with PathGeometryCallback.attach(trainer, reference=...)"
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._measure()  # no clipping configured: nothing measured yet this step

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.measurer.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        last = self.measurer.last
        if last is not None and last["minibatch"]["step"] == state.global_step - 1:
            self.trainer.log(self.measurer.scalars())
