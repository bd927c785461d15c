"""Build-time decisions shared by setup.py and the PEP 517 backend (no torch import here).

* whether to build the compiled extension: PATHGEOM_BUILD_EXT=auto|0|1 and whether a C++
  compiler is found;
* which OpenMP flags the compiler accepts (tried, not assumed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile


def _flag(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def ext_flag() -> str:
    """PATHGEOM_BUILD_EXT: auto (default), 0 or 1."""
    return _flag("PATHGEOM_BUILD_EXT")


def find_cxx() -> str | None:
    """The C++ compiler a build would use: $CXX if set (None if it does not exist), else the
    first of c++, g++, clang++ on PATH (cl on Windows)."""
    cxx = os.environ.get("CXX")
    if cxx:
        prog = cxx.split()[0]
        return cxx if (os.path.isfile(prog) and os.access(prog, os.X_OK)) or shutil.which(prog) else None
    names = ("cl",) if sys.platform == "win32" else ("c++", "g++", "clang++")
    for name in names:
        if shutil.which(name):
            return name
    return None


def want_ext() -> tuple[bool, str | None]:
    """(build the extension?, why not). Does not check torch (setup.py does)."""
    flag = ext_flag()
    if flag == "0":
        return False, "PATHGEOM_BUILD_EXT=0"
    if find_cxx() is None:
        why = "no C++ compiler found (" + (f"CXX={os.environ['CXX']!r}" if os.environ.get("CXX") else "c++, g++, clang++ not on PATH") + ")"
        if flag == "1":
            sys.exit(f"PATHGEOM_BUILD_EXT=1 but the extension cannot be built: {why}")
        return False, why
    return True, None


def _try_compile(cxx: str, flags: list[str], source: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = cxx.split() + flags + [src, "-o", os.path.join(tmp, "t.out")]
        try:
            return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


_OMP_PROGRAM = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel\n{ n = omp_get_num_threads(); }\nreturn n > 0 ? 0 : 1; }\n"
_SIMD_PROGRAM = "int main() { float s[8] = {0};\n#pragma omp simd\nfor (int i = 0; i < 8; ++i) s[i] += 1.0f;\nreturn s[0] == 1.0f ? 0 : 1; }\n"


def openmp_flags(cxx: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """(compile flags, link flags, notes). -fopenmp makes torch's at::parallel_for (inline in
    the ATen headers) run on OpenMP threads in our CPU kernel; without it the kernel runs on
    one thread. -fopenmp-simd only enables the `#pragma omp simd` loops."""
    notes = []
    if sys.platform == "win32":  # MSVC; not tried on a Windows machine by this project
        return ["/openmp"], [], ["MSVC: /openmp assumed"]
    cxx = cxx or find_cxx()
    if cxx is None:
        return [], [], ["no C++ compiler"]
    compile_flags, link_flags = [], []
    if _try_compile(cxx, ["-fopenmp"], _OMP_PROGRAM):
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        notes.append(f"{cxx} does not accept -fopenmp: the CPU kernel will run on one thread")
    if _try_compile(cxx, ["-fopenmp-simd"], _SIMD_PROGRAM):
        compile_flags.append("-fopenmp-simd")
    return compile_flags, link_flags, notes
