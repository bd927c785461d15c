"""Measuring inside someone else's training loop, with one line per run of the two-run protocol.

* ``StepMeasurer``: the shared implementation; plain PyTorch and Accelerate loops use it directly
  (``StepMeasurer.recorder(path)`` in run 1, ``StepMeasurer(reference=path)`` in run 2).
* ``pathgeom_fast.integrations.hf.PathGeometryCallback``: Hugging Face ``Trainer``.
* ``pathgeom_fast.integrations.lightning.PathGeometryCallback``: Lightning ``Trainer``.
* ``pathgeom_fast.integrations.deepspeed.DeepSpeedMeasurer``: DeepSpeed ZeRO 1-3 engines (each
  rank's own partitions, before DeepSpeed clips); the Hugging Face callback uses it under
  ``TrainingArguments(deepspeed=...)``.
* ``pathgeom_fast.integrations.torchtitan.PathGeometryMetricsProcessor``: torchtitan (its
  ``config.metrics``; measures the logged steps before torchtitan's ``clip_grad_norm_``).
"""

from .step_measurer import StepMeasurer

__all__ = ["StepMeasurer"]
