"""The names the integrations shared in this module before it was split, kept importable
from here: :class:`StepMeasurer` (defined in :mod:`.step_measurer`, with its mixins in
:mod:`.loss_replay` and :mod:`.readings`) and the helpers (:mod:`.helpers`). Inside the
package, import them from the module that defines them."""

from __future__ import annotations

from ..checkpoints.discovery import trajectory_path
from .helpers import metric_tensors, read_trajectory, unwrap_model  # noqa: F401 (metric_tensors: as before)
from .readings import KEYS  # noqa: F401 (importable from here, as before)
from .step_measurer import TRAJECTORY_FORMAT, StepMeasurer  # noqa: F401 (TRAJECTORY_FORMAT: as before)

__all__ = ["StepMeasurer", "trajectory_path", "read_trajectory", "unwrap_model"]
