# Two commands set everything up on a fresh machine:
#   make run   - create .venv if missing, install, and start the app (demo project ready in the
#                embedded SQLite store under CELLSPOT_HOME, default ./cellspot_data)
#   make test  - create .venv if missing, install, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test browser install bench bench-env clean-data

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -e .
	touch $(STAMP)

install: $(STAMP)

# `cellspot app` migrates the store, builds the demo project when the store is empty and
# starts the app with streamlit_config/; extra options: make run APP_ARGS="--server.port 8600"
run: $(STAMP)
	$(BIN)/cellspot app $(APP_ARGS)

# Debian Chromium for the end-to-end browser tests (tests/e2e, Playwright drives it; never
# `playwright install`). Installed only when missing and possible (root with apt-get);
# otherwise, or when the install fails, the browser tests skip with a reason.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) \
	    || echo "installing chromium failed: the browser tests in tests/e2e will skip"; \
	else \
	  echo "chromium is missing and cannot be installed here (needs root and apt-get):" \
	       "the browser tests in tests/e2e will skip"; \
	fi

test: $(STAMP) browser
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
