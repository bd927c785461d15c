"""DeepSpeed ZeRO (stage 1, 2, 3) ``save_checkpoint`` folders: their fp32 master weights, merged
by DeepSpeed's ``zero_to_fp32`` from files read weights_only with an allow-list of DeepSpeed's
plain types.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .reader import (
    CheckpointError,
    _as_int,
    _InMemoryReader,
    _listdir,
    _optimizer_lr,
    step_from_name,
)
from .torch_save import _torch_load

Tensor = torch.Tensor


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


def _deepspeed_folder(folder: str) -> tuple[_DeepSpeedReader, int | None, float | None]:
    """(reader, step, lr) of a DeepSpeed tag folder: step from its name (``global_stepN``; else the
    ``global_steps`` it saved), lr from rank 0's optimizer state (None without deepspeed)."""
    reader = _DeepSpeedReader(folder, f"DeepSpeed checkpoint {folder}")
    step = step_from_name(folder)
    if step is None:
        step = reader.model_step()
    return reader, step, reader.optimizer_lr()
