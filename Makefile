# Everything runs from a local virtual environment built from pinned versions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv demo test lint typecheck unit stress bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/takeoff-cache demo --workdir .demo

lint: venv
	$(BIN)/ruff check src tasks flows tests benchmarks

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: venv
	$(BIN)/python benchmarks/engines.py

clean:
	rm -rf .demo .pytest_cache .mypy_cache .ruff_cache
