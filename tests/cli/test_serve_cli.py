"""`customllm serve` as a process: environment configuration and the SIGTERM drain."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest

from tests.api_server import ROOT, subprocess_server


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-2k")
    subprocess.run([sys.executable, "-m", "server.cli", "weights", "init", "--preset", "custom-llm-tiny", "--set",
                    "vocab_size=49152", "--set", "max_context=2048", "--out", str(directory)],
                   check=True, cwd=ROOT, capture_output=True)
    return directory


def stream_after_signal(url: str, process: subprocess.Popen, max_tokens: int) -> list[dict]:
    """Start a stream, send SIGTERM once the first chunk arrived, read the stream to its end."""
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"prompt": "Hello", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[6:]))
            if len(chunks) == 1:
                process.send_signal(signal.SIGTERM)
    return chunks


def test_sigterm_aborts_what_outlives_the_grace_period(long_context_model):
    with subprocess_server(long_context_model, "--shutdown-grace", "0") as (process, url):
        chunks = stream_after_signal(url, process, max_tokens=2000)
        assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
        assert process.wait(timeout=60) == 0


def test_sigterm_lets_running_requests_finish_within_grace(long_context_model):
    with subprocess_server(long_context_model, "--shutdown-grace", "60") as (process, url):
        chunks = stream_after_signal(url, process, max_tokens=40)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        output = process.stdout.read()
        assert "draining" in output and "Traceback" not in output


def test_environment_variables_configure_the_server(long_context_model):
    with subprocess_server(long_context_model, env={"CUSTOMLLM_MAX_N": "2", "CUSTOMLLM_API_KEY": "k1,k2",
                                                    "CUSTOMLLM_SERVED_MODEL_NAME": "my-model"}) as (process, url):
        headers = {"Authorization": "Bearer k2"}
        assert httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"] == "my-model"
        response = httpx.post(f"{url}/v1/completions", headers=headers, json={"prompt": "x", "n": 3})
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
        assert httpx.get(f"{url}/v1/models").status_code == 401
