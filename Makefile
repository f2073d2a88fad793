PY ?= python3
# The service's environment, the test servers' environments and the system services are built side by side.
MAKEFLAGS += --jobs=4
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

# Third-party model servers the remote-verification tests start (KServe's ModelServer, MLServer), each in its
# own environment: their pins conflict with each other and with the service's FastAPI. Built in parallel.
SERVERS := .venv-servers
SERVER_REQS := tests/service/remote_servers
$(SERVERS)/ready: $(SERVER_REQS)/requirements-kserve.txt $(SERVER_REQS)/requirements-mlserver.txt
	rm -rf $(SERVERS)/kserve $(SERVERS)/mlserver && mkdir -p $(SERVERS)
	for s in kserve mlserver; do \
	  ( $(PY) -m venv $(SERVERS)/$$s && $(SERVERS)/$$s/bin/pip install -q --upgrade pip && \
	    $(SERVERS)/$$s/bin/pip install -q -r $(SERVER_REQS)/requirements-$$s.txt ) & \
	done; wait
	$(SERVERS)/kserve/bin/python -c "import kserve, onnxruntime"
	$(SERVERS)/mlserver/bin/python -c "import mlserver, mlserver_sklearn, sklearn"
	touch $@

# numpy and nothing else: the evidence bundle's check script is run there, as an expert without cmim would.
$(SERVERS)/numpy/ready:
	rm -rf $(SERVERS)/numpy && $(PY) -m venv $(SERVERS)/numpy
	$(SERVERS)/numpy/bin/pip install -q numpy
	touch $@

.PHONY: install servers services run test lint bench
install: $(BIN)/cmim servers

servers: $(SERVERS)/ready $(SERVERS)/numpy/ready

run: $(BIN)/cmim
	$(BIN)/cmim serve

services:
	bash scripts/services

test: install services
	$(BIN)/ruff check ml app worker migrations tests bench
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

bench: $(BIN)/cmim
	$(BIN)/cmim bench speed
