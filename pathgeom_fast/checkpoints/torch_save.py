"""Files written by ``torch.save`` (state dicts, containers of them, Lightning ``.ckpt``), read
with ``torch.load(weights_only=True)`` only: a file that would run pickled code is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from .lightning import _is_lightning_checkpoint, _lightning_contents
from .reader import (
    CheckpointError,
    _as_float,
    _as_int,
    _flatten,
    _InMemoryReader,
    _optimizer_lr,
)

Tensor = torch.Tensor


TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _torch_load(path: str):
    """torch.load with weights_only=True (memory-mapped when the file allows); clear errors."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))  # not allowed; blocked
        if m is None:  # not a pickle of allowed types at all: a corrupt or foreign file
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            raise CheckpointError(
                f"{path} is not a readable torch checkpoint ({detail.group(1).strip() if detail else 'unpickling failed'})"
            ) from None
        what = f"it needs {m.group(1)}"
        raise CheckpointError(
            f"{path} cannot be read without running code stored in it ({what}); pathgeom reads checkpoints with "
            "torch.load(weights_only=True) only. Save the weights alone (torch.save(model.state_dict(), ...)) "
            "or as safetensors"
        ) from None
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch.load fails in many ways on a file that is not its format
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({msg})") from exc


class _TorchReader(_InMemoryReader):
    """Files written by torch.save: a state dict, a Lightning ``.ckpt``, or a container of them
    (e.g. ``{"model": ..., "optimizer": ..., "step": ...}``, whose nested keys are flattened with
    dots, so that ``model.`` is a key prefix like any other). Read with weights_only=True only."""


    def __init__(self, paths: str | Sequence[str], source: str):
        super().__init__(source)
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self._flat: dict[str, Tensor] | None = None
        self.step: int | None = None
        self.lr: float | None = None
        self.lightning = False

    def files(self) -> set[str]:
        return {os.path.realpath(p) for p in self.paths}

    def _contents(self) -> dict[str, Tensor]:
        if self._flat is not None:
            return self._flat
        flat: dict[str, Tensor] = {}
        for path in self.paths:
            obj = _torch_load(path)
            if not isinstance(obj, Mapping):
                raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of tensors)")
            if _is_lightning_checkpoint(obj):
                self.lightning = True
                part, self.step, self.lr = _lightning_contents(obj)
            else:
                part = _flatten(obj)
                for key in ("global_step", "step", "iteration"):
                    if self.step is None:
                        self.step = _as_int(obj.get(key))
                for key in ("optimizer", "optimizer_state_dict", "optim", "opt"):
                    if self.lr is None:
                        self.lr = _optimizer_lr(obj.get(key))
                if self.lr is None:
                    self.lr = _as_float(obj.get("lr", obj.get("learning_rate")))
            flat.update(part)
        if not flat:
            raise CheckpointError(f"{self.source} holds no tensors")
        self._flat = flat
        return flat
