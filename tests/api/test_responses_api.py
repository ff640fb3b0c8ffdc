"""/v1/responses through a real server with the official client: text in and out, streamed with the
Responses event types, `text.format` json_schema, function tools (required, with call and result
items in the input), `max_output_tokens` → incomplete; what a stateless server refuses."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.api.http import assert_openai_error, post

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 16},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 10}},
          "required": ["answer", "score"], "additionalProperties": False}
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": False}}


class Answer(BaseModel):
    answer: str = Field(max_length=16)
    score: int


def test_text_in_and_out_with_usage_and_incomplete_at_max_output_tokens(long_server, long_client):
    name = long_server.engine.model_name
    response = long_client.responses.create(model=name, input="Say hello.", instructions="Be brief.",
                                            max_output_tokens=6, temperature=0)
    assert response.object == "response" and response.id.startswith("resp")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output_text == response.output[0].content[0].text
    assert response.usage.output_tokens == 6 and response.usage.input_tokens > 0
    items = long_client.responses.create(model=name, max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}])
    assert items.output_text == long_client.responses.create(model=name, input="Say hello.", max_output_tokens=6,
                                                             temperature=0).output_text


def test_streaming_sends_the_responses_event_types(long_server, long_client):
    events = list(long_client.responses.create(model=long_server.engine.model_name, input="Say hello.",
                                               max_output_tokens=8, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == events[-1].response.output_text
    with httpx.stream("POST", f"{long_server.url}/v1/responses", timeout=60, json={
            "input": "hi", "max_output_tokens": 2, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert lines[0] == "event: response.created" and lines[1].startswith("data: {")


def test_text_format_json_schema_and_parse(long_server, long_client):
    name = long_server.engine.model_name
    response = long_client.responses.create(model=name, input="Rate this.", temperature=1.0, max_output_tokens=120,
                                            text={"format": {"type": "json_schema", "name": "rating",
                                                             "schema": SCHEMA, "strict": True}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    parsed = long_client.responses.parse(model=name, input="Rate this.", text_format=Answer, max_output_tokens=120)
    assert isinstance(parsed.output_parsed, Answer)


def test_function_tools_and_tool_items_in_the_input(long_server, long_client):
    name = long_server.engine.model_name
    response = long_client.responses.create(model=name, input="Weather in Paris?", tools=[TOOL],
                                            tool_choice="required", max_output_tokens=120, temperature=1.0)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and response.status == "completed"
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    follow_up = long_client.responses.create(model=name, tools=[TOOL], max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 21}'}])
    assert follow_up.usage.input_tokens > response.usage.input_tokens
    events = list(long_client.responses.create(model=name, input="Weather?", tools=[TOOL], stream=True,
                                               tool_choice={"type": "function", "name": "get_weather"},
                                               parallel_tool_calls=False, max_output_tokens=120))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments)["city"] is not None
    assert events[-1].type == "response.completed" and events[-1].response.output[0].type == "function_call"


@pytest.mark.parametrize("body, param", [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"), ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, None),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, None),
    ({"tools": [{"type": "web_search"}]}, None),
])
def test_what_a_stateless_text_server_refuses(long_server, body, param):
    response = post(long_server, "/v1/responses", {"input": "hi", "max_output_tokens": 2, **body})
    assert_openai_error(response, 400, param)
    if body.get("input"):
        assert "not supported" in response.json()["error"]["message"]
    stored = httpx.get(f"{long_server.url}/v1/responses/resp_123", timeout=10)
    assert_openai_error(stored, 404)
    assert "stateless" in stored.json()["error"]["message"]


def test_the_clients_stream_helpers_accumulate_our_events(long_server, long_client):
    """`responses.stream` and `chat.completions.stream` rebuild the final objects from the events
    and chunks, which needs their shapes and order to be OpenAI's."""
    name = long_server.engine.model_name
    with long_client.responses.stream(model=name, input="Weather?", tools=[TOOL], tool_choice="required",
                                      max_output_tokens=120, temperature=1.0) as stream:
        final = stream.get_final_response()
    assert final.output and all(item.type == "function_call" for item in final.output)
    with long_client.responses.stream(model=name, input="Rate this.", text_format=Answer, max_output_tokens=120) as s:
        assert isinstance(s.get_final_response().output_parsed, Answer)
    chat_tools = [{"type": "function", "function": {"name": TOOL["name"], "parameters": TOOL["parameters"],
                                                    "strict": True}}]
    with long_client.chat.completions.stream(model=name, messages=[{"role": "user", "content": "Weather?"}],
                                             tools=chat_tools, tool_choice="required", max_tokens=120) as stream:
        completion = stream.get_final_completion()
    calls = completion.choices[0].message.tool_calls
    assert calls and calls[0].function.parsed_arguments["city"] is not None
