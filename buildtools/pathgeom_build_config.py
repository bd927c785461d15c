"""Build-time decisions shared by setup.py and the PEP 517 backend (no torch import here).

* whether to build the compiled extension: PATHGEOM_BUILD_EXT=auto|0|1 and whether a C++
  compiler is found and works (compiles and links a small test library: a compiler that exists
  but fails, e.g. CXX=/bin/false, falls back to the pure-Python install like a missing one);
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
    """(build the extension?, why not). Does not check torch (setup.py does). A compiler that
    is found but fails on a small test file (or whose library does not link) counts as none."""
    flag = ext_flag()
    if flag == "0":
        return False, "PATHGEOM_BUILD_EXT=0"
    cxx = find_cxx()
    if cxx is None:
        why = "no C++ compiler found (" + (f"CXX={os.environ['CXX']!r}" if os.environ.get("CXX") else "c++, g++, clang++ not on PATH") + ")"
    else:
        why = probe_toolchain(cxx)
    if why is not None:
        if flag == "1":
            sys.exit(f"PATHGEOM_BUILD_EXT=1 but the extension cannot be built: {why}")
        return False, why
    return True, None


_PROBE_PROGRAM = (
    "#include <vector>\n"
    'extern "C" int pathgeom_probe(int n) { std::vector<int> v(n, 1); int s = 0; for (int x : v) s += x; return s; }\n'
)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return f": {lines[0][:200]}" if lines else ""


def probe_toolchain(cxx: str) -> str | None:
    """None when ``cxx`` compiles a small C++ file (as torch's ninja build runs it: $CXX, else
    c++) and the linker setuptools will use (CXX, CC and LDSHARED from the environment) links it
    into a shared library; otherwise why not, in one line."""
    if sys.platform == "win32":  # MSVC takes other flags; not tried on a Windows machine by this project
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.o")
        with open(src, "w") as f:
            f.write(_PROBE_PROGRAM)
        try:
            res = subprocess.run(cxx.split() + ["-fPIC", "-c", src, "-o", obj], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the C++ compiler {cxx!r} could not be run ({exc})"
        if res.returncode != 0 or not os.path.exists(obj):
            return (f"the C++ compiler {cxx!r} failed on a test file (exit status {res.returncode}"
                    f"{_first_line(res.stderr or res.stdout)})")
        try:
            try:
                from setuptools._distutils.ccompiler import new_compiler
                from setuptools._distutils.sysconfig import customize_compiler
            except ImportError:  # an old setuptools: the standard library's distutils
                from distutils.ccompiler import new_compiler
                from distutils.sysconfig import customize_compiler
            compiler = new_compiler()
            customize_compiler(compiler)
            compiler.link_shared_object([obj], os.path.join(tmp, "probe.so"), target_lang="c++")
        except Exception as exc:  # LinkError, or a linker that cannot be run
            return f"linking a test library with the C++ toolchain failed ({type(exc).__name__}{_first_line(str(exc))}); check CXX, CC and LDSHARED"
    return None


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
