# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := numpy "gymnasium[box2d]>=1.0" minigrid highway-env pytest hypothesis pybind11 ninja matplotlib tqdm scipy \
  setuptools wheel stable-baselines3 tyro transformers trl peft accelerate
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp)
PYTEST_ARGS ?=

.PHONY: all venv build demo test test-all info clean FORCE

all: build

# The venv records the torch it was made with ($(VENV)/.torch): another TORCH= reinstalls torch and the extension.
TORCH_CHANGED := $(if $(filter-out $(TORCH),$(shell cat $(VENV)/.torch 2>/dev/null)),FORCE)

$(VENV)/.deps: pyproject.toml $(TORCH_CHANGED)
	@echo "make: [1/4] creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	@echo "make: [2/4] installing $(TORCH) (about a minute)"
	$(VENV)/bin/pip install -q "$(TORCH)"
	@echo "make: [3/4] installing the other dependencies (about a minute): $(DEPS)"
	$(VENV)/bin/pip install -q $(DEPS)
	echo "$(TORCH)" > $(VENV)/.torch
	touch $@

venv: $(VENV)/.deps

# The compiled extension (CPU kernels; CUDA too where a GPU is visible or FASTATTR_FORCE_CUDA=1).
$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	@echo "make: [4/4] compiling fastattr's C++ kernels (about a minute)"
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

info: build
	$(PY) -m fastattr info

demo: build
	$(PY) -m fastattr demo

test: build
	$(PY) -m pytest -m "not cuda and not slow" $(PYTEST_ARGS)

test-all: build
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build fastattr/_C*.so *.egg-info $(VENV)/.built

# ---- CUDA kernels: compiled on every CI run, with or without a GPU ----
# A second venv holds the CUDA build of torch; the extension is built out of tree into build/cuda, so the CPU .so in
# fastattr/ is never replaced, and the import check runs from there. TORCH_CUDA_ARCH_LIST defaults to sm_90 only
# (compile check; release builds use setup.py's Ampere/Hopper/Blackwell+PTX default).
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHS ?= 9.0
CUDA_SRC := $(CSRC) $(wildcard csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py

.PHONY: cuda-build cuda-emu

$(CUDA_VENV)/.deps:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH)" numpy ninja setuptools
	touch $@

build/cuda/.built: $(CUDA_VENV)/.deps $(CUDA_SRC)
	@test -x $(CUDA_HOME)/bin/nvcc || { echo "make cuda-build: no $(CUDA_HOME)/bin/nvcc;" \
	  "install the CUDA 13 toolkit (torch 2.14.1 is cu130) or pass CUDA_HOME=/path/to/cuda" >&2; exit 1; }
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" FASTATTR_FORCE_CUDA=1 MAX_JOBS=2 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda/lib --build-temp build/cuda/tmp
	cp fastattr/*.py build/cuda/lib/fastattr/
	cd build/cuda/lib && $(abspath $(CUDA_VENV))/bin/python -c "import torch, fastattr; from fastattr import ops; \
	  missing = [op for op in ops.OPS if not ops.has_kernel(op, 'cuda')]; \
	  print('fastattr CUDA build: cuda_version', ops.cuda_version(), 'torch', torch.__version__, 'missing', missing); \
	  assert not missing and ops.cuda_version() > 0"
	touch $@

cuda-build: build/cuda/.built

# The CUDA kernels run on CPU threads through tests/cuda_emu (no GPU needed): indexing, masking, reductions.
cuda-emu:
	mkdir -p build
	g++ -std=c++20 -O1 -w -I$(CUDA_HOME)/include -Icsrc tests/cuda_emu/emu_kernels.cpp -o build/cuda_emu -pthread
	./build/cuda_emu
