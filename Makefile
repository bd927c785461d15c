# The two commands of the README:
#   make demo   set up (venv, torch, build) and run the main job: `pathgeom demo`
#   make test   set up and run the test suite
# Set-up: a virtual environment in $(VENV) with torch $(TORCH_SPEC) (the 2.14.1 CUDA 13.0
# build runs on CPU and lets the CUDA kernels compile and link where nvcc is found) and numpy
# (installed before the build: torch imported without numpy prints "Failed to initialize
# NumPy"), then the package built against it with --no-build-isolation.
# `make test` includes the compiled-kernel checks (Triton AOT for sm_80/sm_90, nvcc -Xptxas -v;
# no GPU needed) and the packaging tests (pure-Python install, python -m build).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
EXTRAS ?= test,hf,lightning,deepspeed,torchtitan
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
MAX_JOBS ?= 2
SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) setup.py pyproject.toml
DEMO_OUT ?= pathgeom-demo

export CUDA_HOME MAX_JOBS

.PHONY: setup demo test bench bench-gpu compile-check dist clean

setup: $(VENV)/.built

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy ninja
	touch $@

$(VENV)/.built: $(VENV)/.torch $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(VENV)/bin/pathgeom demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest tests

bench: setup
	$(VENV)/bin/pathgeom bench

bench-gpu:
	bash bench/gpu.sh

# The compiled-kernel table (registers, spills, 16-byte loads) into bench/results/.
compile-check: setup
	env -u TRITON_INTERPRET $(PY) -m pathgeom_fast.compile_check --out bench/results/compiled-kernels-$$(date -u +%Y-%m-%d).txt

# sdist and a pure-Python wheel, without downloading anything.
dist: setup
	PATHGEOM_BUILD_EXT=0 $(PY) -m build --no-isolation --outdir dist .

clean:
	rm -rf build dist *.egg-info pathgeom_fast/*.so pathgeom_fast/_build_info.py $(VENV)
