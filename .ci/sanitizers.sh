#!/usr/bin/env bash
# ASan + UBSan run of the compiled CPU kernels:
#
#   bash .ci/sanitizers.sh [PYTEST ARGS...]
#
# Builds pathgeom_fast._C (CPU kernels only) with -fsanitize=address,undefined into
# $SAN_DIR (default build/sanitizers; the normal build, pathgeom_fast/_C*.so and the .venv
# are not touched), lays out a copy of the package there (links to the sources, the
# sanitized library, its own _build_info.py), and runs tests/ops/test_ops.py and
# tests/ops/test_fuzz.py against it with 16 intra-op threads. The sanitizer runtimes are
# preloaded into the Python of the .venv that `make setup` creates. Any sanitizer report
# fails the run (halt_on_error); so does a failing test. PYTEST ARGS replace the default
# test selection. Exit status: pytest's, or the sanitizer's (non-zero) on a report.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PY:-$ROOT/.venv/bin/python}"
SAN_DIR="${SAN_DIR:-$ROOT/build/sanitizers}"
JOBS="${MAX_JOBS:-2}"
CXX="${CXX:-g++}"
t0=$SECONDS

[ -x "$PY" ] || { echo "sanitizers: $PY not found; run 'make setup' first" >&2; exit 2; }
mkdir -p "$SAN_DIR/obj" "$SAN_DIR/pkg"

# 1. Compile and link (objects rebuilt when a source or header is newer).
"$PY" - "$SAN_DIR" "$CXX" > "$SAN_DIR/flags.sh.new" <<'PYEOF'
import shlex, sys, sysconfig
import torch
from torch.utils import cpp_extension
san_dir, cxx = sys.argv[1], sys.argv[2]
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
inc = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], "csrc"]
cflags = ["-std=c++20", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-fopenmp", "-fopenmp-simd",
          "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
          f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
          "-Wno-unused-parameter"] + [f"-I{p}" for p in inc]
ldflags = ["-shared", "-fopenmp", "-fsanitize=address,undefined"] + \
          [f"-L{p}" for p in cpp_extension.library_paths()] + \
          [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()] + \
          ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
print("CFLAGS=" + shlex.quote(" ".join(cflags)))
print("LDFLAGS=" + shlex.quote(" ".join(ldflags)))
print("EXT_SUFFIX=" + shlex.quote(sysconfig.get_config_var("EXT_SUFFIX")))
print("TORCH_VERSION=" + shlex.quote(torch.__version__))
PYEOF
# rewritten only when the flags change (its date decides what is rebuilt)
cmp -s "$SAN_DIR/flags.sh.new" "$SAN_DIR/flags.sh" || mv "$SAN_DIR/flags.sh.new" "$SAN_DIR/flags.sh"
rm -f "$SAN_DIR/flags.sh.new"
# shellcheck disable=SC1091
. "$SAN_DIR/flags.sh"
SOURCES=(csrc/inputs.cpp csrc/cpu_pass.cpp csrc/registration.cpp csrc/python_entry.cpp csrc/secant_cpu.cpp csrc/plan.cpp
         csrc/plan_python.cpp)  # setup.py lists the same
# An object is rebuilt when the content of its source, of the headers or of the flags changed
# (a content stamp: dates alone miss a source edited while it was compiling).
stamp_of() { cat "$1" csrc/*.h "$SAN_DIR/flags.sh" | sha256sum | cut -d' ' -f1; }
todo=()
for src in "${SOURCES[@]}"; do
  obj="$SAN_DIR/obj/$(basename "$src" .cpp).o"
  if [ ! -f "$obj" ] || [ "$(cat "$obj.stamp" 2>/dev/null)" != "$(stamp_of "$src")" ]; then
    stamp_of "$src" > "$obj.stamp.new"
    rm -f "$obj.stamp"
    todo+=("$src")
  fi
done
export CXX CFLAGS SAN_DIR
if [ "${#todo[@]}" -gt 0 ]; then
  echo "sanitizers: compiling ${todo[*]} ($JOBS jobs)"
  printf '%s\n' "${todo[@]}" | xargs -P "$JOBS" -I{} sh -c \
    'o=$SAN_DIR/obj/$(basename {} .cpp).o; eval "$CXX $CFLAGS -c {} -o $o" && mv "$o.stamp.new" "$o.stamp"'
fi
LIB="$SAN_DIR/pkg/pathgeom_fast/_C$EXT_SUFFIX"
mkdir -p "$SAN_DIR/pkg/pathgeom_fast"
# shellcheck disable=SC2086
$CXX "$SAN_DIR"/obj/*.o $LDFLAGS -o "$LIB.tmp" && mv "$LIB.tmp" "$LIB"
echo "sanitizers: built $LIB in $((SECONDS - t0)) s"

# 2. The package: links to the sources, this library, and a build record without CUDA.
# (Links left by an older layout go first: a stale link to a moved module, tracker.py say, would
# load a second copy of it instead of the old-path alias.)
find "$SAN_DIR/pkg/pathgeom_fast" -maxdepth 1 -type l -delete
for f in pathgeom_fast/* ; do
  name=$(basename "$f")
  case "$name" in _C.*|_C|_build_info.py|__pycache__) continue ;; esac
  ln -sfn "$ROOT/$f" "$SAN_DIR/pkg/pathgeom_fast/$name"
done
# a pytest plugin (-p): 16 intra-op threads in the test process, whatever the core count
printf 'import torch\n\ntorch.set_num_threads(16)\n' > "$SAN_DIR/pkg/pathgeom_san_threads.py"
printf '# Written by .ci/sanitizers.sh.\nEXTENSION = True\nREASON = None\nTORCH_VERSION = %s\nWITH_CUDA = False\nCUDA_VERSION = None\n' \
  "'$TORCH_VERSION'" > "$SAN_DIR/pkg/pathgeom_fast/_build_info.py"

# 3. The tests, with the runtimes preloaded and 16 intra-op threads.
ASAN_LIB="$($CXX -print-file-name=libasan.so)"
UBSAN_LIB="$($CXX -print-file-name=libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do  # a bare name: the compiler does not have it
  [ -f "$lib" ] || { echo "sanitizers: $CXX has no $lib (install the compiler's sanitizer runtimes)" >&2; exit 2; }
done
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
# Reports go to files (pytest captures stderr, and a process that halts takes its captured
# output with it; the fuzz workers are subprocesses): REPORTS/asan.PID, REPORTS/ubsan.PID.
REPORTS="$SAN_DIR/reports"
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS="detect_leaks=0:protect_shadow_gap=0:halt_on_error=1:exitcode=86:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$REPORTS/ubsan"
export PYTHONPATH="$SAN_DIR/pkg${PYTHONPATH:+:$PYTHONPATH}"
# PYTHONSAFEPATH: no current directory on sys.path (the source tree holds the normal build)
export OMP_NUM_THREADS=16 PYTHONFAULTHANDLER=1 PYTHONSAFEPATH=1
# The package must come from the sanitized copy, with its compiled kernels loaded.
"$PY" - "$SAN_DIR/pkg" <<'PYEOF'
import sys, torch
import pathgeom_san_threads
import pathgeom_fast, pathgeom_fast.ops.extension as ext
assert pathgeom_fast.__file__.startswith(sys.argv[1]), pathgeom_fast.__file__
assert ext.available(), ext.load_error()
assert ext._C.__file__.startswith(sys.argv[1]), ext._C.__file__
print(f"sanitizers: {ext._C.__file__} loaded; torch {torch.__version__}, {torch.get_num_threads()} threads")
PYEOF
if [ "$#" -eq 0 ]; then
  set -- tests/ops/test_ops.py tests/ops/test_fuzz.py -m "not slow and not cuda" --durations=15
fi
# fewer fuzz cases than the plain run (each is slower under the sanitizers)
export PATHGEOM_FUZZ_EXAMPLES="${PATHGEOM_FUZZ_EXAMPLES:-300}"
LOG="$SAN_DIR/pytest.log"
echo "sanitizers: pytest $* (log $LOG)"
set +e
"$PY" -m pytest -q -p no:cacheprovider -p pathgeom_san_threads -x "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
if [ -n "$(ls -A "$REPORTS")" ] || grep -qE "ERROR: AddressSanitizer|runtime error:" "$LOG"; then
  echo "sanitizers: sanitizer reports (in $REPORTS):" >&2
  for f in "$REPORTS"/*; do [ -f "$f" ] && { echo "--- $f" >&2; head -n 60 "$f" >&2; }; done
  [ "$rc" -ne 0 ] || rc=1
fi
echo "sanitizers: exit $rc after $((SECONDS - t0)) s"
exit "$rc"
