"""Output layout of the ops: the one place that knows it.

Shared by ``ops`` (wrappers, fake kernels) and ``distributed`` (scattering per-tensor rows of
sharded inputs), which therefore do not import each other.
"""

from __future__ import annotations

GRAM = "secant_gram"
MULTI = "secant_stats_multi"
SINGLE = "secant_stats"
GRAM_MAX_VECS = 8  # kGramMaxVecs in csrc/secant_core.h


def out_shape(op: str, T: int, K: int, per_tensor: bool) -> tuple[int, ...]:
    """Shape of ``op``'s result for T tensor positions and K vector lists."""
    if op == GRAM:
        return (T, K + 1, K + 1) if per_tensor else (K + 1, K + 1)
    if op == MULTI:
        return (K, T, 3) if per_tensor else (K, 3)
    return (T, 3) if per_tensor else (3,)


def tensor_axis(op: str) -> int:
    """The axis of a ``per_tensor=True`` result that runs over tensor positions."""
    return 1 if op == MULTI else 0


def list_name(op: str) -> str:
    """What messages call the K vector lists: ``grads[k][i]`` or ``vecs[k][i]``."""
    return "vecs" if op == GRAM else "grads"


def entry_name(op: str, j: int, T: int, K: int) -> str:
    """Name of entry j of the K lists given back to back: ``grads[i]`` or ``grads[k][i]``."""
    name = list_name(op)
    return f"{name}[{j}]" if K == 1 else f"{name}[{j // T}][{j % T}]"
