# llm-flywheel — every target installs into .venv first (idempotent: only when the lock changed).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export FLYWHEEL_HOME ?= $(CURDIR)/var
export MLFLOW_DISABLE_TELEMETRY := true
export DAGSTER_DISABLE_TELEMETRY := true
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install demo test test-slow dev bench lint clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock 2>&1 | sed '/is ignored: it is neither/d'
	$(PY) -m pip check
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | sed '/Warning\|!!\|\*\*\*\|^ *$$/d' 
	touch $(STAMP)

install: $(STAMP)

demo: install  ## the main job: one turn of the flywheel on the project's own sample data
	$(VENV)/bin/flywheel demo

test: install  ## the default test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow"

test-slow: install  ## long fault tests (200 SIGKILL iterations, ...)
	$(PY) -m pytest -q -m slow

dev: install  ## Dagster UI + daemon on http://127.0.0.1:3000
	$(VENV)/bin/flywheel dev

bench: install  ## every benchmark; figures land in benchmarks/results/*.json
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b $(BENCH_ARGS); done

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf var .pytest_cache
