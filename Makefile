# Developer entry points. Each target first brings $(VENV) up to date:
#   make demo     chat with the default model (installs tandem[models])
#   make test     run the test suite (installs tandem[test,models], and Debian's chromium for
#                 the web page's browser test)
#   make lint     ruff check and format check (installs tandem[dev])
#   make format   ruff format, then the fixable lint rules
#
# Variables (make test VAR=value):
#   PYTHON=python3          interpreter that creates the venv
#   VENV=.venv              the virtual environment
#   VENV_FLAGS=             e.g. --system-site-packages, to reuse preinstalled torch, nanobind, ...
#   TORCH=torch==2.13.0     installed before tandem so pip keeps this build of torch; empty: skip
#   BUILD_DEPS=...          build requirements put into the venv: the build runs without isolation
#                           so that build/ stays valid and C++ rebuilds are incremental
#   PIP_BUILD_FLAGS=        extra flags when installing tandem
#   PYTEST_ARGS=, ARGS=     extra arguments for pytest / `tandem chat`
#
# On a machine without a package registry that already has torch, nanobind,
# scikit-build-core, cmake, ninja and pytest:
#   make test VENV_FLAGS=--system-site-packages TORCH= PIP_BUILD_FLAGS=--no-deps
#
# Stamps in the venv record what was installed: dependencies are reinstalled
# only when pyproject.toml changes, the extension rebuilt only when CMakeLists.txt
# or csrc/ changes.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0
BUILD_DEPS ?= scikit-build-core>=0.10 nanobind>=2
PIP_BUILD_FLAGS ?=
PYTEST_ARGS ?=
ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CSRC := CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h)

# Which extras each target needs.
EXTRAS_demo := models
EXTRAS_test := test,models
EXTRAS_dev := dev

.PHONY: demo test lint format clean
.DELETE_ON_ERROR:

demo: $(VENV)/.build-demo
	$(VENV)/bin/tandem chat $(ARGS)

test: $(VENV)/.build-test
	scripts/install_chromium.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.deps-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.deps-dev
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Only the build folder: the venv holds downloads worth keeping (rm -r $(VENV) for those).
clean:
	rm -rf build

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

# Dependencies and a first build of tandem (editable), once per change of pyproject.toml.
$(VENV)/.deps-%: pyproject.toml | $(PY)
	$(if $(strip $(TORCH)),$(PIP) install --progress-bar off '$(TORCH)')
	$(PIP) install --progress-bar off $(foreach dep,$(BUILD_DEPS),'$(dep)')
	$(PIP) install --progress-bar off --no-build-isolation $(PIP_BUILD_FLAGS) -e '.[$(EXTRAS_$*)]'
	touch $@

# The native extension again, incrementally, after a C++ or CMake change.
$(VENV)/.build-%: $(VENV)/.deps-% $(CSRC)
	$(PIP) install --progress-bar off --no-build-isolation --no-deps $(PIP_BUILD_FLAGS) -e .
	touch $@

# Keep the stamps make creates through the pattern rules above.
.PRECIOUS: $(VENV)/.deps-% $(VENV)/.build-%
