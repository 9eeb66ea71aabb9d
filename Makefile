# Targets used by people and by CI alike. `make test` works on a fresh machine: it creates the venv,
# installs the project with its test extras, lints, type-checks and runs the suite against the
# PostgreSQL and RabbitMQ at DATABASE_URL / AMQP_URL (starting them with docker compose if unreachable).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install lint test unit services run run-gateway run-worker migrate bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

services: install
	$(BIN)/python scripts/ensure_services.py
	$(BIN)/python scripts/enable_rabbitmq_prometheus.py

# The 15 slowest tests are listed at the end: a test that grows slow is seen the day it does.
test: lint services
	$(BIN)/pytest --durations=15

# The edit-test loop, under 10 s: property tests run a fifth of their examples (tests/hypothesis_profiles.py;
# `make test` runs them all), and the pytest plugins no unit test uses are not loaded (schemathesis alone
# costs a second of start-up).
unit: install
	$(BIN)/pytest tests/unit --hypothesis-profile=quick -p no:schemathesis -p no:anyio

migrate: install
	$(BIN)/python -m shared.migrate

# The whole system in one terminal: migrate, WORKERS workers (metrics on 9100, 9101, ...) and the gateway, their
# logs interleaved (`worker-1 | ...`); Ctrl-C stops the gateway, then the workers, each draining (scripts/supervise.py).
WORKERS ?= 2
run: install
	$(BIN)/python scripts/supervise.py --workers $(WORKERS)

run-worker: install
	$(BIN)/python -m worker

run-gateway: install
	$(BIN)/python -m gateway

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
