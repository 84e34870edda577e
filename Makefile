# Two entry points (see README): `make train` and `make test`. Each sets up .venv first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# transformers (HF interop tests) needs torch; a CPU build avoids gigabytes of CUDA wheels.
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?= -n 2 -q

.PHONY: setup setup-dev train test test-slow lint bench presets clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(BIN)/pip install -q "$(TORCH_CPU)" || $(BIN)/pip install -q --index-url $(TORCH_INDEX) torch
	$(BIN)/pip install -q -e '.[dev,hf,beam,cloud,track,eval]'
	touch $@

setup: $(VENV)/.core
setup-dev: $(VENV)/.dev

# The main job: train the tiny preset on the embedded corpus (no download) on CPU, then sample.
train: setup
	$(BIN)/python scripts/train.py --config=configs/tiny.py --workdir=$(WORKDIR)

# The default test suite (fast; what CI runs).
test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Long end-to-end tests (learning, kill/resume); a separate CI step.
test-slow: setup-dev
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# ruff: pycodestyle errors and warnings, pyflakes (settings in pyproject.toml); a CI step.
lint: setup-dev
	$(BIN)/ruff check

presets: setup
	$(BIN)/python scripts/presets.py

bench: setup-dev
	$(BIN)/python scripts/bench.py --reference=torch

clean:
	rm -rf $(VENV) runs .pytest_cache
