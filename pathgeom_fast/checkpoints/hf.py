"""Hugging Face and Accelerate folders: ``save_pretrained`` weights (single or sharded
safetensors, ``pytorch_model.bin``, FSDP's sharded DCP folder inside), Trainer ``checkpoint-N``
and Accelerate ``save_state`` folders, and their step and lr (``trainer_state.json``, the
scheduler and optimizer states, the Trainer's log history).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from .dcp import _DCPReader
from .reader import (
    CheckpointError,
    _as_float,
    _as_int,
    _first_file,
    _listdir,
    _optimizer_lr,
    _read_json,
    _Reader,
    step_from_name,
)
from .snapshots import _SafetensorsReader
from .torch_save import _torch_load, _TorchReader

HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")


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


def _hf_weights_reader(folder: str, src: str) -> _Reader | None:
    """The reader of a Hugging Face folder's weights (``save_pretrained``, Trainer ``checkpoint-N``):
    a safetensors or ``.bin`` index and its shards, one weights file, or FSDP's sharded DCP
    folder inside; None when the folder holds none of these."""
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
    return reader
