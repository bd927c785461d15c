"""The reference point x* and checkpoints of any supported format.

* :class:`Reference`: x* aligned parameter by parameter with a model, checked when it is
  built (missing keys, keys the model does not have, shapes, non-float dtypes, lower
  precision than the parameters), so that a bad reference fails before any training step
  with one message naming the file and the key;
* :func:`open_checkpoint` opens one checkpoint, auto-detected (our safetensors snapshots,
  Hugging Face folders, Lightning ``.ckpt`` and ``torch.save`` files, ``torch.distributed.checkpoint``
  folders, DeepSpeed ZeRO folders); :func:`open_run` lists a run's checkpoints with step, lr,
  path and reader (:class:`Checkpoint`, :class:`Run`).

These share one module because they call each other: ``Reference.from_file`` opens a
checkpoint, ``Checkpoint.reference`` builds a ``Reference``, ``open_checkpoint`` lists the run
below a folder that is not itself a checkpoint, and ``open_run`` opens a single file with
``open_checkpoint``. The format modules (:mod:`.snapshots`, :mod:`.torch_save`, :mod:`.dcp`,
:mod:`.deepspeed`, :mod:`.hf`) return readers plus (step, lr) and never import this one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from .dcp import _dcp_folder
from .deepspeed import (
    _DS_STATE_FILE,
    _deepspeed_folder,
    _deepspeed_latest,
    _is_deepspeed_tag,
)
from .discovery import _child_candidates, _search_below, trajectory_path
from .hf import (
    _HF_SHARD,
    _hf_step_lr,
    _hf_weights_reader,
    _is_accelerate_state,
    _lr_from_log_history,
)
from .keys import KeyMatch, check_state_against_model, match_keys, trainable
from .reader import (
    FLOAT_DTYPES,
    CheckpointError,
    _as_dtype,
    _as_int,
    _empty_like,
    _is_dtensor,
    _Reader,
    step_from_name,
)
from .snapshots import _SafetensorsReader
from .torch_save import TORCH_SUFFIXES, _TorchReader

Tensor = torch.Tensor


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


def _folder_checkpoint(folder: str) -> Checkpoint | None:
    """The checkpoint a folder is (DCP, DeepSpeed ``global_stepN``, or Hugging Face
    ``save_pretrained``/Trainer weights), or None."""
    src = f"checkpoint {folder}"
    if _is_deepspeed_tag(folder):
        return _deepspeed_checkpoint(folder)
    config_dir = folder if os.path.isfile(os.path.join(folder, "config.json")) else None
    if os.path.isfile(os.path.join(folder, ".metadata")):
        reader, step, lr = _dcp_folder(folder, src)
        return Checkpoint(folder, "dcp", reader, step, lr, config_dir)
    reader = _hf_weights_reader(folder, src)
    if reader is None:
        return None
    step, lr = _hf_step_lr(folder)
    return Checkpoint(folder, "hf", reader, step, lr, config_dir)


def _deepspeed_checkpoint(folder: str) -> Checkpoint:
    """A DeepSpeed tag folder: step from its name (``global_stepN``; else the ``global_steps`` it
    saved), lr from rank 0's optimizer state (None without deepspeed)."""
    reader, step, lr = _deepspeed_folder(folder)
    return Checkpoint(folder, "deepspeed", reader, step, lr, None)


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
