# Two commands do all set-up: `make demo` (the main job) and `make test`.
# TORCH_SPEC: the CPU wheel on this machine's disk by default; on a GPU machine use e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job: a policy sweep on the embedded (generated, cached) default traces, then the comparison report.
demo: venv
	$(PY) -m sim +experiment=demo
	$(PY) -m analysis report multirun/demo
	@echo "report: multirun/demo/report/report.html (and report.md)"

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: venv
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]  # exit 5: no slow tests collected

bench: venv
	$(PY) benchmarks/bench_sim.py
	$(PY) benchmarks/bench_executor.py

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
