"""Our snapshots: safetensors files ``DIR/step_00000120.safetensors`` holding the trainable
parameters by name, with ``step`` and ``lr`` in the metadata (never unpickled); their writer
(:func:`save_snapshot`, :class:`SnapshotRecorder`), their readers, and the reader of any
safetensors file or sharded set (:class:`_SafetensorsReader`, also used for Hugging Face weights).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch

from .keys import trainable
from .reader import CheckpointError, _as_dtype, _is_dtensor, _Reader

Tensor = torch.Tensor


SNAPSHOT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


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


def _replicated_non_writer(model: torch.nn.Module) -> bool:
    """True on ranks other than 0 of a process group whose parameters are whole copies (DDP):
    there one rank writes. Sharded (DTensor) parameters need every rank (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    from ..ops.distributed import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        return False
    return dist.get_rank() != 0


class SnapshotRecorder:
    """Save the model every ``every`` steps (or at the steps in ``steps``), and at the end.

    ``maybe_save(step, lr)`` is called at the start of optimizer step ``step`` (it saves x_step,
    the point the step starts from); ``finish(T, lr)`` saves the final point x_T after the last
    step (always, so that a later ``pathgeom analyze`` takes the true end of training as x*).
    In a process group of whole-model replicas (DDP) rank 0 alone writes; sharded (DTensor)
    models are gathered and written by rank 0 (every rank must call).
    """

    def __init__(self, model: torch.nn.Module, directory: str, every: int = 0, steps: Iterable[int] | None = None):
        if every <= 0 and steps is None:
            raise ValueError("SnapshotRecorder needs every > 0 or an explicit list of steps")
        self.model, self.dir, self.every = model, directory, every
        self.steps = set(steps or [])
        self.saved: list[int] = []
        os.makedirs(directory, exist_ok=True)

    def maybe_save(self, step: int, lr: float | None = None, force: bool = False) -> str | None:
        if force or step in self.steps or (self.every and step % self.every == 0):
            path = snapshot_path(self.dir, step)
            if not _replicated_non_writer(self.model):
                save_snapshot(self.model, path, step, lr)
            self.saved.append(step)
            return path
        return None

    def finish(self, step: int, lr: float | None = None) -> str:
        """Save the final point as ``step`` (the number of optimizer steps taken), unless it was
        just saved; returns its path."""
        if self.saved and self.saved[-1] == step:
            return snapshot_path(self.dir, step)
        return self.maybe_save(step, lr, force=True)
