"""Which files and folders of a run's directory look like checkpoints, by their names (what
:func:`.reference.open_run` then opens), and where run 1's loss trajectory sits beside x*.
"""

from __future__ import annotations

import os
import re

from .deepspeed import _DS_STATE_FILE, _is_deepspeed_tag
from .hf import _HF_SHARD, HF_WEIGHT_FILES, HF_WEIGHT_INDEXES
from .reader import _listdir
from .torch_save import TORCH_SUFFIXES

# files in checkpoint folders that hold no model weights (HF Trainer, Accelerate, Lightning)
_NOT_WEIGHTS = re.compile(r"^(optimizer|scheduler|scaler|rng_state|random_states|training_args|sampler)", re.I)


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
