# Two commands do all set-up: `make demo` (the main job) and `make test`.
# TORCH_SPEC: the CPU wheel on this machine's disk by default; on a GPU machine use e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench lint clean validate-gpu gpu-wheels gpu-check

venv: $(STAMP)

# Set-up prints pip's own progress (each package as it is collected, a bar per download); the steps say where they are.
$(STAMP): pyproject.toml
	@echo "set-up 1/3: creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@echo "set-up 2/3: installing $(TORCH_SPEC) (the largest download)"
	$(PY) -m pip install $(TORCH_SPEC)
	@echo "set-up 3/3: installing the project and its dependencies"
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)
	@echo "set-up done: $(VENV) is ready"

# The main job: a policy sweep on the embedded (generated, cached) default traces, then the comparison report.
demo: venv
	$(PY) -m sim +experiment=demo
	$(PY) -m analysis report multirun/demo

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: venv
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]  # exit 5: no slow tests collected

bench: venv
	$(PY) benchmarks/bench_sim.py --general
	$(PY) benchmarks/bench_kernel.py --check
	$(PY) benchmarks/bench_executor.py
	$(PY) benchmarks/bench_executor_stall.py

# On a CUDA machine: the `gpu` tests, then `analysis validate` with executor.backend=cuda. Pass TORCH_SPEC (on the
# command line or in the environment) to first replace the venv's torch with that build, e.g.
#   make validate-gpu TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
# without it the venv's torch is used as is; either way the target stops at once if torch sees no GPU.
validate-gpu: venv
ifneq ($(origin TORCH_SPEC),file)
	$(PY) -m pip uninstall -y torch
	$(PY) -m pip install $(TORCH_SPEC)
endif
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		f'validate-gpu: torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)')"
	$(PY) -m pytest -m gpu
	$(PY) -m analysis validate --backend cuda --out outputs/validate-gpu

# The wheels the offline GPU check installs on a bare GPU machine (requirements-gpu-check.txt: pure Python, a few
# MiB, hash-checked), into wheels/ (git-ignored); run it where the registry is reachable, then carry wheels/ along.
gpu-wheels: venv
	$(PY) scripts/gpu_wheels.py download --dest wheels

# On a GPU machine, offline, in under 8 minutes: installs what is missing from wheels/, then the gpu tests, the copy
# bandwidth vs the link's peak, model mode --check on the reference model and `analysis validate --backend cuda`;
# writes $(GPU_CHECK_OUT)/summary.md and summary.json (scratch in $(GPU_CHECK_WORK)). Uses the machine's python3
# (with its torch), no venv; docs/gpu.md.
GPU_CHECK_OUT ?= outputs/gpu-check
GPU_CHECK_WORK ?= outputs/gpu-check-work
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT) --work $(GPU_CHECK_WORK)

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .cache
