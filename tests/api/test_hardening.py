"""Input that costs the server, or that used to slip through, through the real server: bounded
sizes refused before work is done, strict types, invalid Unicode, session ids from either place,
error messages that do not echo input verbatim, the 413 of an upload still in progress, docs behind
the keys, routes known but not served, and the request-head deadline."""
from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.config import ApiConfig
from tests.api.http import assert_openai_error, metric, post, scrape
from tests.api_server import InProcessServer

EOS = 0   # the tiny model's tokenizer (SmolLM2's) has <|endoftext|> at 0


def raw_post(server, path: str, body: str) -> httpx.Response:
    """A body sent as written (so that JSON escapes such as a lone surrogate reach the server)."""
    return httpx.post(f"{server.url}{path}", content=body.encode(), headers={"content-type": "application/json"},
                      timeout=60)


# ---- sizes bounded before any work ------------------------------------------------------------------
def test_prompts_times_n_is_capped(server):
    assert_openai_error(post(server, "/v1/completions", {"prompt": ["x"] * 2000, "max_tokens": 1}), 400, "prompt")
    assert_openai_error(post(server, "/v1/completions", {"prompt": ["x"] * 40, "n": 8, "max_tokens": 1}), 400, "prompt")
    ok = post(server, "/v1/completions", {"prompt": ["x"] * 4, "n": 4, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 16
    server.settle()


def test_logit_bias_and_stop_strings_are_bounded(server):
    bias = {str(i): 1.0 for i in range(301)}
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "logit_bias": bias}), 400, "logit_bias")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400,
                        "stop")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "stop": "s" * 257}), 400, "stop")
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "stop": ["a", "b", "c", "d"],
                                            "logit_bias": {str(i): 1.0 for i in range(300)}}).status_code == 200


def test_text_longer_than_the_context_could_hold_is_refused_without_tokenizing_it(server):
    started = time.monotonic()
    huge = post(server, "/v1/completions", {"prompt": "word " * 800_000, "max_tokens": 1})   # 4 MB
    assert huge.status_code in (400, 413)
    long = post(server, "/v1/completions", {"prompt": "a " * 60_000, "max_tokens": 1})
    assert_openai_error(long, 400, "prompt")
    assert long.json()["error"]["code"] == "context_length_exceeded"
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "b " * 60_000}]})
    assert_openai_error(chat, 400, "messages")
    assert time.monotonic() - started < 10


# ---- strict types and valid text ----------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("max_tokens", "5"), ("max_tokens", True), ("stream", "yes"),
                                          ("temperature", True), ("n", 2.0), ("stop_token_ids", ["1"])])
def test_types_are_strict(server, field, value):
    response = post(server, "/v1/completions", {"prompt": "x", field: value})
    assert_openai_error(response, 400)
    assert response.json()["error"]["param"].split(".")[0] == field


def test_logit_bias_keys_are_plain_decimal_token_ids(server):
    response = post(server, "/v1/completions", {"prompt": "x", "logit_bias": {"٣": 5}})
    assert_openai_error(response, 400, "logit_bias")


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"prompt": "a\\udfffb", "max_tokens": 1}'),
    ("/v1/completions", '{"prompt": ["ok", "\\ud800"], "max_tokens": 1}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}'),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 1}'),
    ("/tokenize", '{"prompt": "\\ud800"}'),
    ("/v1/completions", '{"prompt": "x", "stop": "\\ud800"}'),
])
def test_lone_surrogates_are_a_400(server, path, body):
    response = raw_post(server, path, body)
    assert_openai_error(response, 400)
    assert "surrogate" in response.json()["error"]["message"]


def test_messages_that_cannot_form_a_prompt_and_non_text_parts(server):
    lone_tool = post(server, "/v1/chat/completions", {"messages": [{"role": "tool"}]})
    assert_openai_error(lone_tool, 400, "messages.0")
    no_content = post(server, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert_openai_error(no_content, 400, "messages.0")
    image = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert_openai_error(image, 400)
    assert "image content parts are not supported" in image.json()["error"]["message"]
    audio = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
    assert "audio content parts are not supported" in audio.json()["error"]["message"]


def test_session_header_follows_the_body_rules(server):
    long_id = "s" * 8000
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1},
                             headers={"X-Session-ID": long_id}), 400, "session_id")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "session_id": long_id}),
                        400, "session_id")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "session_id": "a\x01b"}),
                        400, "session_id")
    # httpx refuses control characters in a header: send that one by hand
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Session-ID: a\x01b\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.settimeout(30)
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 400")
    names = [s["id"] for s in httpx.get(f"{server.url}/v1/sessions").json()["data"]]
    assert long_id not in names and "a\x01b" not in names


def test_error_messages_quote_input_bounded_and_escaped(server):
    response = post(server, "/v1/completions", {"model": "<script>alert(1)</script>", "prompt": "x"})
    assert response.status_code == 404
    assert "<script>" not in response.text
    key = "9" * 400
    response = post(server, "/v1/completions", {"prompt": "x", "logit_bias": {key: 1}})
    assert_openai_error(response, 400, "logit_bias")
    assert key not in response.text and len(response.json()["error"]["message"]) < 300
    missing = httpx.get(f"{server.url}/v1/sessions/" + "z" * 500)
    assert missing.status_code == 404 and "z" * 100 not in missing.text


# ---- the 413 of an upload in progress -------------------------------------------------------------
def test_a_too_large_upload_still_in_progress_reads_its_413(server):
    limit = server.config.api.max_body_bytes
    total = limit * 2
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(total).encode() + b"\r\n\r\n")
        sent = 0
        while sent < total:                     # the whole body goes out: no reset while writing
            sock.sendall(chunk[: total - sent])
            sent += min(len(chunk), total - sent)
        sock.settimeout(30)
        response = b""
        while b"body_too_large" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    assert response.startswith(b"HTTP/1.1 413") and b"body_too_large" in response


# ---- known routes we do not serve ---------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/images/generations", "/v1/audio/speech"])
def test_unsupported_routes_say_so(server, path):
    response = post(server, path, {"model": "x", "input": "hello"})
    assert_openai_error(response, 404)
    assert "not served" in response.json()["error"]["message"]


# ---- default output length ----------------------------------------------------------------------
def test_chat_without_max_tokens_ends_at_the_documented_default(long_server):
    reply = post(long_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "ignore_eos": True, "temperature": 0}).json()
    assert reply["usage"]["completion_tokens"] == 512 and reply["choices"][0]["finish_reason"] == "length"
    completion = post(long_server, "/v1/completions", {"prompt": "hi", "ignore_eos": True}).json()
    assert completion["usage"]["completion_tokens"] == 16


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_carry_the_model_name_and_length_histograms(server):
    post(server, "/v1/completions", {"prompt": "metrics", "max_tokens": 3, "ignore_eos": True})
    text = scrape(server)
    assert f'model_name="{server.engine.model_name}"' in text
    assert "_created" not in text
    assert metric(text, "customllm_request_prompt_tokens_count") >= 1
    assert metric(text, "customllm_request_generation_tokens_sum") >= 3


# ---- docs behind the keys -----------------------------------------------------------------------
def test_docs_need_a_key_unless_opened(model_dir):
    keyed = ApiConfig(api_keys=("k1",))
    with InProcessServer(model_dir, api=keyed) as locked:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{locked.url}{path}").status_code == 401
            assert httpx.get(f"{locked.url}{path}", headers={"Authorization": "Bearer k1"}).status_code == 200
        schema = httpx.get(f"{locked.url}/openapi.json", headers={"Authorization": "Bearer k1"}).json()
        assert "/v1/chat/completions" in schema["paths"]
    with InProcessServer(model_dir, api=ApiConfig(api_keys=("k1",), public_docs=True)) as open_docs:
        assert httpx.get(f"{open_docs.url}/openapi.json").status_code == 200


# ---- the request-head deadline ------------------------------------------------------------------
def test_incomplete_request_heads_are_closed_while_normal_requests_are_served(model_dir):
    with InProcessServer(model_dir, api=ApiConfig(header_timeout_s=2.0)) as guarded:
        stalled = []
        for i in range(500):
            sock = socket.create_connection(("127.0.0.1", guarded.port))
            sock.sendall(b"POST /v1/comp" if i % 2 else b"GET /health HTTP/1.1\r\nHost: x\r\n")
            stalled.append(sock)
        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(lambda _: post(guarded, "/v1/completions", {"prompt": "x", "max_tokens": 2}),
                                   range(8)))
        assert all(r.status_code == 200 for r in served)
        deadline = time.monotonic() + 30
        closed = 0
        for sock in stalled:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += sock.recv(1024) == b""
            except ConnectionResetError:
                closed += 1
            except socket.timeout:
                pass                               # still open at the deadline: counted as not closed
            finally:
                sock.close()
        assert closed == 500
        assert time.monotonic() < deadline


# ---- sampling never fails the batch ---------------------------------------------------------------
def test_a_tiny_temperature_with_penalties_is_served(server):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
            "temperature": 3.7e-171, "presence_penalty": -1.8, "max_tokens": 4}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
