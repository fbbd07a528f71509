# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup demo test lint clean

setup:
	@VENV=$(VENV) scripts/setup.sh

demo: setup  ## sample videos + tiny models, then the whole pipeline through Prefect
	$(BIN)/cogpipe demo --workspace demo

test: setup  ## the CPU test suite (GPU tests are skipped without a GPU)
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf demo .pytest_cache .ruff_cache
