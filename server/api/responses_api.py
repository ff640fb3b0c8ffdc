"""/v1/responses, stateless: OpenAI's Responses request, translated to a chat request that runs
through the same path (template, tools, grammar, engine), and shaped back (`responses_events.py`).

Served: `input` as text or items (messages with text parts, `function_call` and
`function_call_output` items), `instructions`, `max_output_tokens`, `temperature`, `top_p`,
`text.format` (text, json_object, json_schema), function `tools`, `tool_choice`,
`parallel_tool_calls`, `metadata` (echoed), `stream` (the Responses event types). Nothing is
stored: `store: true`, `previous_response_id`, `conversation`, `background` and item references
are refused with a 400 that says so, as are image, audio and file inputs and other tool types.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, field_validator

from server.api.errors import ApiError, quoted
from server.api.schema_types import FunctionName, Schema, Text
from server.api.schemas import ChatCompletionRequest, SessionId, UNSUPPORTED_PARTS, bounded

STATELESS = "this server keeps no responses (stateless /v1/responses)"
REFUSED_FIELDS = (
    ("store", lambda v: v is True, f"{STATELESS}: send store: false"),
    ("previous_response_id", lambda v: v is not None, f"{STATELESS}: send the whole conversation as input"),
    ("conversation", lambda v: v is not None, f"{STATELESS}: send the whole conversation as input"),
    ("background", lambda v: v is True, "background responses need a store; this server keeps none"),
    ("prompt", lambda v: v is not None, "stored prompt templates are not supported"),
    ("include", lambda v: bool(v), "extra output data (include) is not supported"),
    ("top_logprobs", lambda v: v is not None, "logprobs are not supported on /v1/responses; use /v1/chat/completions"),
    ("max_tool_calls", lambda v: v is not None, "max_tool_calls is not supported; parallel_tool_calls: false "
                                                "allows one call"),
)


# a chat field named in an error → the Responses field the client sent
RESPONSES_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
                    "response_format": "text.format", "reasoning_effort": "reasoning"}


def responses_error(exc: ApiError) -> ApiError:
    """An error of the chat path, naming the Responses field instead of the chat one."""
    param = exc.param
    if param is not None:
        head, _, rest = param.partition(".")
        param = RESPONSES_PARAMS.get(head, head) + (f".{rest}" if rest else "")
    message = exc.message
    if exc.param and message.startswith(f"{exc.param}:"):
        message = f"{param}:{message[len(exc.param) + 1:]}"
    return ApiError(exc.status, message, param, exc.code, exc.headers)


class InputText(Schema):
    type: Literal["input_text", "output_text", "text"]
    text: Text


def _text_parts_only(value):
    for part in value if isinstance(value, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in ("input_text", "output_text", "text"):
            what = UNSUPPORTED_PARTS.get(kind)
            raise ValueError(f"{what} inputs are not supported: this server serves text-only models"
                             if what else f"unknown content part type {quoted(kind)}; only text parts are supported")
    return value


class MessageItem(Schema):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[Text, list[InputText]]

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value):
        return _text_parts_only(value)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Schema):
    type: Literal["function_call"]
    call_id: str
    name: FunctionName
    arguments: str


class FunctionCallOutputItem(Schema):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[Text, list[InputText]]

    @field_validator("output", mode="before")
    @classmethod
    def _parts(cls, value):
        return _text_parts_only(value)

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


InputItem = Union[MessageItem, FunctionCallItem, FunctionCallOutputItem]
ITEM_TYPES = {"message", "function_call", "function_call_output"}


class FunctionTool(Schema):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(Schema):
    type: Literal["function"]
    name: FunctionName


class TextFormat(Schema):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Schema):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(Schema):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(Schema):
    model: str | None = None
    input: Union[Text, list[InputItem]]
    instructions: Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = bounded("temperature", None)
    top_p: float | None = bounded("top_p", None)
    stream: bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: bool = True
    reasoning: Reasoning | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    session_id: SessionId | None = None
    # refused when given (REFUSED_FIELDS)
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value):
        """Items without a type are messages; other item types need a store or tools we do not have."""
        if not isinstance(value, list):
            return value
        items = []
        for item in value:
            if isinstance(item, dict):
                kind = item.get("type", "message")
                if kind not in ITEM_TYPES:
                    raise ValueError(f"input items of type {quoted(str(kind))} are not supported (stateless server "
                                     "with function tools only)")
                item = {**item, "type": kind}
            items.append(item)
        return items

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value):
        for tool in value if isinstance(value, list) else ():
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise ValueError(f"tools of type {quoted(kind)} are not supported: only function tools")
        return value

    def check(self) -> None:
        for name, refused, why in REFUSED_FIELDS:
            if refused(getattr(self, name)):
                raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_parameter")

    def messages(self) -> list[dict]:
        """The conversation as chat messages: instructions first, then the input items."""
        out: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, MessageItem):
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                    out[-1]["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                out.append({"role": "tool", "content": item.text(), "tool_call_id": item.call_id})
        return out

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this response runs as (ApiError(400) for what a stateless server refuses)."""
        self.check()
        body: dict = {"messages": self.messages(), "stream": False, "parallel_tool_calls": self.parallel_tool_calls}
        if not body["messages"]:
            raise ApiError(400, "input must hold at least one message", param="input")
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p),
                            ("max_completion_tokens", self.max_output_tokens), ("session_id", self.session_id),
                            ("reasoning_effort", self.reasoning.effort if self.reasoning else None)):
            if value is not None:
                body[name] = value
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice if isinstance(self.tool_choice, str) else {
                "type": "function", "function": {"name": self.tool_choice.name}}
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.schema_ if fmt.schema_ is not None else {}, "strict": fmt.strict}}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValueError as exc:
            raise ApiError(400, f"input: {exc}", param="input") from None
