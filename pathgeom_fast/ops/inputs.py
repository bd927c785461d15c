"""Input checks and normalisation of the public ops: the lists they accept (lists, tuples,
generators, modules, a state dict matched by name), the validation that names the offending
entry (torch and Triton backends; the C++ kernels check the same in C++), and the checks of
lengths, ``weight_decay`` and the K vector lists.
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterable, KeysView, Mapping, ValuesView
from typing import Any

import torch

from . import shapes as _shapes

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# Validation (torch and Triton backends; the C++ kernels check the same in C++)
# --------------------------------------------------------------------------------------


def _describe(t: Tensor) -> str:
    return f"shape {list(t.shape)}, {t.dtype}, {t.device}"


def _is_tensor(obj) -> bool:
    """A torch.Tensor (or subclass) by its real type: isinstance also accepts objects that
    only claim the class through ``__class__`` (a mock with ``spec=torch.Tensor``, a proxy),
    which the kernels cannot read."""
    return issubclass(type(obj), Tensor)


def _validate(op: str, grads, params, refs, K: int) -> None:
    """Raise ValueError/TypeError naming the offending index, shapes and dtypes.

    ``grads`` holds the K vector lists back to back (the gradients of the secant ops, the
    vectors of ``secant_gram``, named ``vecs[k][i]`` in its messages).
    """
    T = len(params)
    gram = op == _shapes.GRAM
    lname, count, noun = ("vecs", "num_vecs", "vectors") if gram else ("grads", "num_grads", "gradients")
    if gram and not 1 <= K <= _shapes.GRAM_MAX_VECS:
        raise ValueError(f"{op}: num_vecs must be between 1 and {_shapes.GRAM_MAX_VECS}, got {K}")
    if K < 1:
        raise ValueError(f"{op}: {count} must be >= 1, got {K}")
    if len(refs) != T or len(grads) != K * T:
        extra = f" (expected {count} * len(params) = {K * T})" if K > 1 else ""
        raise ValueError(
            f"{op}: the lists must have matching lengths, got {len(grads)} {lname}{extra}, "
            f"{len(params)} params and {len(refs)} refs"
        )
    if T == 0:
        return
    names = [(params, "params[{}]"), (refs, "refs[{}]")]
    device = None
    for lst, fmt in names + [(grads, None)]:
        for j, t in enumerate(lst):
            name = _shapes.entry_name(op, j, T, K) if fmt is None else fmt.format(j)
            if t is None:
                hint = " (a parameter without .grad? see pathgeom_fast.grads_of)" if fmt is None and not gram else ""
                raise ValueError(f"{op}: {name} is None{hint}")
            if not _is_tensor(t):
                raise TypeError(f"{op}: {name} is a {type(t).__name__}, not a torch.Tensor")
            if t.layout != torch.strided:
                raise ValueError(f"{op}: {name} has layout {t.layout}; only dense (strided) tensors are supported")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{op}: {name} has {_describe(t)}; expected float16, bfloat16, float32 or float64")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(
                    f"{op}: {name} is on {t.device} but params[0] is on {device}; all tensors must be on one device"
                )
    for i in range(T):
        n = params[i].numel()
        if refs[i].numel() != n:
            raise ValueError(
                f"{op}: index {i}: refs[{i}] has {_describe(refs[i])} ({refs[i].numel()} elements) but "
                f"params[{i}] has {_describe(params[i])} ({n} elements); numel must match"
            )
        for k in range(K):
            g = grads[k * T + i]
            name = _shapes.entry_name(op, k * T + i, T, K)
            if g.numel() != n:
                raise ValueError(
                    f"{op}: index {i}: {name} has {_describe(g)} ({g.numel()} elements) but "
                    f"params[{i}] has {_describe(params[i])} ({n} elements); numel must match"
                )
            if g.dtype != grads[i].dtype:
                raise TypeError(
                    f"{op}: index {i}: {name} has {_describe(g)} but {_shapes.entry_name(op, i, T, K)} has "
                    f"{_describe(grads[i])}; the K {noun} of one tensor must share a dtype"
                )


# --------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------


def as_tensor_list(obj: Any, name: str) -> list[Tensor]:
    """A list from a list, tuple, generator, nn.Module or a single tensor. A module given as
    ``params`` stands for its trainable parameters (``requires_grad``, ``parameters()`` order),
    as :func:`grads_of` and the snapshots take them; as ``refs``, for all its parameters; as
    gradients, it is refused.

    Elements are not inspected here (that costs a Python loop per call); the kernels check
    them, and a failing call is explained by :func:`_validate`. Mappings and their views are
    refused: their order is the mapping's, not the parameters' (see :func:`_refs_by_name`).
    """
    if type(obj) is list:
        return obj
    if isinstance(obj, torch.nn.Module):
        if name.startswith(("grads", "vecs")):
            raise TypeError(
                f"{name} is a module ({type(obj).__name__}): its parameters are not gradients; pass "
                "pathgeom_fast.grads_of(model)"
            )
        if name == "params":  # the parameters that train, as grads_of and our snapshots take them
            from ..checkpoints.keys import trainable

            return [p for _, p in trainable(obj)]
        return list(obj.parameters())
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        raise TypeError(
            f"{name} is a {type(obj).__name__}; a mapping is matched by name only when it is passed as refs "
            "with the module as params (secant_stats(grads, model, state)); otherwise pass a list of tensors "
            "in the order of params"
        )
    if isinstance(obj, (KeysView, ValuesView, ItemsView)):
        raise TypeError(
            f"{name} is a {type(obj).__name__} (a view of a mapping): its order is the mapping's, not the "
            "parameters' (a safetensors file loads in sorted-key order, e.g. 0, 1, 10, 11, 2, ...), which would "
            "silently pair tensors of different layers. Pass the mapping itself as refs with the module as "
            "params (secant_stats(grads, model, state)), or a list in the order of the parameters"
        )
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise TypeError(f"{name} must be a sequence of tensors or an nn.Module, got {type(obj).__name__}")
    return list(obj)


def _refs_by_name(refs: Any, params: Any, op: str) -> Any:
    """refs given as a mapping {parameter name: tensor} (or a module, for its named parameters)
    with params a module: the tensors of its trainable parameters in ``parameters()`` order,
    after the checks of :func:`pathgeom_fast.checkpoints.check_state_against_model` (missing
    keys, keys the module does not have, shapes, non-float dtypes; a warning for lower
    precision). Keys of frozen parameters and buffers are allowed and not used. Other refs: as
    given."""
    if isinstance(refs, torch.nn.Module) and isinstance(params, torch.nn.Module):
        refs = dict(refs.named_parameters())
    if not (isinstance(refs, Mapping) and isinstance(params, torch.nn.Module)):
        return refs
    from ..checkpoints.keys import check_state_against_model, trainable
    from ..checkpoints.reader import CheckpointError

    source = f"(the mapping passed as refs to pg.{op})"
    for k, t in refs.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"reference {source}: {k!r} is a {type(t).__name__}, not a tensor")
    check_state_against_model(params, {k: (t.dtype, t.shape) for k, t in refs.items()}, source)
    return [refs[n] for n, _ in trainable(params)]


def _check_lengths(op: str, lists, params, refs) -> None:
    """The length message of :func:`_validate`, before anything reads the first tensors."""
    T = len(params)
    if len(refs) != T or any(len(v) != T for v in lists):
        _validate(op, [t for v in lists for t in v], params, refs, len(lists))


def _weight_decay(value, op: str) -> float:
    wd = float(value)
    if not math.isfinite(wd):
        raise ValueError(f"{op}: weight_decay must be a finite number, got {value!r}")
    return wd


def _vector_lists(op: str, arg: str, noun: str, value, params: list) -> list[list[Tensor]]:
    """K lists of tensors, each as long as ``params``, from a sequence of sequences."""
    if isinstance(value, Tensor) or not isinstance(value, Iterable):
        raise TypeError(f"{arg} must be a sequence of K {noun} lists, got {type(value).__name__}")
    value = list(value)
    # a bare tensor stands for a one-tensor list; with several parameters, tensors side by side
    # are one gradient list passed unwrapped
    if len(params) != 1 and value and all(isinstance(v, Tensor) for v in value):
        raise TypeError(
            f"{op}: {arg} is a list of {len(value)} tensors; it must be a sequence of K {noun} lists, one tensor "
            "per parameter each (one list: wrap it, e.g. [pg.grads_of(model)])"
        )
    lists = [as_tensor_list(v, f"{arg}[{k}]") for k, v in enumerate(value)]
    if not lists:
        raise ValueError(f"{op}: {arg} is empty; pass at least one {noun} list")
    for k, v in enumerate(lists):
        if len(v) != len(params):
            raise ValueError(f"{op}: {arg}[{k}] has {len(v)} tensors but params has {len(params)}")
    return lists
