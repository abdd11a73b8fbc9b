# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := numpy "gymnasium[box2d]>=1.0" minigrid pytest pybind11 ninja matplotlib tqdm scipy setuptools wheel
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp)
PYTEST_ARGS ?=

.PHONY: all venv build demo test test-all info clean

all: build

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q $(DEPS)
	touch $@

venv: $(VENV)/.deps

# The compiled extension (CPU kernels; CUDA too where a GPU is visible or FASTATTR_FORCE_CUDA=1).
$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
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
