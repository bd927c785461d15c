"""pathgeom_fast: fused kernels for the geometry of neural-network optimization paths.

    import pathgeom_fast as pg
    s = pg.secant_stats(grads, params, refs)        # float64 [3]: <g, x-x*>, ||g||^2, ||x-x*||^2
    geo = pg.geometry(s)                            # rsi, eb, cos, eta_star, contraction, ...
    G = pg.secant_gram([g, u], params, refs)        # float64 [3, 3]: Gram of g, u and x - x*
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


__all__ = [
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
