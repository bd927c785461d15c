#!/usr/bin/env bash
# Build the extension here, on the CPU machine, for a GPU machine's Python and torch, so that
# `bash bench/gpu.sh` there measures instead of building (the device reaches no package index
# and a lease is 15 minutes of device time):
#
#   bash bench/gpu_prebuild.sh            # default: Python 3.12, torch 2.11.0, sm_90 (the H100 of 2026-11-27)
#   PYTHON=python3.12 TORCH_SPEC=torch==2.11.0 TORCH_CUDA_ARCH_LIST=9.0 bash bench/gpu_prebuild.sh
#
# Writes build/gpu-carry/: the library (_C.cpython-312-...so), its _build_info.py and
# carry.txt (what it was built with). Carry it in with the device tool's `carry` argument
# ("build/gpu-carry"); bench/gpu.sh uses it when the device's Python ABI, torch release and CUDA
# major version match, and builds on the device otherwise (its fallback). The build runs in a
# copy of the tracked sources (build/gpu-src), so the checkout's own build is not touched.
# Needs nvcc (CUDA 13 here) and network access to PyPI for the venv (about 3 GB, once).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# a pyenv 3.12 first (its shim `python3.12` fails where 3.12 is not the global version)
PYTHON="${PYTHON:-$(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python 2>/dev/null | tail -n 1)}"
PYTHON="${PYTHON:-python3.12}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.11.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PATHGEOM_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}"
VENV="${GPU_VENV:-$ROOT/build/gpu-venv}"
SRC="$ROOT/build/gpu-src"
OUT="${GPU_CARRY:-$ROOT/build/gpu-carry}"
t0=$SECONDS

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy ninja

# the tracked sources (and uncommitted edits of them), nothing else
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z | xargs -0 cp --parents -t "$SRC"
(cd "$SRC" && "$VENV/bin/python" setup.py -q build_ext --inplace)

rm -rf "$OUT" && mkdir -p "$OUT"
cp "$SRC"/pathgeom_fast/_C*.so "$SRC/pathgeom_fast/_build_info.py" "$OUT/"
"$VENV/bin/python" - "$OUT" <<'PYEOF'
import platform, subprocess, sys, sysconfig, torch
out = sys.argv[1]
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
with open(f"{out}/carry.txt", "w") as f:
    f.write(f"python {platform.python_version()} {sysconfig.get_config_var('EXT_SUFFIX')}\n")
    f.write(f"torch {torch.__version__} cuda {torch.version.cuda}\n")
    f.write(f"nvcc {nvcc}\n")
PYEOF
git rev-parse --short HEAD | sed 's/^/git /' >> "$OUT/carry.txt"
echo "arch $TORCH_CUDA_ARCH_LIST" >> "$OUT/carry.txt"
cat "$OUT/carry.txt"
ls -la "$OUT"
echo "gpu_prebuild: done in $((SECONDS - t0)) s; carry build/gpu-carry to the device"
