# `make train` and `make test` install into .venv first (Python 3.10+; torch from the local wheel store),
# at the exact versions of requirements/constraints.txt (pyproject.toml declares the tested ranges).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
CAMVID ?= ../shared/datasets/camvid

.PHONY: setup train test test-fast typecheck lint lock gpu-pack clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

train: setup  ## the default job: a short CPU training on the built-in synthetic data set
	$(BIN)/python train.py

test: setup typecheck  ## what CI runs: types, the import layers, then every test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-fast: setup  ## the inner loop: every test but those marked slow (pyproject.toml markers)
	$(BIN)/python -m pytest -m "not slow"

typecheck: setup  ## mypy over segkit, tests, hydra_plugins and scripts (pyproject.toml [tool.mypy])
	$(BIN)/mypy

lint: setup  ## style and the import layers (pyproject.toml [tool.importlinter])
	$(BIN)/ruff check segkit scripts tests train.py
	$(BIN)/lint-imports

lock: setup  ## after an upgrade that passed the tests: record the exact versions
	{ sed -n '1,2p' $(CONSTRAINTS); $(BIN)/pip freeze --all --exclude-editable | grep -v -e '^#' -e '^pip=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

gpu-pack:  ## wheels the GPU machine lacks + CamVid, in .gpu-pack/ (docs/benchmarks.md, "On the GPU machine")
	CAMVID=$(CAMVID) PYTHON=$(PYTHON) bash scripts/gpu_pack.sh .gpu-pack

clean:
	rm -rf $(VENV) outputs .gpu-pack gpu-check-out .mypy_cache
