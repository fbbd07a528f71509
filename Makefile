# Two commands for a newcomer: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup browser demo test serve lint clean docker-test

setup:
	@VENV=$(VENV) scripts/setup.sh

demo: setup  ## sample videos + tiny models, then the whole pipeline through Prefect
	$(BIN)/cogpipe demo --workspace demo

browser:  ## headless Chromium for the browser test, where apt-get can install it
	@scripts/browser.sh

TEST_WORKERS ?= 2

test: setup browser  ## the CPU test suite (GPU tests are skipped without a GPU)
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadgroup -m "not serial"
	$(BIN)/python -m pytest -q --durations=10 -m serial

docker-test: setup  ## build docker/'s images here and run the compose stack (PostgreSQL) through the demo
	@PYTHON=$(BIN)/python scripts/docker_test.sh

serve: setup  ## Prefect server + pools + deployments + workers on 127.0.0.1:4200 (home: .cogpipe-serve/prefect); Ctrl-C stops
	$(BIN)/cogpipe serve

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf demo .cogpipe-serve .pytest_cache .ruff_cache
