"""Build of pathgeom_fast._C (torch.utils.cpp_extension, ninja).

Build flags (environment variables):

  PATHGEOM_BUILD_CUDA=auto|0|1   auto (default): build the CUDA kernels when torch has CUDA
                                 and nvcc is found (CUDA_HOME or /usr/local/cuda); 1: require
                                 them (fail if impossible); 0: CPU kernel only.
  TORCH_CUDA_ARCH_LIST           GPU architectures, e.g. "8.0;9.0". Default here: "8.0;9.0+PTX"
                                 (A100, H100/H200, and PTX for newer GPUs), not torch's
                                 every-architecture default, to keep builds short.
  MAX_JOBS                       parallel compile jobs for ninja.
  PATHGEOM_DEBUG=1               -O0 -g (and -G -lineinfo for CUDA) instead of -O3.

Build against the installed torch, without build isolation:

  pip install --no-build-isolation -e .

The torch version used is recorded in pathgeom_fast/_build_info.py; importing the package
with another torch version disables the compiled ops with a clear message instead of
failing on an undefined symbol.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
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


def write_build_info(with_cuda: bool) -> None:
    path = os.path.join(HERE, "pathgeom_fast", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n")


def extensions():
    with_cuda = want_cuda()
    write_build_info(with_cuda)
    debug = os.environ.get("PATHGEOM_DEBUG", "0") == "1"
    cxx = ["-fopenmp", "-fopenmp-simd"] + (["-O0", "-g"] if debug else ["-O3"])
    sources = ["csrc/ops.cpp", "csrc/secant_cpu.cpp"]
    kwargs = dict(
        name="pathgeom_fast._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
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


setup(
    packages=find_packages(include=["pathgeom_fast", "pathgeom_fast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
