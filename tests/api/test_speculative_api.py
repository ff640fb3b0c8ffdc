"""`speculative_decoding` through real HTTP: on a server started with speculative tokens the answer
(text, tokens' logprobs, streamed or not) is the one the same request gets without speculation, and
the spec_decode counters count the drafts, also with the engine core in its own process (where stop
strings are matched on the API side, after a step that may have appended several tokens); on a
server without speculation the field is a 400 naming it."""
from __future__ import annotations

import json
import re

import httpx
import pytest

from server.config import EngineConfig
from tests.api_server import TEST_KV_CACHE_GIB, EngineProcessServer, InProcessServer

PROMPT = ("def total(values):\n    result = 0\n    for value in values:\n        result += value\n    return result\n\n"
          "Rename result to acc:\n\ndef total(values):\n    acc = 0\n    for value in values:\n")


@pytest.fixture(scope="module")
def spec_server(model_dir):
    engine = EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, block_size=16, num_speculative_tokens=4)
    with InProcessServer(model_dir, engine_config=engine) as srv:
        yield srv


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^customllm_{name}_total{{[^}}]*}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def completion(url: str, **body):
    return httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                                                     "logprobs": 2, **body}, timeout=120)


def test_completions_with_speculation_answer_as_without(spec_server):
    before = counter(spec_server.url, "spec_decode_num_drafts")
    plain = completion(spec_server.url, ignore_eos=True)
    fast = completion(spec_server.url, ignore_eos=True, speculative_decoding=True)
    assert plain.status_code == fast.status_code == 200
    a, b = plain.json()["choices"][0], fast.json()["choices"][0]
    assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    assert all(abs(x - y) <= 1e-4 for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"]))
    assert fast.json()["usage"]["completion_tokens"] == plain.json()["usage"]["completion_tokens"] == 40
    drafts = counter(spec_server.url, "spec_decode_num_drafts") - before
    assert drafts > 0
    assert counter(spec_server.url, "spec_decode_num_draft_tokens") >= drafts
    assert counter(spec_server.url, "spec_decode_num_accepted_tokens") >= 0
    spec_server.settle()


def test_chat_streamed_with_speculation_answers_as_without(spec_server):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32, "temperature": 0}
    plain = httpx.post(f"{spec_server.url}/v1/chat/completions", json=body, timeout=120).json()
    chunks = []
    with httpx.stream("POST", f"{spec_server.url}/v1/chat/completions", timeout=120,
                      json={**body, "stream": True, "speculative_decoding": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(line)
    text = "".join(json.loads(c[6:])["choices"][0]["delta"].get("content") or "" for c in chunks
                   if json.loads(c[6:])["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    spec_server.settle()


@pytest.mark.parametrize("route,body", [
    ("completions", {"prompt": "hi", "max_tokens": 4}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})])
def test_a_server_without_speculation_refuses_the_field(server, route, body):
    response = httpx.post(f"{server.url}/v1/{route}", json={**body, "speculative_decoding": True}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "speculative_decoding" and "--num-speculative-tokens" in error["message"]
    assert httpx.post(f"{server.url}/v1/{route}", json={**body, "speculative_decoding": False},
                      timeout=60).status_code == 200


def test_the_field_is_a_strict_boolean(spec_server):
    response = httpx.post(f"{spec_server.url}/v1/completions",
                          json={"prompt": "hi", "max_tokens": 2, "speculative_decoding": "yes"}, timeout=60)
    assert response.status_code == 400 and "speculative_decoding" in response.text


def test_an_engine_core_process_speculates_and_forwards_its_counters(model_dir):
    engine = EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, block_size=16, num_speculative_tokens=3)
    with EngineProcessServer(model_dir, engine_config=engine) as srv:
        plain = completion(srv.url, ignore_eos=True).json()["choices"][0]
        fast = completion(srv.url, ignore_eos=True, speculative_decoding=True).json()["choices"][0]
        assert fast["text"] == plain["text"] and fast["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
        assert counter(srv.url, "spec_decode_num_drafts") > 0
        text = plain["text"]
        if len(text) >= 12:             # a stop string the API process finds inside a step's tokens
            stop = text[8:12]
            cut = completion(srv.url, ignore_eos=True, speculative_decoding=True, stop=[stop]).json()["choices"][0]
            assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
        srv.settle()
