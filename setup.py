"""Build of pathgeom_fast and its compiled extension pathgeom_fast._C (torch cpp_extension, ninja).

Build flags (environment variables):

  PATHGEOM_BUILD_EXT=auto|0|1    auto (default): build the compiled extension when a C++
                                 compiler ($CXX, else c++/g++/clang++) and torch are found and
                                 the compiler works (it compiles and links a small test
                                 library first), otherwise install the pure-Python package
                                 (torch and Triton backends) and say why: a compiler that
                                 fails (CXX=/bin/false) is treated like a missing one; 0: never
                                 build it (no compiler, no torch needed at build time); 1:
                                 require it (fail if impossible).
  PATHGEOM_BUILD_CUDA=auto|0|1   auto (default): build the CUDA kernels when torch has CUDA
                                 and nvcc is found (CUDA_HOME or /usr/local/cuda); 1: require
                                 them (fail if impossible); 0: CPU kernel only.
  TORCH_CUDA_ARCH_LIST           GPU architectures, e.g. "8.0;9.0". Default here: "8.0;9.0+PTX"
                                 (A100, H100/H200, and PTX for newer GPUs), not torch's
                                 every-architecture default, to keep builds short.
  MAX_JOBS                       parallel compile jobs for ninja.
  PATHGEOM_DEBUG=1               -O0 -g (and -G -lineinfo for CUDA) instead of -O3.
  CXX                            the C++ compiler; OpenMP flags are used only if it accepts
                                 them (tried at build time; without -fopenmp the CPU kernel
                                 runs on one thread).

Build against the installed torch, without build isolation:

  pip install --no-build-isolation -e .
  PATHGEOM_BUILD_EXT=0 pip install .       # pure Python: no compiler, no torch download

The PEP 517 backend (buildtools/pathgeom_build_backend.py) asks for torch as a build
requirement only when the extension will be built. The torch version used is recorded in
pathgeom_fast/_build_info.py; importing the package with another torch version disables the
compiled ops with a clear message instead of failing on an undefined symbol.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "buildtools"))

import pathgeom_build_config as cfg  # noqa: E402

BUILD_INFO = os.path.join("pathgeom_fast", "_build_info.py")


def decide():
    """(build the extension?, reason if not); imports torch only when it may be needed."""
    build, why = cfg.want_ext()
    if not build:
        return False, why
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError as exc:
        if cfg.ext_flag() == "1":
            sys.exit(f"PATHGEOM_BUILD_EXT=1 but torch cannot be imported in the build environment: {exc}")
        return False, (
            f"torch is not importable in the build environment ({exc}); build against your torch "
            "with `pip install --no-build-isolation .`"
        )
    return True, None


def want_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    flag = os.environ.get("PATHGEOM_BUILD_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        sys.exit(f"PATHGEOM_BUILD_CUDA must be auto, 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    have_nvcc = cpp_extension.CUDA_HOME is not None and (
        os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
    )
    ok = torch.version.cuda is not None and bool(have_nvcc)
    if flag == "1" and not ok:
        sys.exit(
            "PATHGEOM_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return ok


def write_build_info(path: str, extension: bool, with_cuda: bool = False, reason: str | None = None) -> None:
    lines = ["# Written by setup.py at build time.\n", f"EXTENSION = {extension!r}\n", f"REASON = {reason!r}\n"]
    if extension:
        import torch

        lines += [
            f"TORCH_VERSION = {torch.__version__!r}\n",
            f"WITH_CUDA = {with_cuda!r}\n",
            f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n",
        ]
    with open(path, "w") as f:
        f.writelines(lines)


def extensions():
    from torch.utils import cpp_extension

    with_cuda = want_cuda()
    write_build_info(os.path.join(HERE, BUILD_INFO), True, with_cuda)
    debug = os.environ.get("PATHGEOM_DEBUG", "0") == "1"
    omp_cxx, omp_link, notes = cfg.openmp_flags()
    for note in notes:
        print(f"pathgeom_fast: {note}", file=sys.stderr)
    cxx = omp_cxx + (["-O0", "-g"] if debug else ["-O3"])
    sources = ["csrc/inputs.cpp", "csrc/cpu_pass.cpp", "csrc/registration.cpp", "csrc/python_entry.cpp",
               "csrc/secant_cpu.cpp", "csrc/plan.cpp", "csrc/plan_python.cpp"]
    kwargs = dict(
        name="pathgeom_fast._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=omp_link,
        py_limited_api=False,
    )
    if not with_cuda:
        return [cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    nvcc = ["--expt-relaxed-constexpr"] + (["-O0", "-G", "-lineinfo"] if debug else ["-O3"])
    sources += ["csrc/ops_cuda.cpp", "csrc/secant_cuda.cu"]
    return [
        cpp_extension.CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    ]


BUILD_EXT, WHY_NOT = decide()


class BuildPy(build_py):
    """Without the extension, the installed package records why (not the source tree's file)."""

    def run(self):
        super().run()
        if not BUILD_EXT:
            write_build_info(os.path.join(self.build_lib, BUILD_INFO), False, reason=WHY_NOT)


if BUILD_EXT:
    from torch.utils import cpp_extension

    ext_modules = extensions()
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True), "build_py": BuildPy}
else:
    if "sdist" not in sys.argv and "egg_info" not in sys.argv:
        print(
            f"pathgeom_fast: installing the pure-Python package without the compiled extension: {WHY_NOT}. "
            "The torch and Triton backends work; PATHGEOM_BUILD_EXT=1 makes this an error.",
            file=sys.stderr,
        )
    ext_modules, cmdclass = [], {"build_py": BuildPy}

setup(
    packages=find_packages(include=["pathgeom_fast", "pathgeom_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
