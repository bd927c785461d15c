"""Batches as users have them, and the default loss.

Batches are tuples/lists ``(inputs, targets, ...)`` or mappings (Hugging Face style:
``{"input_ids": ..., "labels": ...}``), of tensors, possibly nested.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            raise ValueError("batch_size: a 0-dimensional tensor is not a batch")
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, (Tensor, Mapping, list, tuple)):
                return batch_size(v)
        raise ValueError(f"batch_size: the batch mapping has no tensors (keys {list(batch)[:5]})")
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    raise TypeError(f"batch_size: cannot tell the size of a batch of type {type(batch).__name__}")


def _first_shape(batch: Any) -> list[int] | None:
    if isinstance(batch, Tensor):
        return list(batch.shape)
    for v in batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ():
        if isinstance(v, (Tensor, Mapping, list, tuple)):
            return _first_shape(v)
    return None


def check_not_empty(batches, what: str) -> None:
    """ValueError naming the batch (``what`` and its index) when one holds 0 samples: a mean
    gradient over it is undefined. Batches whose size cannot be told are left to the loss."""
    for i, b in enumerate(batches or ()):
        try:
            n = batch_size(b)
        except (TypeError, ValueError):
            continue
        if n == 0:
            raise ValueError(
                f"{what} {i} has 0 samples (its first tensor has shape {_first_shape(b)}): a gradient over no "
                "samples is undefined; leave the empty batch out"
            )


def to_device(batch: Any, device) -> Any:
    """The batch with every tensor moved to ``device`` (structure kept)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def _loss_of_output(out: Any) -> Tensor | None:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def _logits_of_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"default loss: the model returned a {type(out).__name__} with neither .loss nor logits; "
        "pass a loss function (loss_fn(model, batch) -> scalar tensor)"
    )


def default_loss(model: torch.nn.Module, batch: Any) -> Tensor:
    """The loss users' models already define, else cross-entropy.

    * a mapping batch (Hugging Face style) is passed as keyword arguments,
      ``model(**batch)``, and the output's ``.loss`` is used (HF models compute it when the
      batch has ``labels``);
    * a tuple/list ``(inputs, targets)``: ``model(inputs)``; its ``.loss`` if it has one,
      else cross-entropy of the logits (flattened over all but the last dimension) against
      ``targets``.
    """
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = _loss_of_output(out)
        if loss is None:
            raise ValueError(
                f"default loss: the model's output for a dict batch (keys {sorted(batch)}) has no .loss; "
                "include the labels in the batch or pass a loss function"
            )
        return loss
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
        out = model(inputs)
        loss = _loss_of_output(out)
        if loss is not None:
            return loss
        logits = _logits_of_output(out)
        if logits.ndim > 2:
            logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        return F.cross_entropy(logits, targets)
    raise TypeError(
        f"default loss: a batch must be a dict (keyword arguments of the model) or (inputs, targets), "
        f"got {type(batch).__name__}; pass a loss function (loss_fn(model, batch) -> scalar tensor)"
    )


def full_batch_list(full_batch) -> list | None:
    """The batches of a full-batch gradient as a list, or None; an empty one is refused."""
    if full_batch is None:
        return None
    batches = list(full_batch)
    if not batches:
        raise ValueError("full_batch is empty; pass the batches covering the training set, or None")
    check_not_empty(batches, "full_batch batch")
    return batches
