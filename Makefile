# emlab: the two newcomer commands are `make run` and `make test` (see README).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
# The CPU build of torch that this project is tested with. On a GPU machine set
# TORCH_SPEC to the CUDA build you want (see README, "Installing on a GPU cluster").
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test test-fast bench report clean

$(VENV)/.emlab-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The tests also check SAE folders against SAELens itself, which installs beside the pinned stack.
$(VENV)/.emlab-test-installed: $(VENV)/.emlab-installed
	$(PY) -m pip install -q -e ".[test,saelens]"
	touch $@

# The benchmarks' competitors (sparsify, SAELens) install beside the pinned stack.
$(VENV)/.emlab-bench-installed: $(VENV)/.emlab-installed
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

setup: $(VENV)/.emlab-installed

# Sets up and runs the default DAG (the persona-world organism) to its figures and report.
run: setup
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES)
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores 1 --report results/report.html

# Sets up and runs the whole test suite, slow end-to-end tests included, on two workers (each test file on one
# worker, so a file's shared run is built once); the slowest tests are listed at the end.
test: $(VENV)/.emlab-test-installed
	$(PY) -m pytest -ra --durations=15 -n 2 --dist loadfile

test-fast: $(VENV)/.emlab-test-installed
	$(PY) -m pytest -ra -m "not slow and not slurm"

# Every benchmark against its baseline, in one table (results/bench/summary.csv); a few minutes.
bench: $(VENV)/.emlab-bench-installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf results .snakemake
