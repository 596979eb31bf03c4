# `make run` and `make test` work from a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Every install takes its versions from the locks: requirements.lock (what the service runs on,
# also the image's), requirements-train.lock (that plus the [train] extra: the image's build
# stage) and requirements-dev.lock (all that plus the tools, same versions). `make lock`
# re-resolves them from pyproject.toml, newest versions allowed.
LOCK := requirements.lock
TRAIN_LOCK := requirements-train.lock
DEV_LOCK := requirements-dev.lock
COMPILE := $(BIN)/uv pip compile pyproject.toml --python-version 3.11 --quiet --no-header

# The deployment checks' tools (checkov, kubernetes-validate, check-jsonschema) get a venv of
# their own: checkov's pins would downgrade the app's dependencies in .venv.
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed-stamp

.PHONY: run test lint typecheck dockerlint deploycheck unit bench clean lock

# uv, pinned in the dev lock, installs the lock in seconds where pip takes minutes; `sync` also
# removes whatever the lock no longer names. It compiles the bytecode at install time
# (--compile-bytecode): where PYTHONDONTWRITEBYTECODE is set, as on this project's machines, every
# Python process would otherwise compile every library it imports from source, each time —
# about 4 s of every server worker's and CLI command's start on a busy 2-core machine.
UV := $(BIN)/uv
UV_VERSION = $(shell sed -n 's/^uv==//p' $(DEV_LOCK))

$(STAMP): $(LOCK) $(DEV_LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(UV) pip sync --quiet --compile-bytecode --python $(BIN)/python $(DEV_LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

lock: $(STAMP)
	$(COMPILE) --upgrade -o $(LOCK)
	$(COMPILE) --extra train --constraint $(LOCK) -o $(TRAIN_LOCK)
	$(COMPILE) --extra dev --constraint $(TRAIN_LOCK) -o $(DEV_LOCK)

# No --compile-bytecode here: the three tools run once a test run, and compiling checkov's
# dependencies costs ~19 s at install against ~2 s of compiling on the fly.
$(TOOLS_STAMP): deploy/tools-requirements.txt $(STAMP)
	$(PYTHON) -m venv $(TOOLS)
	$(UV) pip sync --quiet --python $(TOOLS)/bin/python deploy/tools-requirements.txt
	touch $(TOOLS_STAMP)

run: $(STAMP)
	$(BIN)/tenantserve serve

lint: $(STAMP)
	$(BIN)/ruff check service auth tenants tests perf
	$(BIN)/ruff format --check service auth tenants tests perf
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy service auth tenants perf tests

dockerlint: $(STAMP)
	$(BIN)/hadolint --failure-threshold warning Dockerfile

deploycheck: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/pytest tests/test_deploy.py

# The app's own modules compiled first, for the same reason as --compile-bytecode above: the
# tests start dozens of server and CLI processes, each of which would compile them again.
# Three xdist workers on two cores: much of the suite waits on servers starting and stopping.
# `--dist loadfile` keeps a module's tests on one worker (tests/conftest.py spreads some).
PYTEST_WORKERS ?= 3
unit: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m compileall -q service auth tenants
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

test: lint typecheck dockerlint unit

bench: $(STAMP)
	$(BIN)/python -m perf.bench
	$(BIN)/python -m perf.model_figures

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache tenantserve.db* models usage-journal
