PY ?= python
# The oldest transformers setup.py allows (its `transformers>=X` floor).
FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' setup.py)
FLOOR_VENV ?= $(or $(TMPDIR),/tmp)/qwenmoe-gb-floor-venv

.PHONY: install install-newest lint format test test-floor check ci demo

install:  ## the tested versions (constraints.txt)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e ".[dev]"

install-newest:  ## every package at its tested version except transformers: the newest setup.py allows
	$(PY) -m pip install -q torch==2.13.0
	grep -v '^transformers==' constraints.txt > $(or $(TMPDIR),/tmp)/qwenmoe-gb-constraints.txt
	$(PY) -m pip install -q -c $(or $(TMPDIR),/tmp)/qwenmoe-gb-constraints.txt -e ".[dev]"
	$(PY) -m pip install -q -c $(or $(TMPDIR),/tmp)/qwenmoe-gb-constraints.txt --upgrade "transformers>=$(FLOOR),<6"

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test:
	$(PY) -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	$(PY) -m pytest -q

test-floor:  ## the suite again on transformers==$(FLOOR), everything else shared with $(PY)'s environment
	$(PY) -m venv --system-site-packages $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps "transformers==$(FLOOR)"
	$(MAKE) test PY=$(FLOOR_VENV)/bin/python

check: lint test

ci: install-newest check test-floor

demo:
	qwenmoe-gb pretrain
