# Two commands set everything up on a fresh machine:
#   make run   - create .venv if missing, install, build the demo project in the embedded
#                SQLite store (CELLSPOT_HOME, default ./cellspot_data) and print its summary
#   make test  - create .venv if missing, install, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench bench-env clean-data

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/cellspot init
	$(BIN)/cellspot demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The Zooniverse reducer used as a baseline pins older numpy/scikit-learn: own venv.
.venv-bench/.installed: bench/requirements.txt
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet -r bench/requirements.txt
	touch $@

bench-env: .venv-bench/.installed

bench: $(STAMP) bench-env
	$(BIN)/python bench/consensus.py
	$(BIN)/python bench/consensus.py --speed

clean-data:
	rm -rf cellspot_data bench/out
