# The two commands of the README quickstart.
VENV ?= .venv
BIN := $(VENV)/bin
# Parallel test workers; override with `make test PYTEST_WORKERS=0` for a serial run.
PYTEST_WORKERS ?= 2

.PHONY: demo test setup setup-dev

demo: setup
	$(BIN)/bev3d demo

test: setup-dev
	$(BIN)/bev3d build-ops
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -rs tests

setup:
	tools/setup_env.sh

setup-dev:
	tools/setup_env.sh --dev
