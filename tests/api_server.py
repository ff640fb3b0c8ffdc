"""Real uvicorn servers for API tests: in-process (a thread with its own event loop, so tests can
look at the engine) or as a `customllm serve` subprocess (for signals). Readiness is awaited by
polling /health, never by fixed sleeps.

The engine every API test runs is the real one over `custom-llm-tiny` (random weights, the SmolLM2
vocabulary and tokenizer), in exact float32 (`--dtype float32`: the API tests compare outputs across
batches and requests, which `--dtype auto`'s measured bfloat16/int4 formats would not keep equal):
`tiny_server_config` and `subprocess_server` are the places that choose it.

Two things are made once per test session and reused, because making them costs seconds each time
while every server only reads them: the tiny checkpoints (`make_tiny_checkpoint` runs `weights init`
once per seed and settings, then copies its files), and SmolLM2's tokenizer, read once from the
built-in GGUF and saved as a tokenizer.json (`tokenizer_dir`), which loads in a fraction of a second
where parsing the GGUF's metadata takes several (every server process loads a tokenizer).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from model.loading.builtin import builtin_model_path
from server.api.app import create_app
from server.api.http_protocol import http_protocol
from server.config import ApiConfig, EngineConfig, ModelLoadConfig, ServerConfig
from server.api.metrics import Metrics
from server.executor.build import build_engine

ROOT = Path(__file__).resolve().parents[1]
TEST_KV_CACHE_GIB = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_checkpoints_made: dict[tuple, Path] = {}


def make_tiny_checkpoint(directory: Path, seed: int = 0, *settings: str) -> Path:
    """custom-llm-tiny with the SmolLM2 vocabulary, random weights, as `weights init` writes it;
    `settings` are extra `--set key=value` overrides. The first checkpoint of each (seed, settings)
    in a test session is written by `weights init`, the next ones are copies of its files."""
    if not (directory / "model.safetensors").is_file():
        made = _checkpoints_made.get((seed, settings))
        if made is not None and (made / "model.safetensors").is_file():
            shutil.copytree(made, directory, dirs_exist_ok=True)
            return directory
        sets = [arg for setting in ("vocab_size=49152", *settings) for arg in ("--set", setting)]
        subprocess.run([sys.executable, "-m", "server.cli", "weights", "init", "--preset", "custom-llm-tiny", *sets,
                        "--std", "0.1", "--seed", str(seed), "--out", str(directory)],
                       check=True, cwd=ROOT, capture_output=True)
        _checkpoints_made[(seed, settings)] = directory
    return directory


@functools.cache
def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer as the tiny servers use it: the built-in GGUF's tokenizer saved once per test
    session as tokenizer.json and tokenizer_config.json (special tokens, chat template) in a directory
    of its own; checked here to load back the same."""
    from model.text.tokenizer import load_tokenizer
    from tests.default_model import tokenizer_of_gguf

    gguf = tokenizer_of_gguf(builtin_model_path())
    directory = Path(tempfile.mkdtemp(prefix="customllm-test-tokenizer-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    gguf.tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": gguf.id_to_token(gguf.bos_token_id), "eos_token": gguf.id_to_token(gguf.eos_token_id),
              "add_bos_token": gguf.add_bos, "chat_template": gguf.chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    saved = load_tokenizer(directory)
    for name in ("bos_token_id", "eos_token_id", "add_bos", "chat_template", "stop_token_ids", "special_token_ids",
                 "vocab_size"):
        assert getattr(saved, name) == getattr(gguf, name), name
    text = "Hello  42 <|im_start|>user\nÉté 中文 😀<|im_end|>"
    assert saved.encode(text) == gguf.encode(text) and saved.decode(gguf.encode(text)) == gguf.decode(gguf.encode(text))
    return directory


def tiny_server_config(model_dir: Path, api: ApiConfig | None = None,
                       engine: EngineConfig | None = None, tokenizer: Path | None = None) -> ServerConfig:
    """The tiny model's server settings; `tokenizer` defaults to the built-in model's (SmolLM2's)."""
    tokenizer = tokenizer or tokenizer_dir()
    return ServerConfig(model=ModelLoadConfig(model=str(model_dir), tokenizer=str(tokenizer), dtype="float32"),
                        engine=engine or EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, block_size=16),
                        api=api or ApiConfig())


def wait_healthy(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None,
                 statuses: tuple[int, ...] = (200,)) -> int:
    """Poll /health until it answers with one of `statuses`; returns that status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            status = httpx.get(f"{url}/health", timeout=2).status_code
            if status in statuses:
                return status
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url}/health did not answer {statuses} in {timeout} s")


class UvicornThread:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port from a background thread."""

    def __init__(self, app, ready_statuses: tuple[int, ...] = (200,), header_timeout_s: float = 10.0):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_statuses = ready_statuses
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http=http_protocol(header_timeout_s)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_healthy(self.url, statuses=self.ready_statuses)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class InProcessServer(UvicornThread):
    """The real engine over the tiny model behind the real app."""

    def __init__(self, model_dir: Path, api: ApiConfig | None = None, engine_config: EngineConfig | None = None,
                 tokenizer: Path | None = None):
        self.metrics = Metrics()
        self.config = tiny_server_config(model_dir, api, engine_config, tokenizer)
        self.engine = self.build_engine()
        self.metrics.bind_engine(self.engine)
        super().__init__(create_app(self.engine, self.config.api, self.metrics),
                         header_timeout_s=self.config.api.header_timeout_s)

    def build_engine(self):
        return build_engine(self.config, observer=self.metrics)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.engine.stop()

    def settle(self) -> None:
        """Wait until every request the engine knows of has finished (aborts included), then check
        the block pool's integrity."""
        deadline = time.monotonic() + 30
        while self.engine.num_requests and time.monotonic() < deadline:
            self.engine.flush_inbox(timeout=5)
        assert self.engine.num_requests == 0, "requests still held by the engine"
        self.engine.check_integrity()


class EngineProcessServer(InProcessServer):
    """The tiny model's engine core in a process of its own (`serve --engine-process on`), the app and
    uvicorn in this one."""

    def build_engine(self):
        from server.engine.core_client import EngineCoreClient
        engine = EngineCoreClient(self.config, observer=self.metrics, log_level="warning").start()
        try:
            engine.wait_ready(timeout=180)
        except BaseException:
            engine.stop()
            raise
        return engine

    def settle(self) -> None:
        """Wait until the core holds no request (aborts included), then check its block pool."""
        deadline = time.monotonic() + 30
        while self.engine.check_integrity() and time.monotonic() < deadline:
            pass
        assert self.engine.check_integrity() == 0, "requests still held by the engine core"


def openai_client(srv) -> "openai.OpenAI":
    """The official client for a test server, without retries (a test sees every failure)."""
    import openai
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)


class StepGate:
    """Wraps the engine's model execution to count steps and hold them from step `hold_from` on
    until `release()`; records when the HTTP layer aborts a request."""

    def __init__(self, engine, monkeypatch, hold_from: int = 1):
        self.calls = 0
        self.hold_from = hold_from
        self.holding = threading.Event()
        self.released = threading.Event()
        self.aborted: list[str] = []
        self.abort_seen = threading.Event()
        # every step's forward goes through execute_batch (prefill steps built from chunks, decode
        # steps from the persistent batch)
        execute, abort = engine.core.runner.execute_batch, engine.abort

        def gated_execute(batch):
            self.calls += 1
            if self.calls >= self.hold_from and not self.released.is_set():
                self.holding.set()
                self.released.wait(timeout=60)
            return execute(batch)

        def recorded_abort(request_id: str) -> None:
            abort(request_id)
            self.aborted.append(request_id)
            self.abort_seen.set()

        monkeypatch.setattr(engine.core.runner, "execute_batch", gated_execute)
        monkeypatch.setattr(engine, "abort", recorded_abort)

    def release(self) -> None:
        self.released.set()


@contextlib.contextmanager
def subprocess_server(model_dir: Path, *extra: str, env: dict | None = None, statuses: tuple[int, ...] = (200,)):
    """`customllm serve` over `model_dir`; yields once /health answers one of `statuses`."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--tokenizer",
           str(tokenizer_dir()), "--port", str(port), "--kv-cache-memory", str(TEST_KV_CACHE_GIB),
           "--dtype", "float32", *extra]
    process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process=process, statuses=statuses)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
