"""Reading and writing checkpoints, and the reference point x* built from them.

One module that the tracker, the snapshot recorder, the framework integrations and
``pathgeom analyze`` share:

* our snapshots: safetensors files ``DIR/step_00000120.safetensors`` holding the trainable
  parameters by name, with ``step`` and ``lr`` in the metadata (never unpickled);
* readers of other libraries' checkpoints, auto-detected (:func:`open_run` lists a run's
  checkpoints with step, lr, path and loader; :func:`open_checkpoint` opens one): Hugging Face
  Trainer output directories and ``save_pretrained`` folders (single or sharded safetensors,
  ``pytorch_model.bin``), Lightning ``.ckpt`` and ``torch.save`` files (``torch.load`` with
  ``weights_only=True`` only: a file that would run pickled code is refused), and
  ``torch.distributed.checkpoint`` folders (FSDP2 runs; each rank reads only its shards),
  DeepSpeed ZeRO ``save_checkpoint`` folders (the fp32 master weights, merged by deepspeed's
  ``zero_to_fp32`` from files read weights_only with an allow-list of DeepSpeed's plain types);
  their keys are matched to a model's names across wrapper and attribute prefixes
  (:func:`match_keys`);
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
    from ..ops.distributed import is_dtensor

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


def _prefix_hint(missing: list[str], keys) -> str:
    """When the state's keys are the parameter names behind (or without) a common prefix
    (``module.`` of DDP, ``_orig_mod.`` of torch.compile, ``model.`` of a wrapper), say so."""
    keys = set(keys)
    name = missing[0]
    for k in keys:
        if k.endswith("." + name):
            prefix = k[: -len(name)]
            if all(prefix + n in keys for n in missing):
                return (f"; its keys carry the prefix {prefix!r}: strip it, e.g. "
                        f"{{k.removeprefix({prefix!r}): v for k, v in state.items()}}")
        if name.endswith("." + k) or (name.split(".", 1)[-1] == k):
            prefix = name[: -len(k)]
            if all(n.startswith(prefix) and n[len(prefix):] in keys for n in missing):
                return (f"; the model's names carry the prefix {prefix!r} that its keys lack: add it, e.g. "
                        f"{{{prefix!r} + k: v for k, v in state.items()}}")
    return ""


def check_state_against_model(
    model: torch.nn.Module,
    info: Mapping[str, tuple[torch.dtype | str, Sequence[int]]],
    source: str,
    role: str = "reference",
) -> None:
    """Check a state (name -> (dtype, shape)) against the model's trainable parameters.

    Raises :class:`CheckpointError` (``KeyError`` for missing keys) naming ``source`` and the
    first offending key: a missing parameter, a key that is neither a parameter nor a buffer
    of the model, a shape that differs, a dtype that is not floating point. Warns (once, naming
    the keys) when the reference holds fewer mantissa bits than the parameter. ``role`` names
    the state in the messages ("reference", or "checkpoint" for a point x loaded into the model,
    which is not warned about precision: x is what the model holds).
    """
    named = trainable(model)
    missing = [n for n, _ in named if n not in info]
    if missing:
        raise CheckpointKeyError(
            f"{role} {source} lacks {len(missing)} of the model's {len(named)} trainable parameters, "
            f"first {missing[0]!r}" + (f" (also {missing[1:4]}{' ...' if len(missing) > 4 else ''})" if len(missing) > 1 else "")
            + f"; it has {len(info)} keys, e.g. {list(info)[:3]}" + _prefix_hint(missing, info)
        )
    # every name a parameter or buffer goes by: a tied weight (GPT-2's output layer and token
    # embedding) is in state_dict() under both of its names, in named_parameters() under one
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in model.named_buffers(remove_duplicate=False)}
    extra = [k for k in info if k not in known]
    if extra:
        raise CheckpointError(
            f"{role} {source} has {len(extra)} key(s) that are not parameters or buffers of the model, "
            f"first {extra[0]!r}" + (f" (also {extra[1:4]}{' ...' if len(extra) > 4 else ''})" if len(extra) > 1 else "")
            + "; is it the checkpoint of another model?"
        )
    lower = []
    for n, p in named:
        dt, shape = info[n]
        dt = _as_dtype(dt)
        if dt not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{role} {source}: {n!r} has dtype {dt}; the parameters need floating-point tensors "
                "(float16, bfloat16, float32 or float64)"
            )
        if tuple(shape) != tuple(p.shape):
            raise CheckpointError(
                f"{role} {source}: {n!r} has shape {list(shape)} but the model's parameter has {list(p.shape)}"
            )
        if role == "reference" and _PRECISION[dt] < _PRECISION.get(p.dtype, 0):
            lower.append((n, dt, p.dtype))
    if lower:
        n, dt, pdt = lower[0]
        warnings.warn(
            f"{role} {source} holds {len(lower)} tensor(s) in lower precision than the model's parameters "
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
                from .sharding import shard_like

                t = shard_like(t, p)
            else:
                t = t.detach().to(p.device)
            tensors.append(t)
        return cls([n for n, _ in named], tensors, name=name, source=source)

    @classmethod
    def from_file(cls, model: torch.nn.Module, path: str, *, name: str = "xstar", key_prefix: str | None = None) -> "Reference":
        """x* from a checkpoint of any supported format (:func:`open_checkpoint`: our safetensors
        snapshots, Hugging Face folders and files, Lightning ``.ckpt``, ``torch.save`` state
        dicts read with weights_only=True, ``torch.distributed.checkpoint`` folders, DeepSpeed
        ``save_checkpoint`` folders: their fp32 master weights), checked against the model first; key prefixes are matched as in :func:`match_keys`.

        For a sharded model (DTensor parameters, e.g. FSDP2) each rank reads only its own
        slice of each tensor.
        """
        return open_checkpoint(path).reference(model, name=name, key_prefix=key_prefix)

    @classmethod
    def from_checkpoint(cls, model: torch.nn.Module, checkpoint: "Checkpoint", *, name: str = "xstar", key_prefix: str | None = None) -> "Reference":
        """x* from a :class:`Checkpoint` of :func:`open_run`."""
        return checkpoint.reference(model, name=name, key_prefix=key_prefix)

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
    """Check, without a model, that ``path`` can serve as a reference: one existing, readable
    checkpoint of a supported format (:func:`open_checkpoint`) holding floating-point tensors.
    Returns key -> (dtype, shape).

    Used where the model is not known yet (a callback built before the trainer), so that a
    wrong file fails at once; the key-by-key checks against the model
    (:func:`check_state_against_model`) follow as soon as the model is known.
    """
    ck = open_checkpoint(path)
    out = {k: (_as_dtype(dt), shape) for k, (dt, shape) in ck.info().items()}
    ck.reader.release()
    if not any(dt in FLOAT_DTYPES for dt, _ in out.values()):
        raise CheckpointError(f"reference {ck.source} holds no floating-point tensors ({len(out)} tensors in all)")
    return out


# ------------------------------------------------------------------------------------------
# Checkpoints of every kind: one reader interface, auto-detected
# ------------------------------------------------------------------------------------------
#
# A reader knows a checkpoint's tensors by key (``info()``: key -> (dtype, shape), without
# reading the tensors where the format allows) and copies the tensors asked for into target
# tensors (``read(targets)``). Targets may be DTensors (FSDP2 parameters): each rank then
# reads only its own slice (safetensors: sliced reads; DCP: its own shards; torch files:
# slices of a memory-mapped tensor). Nothing is ever unpickled beyond torch's
# ``weights_only`` loader (and DCP's metadata, read with an allow-list of its own types).

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# files in checkpoint folders that hold no model weights (HF Trainer, Accelerate, Lightning)
_NOT_WEIGHTS = re.compile(r"^(optimizer|scheduler|scaler|rng_state|random_states|training_args|sampler)", re.I)
_HF_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")
_DROPPED_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}  # wrappers' attribute names


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


class _SafetensorsReader(_Reader):
    """One safetensors file, or a sharded set ({key: file}, from ``model.safetensors.index.json``)."""


    def __init__(self, files: str | Mapping[str, str], source: str):
        super().__init__(source)
        self.key_files = None if isinstance(files, str) else dict(files)
        self.paths = [files] if isinstance(files, str) else sorted(set(self.key_files.values()))
        self._info = None

    def files(self) -> set[str]:
        return {os.path.realpath(p) for p in self.paths}

    def metadata(self) -> dict[str, str]:
        return _safetensors_header(self.paths[0])[1] if self.key_files is None else {}

    def info(self):
        if self._info is None:
            out = {}
            for path in self.paths:
                header, _ = _safetensors_header(path)
                for k, (dt, shape) in header.items():
                    if self.key_files is None or self.key_files.get(k) == path:
                        out[k] = (_as_dtype(dt), list(shape))
            if self.key_files is not None:
                lost = [k for k in self.key_files if k not in out]
                if lost:
                    raise CheckpointError(
                        f"{self.source}: the index names {len(lost)} tensor(s) that are not in their shard file, "
                        f"first {lost[0]!r} (expected in {self.key_files[lost[0]]})"
                    )
            self._info = out
        return self._info

    def read(self, targets):
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = {}
        for k in targets:
            by_file.setdefault(self.paths[0] if self.key_files is None else self.key_files[k], []).append(k)
        for path, keys in by_file.items():
            try:
                with safe_open(path, framework="pt") as f:
                    for k in keys:
                        t = targets[k]
                        if _is_dtensor(t):
                            from .sharding import _local_slices

                            sl = f.get_slice(k)
                            idx = _local_slices(t)
                            t.to_local().copy_(sl[idx] if idx else sl[:])
                        else:
                            t.copy_(f.get_tensor(k))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


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
            if isinstance(obj.get("state_dict"), Mapping) and ("pytorch-lightning_version" in obj or "global_step" in obj):
                self.lightning = True
                part = _flatten(obj["state_dict"])
                self.step = _as_int(obj.get("global_step"))
                self.lr = _optimizer_lr(obj.get("optimizer_states"))
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


class _DCPMetadataUnpickler:
    """DCP's ``.metadata`` is a pickle; read it with an allow-list of DCP's own metadata types
    (what ``FileSystemReader.read_metadata`` would unpickle without restriction)."""

    _DCP = {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }
    _OTHER = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    }

    @classmethod
    def load(cls, f, source: str):
        import pickle

        allowed_dcp, other = cls._DCP, cls._OTHER

        class _U(pickle.Unpickler):
            def find_class(self, module, name):
                if (module == "torch.distributed.checkpoint.metadata" and name in allowed_dcp) or (module, name) in other:
                    return super().find_class(module, name)
                if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                    return getattr(torch, name)
                raise pickle.UnpicklingError(f"{module}.{name} is not a torch.distributed.checkpoint metadata type")

        try:
            return _U(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: its .metadata is not readable as DCP metadata ({exc})") from None


def _safe_dcp_reader(path: str):
    """A ``FileSystemReader`` whose metadata is read with the allow-list above."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(os.fspath(self.path), ".metadata"), "rb") as f:
                md = _DCPMetadataUnpickler.load(f, f"DCP checkpoint {self.path}")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader(path)


class _DCPReader(_Reader):
    """A ``torch.distributed.checkpoint`` directory (``.metadata`` and ``*.distcp`` files). Under
    torch.distributed with DTensor targets each rank loads only its shards (DCP reshards)."""


    def __init__(self, path: str, source: str):
        super().__init__(source)
        self.path = path
        self._md = None

    def files(self) -> set[str]:
        return {os.path.realpath(self.path)}

    def metadata(self):
        if self._md is None:
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                self._md = _DCPMetadataUnpickler.load(f, self.source)
        return self._md

    def info(self):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {
            k: (m.properties.dtype, list(m.size))
            for k, m in self.metadata().state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)
        }

    def scalar(self, *keys: str):
        """A non-tensor value saved in the checkpoint (e.g. ``step``), read with weights_only=True
        straight from its file (no collective); None when absent or unreadable."""
        import io

        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        md = self.metadata()
        for key in keys:
            m = md.state_dict_metadata.get(key)
            if not isinstance(m, BytesStorageMetadata):
                continue
            info = (md.storage_data or {}).get(MetadataIndex(key))
            if info is None or getattr(info, "transform_descriptors", None):
                continue
            try:
                with open(os.path.join(self.path, info.relative_path), "rb") as f:
                    f.seek(info.offset)
                    return torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
            except Exception:  # a value we cannot read safely is simply not used
                continue
        return None

    def read(self, targets):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        no_dist = not (dist.is_available() and dist.is_initialized())  # one process: no collectives
        try:
            with warnings.catch_warnings():  # DCP warns that one process means no collectives: intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
                dcp.load(dict(targets), storage_reader=_safe_dcp_reader(self.path), planner=DefaultLoadPlanner(), no_dist=no_dist)
        except CheckpointError:
            raise
        except Exception as exc:  # DCP wraps the per-rank failures in CheckpointException
            raise CheckpointError(f"{self.source}: reading failed ({str(exc).strip().splitlines()[0][:300]})") from exc


# DeepSpeed ``engine.save_checkpoint(dir)``: ``dir/latest`` names the tag folder
# (``global_stepN``) holding ``*_model_states.pt`` (the module's state dict, parameter shapes;
# under ZeRO-3 the parameters there are empty placeholders) and ``*_optim_states.pt`` (each
# rank's partition of the fp32 master weights). x* is the fp32 master weights, merged by
# DeepSpeed's own offline reader (``deepspeed.utils.zero_to_fp32``). DeepSpeed loads these files
# with ``weights_only=False``; here they are loaded with ``weights_only=True`` and an allow-list
# of the few DeepSpeed types they hold (plain data: the loss scaler's settings, the ZeRO stage
# enum, fragment addresses), so a file holding anything else is refused, never executed.
_DS_STATE_FILE = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_\d+_)?(?:mp_rank_\d+_)?(model|optim)_states\.pt$")


def _ds_state_files(folder: str, kind: str) -> list[str]:
    """The ``*_{kind}_states.pt`` files of a DeepSpeed tag folder, in rank order."""
    def rank_order(name):
        return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", name)]

    names = [n for n in _listdir(folder) if (m := _DS_STATE_FILE.match(n)) and m.group(1) == kind]
    return [os.path.join(folder, n) for n in sorted(names, key=rank_order)]


def _is_deepspeed_tag(folder: str) -> bool:
    """A folder written by DeepSpeed's ``save_checkpoint`` for one tag (e.g. ``global_step100``)."""
    return os.path.isdir(folder) and bool(_ds_state_files(folder, "model"))


def _deepspeed_latest(folder: str) -> str | None:
    """The tag folder named by ``folder/latest`` (DeepSpeed's checkpoint root), or None when
    ``folder`` has no ``latest`` file; an error naming both when that tag folder is absent."""
    latest = os.path.join(folder, "latest")
    if not os.path.isfile(latest):
        return None
    try:
        with open(latest) as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {latest} ({exc})") from exc
    path = os.path.join(folder, tag)
    if not tag or not _is_deepspeed_tag(path):
        raise CheckpointError(
            f"{latest} names the DeepSpeed checkpoint {tag!r}, but {path} is not a DeepSpeed checkpoint folder "
            f"(no *_model_states.pt in it); pass one of the global_step* folders of {folder}"
        )
    return path


def _deepspeed_allowed_types() -> list:
    """The DeepSpeed types a ZeRO checkpoint's files pickle (all plain data)."""
    import importlib

    out = []
    for module, name in (
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that type is not allowed
            continue
    return out


class _DeepSpeedReader(_InMemoryReader):
    """A DeepSpeed ZeRO (stage 1, 2 or 3) checkpoint folder ``global_stepN``: the fp32 master
    weights (and the module's buffers and frozen parameters), merged from every rank's partition
    with DeepSpeed's ``zero_to_fp32``; needs deepspeed."""

    def __init__(self, path: str, source: str):
        super().__init__(source)
        self.path = path
        self._flat: dict[str, Tensor] | None = None

    def files(self) -> set[str]:
        return {os.path.realpath(self.path)}

    def _zero_to_fp32(self):
        try:
            from deepspeed.utils import zero_to_fp32
        except ImportError as exc:
            raise CheckpointError(
                f"{self.path} is a DeepSpeed checkpoint; reading its fp32 master weights needs deepspeed "
                f"(pip install deepspeed, or from the checkout pip install --no-build-isolation '.[deepspeed]'): {exc}"
            ) from None
        return zero_to_fp32

    def _load(self, path: str):
        with torch.serialization.safe_globals(_deepspeed_allowed_types()):
            return _torch_load(path)

    def optimizer_lr(self) -> float | None:
        """The first param group's lr in rank 0's optimizer state; None without deepspeed or one."""
        files = _ds_state_files(self.path, "optim")
        try:
            self._zero_to_fp32()
            osd = self._load(files[0])["optimizer_state_dict"] if files else None
        except (CheckpointError, KeyError, TypeError):
            return None
        if not isinstance(osd, Mapping):
            return None
        return _optimizer_lr(osd.get("base_optimizer_state", osd.get("optimizer_state_dict")))

    def _contents(self) -> dict[str, Tensor]:
        if self._flat is not None:
            return self._flat
        import contextlib
        import inspect
        import io

        z = self._zero_to_fp32()
        from deepspeed.checkpoint import constants as C

        models = []
        for path in _ds_state_files(self.path, "model"):
            sd = self._load(path)
            if not isinstance(sd, Mapping) or C.BUFFER_NAMES not in sd or C.PARAM_SHAPES not in sd:
                raise CheckpointError(f"{path} is not a DeepSpeed model states file (no {C.PARAM_SHAPES!r})")
            check = getattr(z, "_raise_if_autoep_zero3_partitioned_state", None)
            if check is not None:
                try:
                    check(sd)
                except NotImplementedError as exc:
                    raise CheckpointError(f"{path}: {exc}") from None
            module = sd.get("module") or {}
            models.append(z.zero_model_state(
                buffers={k: v.float() if v.is_floating_point() else v for k, v in module.items() if k in sd[C.BUFFER_NAMES]},
                param_shapes=sd[C.PARAM_SHAPES],
                shared_params=[[k, v] for k, v in (sd.get("shared_params") or {}).items()],
                ds_version=sd.get(C.DS_VERSION),
                frozen_param_shapes=sd.get(C.FROZEN_PARAM_SHAPES),
                frozen_param_fragments=sd.get(C.FROZEN_PARAM_FRAGMENTS),
            ))
        optim_files = _ds_state_files(self.path, "optim")
        if not optim_files:
            raise CheckpointError(
                f"{self.path} has DeepSpeed model states but no *_optim_states.pt files, which hold the fp32 "
                "master weights (saved without the optimizer state?)"
            )
        flat_groups, first = [], None
        for path in optim_files:
            osd = self._load(path).get("optimizer_state_dict")
            if not isinstance(osd, Mapping) or C.ZERO_STAGE not in osd:
                raise CheckpointError(f"{path} is not a DeepSpeed ZeRO optimizer states file (no {C.ZERO_STAGE!r})")
            first = first or osd
            key = C.SINGLE_PARTITION_OF_FP32_GROUPS if int(osd[C.ZERO_STAGE]) <= 2 else C.FP32_FLAT_GROUPS
            flat_groups.append(osd[key])
        stage = int(first[C.ZERO_STAGE])
        world = first[C.PARTITION_COUNT]
        world = max(world) if isinstance(world, (list, tuple)) else int(world)
        if world != len(optim_files):
            raise CheckpointError(
                f"{self.path} holds {len(optim_files)} *_optim_states.pt file(s) but the run had {world} ranks: "
                "a rank's partition of the fp32 master weights is missing"
            )
        if stage not in (1, 2, 3):
            raise CheckpointError(f"{self.path}: unknown ZeRO stage {stage}")
        try:
            # DeepSpeed prints what it merges, and a progress bar
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                if stage <= 2:
                    merge = z._get_fp32_state_dict_from_zero2_checkpoint
                    args = [world, flat_groups, models, False]
                    if "param_alignment_paddings" in inspect.signature(merge).parameters:
                        args.append(first.get(getattr(C, "PARAM_ALIGNMENT_PADDINGS", "param_alignment_paddings")))
                    state = merge(*args)
                else:
                    state = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, models, False)
                flat = z.to_torch_tensor(state)
        except CheckpointError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.source}: DeepSpeed's zero_to_fp32 could not merge it ({msg})") from exc
        if not flat:
            raise CheckpointError(f"{self.source} holds no tensors")
        self._flat = dict(flat)
        return self._flat

    def model_step(self) -> int | None:
        """``global_steps`` of the first model states file (read weights_only, without deepspeed)."""
        files = _ds_state_files(self.path, "model")
        try:
            sd = self._load(files[0]) if files else None
        except CheckpointError:
            return None
        return _as_int(sd.get("global_steps")) if isinstance(sd, Mapping) else None


# ------------------------------------------------------------------------------------------
# Matching a checkpoint's keys to a model's names
# ------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    """Drop wrapper attribute names: torch.compile's ``_orig_mod``, FSDP1/activation-checkpoint
    wrappers anywhere, and DDP/DataParallel's leading ``module.``."""
    parts = [p for p in name.split(".") if p not in _DROPPED_PARTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _canonical_map(names) -> dict[str, str]:
    """canonical -> original; identity when canonical names would collide."""
    out: dict[str, str] = {}
    for n in names:
        c = _canonical(n)
        if c in out:
            return {n: n for n in names}
        out[c] = n
    return out


class KeyMatch:
    """How a checkpoint's keys map onto a model's names.

    ``keys``: model name -> checkpoint key, for every trainable parameter and for every other
    parameter and persistent buffer the checkpoint holds; ``prefix``: (checkpoint prefix,
    model prefix) that was replaced (``("", "")`` for identical names); ``missing_optional``:
    frozen parameters and persistent buffers of the model the checkpoint does not hold."""

    def __init__(self, keys: dict[str, str], prefix: tuple[str, str], missing_optional: list[str]):
        self.keys, self.prefix, self.missing_optional = keys, prefix, missing_optional

    def __repr__(self) -> str:
        return f"KeyMatch({len(self.keys)} keys, prefix={self.prefix}, missing_optional={len(self.missing_optional)})"


def _prefix_candidates(m0: str, ckpt: Sequence[str]) -> set[tuple[str, str]]:
    """(checkpoint prefix s, model prefix t) with s + rest in ckpt and m0 == t + rest, for every
    dotted tail ``rest`` of the model name m0."""
    parts = m0.split(".")
    out = set()
    for j in range(1, len(parts) + 1):
        rest = ".".join(parts[-j:])
        t = m0[: len(m0) - len(rest)]
        for k in ckpt:
            if k == rest or k.endswith("." + rest):
                out.add((k[: len(k) - len(rest)], t))
    return out


def match_keys(
    model: torch.nn.Module,
    info: Mapping[str, tuple[torch.dtype | str, Sequence[int]]],
    source: str,
    key_prefix: str | None = None,
    role: str = "reference",
) -> KeyMatch:
    """Map a checkpoint's keys (``info``: key -> (dtype, shape)) onto the model's names, then check
    them (:func:`check_state_against_model`).

    The names may differ by wrapper attributes (``module.`` of DDP, ``_orig_mod.`` of
    torch.compile) and by a prefix: a Lightning module's attribute (``model.``, ``net.``), a
    container key (``{"model": state_dict, ...}`` saved whole), or a base model's prefix
    (``transformer.``). The one mapping that covers every trainable parameter is used; when
    several would (e.g. ``model.`` and ``ema.`` copies of the same network), ``key_prefix``
    (the checkpoint prefix to use, e.g. ``"ema."``) chooses, else it is an error. Keys under
    the chosen prefix that are not parameters or buffers of the model are an error too.
    """
    named = trainable(model)
    if not named:
        raise CheckpointError("the model has no trainable parameters (requires_grad=True) to measure")
    ck = _canonical_map(info)
    train_ids = {id(p) for _, p in named}
    sd_keys = set(model.state_dict())
    all_params = list(model.named_parameters(remove_duplicate=False))
    # every name the model answers to (tied parameters under each of their names)
    known = [n for n, _ in all_params] + [n for n, _ in model.named_buffers(remove_duplicate=False)] + list(sd_keys)
    mod = _canonical_map(list(dict.fromkeys(known)))
    mod_inv = {v: k for k, v in mod.items()}
    train_c = [mod_inv[n] for n, _ in named]
    # other state: frozen parameters and persistent buffers, each once (tied copies of trainable ones left out)
    seen = set(train_ids)
    optional: dict[str, tuple[int, ...]] = {}
    for n, p in all_params:
        if id(p) not in seen:
            seen.add(id(p))
            optional[n] = tuple(p.shape)
    for n, b in model.named_buffers():
        if n in sd_keys and id(b) not in seen:
            seen.add(id(b))
            optional[n] = tuple(b.shape)

    def mapping(s: str, t: str) -> dict[str, str] | None:
        out = {}
        for c in train_c:
            if not c.startswith(t) or s + c[len(t):] not in ck:
                return None
            out[c] = s + c[len(t):]
        return out

    if key_prefix is not None:
        s = _canonical(key_prefix.strip(".")) + "." if key_prefix.strip(".") else ""
        found = mapping(s, "")
        if found is None:
            under = [k for k in ck if k.startswith(s)]
            raise CheckpointKeyError(
                f"{source}: with key prefix {key_prefix!r} the model's parameter {mod[train_c[0]]!r} would be "
                f"{s + train_c[0]!r}, which it does not hold"
                + (f" ({len(under)} keys start with the prefix, e.g. {[ck[k] for k in under[:3]]})" if under
                   else f" (no key starts with the prefix; its keys are e.g. {list(info)[:3]})")
            )
        valid = {(s, ""): found}
    else:
        valid = {}
        found = mapping("", "")
        if found is not None:
            valid[("", "")] = found  # identical names win
        else:
            for s, t in sorted(_prefix_candidates(train_c[0], list(ck))):
                found = mapping(s, t)
                if found is not None:
                    valid[(s, t)] = found
    if not valid:
        try:
            check_state_against_model(model, {mod.get(c, ck[c]): info[ck[c]] for c in ck}, source, role)
        except CheckpointKeyError as exc:
            raise CheckpointKeyError(f"{exc}; no prefix of its keys maps them onto the model's names either") from None
        raise CheckpointKeyError(f"{source}: its keys do not match the model's parameter names")  # pragma: no cover
    distinct: dict[tuple, tuple[str, str]] = {}
    for st, found in valid.items():
        distinct.setdefault(tuple(sorted(found.items())), st)
    if len(distinct) > 1:
        opts = [s for s, _ in distinct.values()]
        raise CheckpointError(
            f"{source}: the model's parameters match its keys under {len(opts)} different prefixes "
            f"({', '.join(repr(s) for s in opts[:5])}); choose one with --key-prefix (key_prefix=)"
        )
    s, t = next(iter(distinct.values()))
    found = valid[(s, t)]
    # keys under the prefix must belong to the model
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    extra = [
        ck[k] for k in ck
        if k.startswith(s) and (t + k[len(s):]) not in mod and not any(p.search(ck[k]) for p in ignore)
    ]
    if extra:
        raise CheckpointError(
            f"{role} {source} has {len(extra)} key(s) that are not parameters or buffers of the model, "
            f"first {extra[0]!r}" + (f" (also {extra[1:4]}{' ...' if len(extra) > 4 else ''})" if len(extra) > 1 else "")
            + (f" (with its prefix {s!r} read as {t!r})" if (s, t) != ("", "") else "")
            + "; is it the checkpoint of another model?"
        )
    keys = {mod[c]: ck[k] for c, k in found.items()}
    check_state_against_model(model, {n: info[k] for n, k in keys.items()}, source, role)
    missing = []
    for name, shape in optional.items():
        c = mod_inv[name]
        k = s + c[len(t):] if c.startswith(t) else None
        if k is None or k not in ck:
            missing.append(name)
            continue
        if tuple(info[ck[k]][1]) != shape:
            raise CheckpointError(
                f"{source}: {ck[k]!r} has shape {list(info[ck[k]][1])} but the model's {name!r} has {list(shape)}"
            )
        keys[name] = ck[k]
    return KeyMatch(keys, (s, t), missing)


# ------------------------------------------------------------------------------------------
# Checkpoints and runs
# ------------------------------------------------------------------------------------------


class Checkpoint:
    """One checkpoint of a run: ``step``, ``lr`` (the learning rate of the optimizer step taken
    from this point, as in PathTracker rows; None when the checkpoint does not tell), ``path``,
    ``format`` ("snapshot", "safetensors", "hf", "lightning", "torch", "dcp", "deepspeed"), ``config_dir``
    (a folder with a Hugging Face ``config.json`` describing the model, or None) and ``reader``
    (the loader of its tensors)."""

    def __init__(self, path: str, format: str, reader: _Reader, step: int | None = None, lr: float | None = None, config_dir: str | None = None):
        self.path, self.format, self.reader, self.step, self.lr, self.config_dir = path, format, reader, step, lr, config_dir

    def __repr__(self) -> str:
        return f"Checkpoint(step={self.step}, lr={self.lr}, format={self.format!r}, path={self.path!r})"

    @property
    def source(self) -> str:
        return f"{'file' if os.path.isfile(self.path) else 'checkpoint'} {self.path}"

    def files(self) -> set[str]:
        """Real paths of the files (or DCP folder) holding its tensors: two checkpoints sharing
        one are the same point."""
        return self.reader.files()

    def info(self) -> dict[str, tuple[torch.dtype | str, list[int]]]:
        """key -> (dtype, shape) of every tensor (without reading them where the format allows)."""
        return self.reader.info()

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor, on the CPU, by its key in the checkpoint."""
        info = self.info()
        out = {k: torch.empty(shape, dtype=_as_dtype(dt)) for k, (dt, shape) in info.items() if isinstance(_as_dtype(dt), torch.dtype)}
        with torch.no_grad():
            self.reader.read(out)
        self.reader.release()
        return out

    def match(self, model: torch.nn.Module, key_prefix: str | None = None, role: str = "checkpoint") -> KeyMatch:
        """How its keys map onto the model's names (see :func:`match_keys`)."""
        return match_keys(model, self.info(), self.source, key_prefix, role)

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module, key_prefix: str | None = None, match: KeyMatch | None = None) -> KeyMatch:
        """Copy its values into the model's parameters and buffers (cast to their dtypes). Sharded
        (DTensor) parameters receive only their local slices. Returns the :class:`KeyMatch`
        (``missing_optional`` lists the frozen parameters and buffers it did not hold)."""
        m = match or self.match(model, key_prefix)
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        self.reader.read({k: tensors[n].detach() for n, k in m.keys.items()})
        self.reader.release()
        return m

    @torch.no_grad()
    def reference(self, model: torch.nn.Module, *, name: str = "xstar", key_prefix: str | None = None) -> "Reference":
        """The checkpoint as a reference point x* for ``model`` (its own dtypes kept; sharded
        like the model's parameters, each rank reading only its slices)."""
        info = self.info()
        m = match_keys(model, info, self.source, key_prefix, "reference")
        names, targets, tensors = [], {}, []
        for n, p in trainable(model):
            k = m.keys[n]
            t = _empty_like(p, _as_dtype(info[k][0]))
            names.append(n)
            tensors.append(t)
            targets[k] = t
        self.reader.read(targets)
        self.reader.release()
        return Reference(names, tensors, name=name, source=self.source)


class Run:
    """The checkpoints of a run, by step (see :func:`open_run`). ``notes``: what was left out
    or could not be told (shown to users)."""

    def __init__(self, path: str, checkpoints: list[Checkpoint], notes: list[str] | None = None):
        self.path, self.checkpoints, self.notes = path, checkpoints, list(notes or [])

    @property
    def format(self) -> str:
        return self.checkpoints[0].format if self.checkpoints else "?"

    @property
    def config_dir(self) -> str | None:
        """A folder with a Hugging Face config.json describing the model (the last one found)."""
        dirs = [c.config_dir for c in self.checkpoints if c.config_dir]
        return dirs[-1] if dirs else None

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self):
        return iter(self.checkpoints)

    def __repr__(self) -> str:
        return f"Run({self.path!r}, {len(self.checkpoints)} {self.format} checkpoints, steps {[c.step for c in self.checkpoints]})"


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


def _hf_step_lr(folder: str) -> tuple[int | None, float | None]:
    """(step, lr of the next optimizer step) of a Hugging Face Trainer or Accelerate checkpoint folder.

    The step is the folder's ``checkpoint-N`` (else ``trainer_state.json``'s global_step); for an
    Accelerate ``save_state`` folder, the step its name tells, except Accelerate's automatic
    ``checkpoint_N``, which counts saves (step unknown). The lr: the scheduler's last lr
    (``scheduler.pt``, Accelerate's ``scheduler.bin``; read weights_only), else the optimizer's
    (``optimizer.pt`` / ``.bin``); both are saved after the scheduler step of step N, so this is
    the lr of step N + 1, the step taken from these weights."""
    base = os.path.basename(os.path.normpath(folder))
    if _is_accelerate_state(folder):
        # Accelerate's save_state: its automatic names count saves (checkpoint_0, checkpoint_1,
        # ...), not steps; a name the user gave (save_state("run/step_100")) is read as usual
        step = None if re.fullmatch(r"checkpoint_\d+", base) else step_from_name(folder)
    else:
        step = step_from_name(folder) if re.search(r"checkpoint", base) else None
    state_path = os.path.join(folder, "trainer_state.json")
    if step is None and os.path.isfile(state_path):
        step = _as_int(_read_json(state_path).get("global_step"))
    lr = None
    sched = _first_file(folder, ("scheduler.pt", "scheduler.bin"))  # Trainer, Accelerate
    if sched is not None:
        try:
            last = _torch_load(sched).get("_last_lr")
            lr = _as_float(last[0]) if isinstance(last, (list, tuple)) and last else None
        except (CheckpointError, AttributeError):
            lr = None
    opt = _first_file(folder, ("optimizer.pt", "optimizer.bin"))
    if lr is None and opt is not None:
        try:
            lr = _optimizer_lr(_torch_load(opt))
        except CheckpointError:
            lr = None
    return step, lr


def _first_file(folder: str, names: Sequence[str]) -> str | None:
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def _is_accelerate_state(folder: str) -> bool:
    """A folder written by Accelerate's ``save_state`` (its RNG states ``random_states_<rank>.pkl``;
    a Trainer checkpoint has ``rng_state*.pth`` and ``trainer_state.json`` instead)."""
    return not os.path.isfile(os.path.join(folder, "trainer_state.json")) and any(
        re.fullmatch(r"random_states_\d+\.pkl", n) for n in _listdir(folder)
    )


def _logs_next_steps_lr(folder: str) -> bool:
    """Whether the Trainer that wrote ``folder`` logged, at step s, the learning rate of step s + 1.

    transformers before 4.51 stepped the scheduler before logging (its issues #28124, #35942);
    4.51 and later log the rate of the step just taken (pull request #36973). The version is the
    ``transformers_version`` of the checkpoint's config.json; without one, the current behaviour
    is assumed."""
    path = os.path.join(folder, "config.json")
    version = _read_json(path).get("transformers_version") if os.path.isfile(path) else None
    m = re.match(r"(\d+)\.(\d+)", str(version or ""))
    return bool(m) and (int(m.group(1)), int(m.group(2))) < (4, 51)


def _lr_from_log_history(run_dirs: Sequence[str], step: int) -> float | None:
    """The learning rate of the step taken from checkpoint ``step``, from the Trainer's log: the
    entry of step + 1 (transformers >= 4.51), or of step itself for older versions, which logged
    the rate after the scheduler's step (see :func:`_logs_next_steps_lr`)."""
    for d in reversed(run_dirs):
        path = os.path.join(d, "trainer_state.json")
        if os.path.isfile(path):
            logged_at = step if _logs_next_steps_lr(d) else step + 1
            for entry in _read_json(path).get("log_history", []):
                if entry.get("step") == logged_at and "learning_rate" in entry:
                    return _as_float(entry["learning_rate"])
    return None


def _folder_checkpoint(folder: str) -> Checkpoint | None:
    """The checkpoint a folder is (DCP, DeepSpeed ``global_stepN``, or Hugging Face
    ``save_pretrained``/Trainer weights), or None."""
    src = f"checkpoint {folder}"
    if _is_deepspeed_tag(folder):
        return _deepspeed_checkpoint(folder)
    config_dir = folder if os.path.isfile(os.path.join(folder, "config.json")) else None
    if os.path.isfile(os.path.join(folder, ".metadata")):
        reader = _DCPReader(folder, src)
        step = _as_int(reader.scalar("step", "global_step"))
        lr = _as_float(reader.scalar("lr", *[k for k in reader.metadata().state_dict_metadata if k.endswith("param_groups.0.lr")][:1]))
        return Checkpoint(folder, "dcp", reader, step if step is not None else step_from_name(folder), lr, config_dir)
    reader = None
    for index in HF_WEIGHT_INDEXES:
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            wm = _read_json(path).get("weight_map")
            if not isinstance(wm, Mapping) or not wm:
                raise CheckpointError(f"{path} has no weight_map")
            files = {k: os.path.join(folder, f) for k, f in wm.items()}
            absent = sorted({f for f in files.values() if not os.path.isfile(f)})
            if absent:
                raise CheckpointError(f"{path} names shard files that do not exist, e.g. {absent[0]}")
            reader = _SafetensorsReader(files, src) if index.startswith("model.safetensors") else _TorchReader(sorted(set(files.values())), src)
            break
    if reader is None:
        for name in HF_WEIGHT_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                reader = _SafetensorsReader(path, src) if name.endswith(".safetensors") else _TorchReader(path, src)
                break
    if reader is None:
        # HF Trainer / Accelerate with FSDP SHARDED_STATE_DICT: the weights are a DCP folder inside
        subs = [d for d in _listdir(folder) if d.startswith("pytorch_model_fsdp") and os.path.isfile(os.path.join(folder, d, ".metadata"))]
        if len(subs) != 1:
            return None
        reader = _DCPReader(os.path.join(folder, subs[0]), src)
    step, lr = _hf_step_lr(folder)
    return Checkpoint(folder, "hf", reader, step, lr, config_dir)


def _deepspeed_checkpoint(folder: str) -> Checkpoint:
    """A DeepSpeed tag folder: step from its name (``global_stepN``; else the ``global_steps`` it
    saved), lr from rank 0's optimizer state (None without deepspeed)."""
    reader = _DeepSpeedReader(folder, f"DeepSpeed checkpoint {folder}")
    step = step_from_name(folder)
    if step is None:
        step = reader.model_step()
    return Checkpoint(folder, "deepspeed", reader, step, reader.optimizer_lr(), None)


def _listdir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        raise CheckpointError(f"cannot list {folder} ({exc})") from exc


def _file_checkpoint(path: str) -> Checkpoint:
    """The checkpoint a single file is: safetensors (ours or any) or a torch.save / Lightning file."""
    name = os.path.basename(path)
    if _HF_SHARD.search(name):
        raise CheckpointError(f"{path} is one shard of a sharded checkpoint; pass the folder that holds it and its index")
    with open(path, "rb") as f:
        head = f.read(8)
    parent = os.path.dirname(os.path.abspath(path))
    parent_step = step_from_name(parent) if re.search(r"checkpoint", os.path.basename(parent)) else None
    if name.endswith(".safetensors") or not (head.startswith(b"PK") or name.endswith(TORCH_SUFFIXES)):
        reader = _SafetensorsReader(path, f"file {path}")
        meta = reader.metadata()  # a clear error if it is not safetensors
        step = _as_int(int(meta["step"])) if meta.get("step", "").isdigit() else None
        lr = float(meta["lr"]) if meta.get("lr") else None
        fmt = "snapshot" if step is not None else "safetensors"
        if step is None:
            step = parent_step if parent_step is not None else step_from_name(name)
        if lr is None and parent_step is not None:
            lr = _hf_step_lr(parent)[1]
        return Checkpoint(path, fmt, reader, step, lr, parent if os.path.isfile(os.path.join(parent, "config.json")) else None)
    reader = _TorchReader(path, f"file {path}")
    reader.info()  # reads the step and lr it holds; a clear error if unreadable
    fmt = "lightning" if reader.lightning else "torch"
    step = reader.step if reader.step is not None else (parent_step if parent_step is not None else step_from_name(name))
    lr = reader.lr
    if lr is None and parent_step is not None:
        lr = _hf_step_lr(parent)[1]
    reader.release()
    return Checkpoint(path, fmt, reader, step, lr, parent if os.path.isfile(os.path.join(parent, "config.json")) else None)


def _child_candidates(folder: str) -> tuple[list[str], list[str]]:
    """(files, folders) in ``folder`` that look like checkpoints, by name only."""
    files, dirs = [], []
    for name in _listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, ".metadata")) or any(
                os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHT_INDEXES + HF_WEIGHT_FILES
            ) or any(d.startswith("pytorch_model_fsdp") for d in _listdir(path)) or (
                _is_deepspeed_tag(path) and not _folder_checkpoint_name_only(folder)  # not beside HF weights
            ):
                dirs.append(path)
        elif name.endswith(TORCH_SUFFIXES + (".safetensors",)) and not name.startswith("."):
            if _NOT_WEIGHTS.match(name) or _DS_STATE_FILE.match(name) or name in HF_WEIGHT_FILES or _HF_SHARD.search(name):
                continue  # optimizer/scheduler/RNG state, or the folder's own HF weights
            files.append(path)
    return files, dirs


def _search_below(folder: str, depth: int = 3) -> list[str]:
    found = []
    for root, dirs, _ in os.walk(folder):
        if root[len(folder):].count(os.sep) >= depth:
            dirs[:] = []
            continue
        dirs.sort()
        for d in list(dirs):
            path = os.path.join(root, d)
            files, subdirs = _child_candidates(path)
            if files or subdirs or _folder_checkpoint_name_only(path):
                found.append(path)
                dirs.remove(d)
    return found


def _folder_checkpoint_name_only(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, ".metadata")) or any(
        os.path.isfile(os.path.join(folder, f)) for f in HF_WEIGHT_INDEXES + HF_WEIGHT_FILES
    ) or _is_deepspeed_tag(folder)


def trajectory_path(reference_path: str) -> str:
    """Where run 1's loss trajectory sits beside x*: ``xstar.safetensors`` -> ``xstar.trajectory.json``."""
    root, ext = os.path.splitext(reference_path)
    return (root if ext == ".safetensors" else reference_path) + ".trajectory.json"


def open_checkpoint(path: str) -> Checkpoint:
    """One checkpoint, any supported format: a file (safetensors, torch.save, Lightning ``.ckpt``)
    or a folder (DCP, Hugging Face ``save_pretrained`` / Trainer ``checkpoint-N``, DeepSpeed
    ``global_stepN``, or the DeepSpeed folder above it: the tag its ``latest`` file names)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isfile(path):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) == ".metadata" or (_DS_STATE_FILE.match(os.path.basename(path)) and _is_deepspeed_tag(parent)):
            return open_checkpoint(parent)
        return _file_checkpoint(path)
    own = _folder_checkpoint(path)
    if own is not None:
        return own
    latest = _deepspeed_latest(path)
    if latest is not None:
        return _deepspeed_checkpoint(latest)
    run = open_run(path)
    if len(run.checkpoints) == 1:
        return run.checkpoints[0]
    raise CheckpointError(
        f"{path} holds {len(run.checkpoints)} checkpoints (steps {[c.step for c in run.checkpoints][:8]}); "
        "pass one of them"
    )


def open_run(path: str) -> Run:
    """Every checkpoint under ``path``, auto-detected, by step.

    ``path`` may be: a directory of our ``step_*.safetensors`` snapshots; a Hugging Face
    Trainer ``output_dir`` (its ``checkpoint-N`` folders; a final model saved at its top is
    added when ``trainer_state.json`` tells its step); one ``save_pretrained`` or
    ``checkpoint-N`` folder (``model.safetensors``, sharded ``model-0000i-of-0000n.safetensors``
    with its index, or ``pytorch_model.bin``); a folder of Lightning ``.ckpt`` or
    ``torch.save`` files; a ``torch.distributed.checkpoint`` folder or a folder of them; or
    one file; a DeepSpeed ``save_checkpoint`` folder (its ``global_stepN`` folders) or one
    ``global_stepN`` folder. When ``path`` holds none of these but exactly one folder below it does (e.g.
    ``lightning_logs/version_0/checkpoints``), that folder is used.

    Steps come from the checkpoint (snapshot metadata, Lightning's ``global_step``, a
    ``step``/``global_step`` entry) or the file/folder name. A ``last.ckpt`` (or other
    ``last*``) duplicating another checkpoint's step is left out (said in ``notes``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isfile(path):
        ck = open_checkpoint(path)
        if ck.step is None:
            ck.step = 0
        return Run(path, [ck])
    notes: list[str] = []
    own = _folder_checkpoint(path)
    files, dirs = _child_candidates(path)
    if own is None and not files and not dirs:
        below = _search_below(path)
        if len(below) == 1:
            run = open_run(below[0])
            run.notes.insert(0, f"using {below[0]}, the only folder below {path} holding checkpoints")
            return run
        if below:
            raise CheckpointError(
                f"{path} holds no checkpoints itself, but several folders below it do: "
                + ", ".join(below[:5]) + ("..." if len(below) > 5 else "") + "; pass one of them"
            )
        raise FileNotFoundError(
            f"no checkpoints in {path} (looked for step_*.safetensors snapshots, Hugging Face checkpoint folders, "
            "*.ckpt/*.pt/*.pth/*.bin/*.safetensors files, torch.distributed.checkpoint folders and DeepSpeed "
            "global_step* folders)"
        )
    cks = [_file_checkpoint(f) for f in files] + [c for c in (_folder_checkpoint(d) for d in dirs) if c is not None]
    if own is not None:
        if not cks:
            cks = [own]
            if own.step is None:
                own.step = 0
        elif own.step is None or own.step in {c.step for c in cks}:
            why = "its step is unknown" if own.step is None else f"step {own.step} is already a checkpoint"
            notes.append(f"left out the weights at the top of {path} ({why}); pass them as --reference if they are the final model")
        else:
            cks.append(own)
    kinds = sorted({c.format for c in cks})
    if len(kinds) > 1:
        # x* recorded by an integration (record_reference: its loss trajectory beside it), in the
        # output folder of the run whose checkpoints these are: a reference, not a path point
        recorded = [c for c in cks if os.path.isfile(c.path) and os.path.isfile(trajectory_path(c.path))]
        if recorded and len({c.format for c in cks if c not in recorded}) == 1:
            cks = [c for c in cks if c not in recorded]
            for c in recorded:
                notes.append(f"left out {c.path}: the x* recorded beside these checkpoints (its loss trajectory "
                             f"{os.path.basename(trajectory_path(c.path))} is beside it); pass it as --reference")
            kinds = sorted({c.format for c in cks})
    if len(kinds) > 1 and not set(kinds) <= {"snapshot", "safetensors"}:
        examples = ", ".join(f"{k}: {next(c.path for c in cks if c.format == k)}" for k in kinds)
        raise CheckpointError(f"{path} holds checkpoints of several kinds ({examples}); pass the folder or file you mean")
    unknown = [c.path for c in cks if c.step is None]
    if unknown and len(cks) > 1:
        if os.path.isdir(unknown[0]) and _is_accelerate_state(unknown[0]):
            raise CheckpointError(
                f"cannot tell the step of {unknown[0]}: Accelerate's automatic checkpoint names count saves "
                "(checkpoint_0, checkpoint_1, ...), not training steps; save with "
                "accelerator.save_state(f'{run_dir}/step_{step}') so that the folder names the step"
            )
        raise CheckpointError(
            f"cannot tell the step of {unknown[0]}: neither its name nor its contents give one "
            "(name it like step_100.pt, or save 'global_step' / 'step' in it)"
        )
    by_step: dict[int, list[Checkpoint]] = {}
    for c in cks:
        by_step.setdefault(c.step if c.step is not None else 0, []).append(c)
    out = []
    for step, group in sorted(by_step.items()):
        if len(group) > 1:
            keep = [c for c in group if not os.path.basename(c.path).lower().startswith("last")]
            if len(keep) != 1:
                raise CheckpointError(f"two checkpoints have step {step}: {group[0].path} and {group[1].path}")
            for c in group:
                if c is not keep[0]:
                    notes.append(f"left out {c.path}: same step {step} as {keep[0].path}")
            group = keep
        group[0].step = step
        out.append(group[0])
    hf_dirs = [c.path for c in out if c.format == "hf"]
    missing_lr = 0
    for c in out:
        if c.lr is None and c.format == "hf":
            c.lr = _lr_from_log_history(hf_dirs, c.step)
        missing_lr += c.lr is None
    if missing_lr:
        notes.append(f"{missing_lr} of {len(out)} checkpoints do not tell their learning rate (the lr column stays empty)")
    return Run(path, out, notes)


def load_state_dict(path: str) -> dict[str, Tensor]:
    """Every tensor of one checkpoint of any supported format, on the CPU, by key."""
    return open_checkpoint(path).state_dict()
