"""Lightning integration: ``Trainer(callbacks=[PathGeometryCallback(reference=...)])``.

Logs ``pathgeom/rsi``, ``pathgeom/eb``, ``pathgeom/cos``, ``pathgeom/eta_star`` (and
``pathgeom/update_*``) through ``LightningModule.log``, so they reach the configured logger.
The gradient is measured in ``on_before_optimizer_step``, which Lightning calls once the
gradients are accumulated and **before** gradient clipping; the update after the step.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "pathgeom_fast.integrations.lightning needs lightning: pip install 'pathgeom_fast[lightning]'"
        ) from exc

from .common import StepMeasurer


class PathGeometryCallback(pl.Callback):
    """Measure RSI, EB, cos and eta* of the training gradient against x* every ``every`` steps.

    Arguments as :class:`~pathgeom_fast.integrations.common.StepMeasurer`.
    """

    def __init__(self, reference, every: int = 1, **kwargs):
        super().__init__()
        self.measurer = StepMeasurer(reference, every, **kwargs)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        self.measurer.before_step(pl_module, optimizer, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.measurer.after_step():
            pl_module.log_dict(self.measurer.scalars(), on_step=True, on_epoch=False)
