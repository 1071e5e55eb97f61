# One command to set up and run the main job, one to set up and run the tests (see README.md).
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
# uv is run through the interpreter so a fresh pip install needs no PATH or pyenv shim
UV := $(PYTHON) -m uv
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
CORE := .venv/bin
DRIFT := drift_transformer/.venv/bin

.PHONY: setup demo test test-slow test-all services lint lock

setup:  ## create both locked environments (core + drift transformer) from the lock files; Java for Spark
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	@bash scripts/ensure-java.sh
	$(UV) sync --frozen --all-groups
	cd drift_transformer && $(UV) sync --frozen --all-groups

services:  ## start PostgreSQL and Redis if they are not running
	bash scripts/ensure-services.sh

demo: setup  ## simulate -> feature store -> training pipeline -> serving -> sample scores
	bash scripts/demo.sh

lint: setup  ## the static gates: ruff (rules + format), import-linter layer contracts, mypy
	$(CORE)/ruff check .
	$(CORE)/ruff format --check .
	PYTHONPATH=.:drift_transformer $(CORE)/lint-imports
	$(CORE)/mypy

test: setup services  ## the default test suite (core + drift environments)
	$(CORE)/pytest -m "not slow"
	cd drift_transformer && .venv/bin/pytest -m "not slow"

test-slow: setup services  ## only the suites marked slow (full pipeline variants, Ctrl-C of the stack, local canary)
	$(CORE)/pytest -m slow
	cd drift_transformer && .venv/bin/pytest -m slow

test-all: test test-slow  ## everything

lock:  ## re-resolve both lock files (never done at install time)
	$(UV) lock
	cd drift_transformer && $(UV) lock
	cd benchmarks/mlserver && $(UV) lock
