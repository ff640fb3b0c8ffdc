"""`customllm serve` as a process: HTTP before the model (503 while loading), a port in use,
flag checks, API keys from a file with protected metrics, a signal at any time exits 0."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import pytest

from model.loading.builtin import builtin_model_path
from tests.api_server import ROOT, free_port, make_tiny_checkpoint, subprocess_server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-serve"))


def serve_command(model_dir, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--tokenizer",
            str(builtin_model_path()), "--port", str(port), "--kv-cache-memory", "0.02", "--dtype", "float32", *extra]


def test_a_port_in_use_fails_at_once_before_loading_the_model(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(serve_command(model_dir, taken.getsockname()[1]), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 1
    assert "port in use" in result.stderr and "loading model" not in result.stderr


def test_flag_values_are_checked(model_dir):
    result = subprocess.run(serve_command(model_dir, free_port(), "--max-n", "0"), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "--max-n must be at least 1" in result.stderr


def test_a_signal_while_loading_or_serving_exits_0(model_dir):
    # the first answer of /health is 503 while the model loads (200 if loading already finished)
    with subprocess_server(model_dir, statuses=(503, 200)) as (process, url):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stdout.read()


def test_api_keys_from_a_file_and_protected_metrics(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenants\nkey-one\n\n  key-two  \n")
    with subprocess_server(model_dir, "--api-key-file", str(keys), "--metrics-auth") as (process, url):
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Basic key-one"}).status_code == 401
        for key in ("key-one", "key-two"):
            headers = {"Authorization": f"Bearer {key}"}
            assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 200
            assert httpx.get(f"{url}/metrics", headers=headers).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer # tenants"}).status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
