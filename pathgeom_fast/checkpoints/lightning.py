"""Lightning ``.ckpt`` files: recognising the checkpoint dict that ``Trainer.save_checkpoint``
writes and pulling its state dict, step and lr out of it (for :class:`.torch_save._TorchReader`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .reader import _as_int, _flatten, _optimizer_lr

Tensor = torch.Tensor


def _is_lightning_checkpoint(obj: Mapping) -> bool:
    """A dict saved by Lightning: its ``state_dict`` beside ``pytorch-lightning_version`` or ``global_step``."""
    return isinstance(obj.get("state_dict"), Mapping) and ("pytorch-lightning_version" in obj or "global_step" in obj)


def _lightning_contents(obj: Mapping) -> tuple[dict[str, Tensor], int | None, float | None]:
    """(state dict flattened with dots, ``global_step``, the first optimizer's lr) of a Lightning checkpoint dict."""
    return _flatten(obj["state_dict"]), _as_int(obj.get("global_step")), _optimizer_lr(obj.get("optimizer_states"))
