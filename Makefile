# Set-up is implicit: every target below first makes .venv (CPU torch wheel first, then the
# library and the local server package in editable mode). `make demo` and `make test` are the two
# commands a fresh machine needs.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# PyTorch's CPU-only wheels: on Linux a plain `pip install torch` from PyPI pulls the CUDA build
# (several GB of NVIDIA libraries this project never uses).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck check bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml providers/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so that the library's `torch>=2.3` is already met. A wheel pip
	# finds without an index (a local --find-links folder) wins, and torch's own requirements come
	# with the next line; otherwise PyTorch's CPU index, which also serves those requirements.
	$(PY) -m pip install -q --no-index --no-deps '$(TORCH)' 2>/dev/null \
	  || $(PY) -m pip install -q --index-url $(TORCH_INDEX) '$(TORCH)'
	$(PY) -m pip install -q -e '.[dev,plots]' -e './providers[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dect-maas demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV)
