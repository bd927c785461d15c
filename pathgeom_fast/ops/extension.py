"""Guarded loading of the compiled extension ``pathgeom_fast._C``.

The package works without it (pure-torch backend). ``load_error()`` says why it is missing,
and asking explicitly for a compiled backend raises that message. The first run of the torch
backend without the extension warns once (``FallbackWarning``) with the cost, since nothing
else would tell a user whose install fell back to pure Python.
"""

from __future__ import annotations

import warnings

import torch

_C = None
_ERROR: str | None = None
WITH_CUDA = False


def _load() -> None:
    global _C, _ERROR, WITH_CUDA
    try:
        from .. import _build_info
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
    from .. import _C  # registers torch.ops.pathgeom.* (CPU, and CUDA if built)

    return _C


def _package_root() -> str:
    """The folder of ``pathgeom_fast`` itself (this module is one level below it)."""
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library_present() -> bool:
    import importlib.machinery
    import os

    here = _package_root()  # _C*.so sits at the package root, beside _build_info.py
    return any(os.path.exists(os.path.join(here, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


_load()


def available() -> bool:
    """True when the compiled CPU kernel (and, if built, the CUDA kernel) is loaded."""
    return _C is not None


def load_error() -> str | None:
    """Why the compiled extension is not loaded, or None."""
    return _ERROR


# The cost of the fallback: the torch backend against the compiled CPU kernel, side by side on
# an idle 2-core CPU (bench/results/cpu-torch-backend-2026-12-05b.txt: 2.1-3.0x the time on
# lists of large tensors, 15x on 10^4 tensors of 10^3 elements).
FALLBACK_COST = "2-15x slower"


class FallbackWarning(UserWarning):
    """The compiled kernels are not loaded: the pure-torch backend runs instead."""


_WARNED = False


def fallback_message() -> str:
    """One line on what runs without the extension, what it costs and why it is missing."""
    return (
        f"pathgeom_fast: compiled extension not loaded: using the torch fallback, {FALLBACK_COST} than the "
        f"compiled kernel; see docs/backends.md. Reason: {_ERROR}"
    )


def warn_fallback() -> None:
    """Warn once per process when the torch backend runs because the extension is not loaded."""
    global _WARNED
    if _C is None and not _WARNED:
        _WARNED = True
        warnings.warn(fallback_message(), FallbackWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """stacklevel of the first frame outside this package (the user's call)."""
    import os
    import sys

    here = _package_root()
    level, frame = 2, sys._getframe(2)  # 1: warn_fallback, 2: its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    return level
