"""pathgeom_fast: fused kernels for the geometry of neural-network optimization paths.

    import pathgeom_fast as pg
    s = pg.secant_stats(grads, params, refs)        # float64 [3]: <g, x-x*>, ||g||^2, ||x-x*||^2
    geo = pg.geometry(s)                            # rsi, eb, cos, eta_star, contraction, ...
    G = pg.secant_gram([g, u], params, refs)        # float64 [3, 3]: Gram of g, u and x - x*

The whole measurement along a training run: ``pg.PathTracker``, ``pg.Reference``,
``pg.StepMeasurer`` (training frameworks), ``pg.SnapshotRecorder``, ``pg.open_run``.
"""

from . import _moved

_moved.install()  # old module paths (pathgeom_fast.tracker, ...) name the moved modules

from .ops import extension as _ext  # noqa: E402
from .ops.extension import FallbackWarning  # noqa: E402
from .path.geometry import Geometry, geometry  # noqa: E402
from .ops.wrappers import BACKENDS, grads_of, numel_of, secant_gram, secant_stats, secant_stats_multi  # noqa: E402
from .ops.torch_backend import reference_secant_gram, reference_secant_stats  # noqa: E402

__version__ = "0.1.0"


def extension_available() -> bool:
    """True when the compiled kernels are loaded (see ``extension_error()`` otherwise)."""
    return _ext.available()


def extension_error() -> str | None:
    """Why the compiled extension is not loaded, or None."""
    return _ext.load_error()


def backend_for(device="cpu", backend: str = "auto", op: str = "secant_stats") -> str:
    """The backend that ``op`` (``"secant_stats"``, ``"secant_stats_multi"`` or
    ``"secant_gram"``) runs for tensors on ``device`` when asked for ``backend``: what
    ``"auto"`` resolves to here ("cpu", "cuda", "triton" or "torch"). Raises as the op would
    for a backend that cannot run."""
    import torch

    from .ops import wrappers as ops

    choose = ops._choose_gram if op == "secant_gram" else ops._choose
    return choose(backend, torch.device(device))


# The classes that run a whole measurement, loaded on first use (``import pathgeom_fast`` stays
# the ops alone): name -> the module that defines or re-exports it.
_LAZY = {
    "PathTracker": "pathgeom_fast.path.tracker",
    "Reference": "pathgeom_fast.checkpoints",
    "open_checkpoint": "pathgeom_fast.checkpoints",
    "open_run": "pathgeom_fast.checkpoints",
    "SnapshotRecorder": "pathgeom_fast.checkpoints.snapshots",
    "StepMeasurer": "pathgeom_fast.integrations",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pathgeom_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "PathTracker",
    "Reference",
    "SnapshotRecorder",
    "StepMeasurer",
    "open_checkpoint",
    "open_run",

    "BACKENDS",
    "FallbackWarning",
    "backend_for",
    "Geometry",
    "extension_available",
    "extension_error",
    "geometry",
    "grads_of",
    "numel_of",
    "reference_secant_gram",
    "reference_secant_stats",
    "secant_gram",
    "secant_stats",
    "secant_stats_multi",
]
