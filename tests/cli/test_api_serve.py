"""`customllm serve` as a process: HTTP before the model (503 while loading), a port in use,
flag checks, API keys from a file with protected metrics, a signal at any time exits 0; the engine
core's process: its death exits the server non-zero, it never outlives the server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

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
    with subprocess_server(model_dir, "--engine-process", "on", statuses=(503, 200)) as (process, url):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stdout.read()


def test_api_keys_from_a_file_and_protected_metrics(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenants\nkey-one\n\n  key-two  \n")
    with subprocess_server(model_dir, "--api-key-file", str(keys), "--metrics-auth", "--engine-process", "on") as (
            process, url):
        core = engine_core_pid(process.pid)
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
        assert gone_within(core, 5), "the engine core outlived a drained server"


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry))
    return found


def engine_core_pid(server_pid: int) -> int:
    cores = [p for p in children_of(server_pid) if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(cores) == 1, cores
    return cores[0]


def gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_the_engine_core_dying_makes_the_server_exit_non_zero(model_dir):
    with subprocess_server(model_dir, "--engine-process", "on") as (process, url):
        core = engine_core_pid(process.pid)
        os.kill(core, signal.SIGKILL)
        assert process.wait(timeout=30) == 1
        log = process.stdout.read()
        assert "the engine core process died (exit code -9): exiting" in log and "Traceback" not in log


def test_the_engine_core_follows_a_killed_api_process(model_dir):
    with subprocess_server(model_dir, "--engine-process", "on") as (process, url):
        core = engine_core_pid(process.pid)
        process.kill()
        process.wait(timeout=30)
        assert gone_within(core, 10), "the engine core outlived its API process"


def test_one_process_mode_serves(model_dir):
    with subprocess_server(model_dir, "--engine-process", "off") as (process, url):
        assert not [p for p in children_of(process.pid)
                    if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_engine_process_auto_takes_a_process_with_cuda_or_enough_cpus(monkeypatch):
    from server.cli import serve
    from server.executor import threads
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert not serve.engine_process_wanted("auto", "cpu") and serve.engine_process_wanted("on", "cpu")
    monkeypatch.setattr(threads, "available_cpus", lambda: serve.MIN_CPUS_FOR_ENGINE_PROCESS)
    assert serve.engine_process_wanted("auto", "cpu") and not serve.engine_process_wanted("off", "cpu")
