# pgsage developer entry points. Both targets create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PGSAGE_ARGS ?=

.PHONY: run test venv lint typecheck unit integration bench clean accel

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[embedded,accel]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[embedded,accel,test]'
	touch $@ $(VENV)/.installed-run

## accel: compile the hot modules of models/accel.py with mypyc (on failure the source serves)
accel: $(VENV)/.installed-run
	$(BIN)/python -c 'from models.accel import build; build()'

## run: install and start `pgsage serve` (configured upstream, else an embedded PostgreSQL)
run: $(VENV)/.installed-run accel
	$(BIN)/pgsage serve $(PGSAGE_ARGS)

## test: install test dependencies (pip + Debian packages) and run every check and test
test: $(VENV)/.installed-test accel
	bash scripts/system-deps.sh
	$(MAKE) lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests/unit

integration: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests/integration

bench: $(VENV)/.installed-test accel
	$(BIN)/python -m bench.overhead

clean:
	-$(BIN)/python -c 'from models.accel import clean; clean()'
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
