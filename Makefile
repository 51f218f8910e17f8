# `make train` and `make test` install into .venv first (Python 3.10+; torch from the local wheel store).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

train: setup  ## the default job: a short CPU training on the built-in synthetic data set
	$(BIN)/python train.py

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check segkit scripts tests train.py

clean:
	rm -rf $(VENV) outputs
