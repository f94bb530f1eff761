# The two front-door commands are `make run` and `make test`; everything else is optional.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := setup.cfg pyproject.toml requirements.txt $(shell find mmgun twisted -name '*.py' 2>/dev/null)

.PHONY: run test unit e2e bench lint clean

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

test: unit e2e

unit: $(STAMP)
	$(BIN)/python -m twisted.trial --jobs=2 tests

e2e: $(STAMP)
	$(BIN)/python -m pytest -q -p twisted e2e-tests

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* var
