# `make run` and `make test` work from a fresh clone with only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck dockerlint unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tenantserve serve

lint: $(STAMP)
	$(BIN)/ruff check service auth tenants tests perf
	$(BIN)/ruff format --check service auth tenants tests perf

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
