"""Registration of the ops in ``torch.ops.pathgeom``: schemas, the pure-torch Library used
when the compiled extension is missing, fake kernels, the Triton ``custom_op``s and the
autograd kernels. It runs once, when this module is first imported (by ``wrappers``).

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

With the extension built, the C++ library registers ``secant_stats``/``secant_stats_multi``
(CPU and CUDA kernels) and ``secant_gram`` (CPU kernel; CUDA tensors go to Triton); without
the extension, the same ops are registered here with the pure-torch implementation so that
code calling ``torch.ops.pathgeom`` keeps working.
"""

from __future__ import annotations

import torch

from . import extension as _ext
from . import shapes as _shapes
from . import torch_backend as reference
from . import triton_gram
from . import triton_stats as triton_kernels
from .inputs import _validate

Tensor = torch.Tensor

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
