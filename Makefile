# fedge: `make demo`, `make test`, `make bench`. Each creates .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedge-installed
# Real datasets for tests and benchmarks (never copied into the repo).
export FEDGE_DATA_DIR ?= $(abspath ../shared/datasets)

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedge simulate

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy fedge server client strategies simulation deploy

# Everything, slow end-to-end tests included (CI runs this).
test: lint
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/engines.py
	$(PY) benchmarks/export.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/secagg.py
	$(PY) benchmarks/privacy.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
