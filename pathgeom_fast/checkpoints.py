"""Reading and writing checkpoints, and the reference point x* built from them.

One module that the tracker, the snapshot recorder, the framework integrations and
``pathgeom analyze`` share:

* our snapshots: safetensors files ``DIR/step_00000120.safetensors`` holding the trainable
  parameters by name, with ``step`` and ``lr`` in the metadata (never unpickled);
* :class:`Reference`: x* aligned parameter by parameter with a model, checked when it is
  built (missing keys, keys the model does not have, shapes, non-float dtypes, lower
  precision than the parameters), so that a bad reference fails before any training step
  with one message naming the file and the key.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence

import torch

Tensor = torch.Tensor

SNAPSHOT_NAME = re.compile(r"^step_(\d+)\.safetensors$")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint or reference that cannot be used; the message names the file and the key."""


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters that train (requires_grad), in ``named_parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _is_dtensor(t) -> bool:
    from .distributed import is_dtensor

    return is_dtensor(t)


# ------------------------------------------------------------------------------------------
# Our safetensors snapshots
# ------------------------------------------------------------------------------------------


def snapshot_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:08d}.safetensors")


def save_snapshot(model: torch.nn.Module, path: str, step: int, lr: float | None = None, meta: Mapping[str, str] | None = None) -> None:
    """Save the trainable parameters by name (safetensors, metadata: step, lr and ``meta``).

    Sharded (DTensor) parameters are gathered and written by rank 0 alone (a collective:
    every rank must call this). The file is written to a temporary name and renamed, so a
    reader never sees half a file.
    """
    from safetensors.torch import save_file

    named = trainable(model)
    sharded = bool(named) and _is_dtensor(named[0][1])
    tensors = {n: (p.detach().full_tensor() if sharded else p.detach()).cpu().contiguous() for n, p in named}
    if sharded:
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return
    metadata = {"step": str(step), "lr": "" if lr is None else repr(float(lr))}
    metadata.update({k: str(v) for k, v in (meta or {}).items()})
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _safetensors_header(path: str) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """({name: (dtype string, shape)}, metadata) of a safetensors file, without the tensors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a safetensors file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            info = {}
            for k in f.keys():
                sl = f.get_slice(k)
                info[k] = (sl.get_dtype(), list(sl.get_shape()))
            return info, meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


def snapshot_keys(path: str) -> list[str]:
    """Tensor names of a snapshot, without reading the tensors."""
    return list(_safetensors_header(path)[0])


def snapshot_meta(path: str) -> dict[str, str]:
    """Metadata of a snapshot (step, lr), without reading the tensors."""
    return _safetensors_header(path)[1]


def load_snapshot(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a clear error for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = snapshot_meta(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    return tensors, meta


def list_snapshots(directory: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step_*.safetensors`` in ``directory``, by step."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"snapshot directory {directory} does not exist")
    out = []
    for name in os.listdir(directory):
        m = SNAPSHOT_NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    if not out:
        raise FileNotFoundError(f"no step_*.safetensors snapshots in {directory}")
    return sorted(out)


# ------------------------------------------------------------------------------------------
# The reference point x*
# ------------------------------------------------------------------------------------------

_PRECISION = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


def check_state_against_model(
    model: torch.nn.Module,
    info: Mapping[str, tuple[torch.dtype | str, Sequence[int]]],
    source: str,
) -> None:
    """Check a state (name -> (dtype, shape)) against the model's trainable parameters.

    Raises :class:`CheckpointError` (``KeyError`` for missing keys) naming ``source`` and the
    first offending key: a missing parameter, a key that is neither a parameter nor a buffer
    of the model, a shape that differs, a dtype that is not floating point. Warns (once, naming
    the keys) when the reference holds fewer mantissa bits than the parameter.
    """
    named = trainable(model)
    missing = [n for n, _ in named if n not in info]
    if missing:
        raise CheckpointKeyError(
            f"reference {source} lacks {len(missing)} of the model's {len(named)} trainable parameters, "
            f"first {missing[0]!r}" + (f" (also {missing[1:4]}{' ...' if len(missing) > 4 else ''})" if len(missing) > 1 else "")
            + f"; it has {len(info)} keys, e.g. {list(info)[:3]}"
        )
    known = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    extra = [k for k in info if k not in known]
    if extra:
        raise CheckpointError(
            f"reference {source} has {len(extra)} key(s) that are not parameters or buffers of the model, "
            f"first {extra[0]!r}" + (f" (also {extra[1:4]}{' ...' if len(extra) > 4 else ''})" if len(extra) > 1 else "")
            + "; is it the checkpoint of another model?"
        )
    lower = []
    for n, p in named:
        dt, shape = info[n]
        dt = _as_dtype(dt)
        if dt not in FLOAT_DTYPES:
            raise CheckpointError(
                f"reference {source}: {n!r} has dtype {dt}; a reference point needs floating-point tensors "
                "(float16, bfloat16, float32 or float64)"
            )
        if tuple(shape) != tuple(p.shape):
            raise CheckpointError(
                f"reference {source}: {n!r} has shape {list(shape)} but the model's parameter has {list(p.shape)}"
            )
        if _PRECISION[dt] < _PRECISION.get(p.dtype, 0):
            lower.append((n, dt, p.dtype))
    if lower:
        n, dt, pdt = lower[0]
        warnings.warn(
            f"reference {source} holds {len(lower)} tensor(s) in lower precision than the model's parameters "
            f"(e.g. {n!r}: {dt} vs {pdt}): x - x* then carries the rounding error of x* "
            f"(relative ~{2.0 ** -_PRECISION[dt]:.0e}), which dominates once x is that close to x*",
            UserWarning,
            stacklevel=3,
        )


class CheckpointKeyError(CheckpointError, KeyError):
    """A parameter of the model is missing from a checkpoint."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _as_dtype(dt) -> torch.dtype | str:
    if isinstance(dt, torch.dtype):
        return dt
    return _ST_DTYPES.get(str(dt).upper(), str(dt))


class Reference:
    """The reference point x*, aligned parameter by parameter with a model's trainable parameters.

    Build it with :meth:`from_file` (a safetensors snapshot), :meth:`from_state_dict`,
    :meth:`from_model` (a copy of the current parameters, e.g. x_0 or the end of run 1).
    ``name`` labels the rows measured against it (default ``"xstar"``).
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[Tensor], name: str = "xstar", source: str | None = None):
        if len(names) != len(tensors):
            raise ValueError(f"Reference: {len(names)} names but {len(tensors)} tensors")
        self.names = list(names)
        self.tensors = list(tensors)
        self.name = name
        self.source = source

    @classmethod
    def from_state_dict(
        cls, model: torch.nn.Module, state: Mapping[str, Tensor], *, source: str = "state dict", name: str = "xstar"
    ) -> "Reference":
        """Match ``state`` (name -> tensor) to the model's trainable parameters by name.

        The checks of :func:`check_state_against_model` run first; sharded (DTensor) models
        receive this rank's slice of each tensor.
        """
        for k, t in state.items():
            if not isinstance(t, Tensor):
                raise CheckpointError(f"reference {source}: {k!r} is a {type(t).__name__}, not a tensor")
        check_state_against_model(model, {k: (t.dtype, t.shape) for k, t in state.items()}, source)
        tensors = []
        named = trainable(model)
        for n, p in named:
            t = state[n]
            if _is_dtensor(p) and not _is_dtensor(t):
                from .distributed_path import shard_like

                t = shard_like(t, p)
            else:
                t = t.detach().to(p.device)
            tensors.append(t)
        return cls([n for n, _ in named], tensors, name=name, source=source)

    @classmethod
    def from_file(cls, model: torch.nn.Module, path: str, *, name: str = "xstar") -> "Reference":
        """x* from a safetensors file (never unpickled), checked against the model first.

        For a sharded model (DTensor parameters, e.g. FSDP2) each rank reads only its own
        slice of each tensor from the file.
        """
        source = f"file {path}"
        info, _ = _safetensors_header(path)
        check_state_against_model(model, info, source)
        named = trainable(model)
        if named and _is_dtensor(named[0][1]):
            from .distributed_path import read_sharded

            return cls([n for n, _ in named], [read_sharded(path, n, p) for n, p in named], name=name, source=source)
        from safetensors import safe_open

        tensors = []
        with safe_open(path, framework="pt") as f:
            for n, p in named:
                tensors.append(f.get_tensor(n).to(p.device))
        return cls([n for n, _ in named], tensors, name=name, source=source)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, name: str = "xstar") -> "Reference":
        """A copy of the model's current trainable parameters (e.g. x_0, or the end of run 1)."""
        named = trainable(model)
        return cls([n for n, _ in named], [p.detach().clone() for _, p in named], name=name, source="model copy")

    def check_matches(self, model: torch.nn.Module) -> None:
        names = [n for n, _ in trainable(model)]
        if names != self.names:
            missing = [n for n in names if n not in set(self.names)]
            extra = [n for n in self.names if n not in set(names)]
            raise ValueError(
                f"reference {self.source or self.name} does not match the model's trainable parameters "
                f"({len(self.names)} vs {len(names)} tensors; missing {missing[:3]}, not in the model {extra[:3]}"
                + ("; same names in another order" if not missing and not extra else "")
                + ")"
            )
        for n, t, (_, p) in zip(self.names, self.tensors, trainable(model)):
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"reference {self.source or self.name}: {n!r} has shape {list(t.shape)} but the model's "
                    f"parameter has {list(p.shape)}"
                )


def check_reference_file(path: str) -> dict[str, tuple[torch.dtype | str, list[int]]]:
    """Check, without a model, that ``path`` can serve as a reference: an existing, readable
    safetensors file holding floating-point tensors. Returns name -> (dtype, shape).

    Used where the model is not known yet (a callback built before the trainer), so that a
    wrong file fails at once; the key-by-key checks against the model
    (:func:`check_state_against_model`) follow as soon as the model is known.
    """
    info, _ = _safetensors_header(path)
    out = {k: (_as_dtype(dt), shape) for k, (dt, shape) in info.items()}
    if not any(dt in FLOAT_DTYPES for dt, _ in out.values()):
        raise CheckpointError(f"reference file {path} holds no floating-point tensors ({len(out)} tensors in all)")
    return out
