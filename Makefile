# The two Quick start commands: `make demo` (run the main job on embedded defaults) and
# `make test` (lint, types, tests). Both create .venv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint types unit native bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The gateway's chunk path compiled with mypyc into src/unbroken/_compiled/ (a no-op when up
# to date; without a C compiler it says so and the sources run). UNBROKEN_PURE_PYTHON=1 at
# run time runs the sources anyway.
native: $(STAMP)
	$(BIN)/python tools/compile_native.py

demo: native
	$(BIN)/unbroken demo

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/ruff check src tests bench tools

types: $(STAMP)
	$(BIN)/mypy

unit: native
	$(BIN)/pytest --cov=unbroken --cov-report= $(PYTEST_ARGS)
	$(BIN)/coverage report --include='src/unbroken/core/*' --fail-under=100
	$(BIN)/coverage report --fail-under=90

test: lint types unit

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .coverage src/unbroken/_compiled
