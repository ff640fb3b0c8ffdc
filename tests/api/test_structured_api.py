"""Structured outputs through a real server (the tiny random model with SmolLM2's tokenizer): the
official client's `chat.completions.parse` with a Pydantic model, `response_format` json_object and
json_schema, vLLM's `structured_outputs` on chat and completions, streaming, n > 1, answers cut by
max_tokens and free text wrapped up within a small max_tokens, 400s that name an unsupported schema
or a compile that takes too long (while the engine keeps serving), and the fields refused by name."""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Literal, Optional

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from server.config import ApiConfig
from tests.api.http import assert_openai_error, post, sse_events
from tests.api_server import InProcessServer

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "temperature": {"type": "number", "minimum": -50, "maximum": 60},
    "conditions": {"enum": ["sunny", "rain", "snow"]},
    "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7}, "maxItems": 3},
    "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}},
    "required": ["city", "temperature", "conditions", "days"]}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    city: str = Field(max_length=12)
    conditions: Literal["sunny", "rain", "snow"]
    temperature: float = Field(ge=-50, le=60)
    wind: Optional[int] = None


def chat(server, **body) -> httpx.Response:
    return post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 200, **body})


def test_parse_with_a_pydantic_model(long_server, long_client):
    for seed in range(3):
        completion = long_client.chat.completions.parse(
            model=long_server.engine.model_name, messages=MESSAGES, response_format=Weather, max_tokens=200,
            temperature=1.0, seed=seed)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Weather), choice


def test_json_object_and_json_schema(long_server):
    # any object: a random model writes keys and strings of any length, so the closing quote and
    # brace are favoured to end it within max_tokens (the grammar alone decides what is allowed)
    closing = {str(post(long_server, "/tokenize", {"prompt": c}).json()["tokens"][0]): 8 for c in ('"', "}")}
    answer = chat(long_server, response_format={"type": "json_object"}, temperature=1.0, seed=3,
                  logit_bias=closing).json()
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)
    answer = chat(long_server, response_format={"type": "json_schema", "json_schema": {
        "name": "weather", "schema": SCHEMA, "strict": True}}, n=3, temperature=1.0, seed=4).json()
    assert len(answer["choices"]) == 3
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_a_streamed_constrained_answer_concatenates_to_valid_json(long_server):
    with httpx.stream("POST", f"{long_server.url}/v1/chat/completions", timeout=60, json={
            "messages": MESSAGES, "max_tokens": 200, "stream": True, "temperature": 1.0, "seed": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}}) as response:
        events = [json.loads(e) for e in sse_events(response) if e != "[DONE]"]
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events]
    assert sum(1 for p in pieces if p) > 3
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads("".join(pieces)), SCHEMA)


def test_structured_outputs_regex_choice_grammar_and_json_on_chat_and_completions(long_server):
    name = long_server.engine.model_name
    regex = chat(long_server, structured_outputs={"regex": "[0-9]{3}-[a-z]{2,4}"}, temperature=1.0).json()
    assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", regex["choices"][0]["message"]["content"])
    choice = chat(long_server, structured_outputs={"choice": ["yes", "no", "maybe"]}, temperature=1.0).json()
    assert choice["choices"][0]["message"]["content"] in ("yes", "no", "maybe")
    gbnf = chat(long_server, structured_outputs={"grammar": 'root ::= "A" [0-9] [0-9]'}, temperature=1.0).json()
    assert re.fullmatch("A[0-9][0-9]", gbnf["choices"][0]["message"]["content"])
    lark = chat(long_server, structured_outputs={"grammar": 'start: "x" ("y" | "z")+'}, max_tokens=6).json()
    assert re.fullmatch("x[yz]+", lark["choices"][0]["message"]["content"])
    completion = post(long_server, "/v1/completions", {"model": name, "prompt": "JSON:", "max_tokens": 200,
                                                        "temperature": 1.0, "seed": 2,
                                                        "structured_outputs": {"json": json.dumps(SCHEMA)}}).json()
    jsonschema.validate(json.loads(completion["choices"][0]["text"]), SCHEMA)


def test_an_answer_cut_by_max_tokens_comes_back_with_length(long_server):
    answer = chat(long_server, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}},
                  max_tokens=4).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4
    assert choice["message"]["content"].startswith("{") and len(choice["message"]["content"]) > 1


@pytest.mark.parametrize("body, param, named", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}},
     "response_format", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "response_format", "strng"),
    ({"response_format": {"type": "json_schema"}}, None, "json_schema"),
    ({"response_format": {"type": "xml"}}, None, None),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "unclosed"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, None, "exactly one"),
    ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs", "missing_rule"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not JSON"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs", None),
])
def test_unusable_grammars_are_400s_that_name_the_problem(long_server, body, param, named):
    response = chat(long_server, **body)
    assert_openai_error(response, 400, param)
    if named:
        assert named in response.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"), ({"store": True}, "store"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
])
def test_fields_this_server_does_not_act_on_are_refused_by_name(long_server, body, param):
    response = chat(long_server, max_tokens=2, **body)
    assert_openai_error(response, 400, param)
    assert param in response.json()["error"]["message"]
    assert chat(long_server, max_tokens=2, modalities=["text"]).status_code == 200


def test_a_slow_compile_is_a_400_and_never_stalls_the_engine(model_dir, monkeypatch):
    with InProcessServer(model_dir, api=ApiConfig(grammar_compile_timeout_s=0.5)) as server:
        compile_ = server.engine.grammars.compile
        release = threading.Event()

        def slow(spec):
            release.wait(timeout=20)
            return compile_(spec)

        monkeypatch.setattr(server.engine.grammars, "compile", slow)
        results = {}
        slow_request = threading.Thread(target=lambda: results.setdefault("slow", chat(
            server, max_tokens=8, structured_outputs={"regex": "[a-z]+"})))
        slow_request.start()
        time.sleep(0.1)
        started = time.monotonic()
        plain = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8})
        assert plain.status_code == 200 and time.monotonic() - started < 10
        slow_request.join(timeout=30)
        release.set()
        assert_openai_error(results["slow"], 400, "structured_outputs")
        assert "did not compile within 0.5 s" in results["slow"].json()["error"]["message"]
        server.settle()


FREE_TEXT = {"type": "object", "properties": {"title": {"type": "string"}, "summary": {"type": "string"},
                                               "rating": {"type": "number"}}, "required": ["title", "summary", "rating"]}


def test_a_free_text_answer_with_a_small_max_tokens_is_wrapped_up_complete_and_valid(long_server):
    """The random model never ends its free text by itself: the wrap-up closes the document within
    max_tokens, and the answer says "stop"."""
    for seed in range(3):
        answer = chat(long_server, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": FREE_TEXT}},
                      max_tokens=40, temperature=1.0, seed=seed).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] <= 40, answer
        jsonschema.validate(json.loads(choice["message"]["content"]), FREE_TEXT)
