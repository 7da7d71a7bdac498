# The only entry points: setup · generate · run · test · lint · bench.
# `make run` and `make test` each work on a fresh clone with nothing done first.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# `make run CONFIG=...`, else the file $LLM_GATEWAY_CONFIG names, as `serve` reads it.
CONFIG ?= $(or $(LLM_GATEWAY_CONFIG),config/gateway.yaml)
STAMP := $(VENV)/.setup-stamp
# The suite mostly waits on sockets and subprocesses: test processes side by side (xdist),
# the local model's tests in one of them (they share one llama.cpp server). Three on the
# 2-core machine: about 470 s for 6,600 tests (two took 620 s for fewer), the CPUs still not full.
# `TEST_WORKERS=0` runs it in this process.
TEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup
# Every installed package's version, pinned (see its header): installs are reproducible.
CONSTRAINTS := constraints.txt
PROTOS := $(shell find protos/llmgateway -name '*.proto')
# Node tooling (buf, ts-proto, tsc) and the Node client, pinned by its package-lock.json.
NODE_DIR := clients/node
NODE_MODULES := $(NODE_DIR)/node_modules/.package-lock.json
BUF := $(NODE_DIR)/node_modules/.bin/buf

.PHONY: setup generate run test test-fast lint bench redis-server node-setup clean

setup: $(STAMP)

# llama.cpp is compiled for this CPU (-march=native) but without AMX: some VMs advertise
# AMX yet fault on its instructions (SIGILL on the first call); an explicit -mno-* beats
# what -march=native turns on. x86 only: other compilers' targets have no such flags.
ifeq ($(shell uname -m),x86_64)
LLAMA_CPU_FLAGS := CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
	CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
endif

# Builds llama-cpp-python from source the first time (about 6 minutes on 2 cores);
# pip caches the wheel, so later setups take seconds.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -c $(CONSTRAINTS) pip wheel setuptools
	@echo ">>> installing llm-gateway (first run compiles llama.cpp: ~6 min on 2 cores)"
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(LLAMA_CPU_FLAGS) $(PY) -m pip install --progress-bar on \
		-c $(CONSTRAINTS) -e '.[dev,local]'
	@touch $@

node-setup: $(NODE_MODULES)

$(NODE_MODULES): $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund

generate: $(STAMP) $(NODE_MODULES)
	$(PY) -m grpc_tools.protoc -I protos \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=generated --grpc_python_out=generated \
		--mypy_out=generated --mypy_grpc_out=generated $(PROTOS)
	touch generated/llmgateway/py.typed  # typed for those who install the package (PEP 561)
	rm -rf generated/ts
	$(BUF) generate protos --template protos/buf.gen.yaml

run: $(STAMP)
	$(PY) -m service serve --config $(CONFIG)

redis-server:
	@command -v redis-server >/dev/null || { echo ">>> installing redis-server"; \
		apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

# The slowest tests are listed at the end: CI's log shows where its ten minutes go.
test: $(STAMP) redis-server node-setup
	$(PY) -m pytest $(PYTEST_PARALLEL) --durations=15

test-fast: $(STAMP) redis-server node-setup
	$(PY) -m pytest $(PYTEST_PARALLEL) -m 'not local_model'

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(NODE_DIR)/node_modules $(NODE_DIR)/dist
