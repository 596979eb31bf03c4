# `make run` and `make test` work from a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Every install takes its versions from the locks: requirements.lock (what the service runs on,
# also the image's) and requirements-dev.lock (that plus the tools, same versions). `make lock`
# re-resolves both from pyproject.toml, newest versions allowed.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
COMPILE := $(BIN)/uv pip compile pyproject.toml --python-version 3.11 --quiet --no-header

.PHONY: run test lint typecheck dockerlint unit bench clean lock

$(STAMP): $(LOCK) $(DEV_LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lock: $(STAMP)
	$(COMPILE) --upgrade -o $(LOCK)
	$(COMPILE) --extra dev --constraint $(LOCK) -o $(DEV_LOCK)

run: $(STAMP)
	$(BIN)/tenantserve serve

lint: $(STAMP)
	$(BIN)/ruff check service auth tenants tests perf
	$(BIN)/ruff format --check service auth tenants tests perf
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy service auth tenants perf

dockerlint: $(STAMP)
	$(BIN)/hadolint --failure-threshold warning Dockerfile

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck dockerlint unit

bench: $(STAMP)
	$(BIN)/python -m perf.bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache tenantserve.db* models usage-spill
