"""What ``pathgeom --version`` prints (package, torch, Triton, the compiled extension, the
backends that can run here) and the backend note the commands print after a run.
"""

from __future__ import annotations

import argparse


def version_text() -> str:
    """Package, torch and Triton versions and what is compiled (for --version and bug reports)."""
    import platform

    import torch

    from .. import __version__
    from ..ops import extension as _ext

    lines = [f"pathgeom_fast {__version__}", f"torch {torch.__version__} (CUDA {torch.version.cuda or '-'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed (backend='triton' unavailable)")
    if _ext.available():
        what = "CPU" + (" + CUDA kernels" if _ext.WITH_CUDA else " kernel only (built without CUDA)")
        lines.append(f"extension: built, {what}; CPU instruction set {_ext._C.cpu_isa()}")
    else:
        lines.append(f"extension: not loaded: {_ext.load_error()}")
    lines += backend_lines()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    lines.append(f"python {platform.python_version()}, GPU {gpu}")
    return "\n".join(lines)


def backend_lines() -> list[str]:
    """Which backends can run here, and what backend='auto' runs on CPU and CUDA tensors."""
    from .. import backend_for
    from ..ops import extension as _ext
    from ..ops import triton_stats as triton_kernels

    compiled = "compiled" if _ext.available() else "not available (extension not loaded)"
    cuda = compiled if not _ext.available() or _ext.WITH_CUDA else "not available (built without CUDA)"
    triton = "available" if triton_kernels.available() else "not available (no usable triton)"
    auto_cpu, auto_cuda = backend_for("cpu"), backend_for("cuda")
    lines = [
        f"backends: cpu {compiled}; cuda {cuda}; triton {triton}; torch available (pure PyTorch)",
        f"backend='auto' runs: {auto_cpu} on CPU tensors, {auto_cuda} on CUDA tensors",
    ]
    if auto_cpu == "torch":
        lines.append(f"fallback: CPU tensors run the torch backend, {_ext.FALLBACK_COST} than the compiled kernel "
                     "(see docs/backends.md)")
    return lines


def _backend_used(device: str, backend: str) -> str:
    """What ``backend`` resolves to for tensors on ``device`` ("cpu", "cuda:1", ...)."""
    import torch

    from .. import backend_for

    return backend_for(torch.device(device).type, backend)


def backend_note(device: str, backend: str) -> str:
    """'backend: cpu (compiled C++ kernel)' and the like, for the commands' output."""
    from ..ops import extension as _ext

    used = _backend_used(device, backend)
    what = {"cpu": "compiled C++ kernel", "cuda": "compiled CUDA kernel", "triton": "Triton kernel"}.get(
        used, "pure-torch fallback" if not _ext.available() else "pure-torch backend")
    note = f"backend: {used} ({what})"
    if used == "torch" and not _ext.available():
        note += f": compiled extension not loaded, {_ext.FALLBACK_COST} than the compiled kernel (see docs/backends.md)"
    return note


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()
