# Everything runs from a local virtual environment built from pinned versions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# No Prefect telemetry or outside calls (scripts/offline.env, docs/operations.md).
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT := false
export PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY := false

.PHONY: venv demo test lint typecheck unit stress bench clean server server-postgres test-postgres

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(BIN)/takeoff-cache demo --workdir .demo

lint: venv
	$(BIN)/ruff check src tasks flows tests benchmarks scripts
	$(BIN)/ruff format --check src tasks flows tests benchmarks scripts

typecheck: venv
	$(BIN)/python scripts/typecheck.py

unit: venv
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# Crash safety and concurrency at length: hundreds of builds killed with SIGKILL.
stress: venv
	$(BIN)/python -m pytest -q -m stress -s tests/scenarios/test_crash_safety.py tests/scenarios/test_concurrency.py

# Local Prefect server (SQLite, 127.0.0.1:4200), work pool, deployments and a worker.
server: venv
	VENV=$(VENV) scripts/server.sh

# The same on a throwaway PostgreSQL cluster (gone when the server stops).
server-postgres: venv
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,postgres]"
	VENV=$(VENV) scripts/postgres.sh scripts/server.sh

# The Prefect server end-to-end test on PostgreSQL instead of SQLite; not part of `test`.
test-postgres: venv
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,postgres]"
	scripts/postgres.sh $(BIN)/python -m pytest -q tests/prefect/test_prefect_server.py

bench: venv
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/noop.py

clean:
	rm -rf .demo .prefect .pytest_cache .mypy_cache .ruff_cache
