"""Real uvicorn servers for API tests: in-process (a thread with its own event loop, so tests can
look at the engine) or as a `customllm serve` subprocess (for signals). Readiness is awaited by
polling /health, never by fixed sleeps."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from model.builtin import builtin_model_path
from server.app import create_app
from server.config import ApiConfig, EngineConfig, ModelLoadConfig, ServerConfig
from server.metrics import Metrics
from server.serving import build_engine

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """custom-llm-tiny with the SmolLM2 vocabulary, random weights, as `weights init` writes it."""
    if not (directory / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "server.cli", "weights", "init", "--preset", "custom-llm-tiny",
                        "--set", "vocab_size=49152", "--std", "0.1", "--seed", str(seed), "--out", str(directory)],
                       check=True, cwd=ROOT, capture_output=True)
    return directory


def wait_healthy(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


class InProcessServer:
    def __init__(self, model_dir: Path, api: ApiConfig | None = None, engine_config: EngineConfig | None = None):
        self.metrics = Metrics()
        config = ServerConfig(
            model=ModelLoadConfig(model=str(model_dir), tokenizer=str(builtin_model_path())),
            engine=engine_config or EngineConfig(kv_cache_memory_gib=0.02, block_size=16),
            api=api or ApiConfig())
        self.engine = build_engine(config, observer=self.metrics)
        self.metrics.bind_engine(self.engine)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.engine, config.api, self.metrics)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()

    def settle(self) -> None:
        """Wait until every request the engine knows of has finished (aborts included), then check
        the block pool's integrity."""
        deadline = time.monotonic() + 30
        while self.engine.num_requests and time.monotonic() < deadline:
            self.engine.flush_inbox(timeout=5)
        assert self.engine.num_requests == 0, "requests still held by the engine"
        self.engine.check_integrity()


@contextlib.contextmanager
def subprocess_server(model_dir: Path, *extra: str, env: dict | None = None):
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--tokenizer",
           str(builtin_model_path()), "--port", str(port), "--kv-cache-memory", "0.02", *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process=process)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
