"""The fused secant-statistics ops and their Python wrappers.

Ops (namespace ``torch.ops.pathgeom``)::

    secant_stats(Tensor[] grads, Tensor[] params, Tensor[] refs, bool per_tensor=False,
                 float weight_decay=0.0) -> Tensor                       # [3] or [T, 3]
    secant_stats_multi(Tensor[] grads, Tensor[] params, Tensor[] refs, int num_grads,
                       bool per_tensor=False, float weight_decay=0.0) -> Tensor  # [K, 3] or [K, T, 3]
    secant_stats_triton(...)   # same as secant_stats_multi, computed by the Triton kernel

``secant_stats_multi`` takes its K gradient lists back to back: ``grads[k * T + i]``.
Each row is (a, b, c) = (<h, x - x*>, ||h||^2, ||x - x*||^2) with h = g + weight_decay * x.

With the extension built, ``secant_stats``/``secant_stats_multi`` run the C++ CPU and CUDA
kernels; without it, the same ops are registered here with the pure-torch implementation so
that code calling ``torch.ops.pathgeom`` keeps working.
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterable, KeysView, Mapping, ValuesView
from typing import Any

import torch

from . import _ext, distributed, reference, triton_kernels

Tensor = torch.Tensor
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_SINGLE_SCHEMA = "(Tensor[] grads, Tensor[] params, Tensor[] refs, bool per_tensor=False, float weight_decay=0.0) -> Tensor"
_MULTI_SCHEMA = (
    "(Tensor[] grads, Tensor[] params, Tensor[] refs, int num_grads, bool per_tensor=False, "
    "float weight_decay=0.0) -> Tensor"
)


def _shape_rows(rows: Tensor, K: int, per_tensor: bool, multi: bool) -> Tensor:
    """[T or 1, K, 3] rows -> the op's output shape (same rule as shape_output in C++)."""
    if per_tensor:
        return rows.permute(1, 0, 2).contiguous() if multi else rows[:, 0].contiguous()
    return rows[0].contiguous() if multi else rows[0, 0].contiguous()


def _out_shape(T: int, K: int, per_tensor: bool, multi: bool) -> tuple[int, ...]:
    if per_tensor:
        return (K, T, 3) if multi else (T, 3)
    return (K, 3) if multi else (3,)


# --------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------

if not _ext.available():
    # No compiled library: register the pure-torch implementation under the same schemas.
    _lib = torch.library.Library("pathgeom", "DEF")
    _lib.define("secant_stats" + _SINGLE_SCHEMA)
    _lib.define("secant_stats_multi" + _MULTI_SCHEMA)

    def _torch_single(grads, params, refs, per_tensor=False, weight_decay=0.0):
        _validate("secant_stats", grads, params, refs, 1)
        rows = reference.secant_rows(grads, params, refs, 1, per_tensor=per_tensor, weight_decay=weight_decay)
        return _shape_rows(rows, 1, per_tensor, False)

    def _torch_multi(grads, params, refs, num_grads, per_tensor=False, weight_decay=0.0):
        _validate("secant_stats_multi", grads, params, refs, num_grads)
        rows = reference.secant_rows(grads, params, refs, num_grads, per_tensor=per_tensor, weight_decay=weight_decay)
        return _shape_rows(rows, num_grads, per_tensor, True)

    _lib.impl("secant_stats", _torch_single, "CompositeExplicitAutograd")
    _lib.impl("secant_stats_multi", _torch_multi, "CompositeExplicitAutograd")


@torch.library.register_fake("pathgeom::secant_stats")
def _fake_single(grads, params, refs, per_tensor=False, weight_decay=0.0):
    return params[0].new_empty(_out_shape(len(params), 1, per_tensor, False), dtype=torch.float64)


@torch.library.register_fake("pathgeom::secant_stats_multi")
def _fake_multi(grads, params, refs, num_grads, per_tensor=False, weight_decay=0.0):
    return params[0].new_empty(_out_shape(len(params), num_grads, per_tensor, True), dtype=torch.float64)


@torch.library.custom_op("pathgeom::secant_stats_triton", mutates_args=())
def _triton_op(
    grads: list[Tensor], params: list[Tensor], refs: list[Tensor], num_grads: int, per_tensor: bool, weight_decay: float
) -> Tensor:
    _validate("secant_stats", grads, params, refs, num_grads)
    rows = triton_kernels.triton_rows(grads, params, refs, num_grads, per_tensor, weight_decay)
    return _shape_rows(rows, num_grads, per_tensor, True)


@_triton_op.register_fake
def _(grads, params, refs, num_grads, per_tensor, weight_decay):
    return params[0].new_empty(_out_shape(len(params), num_grads, per_tensor, True), dtype=torch.float64)


# --------------------------------------------------------------------------------------
# Validation (torch and Triton backends; the C++ kernels check the same in C++)
# --------------------------------------------------------------------------------------


def _describe(t: Tensor) -> str:
    return f"shape {list(t.shape)}, {t.dtype}, {t.device}"


def _grad_name(j: int, T: int, K: int) -> str:
    return f"grads[{j}]" if K == 1 else f"grads[{j // T}][{j % T}]"


def _validate(op: str, grads, params, refs, K: int) -> None:
    """Raise ValueError/TypeError naming the offending index, shapes and dtypes."""
    T = len(params)
    if K < 1:
        raise ValueError(f"{op}: num_grads must be >= 1, got {K}")
    if len(refs) != T or len(grads) != K * T:
        extra = f" (expected num_grads * len(params) = {K * T})" if K > 1 else ""
        raise ValueError(
            f"{op}: the lists must have matching lengths, got {len(grads)} grads{extra}, "
            f"{len(params)} params and {len(refs)} refs"
        )
    if T == 0:
        return
    names = [(params, "params[{}]"), (refs, "refs[{}]")]
    device = None
    for lst, fmt in names + [(grads, None)]:
        for j, t in enumerate(lst):
            name = _grad_name(j, T, K) if fmt is None else fmt.format(j)
            if t is None:
                raise ValueError(f"{op}: {name} is None (a parameter without .grad? see pathgeom_fast.grads_of)")
            if not isinstance(t, Tensor):
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
            name = _grad_name(k * T + i, T, K)
            if g.numel() != n:
                raise ValueError(
                    f"{op}: index {i}: {name} has {_describe(g)} ({g.numel()} elements) but "
                    f"params[{i}] has {_describe(params[i])} ({n} elements); numel must match"
                )
            if g.dtype != grads[i].dtype:
                raise TypeError(
                    f"{op}: index {i}: {name} has {_describe(g)} but {_grad_name(i, T, K)} has "
                    f"{_describe(grads[i])}; the K gradients of one tensor must share a dtype"
                )


# --------------------------------------------------------------------------------------
# Input normalisation and backend choice
# --------------------------------------------------------------------------------------


def as_tensor_list(obj: Any, name: str) -> list[Tensor]:
    """A list from a list, tuple, generator, nn.Module (its parameters) or a single tensor.

    Elements are not inspected here (that costs a Python loop per call); the kernels check
    them, and a failing call is explained by :func:`_validate`. Mappings and their views are
    refused: their order is the mapping's, not the parameters' (see :func:`_refs_by_name`).
    """
    if type(obj) is list:
        return obj
    if isinstance(obj, torch.nn.Module):
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
    """refs given as a mapping {parameter name: tensor} with params a module: the tensors in the
    order of ``params.parameters()``, after the checks of
    :func:`pathgeom_fast.checkpoints.check_state_against_model` (missing keys, keys the module
    does not have, shapes, non-float dtypes; a warning for lower precision). Other refs: as given."""
    if not (isinstance(refs, Mapping) and isinstance(params, torch.nn.Module)):
        return refs
    from .checkpoints import CheckpointError, CheckpointKeyError, check_state_against_model

    source = f"(the mapping passed as refs to pg.{op})"
    for k, t in refs.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"reference {source}: {k!r} is a {type(t).__name__}, not a tensor")
    check_state_against_model(params, {k: (t.dtype, t.shape) for k, t in refs.items()}, source)
    named = list(params.named_parameters())
    frozen = [n for n, _ in named if n not in refs]  # the trainable ones were checked above
    if frozen:
        raise CheckpointKeyError(
            f"reference {source} lacks {frozen[0]!r}, a parameter of the module that does not train; "
            "params=module means every parameter: pass lists of the trainable parameters instead"
        )
    return [refs[n] for n, _ in named]


def grads_of(module_or_params: Any) -> list[Tensor]:
    """The ``.grad`` of every parameter, in ``parameters()`` order; raises if one is missing."""
    if isinstance(module_or_params, torch.nn.Module):
        named = list(module_or_params.named_parameters())
    else:
        named = [(str(j), p) for j, p in enumerate(module_or_params)]
    out = []
    for n, p in named:
        if p.grad is None:
            raise ValueError(
                f"parameter {n!r} (shape {list(p.shape)}) has no .grad; call backward() first, or "
                "pass the parameters that do have gradients"
            )
        out.append(p.grad)
    return out


def _choose(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if _ext.available() and _ext.WITH_CUDA:
                return "cuda"
            return "triton" if triton_kernels.available() else "torch"
        if device.type == "cpu" and _ext.available():
            return "cpu"
        return "torch"
    if backend in ("cpu", "cuda"):
        if not _ext.available():
            raise RuntimeError(f"backend={backend!r} needs the compiled extension: {_ext.load_error()}")
        if backend == "cuda" and not _ext.WITH_CUDA:
            raise RuntimeError(
                "backend='cuda': pathgeom_fast._C was built without the CUDA kernels "
                "(rebuild with PATHGEOM_BUILD_CUDA=1 and nvcc available)"
            )
        if device.type != backend:
            raise ValueError(f"backend={backend!r} got tensors on {device}")
    return backend


def _run(op: str, grads, params, refs, K: int, per_tensor: bool, weight_decay: float, backend: str) -> Tensor:
    T = len(params)
    multi = op == "secant_stats_multi"
    if T == 0:
        _validate(op, grads, params, refs, K)
        return torch.zeros(_out_shape(0, K, per_tensor, multi), dtype=torch.float64)
    device = params[0].device
    which = _choose(backend, device)
    if which in ("cpu", "cuda"):
        if torch.compiler.is_compiling():  # traced: the registered op, with its fake kernel
            fn = torch.ops.pathgeom.secant_stats_multi if multi else torch.ops.pathgeom.secant_stats
            args = (grads, params, refs, K) if multi else (grads, params, refs)
            return fn(*args, per_tensor=per_tensor, weight_decay=weight_decay)
        # eager: the dispatcher-free entry point (same kernels, same checks)
        return _ext._C.secant_stats_direct(grads, params, refs, K, per_tensor, weight_decay, multi)
    _validate(op, grads, params, refs, K)
    if which == "triton":
        out = torch.ops.pathgeom.secant_stats_triton(grads, params, refs, K, per_tensor, weight_decay)
        return out if multi else out[0]
    rows = reference.secant_rows(grads, params, refs, K, per_tensor=per_tensor, weight_decay=weight_decay)
    return _shape_rows(rows, K, per_tensor, multi)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def secant_stats(
    grads,
    params,
    refs,
    *,
    per_tensor: bool = False,
    weight_decay: float = 0.0,
    backend: str = "auto",
    group=None,
) -> Tensor:
    """(a, b, c) = (<h, x - x*>, ||h||^2, ||x - x*||^2) in one fused pass, h = g + weight_decay * x.

    Args:
        grads, params, refs: equal-length sequences (list, tuple, generator, or an
            ``nn.Module`` for its parameters) of float16/bfloat16/float32/float64 tensors on one
            device; triple i must have equal numel. DTensors are reduced over their mesh.
            When ``params`` is a module, ``refs`` may be a mapping {parameter name: tensor}
            (a state dict, ``safetensors.torch.load_file(...)``), matched by name and checked
            (missing or unknown keys, shapes, dtypes raise naming the key). Mapping views
            (``d.values()``) are refused: their order is not the parameters' order.
        per_tensor: return one row per tensor, shape [T, 3], instead of the total [3].
        weight_decay: measure g + weight_decay * x (coupled L2 weight decay) without a copy.
        backend: "auto", "cpu" (C++ kernel), "cuda" (CUDA kernel), "triton", or "torch".
        group: a process group over which plain local shards are summed (ZeRO-style shards).

    Returns:
        float64 tensor on the inputs' device; see ``pathgeom_fast.geometry`` for RSI, EB, ...
    """
    refs = as_tensor_list(_refs_by_name(refs, params, "secant_stats"), "refs")
    grads = as_tensor_list(grads, "grads")
    params = as_tensor_list(params, "params")
    return distributed.dispatch(
        "secant_stats", [grads], params, refs, per_tensor, float(weight_decay), backend, group, _run
    )


def secant_stats_multi(
    grads_lists,
    params,
    refs,
    *,
    per_tensor: bool = False,
    weight_decay: float = 0.0,
    backend: str = "auto",
    group=None,
) -> Tensor:
    """Stats of K gradient lists sharing params and refs, which are read once per chunk.

    ``grads_lists`` is a sequence of K gradient lists. Returns float64 [K, 3], or [K, T, 3]
    with ``per_tensor=True``. Other arguments as in :func:`secant_stats`.
    """
    if isinstance(grads_lists, Tensor) or not isinstance(grads_lists, Iterable):
        raise TypeError(f"grads_lists must be a sequence of K gradient lists, got {type(grads_lists).__name__}")
    lists = [as_tensor_list(g, f"grads_lists[{k}]") for k, g in enumerate(grads_lists)]
    if not lists:
        raise ValueError("secant_stats_multi: grads_lists is empty; pass at least one gradient list")
    refs = as_tensor_list(_refs_by_name(refs, params, "secant_stats_multi"), "refs")
    params = as_tensor_list(params, "params")
    for k, g in enumerate(lists):
        if len(g) != len(params):
            raise ValueError(
                f"secant_stats_multi: grads_lists[{k}] has {len(g)} tensors but params has {len(params)}"
            )
    return distributed.dispatch(
        "secant_stats_multi", lists, params, refs, per_tensor, float(weight_decay), backend, group, _run
    )


def numel_of(params) -> int:
    """D, the number of scalar parameters (the global size for DTensors)."""
    return sum(int(math.prod(p.shape)) for p in as_tensor_list(params, "params"))
