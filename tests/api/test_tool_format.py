"""The Hermes tool-call format without a server: the parser gives the same content and calls whatever
the text's split into stream pieces; blocks that are not calls stay content; history and tools
reach templates that take them as Hugging Face templates expect, and the built-in ChatML template
(which does not) as the documented default rendering; the forcing grammar."""
from __future__ import annotations

import json
import random

import llguidance as llg

from model.text.chat_template import ChatTemplate
from server.api.schemas import ChatMessage
from server.api.schema_types import Tool
from server.api.tools import ToolCallParser, ToolPlan, call_text, template_messages
from server.engine.grammar import grammar_text
from tests.default_model import builtin_tokenizer

TOOLS = [Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "description": "Weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})]
TEXT = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>\n')


def run(text: str, pieces: list[int], parallel: bool = True):
    parser = ToolCallParser({"get_weather"}, parallel)
    events, at = [], 0
    for size in pieces + [len(text)]:
        events += parser.feed(text[at:at + size])
        at += size
    events += parser.finish()
    content = "".join(v for k, v in events if k == "content")
    return content, [(c.name, json.loads(c.arguments)) for c in parser.calls]


def test_the_parser_is_the_same_streamed_in_any_pieces():
    whole = run(TEXT, [])
    assert whole == ('Sure.\n<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
                     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})])
    rng = random.Random(0)
    for _ in range(50):
        assert run(TEXT, [rng.randint(1, 7) for _ in range(60)]) == whole
    assert run(TEXT, [], parallel=False)[1] == [("get_weather", {"city": "Paris"})]
    assert run("a < b <tool_ but no call", [3, 5]) == ("a < b <tool_ but no call", [])
    # a closing tag cut by a stop string: the complete JSON is still a call
    assert run('<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}', [4])[1] == [
        ("get_weather", {"city": "X"})]
    assert run("<tool_call>\n{\"name\": \"get_weather\", \"argu", [])[0].startswith("<tool_call>")


HISTORY = [ChatMessage.model_validate(m) for m in [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]]


def test_the_default_rendering_for_the_built_in_chatml_template():
    tokenizer = builtin_tokenizer()
    template = ChatTemplate(tokenizer.chat_template)
    assert not template.takes("tools")
    plan = ToolPlan(TOOLS, "auto")
    text = template.render(template_messages(HISTORY, plan, takes_tools=False))
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert json.dumps(plan.openai_tools()[0]) in text
    assert "<|im_start|>assistant\n" + call_text("get_weather", {"city": "Paris"}) + "<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>" in text
    without = template.render(template_messages(HISTORY, ToolPlan(TOOLS, "none"), takes_tools=False))
    assert "# Tools" not in without and "<tool_response>" in without


def test_templates_that_take_tools_get_them_and_the_history_as_hugging_face_passes_it():
    template = ChatTemplate(
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}call {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.tool_call_id %} for {{ m.tool_call_id }} ({{ m.name }}){% endif %}{% endfor %}")
    plan = ToolPlan(TOOLS, "auto")
    text = template.render(template_messages(HISTORY, plan, takes_tools=True), tools=plan.openai_tools())
    assert text == ("[get_weather]<user>Weather in Paris?<assistant>call get_weather Paris"
                    "<tool>21 C for call_1 (get_weather)<tool>sunny for call_2 ()")


def test_the_forcing_grammar_accepts_the_format_and_names_only_allowed_functions():
    two = TOOLS + [Tool.model_validate({"type": "function", "function": {"name": "get_time"}})]
    for plan, good, bad in [
            (ToolPlan(two, "named", "get_time"), call_text("get_time", {}), call_text("get_weather", {"city": "x"})),
            (ToolPlan(two, "required"), call_text("get_weather", {"city": "x"}) + "\n" + call_text("get_time", {}),
             call_text("get_weather", {})),
            (ToolPlan(two, "required", parallel=False), call_text("get_time", {}),
             call_text("get_time", {}) + "\n" + call_text("get_time", {}))]:
        lark = grammar_text(plan.grammar_spec())
        assert _matches(lark, good) and not _matches(lark, bad), (plan, good, bad)
    named = grammar_text(ToolPlan(two, "named", "get_time").grammar_spec())
    assert not _matches(named, call_text("get_time", {}) + "\n" + call_text("get_time", {}))   # once, as OpenAI


def _matches(grammar: str, text: str) -> bool:
    tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Bytes()))
    matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


class _Bytes:
    """One token per byte (id = byte value; 256 is end-of-sequence)."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b""]
    special_token_ids = [256]

    def __call__(self, text):
        return list(text if isinstance(text, bytes) else text.encode())
