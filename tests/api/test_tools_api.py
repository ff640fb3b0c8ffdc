"""Tool calling through a real server with the official client: named and required choices are
enforced by the grammar (the arguments always parse and match the function's schema), streamed
and not, `parallel_tool_calls: false` gives one call; under `auto` the model's `<tool_call>` blocks
are parsed into `tool_calls` (the tiny model is made to write one with a regex, as a model would);
history tool calls and tool results are accepted; bad tool requests are 400s."""
from __future__ import annotations

import json

import jsonschema
import pytest

from tests.api.http import assert_openai_error, post

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]


def create(long_server, long_client, **kwargs):
    kwargs = {"max_tokens": 160, "temperature": 1.0, **kwargs}
    return long_client.chat.completions.create(model=long_server.engine.model_name, messages=MESSAGES, tools=TOOLS,
                                               **kwargs)


def assert_valid_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed(stream):
    """(content, {index: (id, name, arguments)}, finish_reason) accumulated from chunks."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            call_id, name, arguments = calls.get(delta.index, (None, None, ""))
            calls[delta.index] = (delta.id or call_id, (delta.function.name if delta.function else None) or name,
                                  arguments + ((delta.function.arguments or "") if delta.function else ""))
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_a_named_function_is_called_with_valid_arguments(long_server, long_client):
    for seed in range(3):
        reply = create(long_server, long_client, seed=seed,
                       tool_choice={"type": "function", "function": {"name": "get_time"}})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"            # OpenAI's finish reason for a named function
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert_valid_call(call, ("get_time",))


def test_required_streamed_and_not(long_server, long_client):
    reply = create(long_server, long_client, seed=7, tool_choice="required")
    assert reply.choices[0].finish_reason == "tool_calls"
    for call in reply.choices[0].message.tool_calls:
        assert_valid_call(call)
    content, calls, finish = streamed(create(long_server, long_client, seed=7, tool_choice="required", stream=True))
    assert finish == "tool_calls" and content == "" and calls
    assert [name for _, name, _ in calls.values()] == [c.function.name for c in reply.choices[0].message.tool_calls]
    for call_id, name, arguments in calls.values():
        assert call_id.startswith("call_")
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_parallel_tool_calls_false_gives_one_call(long_server, long_client):
    for seed in range(3):
        reply = create(long_server, long_client, seed=seed, tool_choice="required", parallel_tool_calls=False)
        assert len(reply.choices[0].message.tool_calls) == 1
        assert_valid_call(reply.choices[0].message.tool_calls[0])


def literal(text: str) -> str:
    """`text` as a regex that matches it alone."""
    return "".join("\\" + c if c in "\\.^$*+?{}[]()|" else "\\n" if c == "\n" else c for c in text)


CALL = literal('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')


def test_auto_parses_the_models_tool_calls(long_server, long_client):
    """The model writes a sentence then a call (forced here with a regex, as a trained model would
    write it): content and tool_calls come apart, in one body and in the stream."""
    regex = {"structured_outputs": {"regex": f"Let me check\\.\\n{CALL}"}}
    reply = create(long_server, long_client, tool_choice="auto", extra_body=regex)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
    content, calls, finish = streamed(create(long_server, long_client, tool_choice="auto", extra_body=regex,
                                             stream=True))
    assert finish == "tool_calls" and content == "Let me check."
    (call_id, name, arguments), = calls.values()
    assert call_id.startswith("call_") and name == "get_weather" and json.loads(arguments)["city"] == "Paris"
    two = {"structured_outputs": {"regex": f"{CALL}\\n{CALL}"}}
    assert len(create(long_server, long_client, extra_body=two).choices[0].message.tool_calls) == 2
    one = create(long_server, long_client, extra_body=two, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    # text without calls stays content; tool_choice none leaves calls unparsed
    plain = create(long_server, long_client, max_tokens=6, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    unparsed = create(long_server, long_client, tool_choice="none", extra_body=regex)
    assert unparsed.choices[0].message.tool_calls is None and "<tool_call>" in unparsed.choices[0].message.content


def test_history_with_tool_calls_and_results_is_rendered(long_server, long_client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    reply = long_client.chat.completions.create(model=long_server.engine.model_name, messages=history, tools=TOOLS,
                                                max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens > create(long_server, long_client, max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "max_tokens": 8,
      "messages": MESSAGES + [{"role": "user", "content": "x", "tool_calls": [
          {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.1.tool_calls"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"not": {"type": "null"}}}}}}], "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400s(long_server, body, param):
    response = post(long_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, **body})
    assert_openai_error(response, 400, param)
