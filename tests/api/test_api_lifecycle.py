"""The HTTP layer's life cycle through a real uvicorn server and the real engine: readiness, client
disconnects in every phase (each aborted within one engine step), gauges and counters that follow
the engine, body limits, rejections, and failures inside a stream."""
from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import server.api.http_guard as http_guard
import server.api.responses as responses_module
from server.api.app import create_app
from server.config import ApiConfig, EngineConfig
from server.api.metrics import Metrics
from tests.api.http import assert_openai_error, metric, post, scrape, sse_events
from tests.api_server import TEST_KV_CACHE_GIB, InProcessServer, StepGate, UvicornThread

STRICT_BODY_BYTES = 2048


@pytest.fixture(scope="module")
def strict(model_dir):
    """Small body limit and a single session slot."""
    with InProcessServer(model_dir, api=ApiConfig(max_body_bytes=STRICT_BODY_BYTES),
                         engine_config=EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, max_sessions=1)) as srv:
        yield srv


@pytest.fixture
def gate_for(monkeypatch):
    """Makes StepGates and releases them all at teardown, so that a failing test leaves no engine
    step held."""
    gates = []

    def make(srv, hold_from: int = 1) -> StepGate:
        gates.append(StepGate(srv.engine, monkeypatch, hold_from=hold_from))
        return gates[-1]
    yield make
    for gate in gates:
        gate.release()


def wait_for_metrics(srv, condition, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(srv)
        if condition(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def raw_request(port: int, path: str, payload: bytes, headers: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}".encode()
                 + (b"\r\n" if headers else f"Content-Length: {len(payload)}\r\n\r\n".encode()) + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# ---- readiness ----------------------------------------------------------------------------------
def test_before_the_engine_is_attached_the_api_answers_503(server):
    app = create_app(None, ApiConfig(), Metrics())
    with UvicornThread(app, ready_statuses=(503,)) as bare:
        health = httpx.get(f"{bare.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "x"}),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                                   ("POST", "/tokenize", {"prompt": "x"}), ("GET", "/v1/sessions", None)]:
            response = httpx.request(method, f"{bare.url}{path}", json=body, timeout=30)
            assert_openai_error(response, 503)
            assert response.headers["retry-after"]
        assert httpx.get(f"{bare.url}/metrics").status_code == 200
        app.state.engine = server.engine
        assert httpx.get(f"{bare.url}/health").status_code == 200
        assert post(bare, "/v1/completions", {"prompt": "Hello", "max_tokens": 2}).status_code == 200
    server.settle()


# ---- disconnects --------------------------------------------------------------------------------
@pytest.mark.parametrize("stream, hold_from", [(False, 1), (True, 1), (True, 2)],
                         ids=["non-streaming", "streaming-before-first-token", "streaming-midway"])
def test_disconnect_aborts_within_one_engine_step(server, gate_for, stream, hold_from):
    aborted_before = metric(scrape(server), "customllm_requests_finished_total", '{finish_reason="abort"}')
    gate = gate_for(server, hold_from)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200,
            "ignore_eos": True, "stream": stream}
    sock = raw_request(server.port, "/v1/chat/completions", json.dumps(body).encode())
    try:
        assert gate.holding.wait(30), "the engine never ran the request"
        if hold_from > 1:
            assert b"data: " in read_until(sock, b"data: ")
    finally:
        sock.close()                                   # the client leaves while step `hold_from` runs
    assert gate.abort_seen.wait(30), "the HTTP layer did not abort the request"
    gate.release()
    server.settle()
    assert gate.calls == hold_from, "the engine ran steps for a request whose client had gone"
    assert server.engine.kv.pool.num_used_blocks == server.engine.kv.sessions.num_pinned_blocks
    after = scrape(server)
    assert metric(after, "customllm_requests_finished_total", '{finish_reason="abort"}') == aborted_before + 1


# ---- gauges -------------------------------------------------------------------------------------
def test_running_waiting_and_cache_gauges_follow_the_engine(server, gate_for):
    idle = scrape(server)
    gate = gate_for(server)
    body = {"prompt": "gauges " * 40, "max_tokens": 4, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, server, "/v1/completions", body)
        assert gate.holding.wait(30)
        second = pool.submit(post, server, "/v1/completions", {**body, "prompt": "other " * 40})
        busy = wait_for_metrics(server, lambda text: metric(text, "customllm_requests_waiting") == 1)
        gate.release()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert metric(busy, "customllm_requests_waiting") == 1
    assert metric(busy, "customllm_requests_running") == 1
    assert metric(busy, "customllm_kv_cache_usage_ratio") > metric(idle, "customllm_kv_cache_usage_ratio")
    server.settle()
    done = scrape(server)
    assert metric(done, "customllm_requests_running") == metric(done, "customllm_requests_waiting") == 0
    assert metric(done, "customllm_kv_cache_usage_ratio") == metric(idle, "customllm_kv_cache_usage_ratio")


def test_session_eviction_and_rejections_are_counted(strict):
    before = scrape(strict)
    chat = {"messages": [{"role": "user", "content": "remember me"}], "max_tokens": 2}
    for session in ("first", "second"):
        assert post(strict, "/v1/chat/completions", chat, headers={"X-Session-ID": session}).status_code == 200
    assert [s["id"] for s in httpx.get(f"{strict.url}/v1/sessions").json()["data"]] == ["second"]
    assert_openai_error(post(strict, "/v1/completions", {"prompt": "x", "temperature": 9}), 400, "temperature")
    assert_openai_error(post(strict, "/v1/completions", {"prompt": "x", "model": "nope"}), 404, "model")
    assert_openai_error(post(strict, "/v1/completions", {"prompt": "x" * STRICT_BODY_BYTES}), 413)
    assert_openai_error(httpx.get(f"{strict.url}/v1/completions"), 405)
    after = scrape(strict)
    assert metric(after, "customllm_session_evictions_total") == metric(before, "customllm_session_evictions_total") + 1
    assert metric(after, "customllm_sessions_active") == 1
    for reason in ("invalid_request", "not_found", "body_too_large", "method_not_allowed"):
        label = f'{{reason="{reason}"}}'
        assert metric(after, "customllm_requests_rejected_total", label) == \
            metric(before, "customllm_requests_rejected_total", label) + 1, reason
    strict.settle()


# ---- body limit ---------------------------------------------------------------------------------
def test_oversized_content_length_is_413_before_any_body_is_read(strict, monkeypatch):
    # this client sends no body and waits: the server drops what might still come for at most
    # DRAIN_MAX_SECONDS before it answers, 10 s that would prove nothing more here than half a second
    monkeypatch.setattr(http_guard, "DRAIN_MAX_SECONDS", 0.5)
    sock = raw_request(strict.port, "/v1/completions", b"", headers="Content-Length: 1000000000\r\n")
    try:
        head = read_until(sock, b"\r\n\r\n")
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 413")


def test_oversized_chunked_body_is_413(strict):
    piece = b"x" * 1000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(4)) + b"0\r\n\r\n"
    sock = raw_request(strict.port, "/v1/completions", chunked, headers="Transfer-Encoding: chunked\r\n")
    try:
        response = read_until(sock, b"}}")
    finally:
        sock.close()
    assert response.startswith(b"HTTP/1.1 413") and b'"body_too_large"' in response
    small = b'{"prompt": "hi", "max_tokens": 2}'
    sock = raw_request(strict.port, "/v1/completions", b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small),
                       headers="Transfer-Encoding: chunked\r\n")
    try:
        assert read_until(sock, b"\r\n").startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    strict.settle()


# ---- protocol details ---------------------------------------------------------------------------
def test_model_retrieval_with_the_openai_client(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    assert client.models.retrieve(server.engine.model_name).id == server.engine.model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_streamed_choices_of_n_each_start_and_finish(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    roles, finishes, texts = set(), {}, {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=server.engine.model_name, n=2, max_tokens=5, stream=True,
                                                messages=[{"role": "user", "content": "Hi"}], seed=3,
                                                extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            roles.add(choice.index) if choice.delta.role == "assistant" else None
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1} and finishes == {0: "length", 1: "length"}
    server.settle()


def test_streamed_completion_logprobs_offsets_run_on(server):
    body = {"prompt": "The", "max_tokens": 6, "logprobs": 2, "temperature": 0, "ignore_eos": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    offsets = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert offsets == whole["text_offset"] and offsets == sorted(offsets)
    server.settle()


def test_generation_limits_and_unsupported_combinations_are_400(server, monkeypatch):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
                        400, "stream_options")
    response = post(server, "/v1/completions", {"prompt": "x", "max_tokens": server.engine.max_context})
    assert_openai_error(response, 400, "max_tokens")
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert_openai_error(post(server, "/v1/completions", {"prompt": [[1, 2], "a", 3]}), 400, "prompt")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "stop": ["a"] * 9}), 400, "stop")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}), 400,
                        "stop_token_ids")
    assert_openai_error(post(server, "/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}), 400,
                        "tools.0.function")
    assert_openai_error(post(server, "/v1/chat/completions", {**chat, "messages": [{"role": "wizard"}]}), 400,
                        "messages.0.role")
    monkeypatch.setattr(server.engine, "chat_template", None)
    response = post(server, "/v1/chat/completions", chat)
    assert_openai_error(response, 400, "messages")
    assert "--chat-template" in response.json()["error"]["message"]


def test_a_failure_in_the_http_layer_midway_ends_the_stream_with_an_error_then_done(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("formatting bug")

    monkeypatch.setattr(responses_module, "completion_logprobs", broken)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Hi", "max_tokens": 50, "logprobs": 1, "stream": True}) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "internal_error" and "formatting bug" not in error["message"]
    server.settle()
