"""Tool calling in the Hermes format: how tools and tool turns reach the chat template, the grammar
that enforces `tool_choice` "required" or a named function, and the parser that turns the model's
output into OpenAI `tool_calls` (docs/structured-outputs.md has the format).

A call is `<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>`, several separated by a
newline. Templates that read a `tools` variable get the tools (OpenAI-shaped) and the tool turns as
Hugging Face templates expect them (assistant `tool_calls` with parsed arguments, `tool` messages);
other templates (the built-in ChatML, SmartLLM's) get the default rendering: a system section listing
the tools and the format, assistant calls written as `<tool_call>` blocks, tool results as user
turns of `<tool_response>` blocks. `tool_choice: none` leaves the tools out and the output unparsed.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.api.schema_types import Tool
from server.api.structured import strict_schema
from server.engine.grammar import JSON_OPTIONS, GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOLS_SECTION = """# Tools

You may call {how} to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_text(name: str, arguments) -> str:
    """One call in the Hermes format (what the grammar forces, and how history calls are rendered)."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def _arguments(text: str):
    """History arguments (a JSON string in OpenAI's shape) as an object when they parse."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass
class ToolPlan:
    """What a request's `tools`, `tool_choice` and `parallel_tool_calls` mean for this generation."""

    tools: list[Tool]
    choice: str                      # none | auto | required | named
    named: str | None = None
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[Tool] | None, tool_choice, parallel: bool) -> "ToolPlan":
        tools = list(tools or ())
        if not tools:
            return cls([], "none", parallel=parallel)
        if tool_choice is None or isinstance(tool_choice, str):
            return cls(tools, tool_choice or "auto", parallel=parallel)
        return cls(tools, "named", tool_choice.function.name, parallel)

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def openai_tools(self) -> list[dict]:
        return [tool.model_dump(exclude_none=True, by_alias=True) for tool in self.tools]

    def grammar_spec(self) -> GrammarSpec | None:
        """The Lark grammar for "required" and a named function: the calls (one for a named function
        or without `parallel`), each naming an allowed function, its arguments following that
        function's parameter schema."""
        if self.choice not in ("required", "named"):
            return None
        functions = [t.function for t in self.tools if self.choice == "required" or t.function.name == self.named]
        rules = []
        for index, function in enumerate(functions):
            schema = strict_schema(function.parameters or {"type": "object", "properties": {}})
            if isinstance(schema, dict):
                schema = {**schema, "x-guidance": JSON_OPTIONS}
            head = f'{OPEN}\n{{"name": {json.dumps(function.name)}, "arguments": '
            rules.append(f"fn_{index}: {json.dumps(head)} args_{index} {json.dumps('}' + chr(10) + CLOSE)}")
            rules.append(f"args_{index}: %json {json.dumps(schema)}")
        calls = " | ".join(f"fn_{i}" for i in range(len(functions)))
        several = self.parallel and self.choice == "required"      # a named function is called once, as OpenAI
        start = 'start: call ("\\n" call)*' if several else "start: call"
        return GrammarSpec("lark", "\n".join([start, f"call: {calls}", *rules]))

    def finish_reason(self, reason: str | None, has_calls: bool) -> str | None:
        """OpenAI's: "tool_calls" when the model called tools (a named function: "stop", as OpenAI)."""
        if has_calls and reason == "stop" and self.choice != "named":
            return "tool_calls"
        return reason

    def parser(self) -> "ToolCallParser | None":
        return ToolCallParser({t.function.name for t in self.tools}, self.parallel) if self.active else None


def template_messages(messages, plan: ToolPlan, takes_tools: bool) -> list[dict]:
    """Chat messages (schemas.ChatMessage) → the dicts the chat template renders (see module doc)."""
    out: list[dict] = []
    names: dict[str, str] = {}
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        entry: dict = {"role": role, "content": message.text()}
        if message.name:
            entry["name"] = message.name
        if role == "assistant" and message.tool_calls:
            names.update({c.id: c.function.name for c in message.tool_calls})
            if takes_tools:
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                    for c in message.tool_calls]
            else:
                blocks = "\n".join(call_text(c.function.name, _arguments(c.function.arguments))
                                   for c in message.tool_calls)
                entry["content"] = f"{entry['content']}\n{blocks}" if entry["content"] else blocks
        elif role == "tool":
            name = names.get(message.tool_call_id or "") or message.name
            if takes_tools:
                entry.update({"tool_call_id": message.tool_call_id, **({"name": name} if name else {})})
            else:
                block = f"<tool_response>\n{entry['content']}\n</tool_response>"
                if out and out[-1].pop("_tool_responses", False):
                    out[-1]["content"] += "\n" + block
                    out[-1]["_tool_responses"] = True
                    continue
                entry = {"role": "user", "content": block, "_tool_responses": True}
        out.append(entry)
    for entry in out:
        entry.pop("_tool_responses", None)
    if plan.active and not takes_tools:
        how = "one or more functions" if plan.parallel else "at most one function"
        section = TOOLS_SECTION.format(how=how, tools="\n".join(json.dumps(t, ensure_ascii=False)
                                                                 for t in plan.openai_tools()))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{section}" if out[0]["content"] else section
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


@dataclass
class ParsedCall:
    name: str
    arguments: str                  # JSON text
    id: str = field(default_factory=new_call_id)


class ToolCallParser:
    """Splits streamed output text into content and tool calls. `feed(text)` returns the new events,
    ("content", str) or ("call", ParsedCall); text that may still become `<tool_call>` is held back,
    and so is trailing whitespace, which is dropped when a call follows or the message ends with
    calls (so the same text gives the same content streamed or whole). A block that is not a
    call of a known function stays content. Without `parallel`, calls after the first are dropped."""

    def __init__(self, names: set[str], parallel: bool = True):
        self.names = names
        self.parallel = parallel
        self.calls: list[ParsedCall] = []
        self.buffer = ""
        self.inside = False
        self.blank = ""          # whitespace held back

    def _content(self, text: str, events: list) -> None:
        """Emit content, holding back its trailing whitespace (dropped if a call follows)."""
        if not text:
            return
        body = text.rstrip()
        if body:
            events.append(("content", self.blank + body))
            self.blank = ""
        self.blank += text[len(body):]

    def _call(self, body: str, events: list) -> None:
        call = self._parse(body)
        if call is None:
            self._content(OPEN + body + CLOSE, events)
        elif self.parallel or not self.calls:
            self.blank = ""
            self.calls.append(call)
            events.append(("call", call))

    def _parse(self, body: str) -> ParsedCall | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))

    def feed(self, text: str) -> list:
        self.buffer += text
        events: list = []
        while True:
            if self.inside:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    return events
                body, self.buffer, self.inside = self.buffer[:end], self.buffer[end + len(CLOSE):], False
                self._call(body, events)
                continue
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buffer)), 0, -1)
                             if OPEN.startswith(self.buffer[-k:])), 0)
                cut = len(self.buffer) - keep
                self._content(self.buffer[:cut], events)
                self.buffer = self.buffer[cut:]
                return events
            self._content(self.buffer[:start], events)
            self.buffer, self.inside = self.buffer[start + len(OPEN):], True

    def finish(self) -> list:
        """Events for what is still held at the end: an unterminated block is a call if its JSON is
        complete (a stop string may have cut the closing tag), else content."""
        events: list = []
        if self.inside:
            if self._parse(self.buffer) is not None:
                self._call(self.buffer, events)
            else:
                self._content(OPEN + self.buffer, events)
        else:
            self._content(self.buffer, events)
        self.buffer, self.inside = "", False
        if self.blank and not self.calls:
            events.append(("content", self.blank))
        self.blank = ""
        return events
