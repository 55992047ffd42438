# Two commands for a fresh machine:
#   make demo   set up .venv and run the tiny end-to-end pretraining demo (CPU, a few minutes)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel is installed first so that resolving cupola's `torch>=2.6` never pulls a CUDA build.
# On a GPU machine: make setup TORCH="torch==2.11.0" (or whichever CUDA build you use).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements/core.txt requirements/test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/cupola demo

test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations 15 tests

lint: setup
	$(BIN)/ruff check cupola tests benchmarks
	$(BIN)/ruff format --check cupola tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
