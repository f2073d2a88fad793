PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/cmim: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install services run test lint bench
install: $(BIN)/cmim

run: install
	$(BIN)/cmim serve

services:
	bash scripts/services

test: install services
	$(BIN)/ruff check ml app worker migrations tests bench
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

bench: install
	$(BIN)/cmim bench speed
