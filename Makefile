# jaxprune: `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist; each takes whole test files, so module fixtures load once). The
# tests mostly compile and run single-threaded, so two processes use a 2-core machine's cores;
# TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
# The docs site, built strictly: a broken link, a missing page or an unresolved API reference fails.
# (The variable silences Material's banner about MkDocs 2.0.)
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

.PHONY: demo table test test-fast lint format bench docs clean

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxprune needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	@touch $@

$(DEV): pyproject.toml $(RUNTIME)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: $(RUNTIME)
	$(VENV)/bin/jaxprune run experiments/configs/synthetic.yaml
	$(VENV)/bin/jaxprune run experiments/configs/demo.yaml

table: $(RUNTIME)
	$(VENV)/bin/jaxprune run experiments/configs/table.yaml

test: $(DEV)
	$(VENV)/bin/ruff check jaxprune tests experiments benchmarks docs
	$(MKDOCS)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(DEV)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: $(DEV)
	$(VENV)/bin/ruff check jaxprune tests experiments benchmarks docs
	$(VENV)/bin/ruff format --check jaxprune tests experiments benchmarks docs

format: $(DEV)
	$(VENV)/bin/ruff format jaxprune tests experiments benchmarks docs
	$(VENV)/bin/ruff check --fix jaxprune tests experiments benchmarks docs

bench: $(DEV)
	$(PY) benchmarks/objective_step.py
	$(PY) benchmarks/objective_memory.py
	$(PY) benchmarks/eval_throughput.py --windows 2 --seq-len 2048 --batch-size 1 --repeats 2
	$(PY) benchmarks/cpu_kernels.py

docs: $(DEV)
	$(MKDOCS)

clean:
	rm -rf $(VENV) runs site .pytest_cache
