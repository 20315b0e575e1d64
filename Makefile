# Two commands matter: `make demo` and `make test`. Each builds .venv by itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck layers pytest test-unit test-slow bench bench-quick server clean

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
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

server: $(STAMP)
	$(BIN)/rolebus server

clean:
	rm -rf $(VENV) .rolebus .mypy_cache .pytest_cache .ruff_cache .import_linter_cache
