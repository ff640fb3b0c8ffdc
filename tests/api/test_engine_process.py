"""The engine core in a process of its own (`serve --engine-process`): the same answers as the
in-process engine through real HTTP, admission errors, sessions and metrics across the processes,
aborts on disconnect, malformed messages, and the core dying under a stream."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from server.engine import wire
from server.engine.errors import ContextLengthError, InvalidRequestError
from server.engine.request import GenerationRequest, SamplingParams
from tests.api_server import EngineProcessServer, openai_client

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def process_server(model_dir):
    """The engine core in its own process with its decode steps overlapped (`serve --engine-process on
    --overlap-steps on`, as with CUDA): every answer here must be the one-process, in-series engine's."""
    from server.config import EngineConfig
    from tests.api_server import TEST_KV_CACHE_GIB
    with EngineProcessServer(model_dir, engine_config=EngineConfig(kv_cache_memory_gib=TEST_KV_CACHE_GIB, block_size=16,
                                                                   overlap_steps=True)) as srv:
        yield srv


@pytest.fixture(scope="module")
def process_client(process_server):
    return openai_client(process_server)


def greedy_answers(client, model: str) -> list[tuple[str, list[float]]]:
    answers = []
    for prompt in PROMPTS:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
        answers.append((out.choices[0].text, out.choices[0].logprobs.token_logprobs))
    return answers


def test_greedy_answers_and_logprobs_match_the_in_process_engine(process_client, process_server, client, server):
    assert process_server.engine.model_name == server.engine.model_name
    # the same text; logprobs equal up to float32 rounding (the two engines' matrix products run on
    # different threads, whose parallel split MKL may choose by the machine's load)
    ours, reference = (greedy_answers(c, server.engine.model_name) for c in (process_client, client))
    assert [text for text, _ in ours] == [text for text, _ in reference]
    for (_, got), (_, want) in zip(ours, reference):
        assert got == pytest.approx(want, abs=1e-5)


def test_streamed_chat_with_usage(process_client, process_server):
    stream = process_client.chat.completions.create(
        model=process_server.engine.model_name, messages=[{"role": "user", "content": "Say something"}], max_tokens=9, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 9 and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    process_server.settle()


def test_admission_errors_come_back_as_the_same_4xx(process_server):
    url = f"{process_server.url}/v1/completions"
    too_long = httpx.post(url, json={"prompt": "hi", "max_tokens": 300})      # the context is 256
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    bad_token = httpx.post(url, json={"prompt": [1, 2, 10 ** 7], "max_tokens": 2})
    assert bad_token.status_code == 400 and "49152" in bad_token.json()["error"]["message"]
    grammar = httpx.post(url, json={"prompt": "x", "max_tokens": 4, "structured_outputs": {"choice": ["yes", "no"]}})
    assert grammar.status_code == 200 and grammar.json()["choices"][0]["text"] in ("yes", "no")
    process_server.settle()


def test_the_core_refuses_with_the_in_process_engines_typed_errors(process_server):
    engine = process_server.engine

    async def first_output(request):
        async for output in engine.generate(request):
            return output

    too_long = GenerationRequest("too-long", [1, 2, 3], SamplingParams(max_tokens=1000))
    with pytest.raises(ContextLengthError) as refused:
        asyncio.run(first_output(too_long))
    assert refused.value.max_context == engine.max_context and refused.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        asyncio.run(first_output(GenerationRequest("bad-id", [1, 10 ** 7], SamplingParams(max_tokens=2))))
    assert asyncio.run(first_output(GenerationRequest("fine", [1, 2], SamplingParams(max_tokens=2)))).token_ids
    process_server.settle()


def test_sessions_and_metrics_cross_the_processes(process_server):
    url = process_server.url
    body = {"prompt": "Remember this", "max_tokens": 4, "temperature": 0, "session_id": "s-1"}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
    sessions = httpx.get(f"{url}/v1/sessions").json()["data"]
    assert [s["id"] for s in sessions] == ["s-1"] and sessions[0]["num_tokens"] > 0
    assert httpx.get(f"{url}/v1/sessions/s-1").json()["id"] == "s-1"
    assert httpx.delete(f"{url}/v1/sessions/s-1").status_code == 200
    assert httpx.get(f"{url}/v1/sessions/s-1").status_code == 404
    process_server.settle()
    metrics = httpx.get(f"{url}/metrics").text
    finished = [line for line in metrics.splitlines() if line.startswith("customllm_requests_finished_total{")]
    assert finished and sum(float(line.split()[-1]) for line in finished) >= 1
    assert f'customllm_engine_alive{{model_name="{process_server.engine.model_name}"}} 1.0' in metrics


def test_a_client_leaving_midway_aborts_its_request_in_the_core(process_server):
    body = {"prompt": "Tell a long story", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{process_server.url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break                       # leave after the first event
    process_server.settle()                 # the core holds nothing and its pool is intact


def test_malformed_messages_never_crash_the_core(process_server, process_client):
    engine = process_server.engine
    for junk in (b"", b"\xc1\xff garbage", wire.encode(["add", "no fields"]), wire.encode({"tag": "query"}),
                 wire.encode(wire.Query(1, "no_such_query"))):
        engine._send_bytes(junk)
    assert process_server.engine.check_integrity() == 0
    out = process_client.completions.create(model=engine.model_name, prompt="still here", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length"


def test_the_core_dying_ends_streams_with_an_error_and_health_503(model_dir):
    with EngineProcessServer(model_dir) as srv:
        body = {"prompt": "Tell a long story", "max_tokens": 200, "ignore_eos": True, "stream": True}
        events, killed_at = [], None
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if killed_at is None:
                    killed_at = time.monotonic()
                    os.kill(srv.engine.process.pid, signal.SIGKILL)
        ended_after = time.monotonic() - killed_at
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "engine core process exited" in error["message"]
        assert ended_after < 5, f"the stream ended {ended_after:.1f} s after the core died"
        assert httpx.get(f"{srv.url}/health").status_code == 503
        refused = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503


def test_a_client_whose_core_never_started_stops_cleanly(model_dir):
    """A signal can end `start` before the process is there (serve's stop while loading): stopping
    then releases the sockets without joining a process or a thread that never started."""
    from server.engine.core_client import EngineCoreClient
    from tests.api_server import tiny_server_config
    client = EngineCoreClient(tiny_server_config(model_dir), log_level="warning")
    client.stop()
    assert client._context.closed and not client.process.is_alive()
    client.stop()                                   # and again: nothing left to do
