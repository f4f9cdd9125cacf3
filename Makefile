# The README's commands, so that users and CI run the same thing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast lint table

install:
	$(PY) -m venv $(VENV) && $(BIN)/pip install -q -e ".[dev]"

quickstart: install
	$(BIN)/python train.py experiment=quickstart

test: install
	$(BIN)/python -m pytest -n auto --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -m "not slow" -x -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

table:
	$(BIN)/python scripts/model_table.py
