# The two front-door commands are `make run` and `make test`; everything else is optional.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := setup.cfg pyproject.toml requirements.txt $(shell find mmgun twisted -name '*.py' 2>/dev/null)

.PHONY: run test lint unit e2e netns fuzz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# A regular (non-editable) install: twistd only sees the plugin in twisted/plugins/ of an installed
# distribution. Reinstalled whenever a source file changes.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	@rm -rf build mmgun.egg-info
	@touch $(STAMP)

run: $(STAMP)
	@mkdir -p var
	$(BIN)/twistd --pidfile= -n mmgun

test: lint unit e2e netns fuzz

# ruff and mypy (with the mypy-zope plugin); both are configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m mypy

# One private PostgreSQL cluster (tests/pgcluster.py) for the whole run, in MMGUN_TEST_POSTGRES.
unit: $(STAMP)
	$(BIN)/python -m tests.pgcluster -- $(BIN)/python -m twisted.trial --jobs=2 tests

# Real processes on loopback, then a scan of their logs for secrets and message bodies.
e2e: $(STAMP)
	e2e-tests/run.sh
	$(BIN)/python e2e-tests/scan-logs.py

# Two mmgun hosts on one PostgreSQL in network namespaces: kill -9, a cut database path, a
# PostgreSQL restart (needs root for ip netns; about a minute).
netns: $(STAMP)
	e2e-tests/netns/run.sh

# schemathesis against a live frontend and docs/openapi.yaml (bounded).
fuzz: $(STAMP)
	e2e-tests/schemathesis.sh

bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* var
