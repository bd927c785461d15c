"""Guarded loading of the compiled extension ``pathgeom_fast._C``.

The package works without it (pure-torch backend). ``load_error()`` says why it is missing,
and asking explicitly for a compiled backend raises that message.
"""

from __future__ import annotations

import torch

_C = None
_ERROR: str | None = None
WITH_CUDA = False


def _load() -> None:
    global _C, _ERROR, WITH_CUDA
    try:
        from . import _build_info
    except ImportError:
        _ERROR = (
            "the compiled extension pathgeom_fast._C is not built; build it with "
            "`pip install --no-build-isolation -e .` (see setup.py for the build flags)"
        )
        return
    if not getattr(_build_info, "EXTENSION", True):
        _ERROR = (
            f"pathgeom_fast was installed without its compiled extension ({_build_info.REASON}); the torch "
            "and Triton backends work. Build it with `pip install --no-build-isolation .` where a C++ "
            "compiler and torch are available (see setup.py for the build flags)"
        )
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        _ERROR = (
            f"pathgeom_fast._C was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation "
            "--force-reinstall --no-deps -e .`"
        )
        return
    try:
        ext = _import_library()
    except (ImportError, OSError) as exc:  # e.g. an undefined symbol after a partial rebuild
        if not _library_present():  # the build started (it wrote _build_info) but made no library
            _ERROR = (
                "pathgeom_fast._C is not built: the package has no _C library (an interrupted or failed "
                "build?); build it with `pip install --no-build-isolation -e .`"
            )
        else:
            _ERROR = f"pathgeom_fast._C failed to load ({exc}); rebuild it with `pip install --no-build-isolation -e .`"
        return
    _C = ext
    WITH_CUDA = bool(_build_info.WITH_CUDA)


def _import_library():
    from . import _C  # registers torch.ops.pathgeom.* (CPU, and CUDA if built)

    return _C


def _library_present() -> bool:
    import importlib.machinery
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    return any(os.path.exists(os.path.join(here, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


_load()


def available() -> bool:
    """True when the compiled CPU kernel (and, if built, the CUDA kernel) is loaded."""
    return _C is not None


def load_error() -> str | None:
    """Why the compiled extension is not loaded, or None."""
    return _ERROR
