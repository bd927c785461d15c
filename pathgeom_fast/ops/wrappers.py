"""The fused secant-statistics and Gram ops and their Python wrappers.

Ops (namespace ``torch.ops.pathgeom``)::

    secant_stats(Tensor[] grads, Tensor[] params, Tensor[] refs, bool per_tensor=False,
                 float weight_decay=0.0) -> Tensor                       # [3] or [T, 3]
    secant_stats_multi(Tensor[] grads, Tensor[] params, Tensor[] refs, int num_grads,
                       bool per_tensor=False, float weight_decay=0.0) -> Tensor  # [K, 3] or [K, T, 3]
    secant_stats_triton(...)   # same as secant_stats_multi, computed by the Triton kernel
    secant_gram(Tensor[] vecs, Tensor[] params, Tensor[] refs, int num_vecs,
                bool per_tensor=False) -> Tensor          # [K+1, K+1] or [T, K+1, K+1]
    secant_gram_triton(...)    # same as secant_gram, computed by the Triton kernel

``secant_stats_multi`` takes its K gradient lists back to back: ``grads[k * T + i]``.
Each row is (a, b, c) = (<h, x - x*>, ||h||^2, ||x - x*||^2) with h = g + weight_decay * x.
``secant_gram`` takes its K vector lists the same way and returns the Gram matrix of
(v_0, ..., v_{K-1}, x - x*).

With the extension built, ``secant_stats``/``secant_stats_multi`` run the C++ CPU and CUDA
kernels and ``secant_gram`` the C++ CPU kernel (it has no CUDA kernel: CUDA tensors go to
Triton); without the extension, the same ops are registered here with the pure-torch
implementation so that code calling ``torch.ops.pathgeom`` keeps working.
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterable, KeysView, Mapping, ValuesView
from typing import Any

import torch

from . import distributed, triton_gram
from . import extension as _ext
from . import shapes as _shapes
from . import torch_backend as reference
from . import triton_stats as triton_kernels

Tensor = torch.Tensor
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_SINGLE_SCHEMA = "(Tensor[] grads, Tensor[] params, Tensor[] refs, bool per_tensor=False, float weight_decay=0.0) -> Tensor"
_MULTI_SCHEMA = (
    "(Tensor[] grads, Tensor[] params, Tensor[] refs, int num_grads, bool per_tensor=False, "
    "float weight_decay=0.0) -> Tensor"
)
_GRAM_SCHEMA = "(Tensor[] vecs, Tensor[] params, Tensor[] refs, int num_vecs, bool per_tensor=False) -> Tensor"


def _shape_rows(rows: Tensor, K: int, per_tensor: bool, multi: bool) -> Tensor:
    """[T or 1, K, 3] rows -> the op's output shape (same rule as shape_output in C++)."""
    if per_tensor:
        return rows.permute(1, 0, 2).contiguous() if multi else rows[:, 0].contiguous()
    return rows[0].contiguous() if multi else rows[0, 0].contiguous()


def _gram_out(rows: Tensor, per_tensor: bool) -> Tensor:
    """[T or 1, K+1, K+1] rows -> [T, K+1, K+1] or [K+1, K+1]."""
    return rows if per_tensor else rows[0].contiguous()


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

    _lib.define("secant_gram" + _GRAM_SCHEMA)

    def _torch_gram(vecs, params, refs, num_vecs, per_tensor=False):
        _validate(_shapes.GRAM, vecs, params, refs, num_vecs)
        return _gram_out(reference.gram_rows(vecs, params, refs, num_vecs, per_tensor=per_tensor), per_tensor)

    _lib.impl("secant_stats", _torch_single, "CompositeExplicitAutograd")
    _lib.impl("secant_stats_multi", _torch_multi, "CompositeExplicitAutograd")
    _lib.impl("secant_gram", _torch_gram, "CompositeExplicitAutograd")


def _fake_out(op: str, params, K: int, per_tensor: bool) -> Tensor:
    return params[0].new_empty(_shapes.out_shape(op, len(params), K, per_tensor), dtype=torch.float64)


@torch.library.register_fake("pathgeom::secant_stats")
def _fake_single(grads, params, refs, per_tensor=False, weight_decay=0.0):
    return _fake_out(_shapes.SINGLE, params, 1, per_tensor)


@torch.library.register_fake("pathgeom::secant_stats_multi")
def _fake_multi(grads, params, refs, num_grads, per_tensor=False, weight_decay=0.0):
    return _fake_out(_shapes.MULTI, params, num_grads, per_tensor)


@torch.library.register_fake("pathgeom::secant_gram")
def _fake_gram(vecs, params, refs, num_vecs, per_tensor=False):
    return _fake_out(_shapes.GRAM, params, num_vecs, per_tensor)


def _triton_stats(grads, params, refs, num_grads: int, per_tensor: bool, weight_decay: float) -> Tensor:
    """The Triton secant_stats_multi: the body of the registered op, also called directly in
    eager mode (the dispatcher's boxing of 3 T tensors costs ~1 us each)."""
    if not triton_kernels.checks_inputs():  # else checked in C++ with the tables (same messages)
        _validate("secant_stats", grads, params, refs, num_grads)
    rows = triton_kernels.triton_rows(grads, params, refs, num_grads, per_tensor, weight_decay)
    return _shape_rows(rows, num_grads, per_tensor, True)


@torch.library.custom_op("pathgeom::secant_stats_triton", mutates_args=())
def _triton_op(
    grads: list[Tensor], params: list[Tensor], refs: list[Tensor], num_grads: int, per_tensor: bool, weight_decay: float
) -> Tensor:
    return _triton_stats(grads, params, refs, num_grads, per_tensor, weight_decay)


@_triton_op.register_fake
def _(grads, params, refs, num_grads, per_tensor, weight_decay):
    return _fake_out(_shapes.MULTI, params, num_grads, per_tensor)


def _triton_gram(vecs, params, refs, num_vecs: int, per_tensor: bool) -> Tensor:
    """The Triton secant_gram: the body of the registered op, also called directly in eager mode."""
    if not triton_kernels.checks_inputs():
        _validate(_shapes.GRAM, vecs, params, refs, num_vecs)
    return _gram_out(triton_gram.gram_rows(vecs, params, refs, num_vecs, per_tensor), per_tensor)


@torch.library.custom_op("pathgeom::secant_gram_triton", mutates_args=())
def _triton_gram_op(vecs: list[Tensor], params: list[Tensor], refs: list[Tensor], num_vecs: int, per_tensor: bool) -> Tensor:
    return _triton_gram(vecs, params, refs, num_vecs, per_tensor)


@_triton_gram_op.register_fake
def _(vecs, params, refs, num_vecs, per_tensor):
    return _fake_out(_shapes.GRAM, params, num_vecs, per_tensor)


# --------------------------------------------------------------------------------------
# Autograd: the statistics are measurements, not differentiable functions of the inputs.
# Every op registers an autograd kernel that marks its output non-differentiable (so that
# inputs with requires_grad, e.g. parameters inside torch.compile, neither warn about a
# missing autograd kernel nor build a graph through the op); a loss that uses the result
# back-propagates through its other terms only.
# --------------------------------------------------------------------------------------


def _mark_non_differentiable(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output)


def _no_backward(ctx, grad):
    raise RuntimeError(
        "the pathgeom ops are not differentiable: their output is marked non-differentiable, so no "
        "gradient flows through it"
    )


for _op_name in ("secant_stats", "secant_stats_multi", "secant_gram", "secant_stats_triton", "secant_gram_triton"):
    torch.library.register_autograd(
        f"pathgeom::{_op_name}", _no_backward, setup_context=_mark_non_differentiable
    )


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
# Input normalisation and backend choice
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
            from ..checkpoints.core import trainable

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
    from ..checkpoints.core import CheckpointError, check_state_against_model, trainable

    source = f"(the mapping passed as refs to pg.{op})"
    for k, t in refs.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"reference {source}: {k!r} is a {type(t).__name__}, not a tensor")
    check_state_against_model(params, {k: (t.dtype, t.shape) for k, t in refs.items()}, source)
    return [refs[n] for n, _ in trainable(params)]


def grads_of(module_or_params: Any) -> list[Tensor]:
    """The ``.grad`` of every trainable parameter of a module (``requires_grad``, in
    ``parameters()`` order: the order of ``params=module``), or of every tensor of a list;
    raises naming the first one without a gradient."""
    if isinstance(module_or_params, torch.nn.Module):
        from ..checkpoints.core import trainable

        named = trainable(module_or_params)
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


def _choose_gram(backend: str, device: torch.device) -> str:
    """Backend of secant_gram: as _choose, but with no CUDA kernel (CUDA tensors go to Triton)."""
    if backend == "cuda":
        raise ValueError(
            "secant_gram has no CUDA kernel (backend='cuda'); use backend='triton', or 'auto', which "
            "runs the Triton kernel on CUDA tensors"
        )
    if backend == "auto" and device.type == "cuda":
        return "triton" if triton_kernels.available() else "torch"
    return _choose(backend, device)


def _explained(op: str, lists, params, refs, K: int, fn, *args) -> Tensor:
    """fn(lists, params, refs, K, *args), a registered Triton op, which checks its inputs. The
    dispatcher parses the arguments first and rejects a None or non-tensor entry with a message
    that names no index: then :func:`_validate` names it."""
    try:
        return fn(lists, params, refs, K, *args)
    except (TypeError, RuntimeError):
        _validate(op, lists, params, refs, K)
        raise


def _run(op: str, grads, params, refs, K: int, per_tensor: bool, weight_decay: float, backend: str) -> Tensor:
    """Local (unsharded) result of secant_stats / secant_stats_multi."""
    T = len(params)
    multi = op == _shapes.MULTI
    if T == 0:
        _validate(op, grads, params, refs, K)
        return torch.zeros(_shapes.out_shape(op, 0, K, per_tensor), dtype=torch.float64)
    if not _is_tensor(params[0]):
        _validate(op, grads, params, refs, K)  # names the entry
    device = params[0].device
    which = _choose(backend, device)
    if which in ("cpu", "cuda"):
        if torch.compiler.is_compiling():  # traced: the registered op, with its fake kernel
            fn = torch.ops.pathgeom.secant_stats_multi if multi else torch.ops.pathgeom.secant_stats
            args = (grads, params, refs, K) if multi else (grads, params, refs)
            return fn(*args, per_tensor=per_tensor, weight_decay=weight_decay)
        # eager: the dispatcher-free entry point (same kernels, same checks)
        return _ext._C.secant_stats_direct(grads, params, refs, K, per_tensor, weight_decay, multi)
    if which == "triton":  # checks its inputs
        if torch.compiler.is_compiling():  # traced: the registered op, with its fake kernel
            out = _explained(op, grads, params, refs, K, torch.ops.pathgeom.secant_stats_triton, per_tensor, weight_decay)
        else:
            out = _triton_stats(grads, params, refs, K, per_tensor, weight_decay)
        return out if multi else out[0]
    _validate(op, grads, params, refs, K)
    rows = reference.secant_rows(grads, params, refs, K, per_tensor=per_tensor, weight_decay=weight_decay)
    return _shape_rows(rows, K, per_tensor, multi)


def _run_gram(vecs, params, refs, K: int, per_tensor: bool, backend: str) -> Tensor:
    """Local (unsharded) result of secant_gram."""
    op = _shapes.GRAM
    if len(params) == 0:
        _validate(op, vecs, params, refs, K)
        return torch.zeros(_shapes.out_shape(op, 0, K, per_tensor), dtype=torch.float64)
    if not _is_tensor(params[0]):
        _validate(op, vecs, params, refs, K)  # names the entry
    which = _choose_gram(backend, params[0].device)
    if which == "cpu":
        if torch.compiler.is_compiling():  # traced: the registered op, with its fake kernel
            return torch.ops.pathgeom.secant_gram(vecs, params, refs, K, per_tensor)
        # eager: the dispatcher-free entry point (mode 2: the Gram kernel; same checks)
        return _ext._C.secant_stats_direct(vecs, params, refs, K, per_tensor, 0.0, 2)
    if which == "triton":  # checks its inputs
        if torch.compiler.is_compiling():
            return _explained(op, vecs, params, refs, K, torch.ops.pathgeom.secant_gram_triton, per_tensor)
        return _triton_gram(vecs, params, refs, K, per_tensor)
    _validate(op, vecs, params, refs, K)
    return _gram_out(reference.gram_rows(vecs, params, refs, K, per_tensor=per_tensor), per_tensor)


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
            ``nn.Module`` as ``params``, for its trainable parameters) of
            float16/bfloat16/float32/float64 tensors on one device; triple i must have equal
            numel. DTensors are reduced over their mesh. When ``params`` is a module, ``refs``
            may be a mapping {parameter name: tensor} (a state dict,
            ``safetensors.torch.load_file(...)``) or a module, matched by name and checked
            (missing or unknown keys, shapes, dtypes raise naming the key; frozen parameters
            are not measured, and their keys are allowed). Mapping views
            (``d.values()``) are refused: their order is not the parameters' order.
        per_tensor: return one row per tensor, shape [T, 3], instead of the total [3].
        weight_decay: measure g + weight_decay * x (coupled L2 weight decay) without a copy.
        backend: "auto", "cpu" (C++ kernel), "cuda" (CUDA kernel), "triton", or "torch".
        group: a process group over which plain local shards are summed (ZeRO-style shards).

    Returns:
        float64 tensor on the inputs' device; see ``pathgeom_fast.geometry`` for RSI, EB, ...
    """
    refs = as_tensor_list(_refs_by_name(refs, params, _shapes.SINGLE), "refs")
    grads = as_tensor_list(grads, "grads")
    params = as_tensor_list(params, "params")
    wd = _weight_decay(weight_decay, _shapes.SINGLE)
    _check_lengths(_shapes.SINGLE, [grads], params, refs)
    return distributed.dispatch(
        _shapes.SINGLE, [grads], params, refs, per_tensor, group,
        lambda flat, p, r: _run(_shapes.SINGLE, flat, p, r, 1, per_tensor, wd, backend),
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
    refs = as_tensor_list(_refs_by_name(refs, params, _shapes.MULTI), "refs")
    params = as_tensor_list(params, "params")
    lists = _vector_lists(_shapes.MULTI, "grads_lists", "gradient", grads_lists, params)
    wd, K = _weight_decay(weight_decay, _shapes.MULTI), len(lists)
    _check_lengths(_shapes.MULTI, lists, params, refs)
    return distributed.dispatch(
        _shapes.MULTI, lists, params, refs, per_tensor, group,
        lambda flat, p, r: _run(_shapes.MULTI, flat, p, r, K, per_tensor, wd, backend),
    )


def secant_gram(
    vec_lists,
    params,
    refs,
    *,
    per_tensor: bool = False,
    backend: str = "auto",
    group=None,
) -> Tensor:
    """Gram matrix of K vector lists and x - x*, in one fused pass with no flattening.

    With v_0, ..., v_{K-1} the K vector lists (gradients, a stored earlier gradient, an update
    ...) and v_K = x - x*::

        G[i][j] = <v_i, v_j>          G[i][K] = G[K][i] = <v_i, x - x*>      G[K][K] = ||x - x*||^2

    Args:
        vec_lists: a sequence of K (1 <= K <= 8) lists of tensors, each as long as ``params``
            and matching it position by position in numel (like ``grads`` of
            :func:`secant_stats`); the K vectors at one position share a dtype.
        params, refs, group: as in :func:`secant_stats` (DTensors are reduced over their mesh,
            plain shards over ``group``, with one collective).
        per_tensor: return one matrix per tensor position, [T, K+1, K+1].
        backend: "auto", "cpu" (C++ kernel), "triton", or "torch". There is no CUDA kernel for
            this op: ``backend="cuda"`` raises, and "auto" runs Triton on CUDA tensors.

    Returns:
        float64 [K+1, K+1] (or [T, K+1, K+1]) on the inputs' device, exactly symmetric: products
        in fp32 (fp64 when an input of that tensor position is fp64), sums in fp64 in a fixed
        order (bitwise reproducible).
    """
    refs = as_tensor_list(_refs_by_name(refs, params, _shapes.GRAM), "refs")
    params = as_tensor_list(params, "params")
    if isinstance(vec_lists, Iterable) and not isinstance(vec_lists, Tensor):
        vec_lists = list(vec_lists)
        if not 1 <= len(vec_lists) <= _shapes.GRAM_MAX_VECS:
            raise ValueError(
                f"secant_gram: vec_lists holds {len(vec_lists)} lists; pass between 1 and "
                f"{_shapes.GRAM_MAX_VECS} vector lists"
            )
    lists = _vector_lists(_shapes.GRAM, "vec_lists", "vector", vec_lists, params)
    K = len(lists)
    _check_lengths(_shapes.GRAM, lists, params, refs)
    return distributed.dispatch(
        _shapes.GRAM, lists, params, refs, per_tensor, group,
        lambda flat, p, r: _run_gram(flat, p, r, K, per_tensor, backend),
    )


def numel_of(params) -> int:
    """D, the number of scalar parameters (the global size for DTensors)."""
    return sum(int(math.prod(p.shape)) for p in as_tensor_list(params, "params"))
