"""What every checkpoint reader shares: the reader interface, the errors, dtypes, and small
parsing and listing helpers.

A reader knows a checkpoint's tensors by key (``info()``: key -> (dtype, shape), without
reading the tensors where the format allows) and copies the tensors asked for into target
tensors (``read(targets)``). Targets may be DTensors (FSDP2 parameters): each rank then
reads only its own slice (safetensors: sliced reads; DCP: its own shards; torch files:
slices of a memory-mapped tensor). Nothing is ever unpickled beyond torch's
``weights_only`` loader (and DCP's metadata, read with an allow-list of its own types).

The readers of each format live in their own modules (:mod:`.snapshots`, :mod:`.torch_save`,
:mod:`.dcp`, :mod:`.deepspeed`, :mod:`.hf`); :mod:`.reference` opens a checkpoint of any of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

Tensor = torch.Tensor


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint or reference that cannot be used; the message names the file and the key."""


_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _as_dtype(dt) -> torch.dtype | str:
    if isinstance(dt, torch.dtype):
        return dt
    return _ST_DTYPES.get(str(dt).upper(), str(dt))


def _is_dtensor(t) -> bool:
    from ..ops.distributed import is_dtensor

    return is_dtensor(t)


def _copy_into(target: Tensor, full: Tensor) -> None:
    """Copy ``full`` (the whole tensor, possibly memory-mapped) into ``target``; a DTensor target
    receives only its local slice (so only that slice of a memory-mapped file is read)."""
    if _is_dtensor(target):
        from .sharding import _local_slices

        idx = _local_slices(target)
        target.to_local().copy_(full[idx] if idx else full)
    else:
        target.copy_(full)


def _empty_like(p: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor laid out like parameter ``p`` (a DTensor like a DTensor) in ``dtype``."""
    return torch.empty_like(p.detach(), dtype=dtype)


class _Reader:

    def __init__(self, source: str):
        self.source = source

    def info(self) -> dict[str, tuple[torch.dtype | str, list[int]]]:
        raise NotImplementedError

    def read(self, targets: Mapping[str, Tensor]) -> None:
        raise NotImplementedError

    def files(self) -> set[str]:
        raise NotImplementedError

    def release(self) -> None:
        """Drop anything cached between ``info()`` and ``read()``."""


class _InMemoryReader(_Reader):
    """A reader whose whole contents are loaded at once as {name: tensor} by ``_contents()``
    (cached in ``_flat`` between ``info()`` and ``read()``)."""

    _flat: dict[str, Tensor] | None = None

    def _contents(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def info(self):
        return {k: (v.dtype, list(v.shape)) for k, v in self._contents().items()}

    def read(self, targets):
        flat = self._contents()
        for k, t in targets.items():
            _copy_into(t, flat[k])

    def release(self):
        self._flat = None


def _flatten(d: Mapping, prefix: str = "", out: dict | None = None) -> dict[str, Tensor]:
    """Nested mappings -> {dotted key: tensor} (as torch.distributed.checkpoint flattens them);
    lists and non-tensor leaves are left out."""
    out = {} if out is None else out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Tensor):
            out[key] = v
        elif isinstance(v, Mapping):
            _flatten(v, key + ".", out)
    return out


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v.item())
    return None


def _as_float(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, Tensor) and v.numel() == 1:
        return float(v.item())
    return None


def _optimizer_lr(opt) -> float | None:
    """The first param group's lr of an optimizer state dict (or a list of them, as Lightning keeps)."""
    if isinstance(opt, (list, tuple)):
        opt = opt[0] if opt else None
    if isinstance(opt, Mapping):
        groups = opt.get("param_groups")
        if isinstance(groups, (list, tuple)) and groups and isinstance(groups[0], Mapping):
            return _as_float(groups[0].get("lr"))
    return None


_STEP_PATTERNS = (
    re.compile(r"(?:^|[^a-z])(?:global_?)?step[_=-]?(\d+)"),
    re.compile(r"checkpoint[_-]?(\d+)"),
    re.compile(r"iter(?:ation)?[_=-]?(\d+)"),
)


def step_from_name(name: str) -> int | None:
    """The training step a file or folder name tells: ``step_00000120``, ``epoch=0-step=6``,
    ``global_step100``, ``checkpoint-20``, ``iter_300``, else its only number (one written
    after ``epoch`` is an epoch, not a step); None when it tells none."""
    base = os.path.basename(os.path.normpath(name)).lower()
    stem = re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", base)
    for pat in _STEP_PATTERNS:
        m = pat.search(stem)
        if m:
            return int(m.group(1))
    nums = [m for m in re.finditer(r"\d+", stem) if not re.search(r"epoch[_=-]?$", stem[: m.start()])]
    return int(nums[0].group()) if len(nums) == 1 else None


def _read_json(path: str):
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc})") from exc


def _listdir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        raise CheckpointError(f"cannot list {folder} ({exc})") from exc


def _first_file(folder: str, names: Sequence[str]) -> str | None:
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)
