"""The public ops (``secant_stats``, ``secant_stats_multi``, ``secant_gram``, ``grads_of``,
``numel_of``) and the choice of backend for each call.

Each op normalises and checks its inputs (:mod:`.inputs`), picks a backend ("cpu"/"cuda": the
compiled kernels, "triton", or "torch") and runs it locally, with one all-reduce for sharded
inputs (:mod:`.distributed`). Importing this module registers the ``torch.ops.pathgeom`` ops
(:mod:`.registration`, which also documents their schemas).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from . import distributed
from . import extension as _ext
from . import shapes as _shapes
from . import torch_backend as reference
from . import triton_stats as triton_kernels
from .inputs import _check_lengths, _is_tensor, _refs_by_name, _validate, _vector_lists, _weight_decay, as_tensor_list
from .registration import _gram_out, _shape_rows, _triton_gram, _triton_stats

Tensor = torch.Tensor
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


def grads_of(module_or_params: Any) -> list[Tensor]:
    """The ``.grad`` of every trainable parameter of a module (``requires_grad``, in
    ``parameters()`` order: the order of ``params=module``), or of every tensor of a list;
    raises naming the first one without a gradient."""
    if isinstance(module_or_params, torch.nn.Module):
        from ..checkpoints.keys import trainable

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


# --------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------


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
