# flashsale: `make demo` runs a flash sale end to end; `make test` runs the tests.
# Both set everything up on a fresh machine (venv, Kafka jars, system packages as root).

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
FS    := $(VENV)/bin/flashsale
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
FAULT_RUNS ?= 3
# `make up CLUSTER=3` (or demo, test, ...): three Kafka nodes on loopback, RF 3, min.insync 2.
ifdef CLUSTER
export FLASHSALE_CLUSTER := $(CLUSTER)
endif

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml infra/setup-system.sh
	@infra/setup-system.sh
	@# The venv is rebuilt from scratch whenever pyproject.toml changes.
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,dev]'
	@touch $(STAMP)

.PHONY: setup
setup: $(STAMP) ## Create the venv and install system packages (as root) if missing
	@infra/setup-system.sh

.PHONY: up
up: setup ## Start Kafka, PostgreSQL, the processor and the projector; leave them running
	$(FS) infra up --services

.PHONY: down
down: ## Stop everything `make up` started
	@if [ -x $(FS) ]; then $(FS) infra down; else echo "nothing to stop (no venv)"; fi

.PHONY: status
status: ## Show whether the servers answer (JSON: .venv/bin/flashsale infra status --json)
	@$(FS) infra status

.PHONY: demo
demo: setup ## Run a flash sale end to end (reuses what `make up` started, stops what it started)
	$(FS) demo --report .state/demo-report.json

.PHONY: test
test: setup ## Run every test against real Kafka and PostgreSQL (started if not up); of the fault scenarios, the CI subset
	$(PY) -m pytest -m "(not faults or ci) and not bench_smoke" $(PYTEST_ARGS)

.PHONY: test-bench
test-bench: setup ## The benchmark comparison at smoke sizes (every system, none oversells; minutes, not in CI)
	$(PY) -m pytest -m bench_smoke $(PYTEST_ARGS)

.PHONY: test-faults
test-faults: setup ## Every fault-injection scenario, FAULT_RUNS times in a row (default 3); figures in .state/test/faults/
	@for run in $$(seq 1 $(FAULT_RUNS)); do \
		echo "== fault scenarios: pass $$run of $(FAULT_RUNS)"; \
		$(PY) -m pytest -m faults tests/faults $(PYTEST_ARGS) || exit 1; \
	done

.PHONY: lint
lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy flashsale infra schemas producers processors projections

.PHONY: bench
bench: setup ## Benchmarks: print figures and write them to bench-results/
	$(FS) bench

.PHONY: soak
soak: setup ## 10 minutes at 1,000 intents/s (about half the whole system's maximum here), every process's RSS and open files sampled (not in CI)
	$(FS) soak $(SOAK_ARGS)

.PHONY: clean
clean: ## Stop and delete all local server data (keeps the venv and jars)
	@if [ -x $(FS) ]; then $(FS) infra down --wipe; fi
	rm -rf .state/kafka .state/postgres .state/run .state/processor .state/nginx
