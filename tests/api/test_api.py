"""The HTTP API through a real uvicorn server on 127.0.0.1, with httpx and the official openai client."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from server.config import ApiConfig, EngineConfig
from tests.api.http import assert_openai_error, metric, post, sse_events
from tests.api_server import InProcessServer


def test_health_models_tokenize_detokenize(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["id"] == server.engine.model_name
    tokens = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == "Hello world"
    chat_tokens = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tokens["count"] > tokens["count"]
    assert post(server, "/detokenize", {"tokens": [10**9]}).status_code == 400


# ---- completions --------------------------------------------------------------------------------
def test_completions_prompt_shapes_n_echo_and_usage(server, client):
    one = client.completions.create(model=server.engine.model_name, prompt="Once upon", max_tokens=5, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 5
    ids = post(server, "/tokenize", {"prompt": "Once upon"}).json()["tokens"]
    same = client.completions.create(model=server.engine.model_name, prompt=ids, max_tokens=5, temperature=0)
    assert same.choices[0].text == one.choices[0].text
    several = client.completions.create(model=server.engine.model_name, prompt=["a", ids], max_tokens=3, n=2,
                                        temperature=0.8, seed=1)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    assert several.usage.completion_tokens == 12
    echo = client.completions.create(model=server.engine.model_name, prompt="Once upon", max_tokens=5, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "Once upon" + one.choices[0].text
    assert echo.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_logprobs_shape(server, client):
    out = client.completions.create(model=server.engine.model_name, prompt="The", max_tokens=3, logprobs=5,
                                    temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) <= 5 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-5)


def test_streaming_completion_sse_framing(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Hi", "max_tokens": 6, "stream": True, "temperature": 0,
                            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    full = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 6, "temperature": 0}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full["choices"][0]["text"]


# ---- chat with the openai client ----------------------------------------------------------------
def test_chat_sync_and_stream(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(model=server.engine.model_name, messages=messages, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=2)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].logprobs.content[0].top_logprobs
    pieces = []
    for chunk in client.chat.completions.create(model=server.engine.model_name, messages=messages, max_tokens=8,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == reply.choices[0].message.content


def test_chat_async_client(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as aclient:
            reply = await aclient.chat.completions.create(
                model=server.engine.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True})
            stream = await aclient.chat.completions.create(
                model=server.engine.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                stream=True, stream_options={"include_usage": True})
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
            return reply, usage
    reply, usage = asyncio.run(main())
    assert reply.usage.completion_tokens == 4
    assert usage.completion_tokens == 4


def test_min_tokens_holds_back_eos_in_completions_and_chat(server):
    """With eos biased to the top, greedy ends at once; min_tokens keeps it out for that many tokens."""
    eos = server.engine.tokenizer.eos_token_id
    assert eos is not None
    base = {"logit_bias": {str(eos): 100}, "max_tokens": 8, "temperature": 0}
    for path, prompt in (("/v1/completions", {"prompt": "Once upon"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello!"}]})):
        plain = post(server, path, {**prompt, **base}).json()
        assert plain["usage"]["completion_tokens"] == 1 and plain["choices"][0]["finish_reason"] == "stop"
        held = post(server, path, {**prompt, **base, "min_tokens": 5}).json()
        assert held["usage"]["completion_tokens"] >= 5
        assert held["usage"]["completion_tokens"] == 6 and held["choices"][0]["finish_reason"] == "stop"
    too_many = post(server, "/v1/completions", {"prompt": "Hi", **base, "min_tokens": 9})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "min_tokens"


def test_32_concurrent_streaming_clients(server):
    async def one(client, i):
        text, done = "", False
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 12, "stream": True,
                "ignore_eos": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0]["delta"].get("content") or ""
        return done

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
    assert all(asyncio.run(main()))
    server.settle()


# ---- sessions -----------------------------------------------------------------------------------
def test_three_turn_chat_session_reuses_its_cache(server, client):
    messages = [{"role": "system", "content": "You are a patient assistant who answers questions " * 4}]
    cached = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question number {turn}: tell me something about turn {turn}."})
        reply = client.chat.completions.create(model=server.engine.model_name, messages=messages, max_tokens=6,
                                               temperature=0, extra_body={"session_id": "talk"})
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]
    listed = httpx.get(f"{server.url}/v1/sessions").json()["data"]
    assert [s["id"] for s in listed] == ["talk"] and listed[0]["num_tokens"] > 0 and listed[0]["bytes"] > 0
    assert httpx.get(f"{server.url}/v1/sessions/talk").json()["id"] == "talk"
    assert httpx.delete(f"{server.url}/v1/sessions/talk").json()["deleted"] is True
    assert httpx.get(f"{server.url}/v1/sessions/talk").status_code == 404
    server.settle()


def test_session_header_and_body_must_agree(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "session_id": "a"}
    response = post(server, "/v1/chat/completions", body, headers={"X-Session-ID": "b"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "session_id"
    assert post(server, "/v1/chat/completions", body, headers={"X-Session-ID": "a"}).status_code == 200
    httpx.delete(f"{server.url}/v1/sessions/a")


# ---- errors -------------------------------------------------------------------------------------
def test_invalid_parameters_are_400_not_422(server):
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "temperature": 5}), 400, "temperature")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "top_p": 0}), 400, "top_p")
    assert_openai_error(post(server, "/v1/completions", {}), 400, "prompt")
    assert_openai_error(post(server, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}), 400)
    assert_openai_error(post(server, "/v1/completions", {"prompt": [10**9]}), 400)
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x", "n": 1000}), 400, "n")
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=30,
                          headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


def test_context_overflow_is_a_clear_400(server):
    response = post(server, "/v1/completions", {"prompt": "hello " * 50, "max_tokens": 250})
    assert_openai_error(response, 400)
    assert "maximum context length" in response.json()["error"]["message"]


def test_unknown_model_and_session_are_404(server):
    assert_openai_error(post(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model")
    assert_openai_error(httpx.get(f"{server.url}/v1/sessions/missing"), 404)
    assert_openai_error(httpx.delete(f"{server.url}/v1/sessions/missing"), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)


def test_oversized_body_is_413(server):
    response = post(server, "/v1/completions", {"prompt": "x" * (5 * 1024 * 1024)})
    assert_openai_error(response, 413)


def test_stream_failing_midway_sends_error_then_done(server, monkeypatch):
    original, calls = server.engine.core.runner.execute_batch, {"n": 0}   # every step's forward

    def fail_on_third_step(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device failure")
        return original(batch)

    monkeypatch.setattr(server.engine.core.runner, "execute_batch", fail_on_third_step)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Hi", "max_tokens": 20, "stream": True, "ignore_eos": True}) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2]) and "injected" in json.loads(events[-2])["error"]["message"]
    monkeypatch.undo()
    assert httpx.get(f"{server.url}/health").status_code == 200
    server.settle()


# ---- disconnects --------------------------------------------------------------------------------
def test_streaming_client_disconnect_aborts_and_frees_blocks(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Hi", "max_tokens": 200, "stream": True, "ignore_eos": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    server.settle()
    assert server.engine.kv.pool.num_used_blocks == server.engine.kv.sessions.num_pinned_blocks


def test_non_streaming_client_disconnect_aborts_and_frees_blocks(server):
    body = json.dumps({"prompt": "Hi", "max_tokens": 200, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while server.engine.num_requests == 0 and time.monotonic() < deadline:
            server.engine.flush_inbox(timeout=5)
    server.settle()
    assert server.engine.kv.pool.num_used_blocks == server.engine.kv.sessions.num_pinned_blocks


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_move_with_traffic(server):
    before = httpx.get(f"{server.url}/metrics").text
    messages = [{"role": "user", "content": "metrics please " * 8}]
    for _ in range(2):
        post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "ignore_eos": True,
                                              "session_id": "m"})
    post(server, "/v1/completions", {"prompt": "x", "temperature": 9})
    after = httpx.get(f"{server.url}/metrics").text
    grew = lambda name, labels="": metric(after, name, labels) > metric(before, name, labels)  # noqa: E731
    assert grew("customllm_prompt_tokens_total")
    assert grew("customllm_generation_tokens_total")
    assert grew("customllm_requests_finished_total", '{finish_reason="length"}')
    assert grew("customllm_prefix_cache_queried_tokens_total")
    assert grew("customllm_prefix_cache_hit_tokens_total")
    assert grew("customllm_time_to_first_token_seconds_count")
    assert grew("customllm_inter_token_latency_seconds_count")
    assert grew("customllm_e2e_request_latency_seconds_count")
    assert grew("customllm_request_queue_time_seconds_count")
    assert grew("customllm_tokens_per_step_count")
    assert grew("customllm_http_responses_total", '{code="400"}')
    assert metric(after, "customllm_sessions_active") >= 1
    assert metric(after, "customllm_session_cached_tokens") > 0
    assert metric(after, "customllm_engine_alive") == 1
    for name in ("customllm_requests_running", "customllm_requests_waiting", "customllm_kv_cache_usage_ratio",
                 "customllm_preemptions_total", "customllm_session_evictions_total", "customllm_shared_steps_total"):
        assert name in after
    httpx.delete(f"{server.url}/v1/sessions/m")


def test_preemption_and_rejection_metrics(model_dir):
    # a cache of a few blocks forces preemption; a zero-length queue rejects
    with InProcessServer(model_dir, engine_config=EngineConfig(kv_cache_memory_gib=24 * 16 * 384 / 2**30,
                                                               block_size=16, max_waiting_requests=64)) as small:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*(c.post(f"{small.url}/v1/completions", json={
                    "prompt": f"request {i} " * 20, "max_tokens": 60, "ignore_eos": True}) for i in range(8)))
        assert all(r.status_code == 200 for r in asyncio.run(main()))
        text = httpx.get(f"{small.url}/metrics").text
        assert metric(text, "customllm_preemptions_total") > 0
        small.settle()


def test_full_queue_is_429_with_retry_after(model_dir):
    with InProcessServer(model_dir, engine_config=EngineConfig(kv_cache_memory_gib=0.01, max_waiting_requests=0)) as s:
        response = post(s, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert_openai_error(response, 429)
        assert response.headers["retry-after"] == "1"
        assert metric(httpx.get(f"{s.url}/metrics").text, "customllm_requests_rejected_total",
                      '{reason="queue_full"}') == 1


def test_a_tenant_over_its_waiting_share_is_429_before_tokenizing(model_dir, monkeypatch):
    engine = EngineConfig(kv_cache_memory_gib=0.01, max_waiting_requests=8, max_waiting_per_tenant=2)
    with InProcessServer(model_dir, api=ApiConfig(api_keys=("key-a",)), engine_config=engine) as s:
        monkeypatch.setattr(s.engine.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized a refusal"))
        response = httpx.post(f"{s.url}/v1/completions", json={"prompt": ["x", "y", "z"], "max_tokens": 2},
                              headers={"Authorization": "Bearer key-a"}, timeout=60)
        assert_openai_error(response, 429)
        assert "at most 2 may wait" in response.json()["error"]["message"]
        response = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                              "n": 3, "max_tokens": 2}, headers={"Authorization": "Bearer key-a"}, timeout=60)
        assert_openai_error(response, 429)


def test_dead_engine_is_503(model_dir):
    with InProcessServer(model_dir) as s:
        s.engine.stop()
        assert httpx.get(f"{s.url}/health").status_code == 503
        assert_openai_error(post(s, "/v1/completions", {"prompt": "x"}), 503)


# ---- auth and tenants ---------------------------------------------------------------------------
def test_competing_keys_share_steps_with_the_answers_unchanged(model_dir):
    """Two keys at once on a server with shared steps (--fair-step-tokens): each greedy answer is the
    one it gets alone, and the shared steps are counted."""
    keys = ("key-light", "key-flood")
    bodies = [(keys[0], {"prompt": "the light one", "max_tokens": 8, "temperature": 0, "ignore_eos": True})] + \
        [(keys[1], {"prompt": [f"flood {i}" for i in range(4)], "max_tokens": 8, "temperature": 0, "ignore_eos": True})
         for _ in range(3)]
    with InProcessServer(model_dir, api=ApiConfig(api_keys=keys), engine_config=EngineConfig(fair_step_tokens=4)) as s:
        def answer(key, body):
            response = post(s, "/v1/completions", body, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
            return [choice["text"] for choice in response.json()["choices"]]
        alone = [answer(key, body) for key, body in bodies]
        before = metric(httpx.get(f"{s.url}/metrics", headers={"Authorization": f"Bearer {keys[0]}"}).text,
                        "customllm_shared_steps_total")

        async def together():
            async with httpx.AsyncClient(timeout=120) as c:
                responses = await asyncio.gather(*(c.post(f"{s.url}/v1/completions", json=body,
                                                          headers={"Authorization": f"Bearer {key}"})
                                                   for key, body in bodies))
            return [[choice["text"] for choice in r.json()["choices"]] for r in responses]
        assert asyncio.run(together()) == alone
        after = metric(httpx.get(f"{s.url}/metrics", headers={"Authorization": f"Bearer {keys[0]}"}).text,
                       "customllm_shared_steps_total")
        assert after > before
        s.settle()


def test_api_keys_and_tenant_isolation(model_dir):
    with InProcessServer(model_dir, api=ApiConfig(api_keys=("key-alice", "key-bob"), metrics_require_auth=True)) as s:
        alice, bob = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
        assert_openai_error(post(s, "/v1/completions", {"prompt": "x"}), 401)
        assert_openai_error(post(s, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(f"{s.url}/health").status_code == 200
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/metrics", headers=alice).status_code == 200
        body = {"messages": [{"role": "user", "content": "secret plan " * 10}], "max_tokens": 3, "session_id": "s1"}
        assert post(s, "/v1/chat/completions", body, headers=alice).status_code == 200
        assert [x["id"] for x in httpx.get(f"{s.url}/v1/sessions", headers=alice).json()["data"]] == ["s1"]
        assert httpx.get(f"{s.url}/v1/sessions", headers=bob).json()["data"] == []
        assert httpx.get(f"{s.url}/v1/sessions/s1", headers=bob).status_code == 404
        assert httpx.delete(f"{s.url}/v1/sessions/s1", headers=bob).status_code == 404
        # the same prompt from another tenant gets no prefix-cache hit
        bob_reply = post(s, "/v1/chat/completions", {**body, "session_id": None}, headers=bob).json()
        assert bob_reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        alice_again = post(s, "/v1/chat/completions", {**body, "session_id": None}, headers=alice).json()
        assert alice_again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert httpx.get(f"{s.url}/v1/sessions/s1", headers=alice).status_code == 200
        s.settle()
