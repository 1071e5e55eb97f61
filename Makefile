# One command to set up and run the main job, one to set up and run the tests (see README.md).
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
CORE := .venv/bin
DRIFT := drift_transformer/.venv/bin

.PHONY: setup demo test test-all services lock

setup:  ## create both locked environments (core + drift transformer) from the lock files
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	uv sync --frozen --all-groups
	cd drift_transformer && uv sync --frozen --all-groups

services:  ## start PostgreSQL and Redis if they are not running
	bash scripts/ensure-services.sh

demo: setup  ## simulate -> feature store -> training pipeline -> serving -> sample scores
	bash scripts/demo.sh

test: setup services  ## the default test suite (core + drift environments)
	$(CORE)/pytest -m "not slow"
	cd drift_transformer && .venv/bin/pytest

test-all: setup services  ## everything, including suites marked slow
	$(CORE)/pytest
	cd drift_transformer && .venv/bin/pytest

lock:  ## re-resolve both lock files (never done at install time)
	uv lock
	cd drift_transformer && uv lock
