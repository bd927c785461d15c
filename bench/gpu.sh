#!/usr/bin/env bash
# The one call to run first on a machine with a GPU:
#
#   bash bench/gpu.sh [--dry-run] [OUT_DIR]        (default bench/results/gpu-<date>)
#
# 1. device, driver and versions        -> OUT/gpu-device.txt
# 2. the extension: the library built beforehand on a CPU machine for this machine's Python and
#    torch (bench/gpu_prebuild.sh -> build/gpu-carry/, brought in with the device tool's
#    `carry`), used when its Python ABI, torch release and CUDA major version match this
#    machine's and it loads; otherwise built here (minutes)   -> OUT/gpu-build.log
# 3. the extension's error paths, each in a subprocess -> OUT/gpu-error-paths.txt; the
#    sequence that once crashed here (test_bad_inputs_name_the_offender and the error probes)
#    in one process under gdb, so that a crash leaves its native backtrace
#                                       -> OUT/gpu-crash-probe.txt; every GPU
#    test (CUDA kernel, compiled Triton, plans, >2^31 elements, opcheck/compile)
#                                       -> OUT/gpu-tests.log
# 4. the GPU benchmark table            -> OUT/gpu-bench.txt, gpu-bench.json
# 5. end to end: a GPT-2-124M-shaped model trained in bf16, step time without measuring, and
#    measuring every 10 steps and every step (bench/gpu_e2e.py) -> OUT/gpu-e2e.txt, .json
# 6. the host work of the GPU backends' calls (`pathgeom bench --cases host`) on this machine's
#    CPU                                -> OUT/gpu-host.txt, .json
# 7. the sync-free check                -> OUT/gpu-sync-check.txt
# 8. the compiled-kernel table on this machine's toolchain and GPU arch, plus the
#    resource usage of the built extension -> OUT/compiled-kernels.txt (.json)
# 9. the Triton launch sweep (warps x pipelining stages per case, bench/triton_tune.py)
#                                       -> OUT/gpu-triton-tune.txt, .json
# Everything is packed into OUT/gpu.tgz at the end (the device tool returns at most 8 files).
#
# Steps run in order of value (correctness, then speed, then resource tables); each is bounded
# by STEP_TIMEOUT seconds (default 240) so that a short lease still returns the early ones.
# Each step's exit status is recorded and the script goes on after a failing step; a summary
# is printed last (and written to OUT/summary.txt). Exit status: the number of failed steps.
# The GPU machines bring their own torch/triton: a build here uses them, without dependencies.
# --dry-run: decides about the carried library and prints every step's command without
# running it (what the tests run on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-${OUT:-bench/results/gpu-$(date -u +%Y-%m-%d)}}"
CARRY="${GPU_CARRY:-build/gpu-carry}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATHGEOM_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
declare -a NAMES STATUS SECS

step() {  # step NAME LOGFILE COMMAND...
  local name="$1" log="$2"; shift 2
  local t0=$SECONDS
  echo "== $name" | tee -a "$OUT/summary.txt"
  if [ "$DRY" = 1 ]; then
    echo "would run: $* > $log" | tee -a "$OUT/summary.txt"
    NAMES+=("$name"); STATUS+=(0); SECS+=(0)
    return
  fi
  timeout "${STEP_TIMEOUT:-240}" "$@" > "$log" 2>&1
  local rc=$?
  [ "$rc" = 124 ] && echo "(step stopped after STEP_TIMEOUT=${STEP_TIMEOUT:-240} s)" | tee -a "$log"
  tail -n 25 "$log"
  NAMES+=("$name"); STATUS+=("$rc"); SECS+=("$((SECONDS - t0))")
  echo "-- $name: exit $rc ($((SECONDS - t0)) s), log $log" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "command: bash bench/gpu.sh $([ "$DRY" = 1 ] && echo "--dry-run ")$OUT"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') uncommitted changes"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch.cuda.get_device_capability() if torch.cuda.is_available() else '')" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  (nvcc --version 2>/dev/null || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) 2>&1 | tail -2
} | tee "$OUT/gpu-device.txt"

# The carried library: used when built for this Python ABI, torch release and CUDA major version
# (carry.txt), and it loads; its _build_info then names this machine's torch version string
# (a release from PyPI, 2.11.0, serves 2.11.0+cu130). Prints the decision; exit 0 = use it.
carried_ok() {
  [ -f "$CARRY/carry.txt" ] || { echo "carried build: none at $CARRY (bench/gpu_prebuild.sh makes one)"; return 1; }
  "$PY" - "$CARRY" <<'PYEOF'
import glob, os, sys, sysconfig
carry = sys.argv[1]
info = dict(line.split(" ", 1) for line in open(os.path.join(carry, "carry.txt")).read().splitlines() if " " in line)
py_ver, suffix = info["python"].split()
built_torch, _, built_cuda = info["torch"].split()
try:
    import torch
    have = (torch.__version__, torch.version.cuda)
except ImportError as exc:
    print(f"carried build: not used (torch does not import here: {exc})")
    sys.exit(1)
want_suffix = sysconfig.get_config_var("EXT_SUFFIX")
release = lambda v: v.split("+")[0]
why = []
if suffix != want_suffix or not os.path.exists(os.path.join(carry, "_C" + want_suffix)):
    why.append(f"built for Python {py_ver} ({suffix}), this is {sys.version.split()[0]} ({want_suffix})")
if release(built_torch) != release(have[0]):
    why.append(f"built against torch {built_torch}, this machine has {have[0]}")
if (built_cuda.split(".")[0] if built_cuda != "None" else None) != (have[1].split(".")[0] if have[1] else None):
    why.append(f"built with CUDA {built_cuda}, torch here has CUDA {have[1]}")
if why:
    print("carried build: not used (" + "; ".join(why) + ")")
    sys.exit(1)
print(f"carried build: usable (built for torch {built_torch}, CUDA {built_cuda}, {info.get('arch', '?')}; "
      f"{info.get('git', '')}); this machine: torch {have[0]}, CUDA {have[1]}")
PYEOF
}
install_carried() {  # copies the carried library in and checks that it loads
  local suffix
  suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  cp "$CARRY/_C$suffix" pathgeom_fast/ &&
  "$PY" - "$CARRY/_build_info.py" > pathgeom_fast/_build_info.py <<'PYEOF' &&
import re, sys, torch
text = open(sys.argv[1]).read()
print(re.sub(r"TORCH_VERSION = .*", f"TORCH_VERSION = {torch.__version__!r}", text), end="")
PYEOF
  "$PY" -c "import pathgeom_fast as pg, sys; sys.exit(0 if pg.extension_available() else 'carried library does not load: ' + str(pg.extension_error()))" &&
  "$PY" -m pathgeom_fast.cli --version
}
export -f install_carried
export CARRY PY
if carried_ok | tee -a "$OUT/summary.txt" "$OUT/gpu-build.log"; then
  step carried "$OUT/gpu-build.log" bash -c install_carried
  if [ "${STATUS[${#STATUS[@]}-1]}" != 0 ]; then
    step build "$OUT/gpu-build.log" $PY -m pip install -v --no-build-isolation --no-deps -e .
  fi
else
  step build "$OUT/gpu-build.log" $PY -m pip install -v --no-build-isolation --no-deps -e .
fi
step version "$OUT/gpu-version.txt" $PY -m pathgeom_fast.cli --version
step error-paths "$OUT/gpu-error-paths.txt" $PY bench/error_paths.py
# One process, no xdist, under gdb when the machine has it (else faulthandler's Python stack):
# a crash stops at the faulting native frame and `bt` writes it to the log. Bounded to 300 s.
crash_probe() {
  local py_cmds=("$PY" -X faulthandler -m pytest -p no:cacheprovider -q -x
                 "tests/ops/test_ops.py::test_bad_inputs_name_the_offender"
                 "tests/ops/test_ops.py::test_tensor_like_objects_are_refused"
                 "tests/ops/test_ops.py::test_direct_entry_checks_lengths_before_naming_entries")
  local probes=("$PY" -X faulthandler bench/error_paths.py --in-process)
  if command -v gdb >/dev/null 2>&1; then
    # py-bt (the Python stack at the crash) where the interpreter's gdb helpers are installed
    local gdb=(gdb -q -batch -return-child-result -iex "set auto-load safe-path /" -ex "set pagination off"
               -ex "set confirm off" -ex "handle SIGPIPE nostop noprint pass" -ex run -ex bt
               -ex "info threads" -ex py-bt --args)
  else
    echo "(gdb not found: Python stacks only, from faulthandler)"
    local gdb=()
  fi
  timeout 300 "${gdb[@]}" "${py_cmds[@]}"; local rc_tests=$?
  timeout 300 "${gdb[@]}" "${probes[@]}"; local rc_probes=$?
  echo "crash-probe: tests exit $rc_tests, probes exit $rc_probes"
  [ "$rc_tests" = 0 ] && [ "$rc_probes" = 0 ]
}
export -f crash_probe
export PY
step crash-probe "$OUT/gpu-crash-probe.txt" bash -c crash_probe
# pytest-xdist when present: a crashing test then fails alone instead of ending the step
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step tests "$OUT/gpu-tests.log" $PY -m pytest "${XDIST[@]}" tests/ops/test_ops_cuda.py tests/ops/test_ops.py tests/ops/test_triton_kernels.py \
  tests/ops/test_gram.py tests/ops/test_plan.py tests/ops/test_compiled_kernels.py -q -rs
step bench "$OUT/gpu-bench.txt" $PY -m pathgeom_fast.cli bench --device cuda --repeats 20 --json "$OUT/gpu-bench.json"
step e2e "$OUT/gpu-e2e.txt" $PY bench/gpu_e2e.py --out "$OUT/gpu-e2e.json"
step host "$OUT/gpu-host.txt" $PY -m pathgeom_fast.cli bench --cases host --no-progress --json "$OUT/gpu-host.json"
step sync-check "$OUT/gpu-sync-check.txt" $PY bench/gpu_sync_check.py
step compiled-kernels "$OUT/compiled-kernels.log" $PY -m pathgeom_fast.compile_check --device \
  --out "$OUT/compiled-kernels.txt" --json "$OUT/compiled-kernels.json"
step triton-tune "$OUT/gpu-triton-tune.txt" $PY bench/triton_tune.py --out "$OUT/gpu-triton-tune.json"

failed=0
echo
echo "summary ($OUT):" | tee -a "$OUT/summary.txt"
for i in "${!NAMES[@]}"; do
  s="ok"; [ "${STATUS[$i]}" != 0 ] && { s="FAILED (exit ${STATUS[$i]})"; failed=$((failed + 1)); }
  printf '  %-18s %-18s %5s s\n' "${NAMES[$i]}" "$s" "${SECS[$i]}" | tee -a "$OUT/summary.txt"
done
if [ "$DRY" = 0 ]; then
  echo "--- benchmark table"; tail -n 40 "$OUT/gpu-bench.txt"
  echo "--- end to end"; tail -n 5 "$OUT/gpu-e2e.txt"
  tar czf "$OUT.tgz" -C "$OUT" . && mv "$OUT.tgz" "$OUT/gpu.tgz" && echo "packed: $OUT/gpu.tgz"
fi
exit "$failed"
