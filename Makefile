PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/cmim: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone: resolved with everything else, pip's backtracking can trade the CPU wheel for
	# the multi-GB CUDA build of the same version. Installed, it satisfies the pin and stays.
	$(BIN)/pip install -q "$$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -c "import sys, torch; torch.version.cuda and sys.exit('a CUDA build of torch was installed: ' + torch.__version__)"
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
