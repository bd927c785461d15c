"""``torch.distributed.checkpoint`` folders (``.metadata`` and ``*.distcp``, e.g. FSDP2 runs): each
rank reads only its shards; the metadata pickle is read with an allow-list of DCP's own types.
"""

from __future__ import annotations

import os
import warnings

import torch

from .reader import CheckpointError, _as_float, _as_int, _Reader, step_from_name


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


def _dcp_folder(folder: str, src: str) -> tuple[_DCPReader, int | None, float | None]:
    """(reader, step, lr) of a DCP folder: step and lr from the values saved in it (``step`` /
    ``global_step``, ``lr`` or the first param group's lr), else the step its name tells."""
    reader = _DCPReader(folder, src)
    step = _as_int(reader.scalar("step", "global_step"))
    lr = _as_float(reader.scalar("lr", *[k for k in reader.metadata().state_dict_metadata if k.endswith("param_groups.0.lr")][:1]))
    return reader, step if step is not None else step_from_name(folder), lr
