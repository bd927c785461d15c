#!/usr/bin/env bash
# One call on a GPU machine: rebuild the extension, run the GPU tests (CUDA, compiled Triton,
# >2^31 elements), check correctness against fp64, and time the GPU table.
# Usage: bash bench/gpu.sh [OUT_DIR]   (writes gpu-tests.log, gpu-bench.json, gpu-bench.txt)
# The GPU machines bring their own torch/triton: build against them without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATHGEOM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu-device.txt"
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
$PY -c "import pathgeom_fast as pg, torch; print('extension', pg.extension_available(), pg.extension_error(), torch.__version__)"
$PY -m pytest tests/test_ops_cuda.py tests/test_ops.py -q -rs -x 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
$PY -m pathgeom_fast.cli bench --device cuda --repeats 20 --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.txt"
