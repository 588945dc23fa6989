# Two commands set up a fresh machine and use it: `make train` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: only this version installs the CPU wheel here; anything else (or a package
# that asks for a newer torch) pulls the multi-GB CUDA build. GPU machines: TORCH_SPEC=torch==2.x.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check --quiet
ARGS ?=
PYTEST_ARGS ?=
# make test's pytest-xdist workers: one per core here. A test file stays on one worker (its
# module fixtures, a training run or a server, are built once); files go out in the order
# tests/conftest.py sorts them (longest first).
TEST_WORKERS ?= 2

.PHONY: install dev train test test-xla lint bench docs reference system-deps clean

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e . "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

# What the tests need outside Python: headless Chromium for the MLflow UI test; SLURM (slurm-wlm,
# munge) for the launcher's two-node cluster tests (tests/launch starts the daemons itself).
system-deps:
	@{ command -v chromium && command -v slurmctld && command -v munged; } >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation slurm-wlm munge; }

# The default job: python -m trainer with no arguments (add overrides with ARGS="key=value ...").
train: install
	$(PY) -m trainer $(ARGS)

test: dev system-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The XLA path's tests, in an environment of their own: torch-xla on PyPI stops at 2.9.0 and needs
# torch 2.9.0, whose PyPI wheel is the CUDA build (about 4 GB to download, 8 GB installed, 4-5
# minutes here), so it stays out of .venv. The tests run the CPU path's half of each comparison in
# .venv (hence `dev`): a checkpoint saved on one path loads on the other.
XLA_VENV ?= .venv-xla
XLA_PY := $(XLA_VENV)/bin/python
XLA_SPEC := torch==2.9.0 torch-xla==2.9.0
XLA_PIP := $(XLA_PY) -m pip install --disable-pip-version-check --quiet

$(XLA_VENV)/.installed: pyproject.toml Makefile
	test -x $(XLA_PY) || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PIP) --upgrade pip
	$(XLA_PIP) $(XLA_SPEC)
	$(XLA_PIP) -e . pytest pytest-timeout $(XLA_SPEC)
	touch $@

test-xla: dev $(XLA_VENV)/.installed
	PJRT_DEVICE=CPU ULTRAMESH_CPU_PYTHON=$(abspath $(PY)) $(XLA_PY) -m pytest -m xla tests/xla $(PYTEST_ARGS)

lint: dev
	$(VENV)/bin/ruff check trainer launch tests bench hydra_plugins

bench: dev
	$(PY) bench/overhead.py

# The manual (docs/, mkdocs.yml) into site/; --strict turns a broken link or anchor into an error.
docs: dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# docs/reference/configuration.md from trainer/config.py and configs/ (tests fail when it is stale).
reference: install
	$(PY) -m trainer.reference

clean:
	rm -rf outputs multirun mlflow.db mlruns .pytest_cache site
