# iotd: `make run` starts the daemon, `make test` runs the tests, `make bench` the benchmarks.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CONFIG ?= etc/iotd.ini

.PHONY: run test bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

SOURCES := setup.cfg pyproject.toml $(shell find iotd twisted -name '*.py' -o -name '*.sql' 2>/dev/null) \
           $(wildcard iotd/console/*.*)

$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet --force-reinstall --no-deps . && $(BIN)/pip install --quiet .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/twistd --nodaemon --pidfile= iotd --config $(CONFIG)

# BACKENDS=sqlite (or postgresql) runs the suite on one store backend; default both.
test: install-test
	$(if $(BACKENDS),IOTD_TEST_BACKENDS=$(BACKENDS) ,)$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	@for tool in socat haproxy mosquitto cc; do command -v $$tool >/dev/null 2>&1 || echo "$$tool is not installed: the rows that need it are left out or fail (apt-get install socat haproxy mosquitto gcc)"; done
	$(BIN)/python bench/run.py $(if $(QUICK),--quick,)
	$(BIN)/python bench/readme.py

clean:
	rm -rf $(VENV) build *.egg-info
