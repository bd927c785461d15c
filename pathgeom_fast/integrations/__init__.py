"""Measuring inside someone else's training loop, with one line.

* ``StepMeasurer``: the shared implementation (plain PyTorch loops use it directly).
* ``pathgeom_fast.integrations.hf.PathGeometryCallback``: Hugging Face ``Trainer``.
* ``pathgeom_fast.integrations.lightning.PathGeometryCallback``: Lightning ``Trainer``.
"""

from .common import StepMeasurer

__all__ = ["StepMeasurer"]
