"""OpenAI request schemas, validated with pydantic: malformed input is a 400 before anything runs.

Types are strict (`"max_tokens": "5"`, `true` for a number, `"stream": "yes"` are refused, not
coerced); text must be valid Unicode (a lone surrogate is refused before any tokenizer sees it).
Bounds on sampling parameters come from `server.engine.request.SAMPLING_BOUNDS` (the one set); the
server's own limits (prompts × n, stop strings, logit_bias entries, max_tokens) from `ApiConfig`.

Unknown fields are ignored, as OpenAI-compatible servers commonly do; our extension fields
(`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `session_id`,
`priority`, `speculative_decoding`, vLLM's `structured_outputs`) sit beside OpenAI's in the same body. OpenAI fields this server does
not act on (audio output, predicted outputs, stored completions, web search, the deprecated
`functions`) are refused with a 400 naming them rather than dropped (`REFUSED_CHAT_FIELDS`).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, Field, field_validator

from server.api.errors import ApiError, quoted
from server.api.schema_types import (ResponseFormat, Schema, StructuredOutputs, Text, Tool, ToolCall, ToolChoice,
                                     valid_unicode)
from server.config import ApiConfig
from server.engine.errors import ContextLengthError
from server.engine.request import SAMPLING_BOUNDS, SamplingParams

# max_tokens when a request gives none (and --default-max-tokens is not set): an answer that ends
CHAT_DEFAULT_MAX_TOKENS = 512
COMPLETION_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for completions
SESSION_ID_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")


def valid_session_id(value: str) -> str:
    """The rule for a session id, wherever it comes from (the `session_id` field, `X-Session-ID`):
    1 to 256 characters, no control characters, valid Unicode."""
    valid_unicode(value)
    if not SESSION_ID_PATTERN.fullmatch(value):
        raise ValueError("a session id has 1 to 256 characters and no control characters")
    return value


SessionId = Annotated[str, AfterValidator(valid_session_id)]


def bounded(name: str, default):
    """A field whose range is `SAMPLING_BOUNDS[name]`."""
    return Field(default=default, **SAMPLING_BOUNDS[name].field_constraints())


class StreamOptions(Schema):
    include_usage: bool = False


class SamplingFields(Schema):
    """Fields shared by completions and chat."""

    model: str | None = None
    max_tokens: int | None = bounded("max_tokens", None)
    temperature: float = bounded("temperature", 1.0)
    top_p: float = bounded("top_p", 1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[Text, list[Text], None] = None
    presence_penalty: float = bounded("presence_penalty", 0.0)
    frequency_penalty: float = bounded("frequency_penalty", 0.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions
    top_k: int = bounded("top_k", 0)
    min_p: float = bounded("min_p", 0.0)
    repetition_penalty: float = bounded("repetition_penalty", 1.0)
    min_tokens: int = bounded("min_tokens", 0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    session_id: SessionId | None = None
    priority: int = Field(default=0, ge=-(2 ** 31), le=2 ** 31 - 1)   # within the tenant, lower first
    structured_outputs: StructuredOutputs | None = None
    # prompt-lookup speculation for this request, on a server started with --num-speculative-tokens
    # (400 on one without); the output is the same, only faster when it repeats its context
    speculative_decoding: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        if value is None:
            return value
        bound = SAMPLING_BOUNDS["logit_bias"]
        for key, bias in value.items():
            if not TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids (decimal digits), got {quoted(key)}")
            if not bound.contains(bias):
                raise ValueError(f"logit_bias values must be {bound.describe()}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    # the field that holds the prompt
    prompt_param: ClassVar[str] = "prompt"

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def default_max_tokens(self, api: ApiConfig) -> int:
        return api.default_max_tokens or CHAT_DEFAULT_MAX_TOKENS

    def check(self, api: ApiConfig, num_prompts: int = 1) -> None:
        """The server's limits (flags) and the features it does not have; ApiError(400) naming the field.
        What depends on the model (token ids, context length) is the engine's admission check."""
        max_tokens = self.requested_max_tokens()
        if self.n > api.max_n:
            raise ApiError(400, f"n must be at most {api.max_n}", param="n")
        if num_prompts * self.n > api.max_sequences_per_request:
            raise ApiError(400, f"{num_prompts} prompts × n {self.n} would start {num_prompts * self.n} sequences; "
                                f"at most {api.max_sequences_per_request} are allowed per request", param="prompt")
        stops = self.stop_list()
        if len(stops) > api.max_stop_strings:
            raise ApiError(400, f"at most {api.max_stop_strings} stop strings are allowed", param="stop")
        if any(len(stop) > api.max_stop_chars for stop in stops):
            raise ApiError(400, f"a stop string may have at most {api.max_stop_chars} characters", param="stop")
        if self.logit_bias is not None and len(self.logit_bias) > api.max_logit_bias:
            raise ApiError(400, f"logit_bias may have at most {api.max_logit_bias} entries", param="logit_bias")
        if max_tokens is not None and max_tokens > api.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {api.max_tokens_limit}", param="max_tokens")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def resolve_max_tokens(self, prompt_len: int, max_context: int, api: ApiConfig) -> int:
        """max_tokens as requested (the engine checks that it fits), else the default within what the
        context leaves; ContextLengthError when the prompt leaves no room at all."""
        requested = self.requested_max_tokens()
        if requested is not None:
            return requested
        room = max_context - prompt_len
        if room < 1:
            raise ContextLengthError(max_context, prompt_len, 1, "prompt")
        return min(room, self.default_max_tokens(api), api.max_tokens_limit)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int, logprobs: int | None, grammar=None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            seed=self.seed, logprobs=logprobs, stop=tuple(self.stop_list()),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, grammar=grammar, speculative=self.speculative_decoding)


class CompletionRequest(SamplingFields):
    prompt: Any
    echo: bool = False
    logprobs: int | None = bounded("logprobs", None)
    best_of: int | None = None
    suffix: str | None = None

    def default_max_tokens(self, api: ApiConfig) -> int:
        return api.default_max_tokens or COMPLETION_DEFAULT_MAX_TOKENS

    def check(self, api: ApiConfig, num_prompts: int = 1) -> None:
        super().check(api, num_prompts)
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo together with logprobs is not supported (no prompt logprobs)", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise ApiError(400, "best_of is not supported (it must equal n)", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of strings or token-id lists (one choice set per prompt): the prompt
        is a string, a list of token ids, or a list of either. ApiError(400) otherwise."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(_is_token_id(p) for p in prompt):
            return [list(prompt)]
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(p, str) or (isinstance(p, list) and p and all(_is_token_id(t) for t in p)) for p in prompt):
            raise ApiError(400, "prompt must be a string, a non-empty list of token ids, or a non-empty list of "
                                "strings and token-id lists", param="prompt")
        return list(prompt)

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value):
        for text in [value] if isinstance(value, str) else value if isinstance(value, list) else ():
            if isinstance(text, str):
                valid_unicode(text)
        return value


UNSUPPORTED_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "audio", "audio": "audio",
                     "file": "file", "input_file": "file"}


class TextPart(Schema):
    type: Literal["text"]
    text: Text


class ChatMessage(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None       # assistant messages
    tool_call_id: str | None = None                # tool messages: the call answered

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value):
        """This server runs text-only models: image, audio and file parts are refused by name
        (rather than as "not a valid string")."""
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                what = UNSUPPORTED_PARTS.get(kind)
                raise ValueError(f"{what} content parts are not supported: this server serves text-only models"
                                 if what else f"unknown content part type {quoted(kind)}; only text parts are supported")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def check_messages(messages: list[ChatMessage], param: str = "messages") -> None:
    """A message list that can form a prompt: every message but the assistant's carries content, and
    only assistant messages carry tool calls (ApiError(400) naming the first that does not)."""
    for index, message in enumerate(messages):
        if message.role != "assistant" and message.content is None:
            raise ApiError(400, f"messages[{index}]: a {message.role} message needs content", param=f"{param}.{index}")
        if message.role != "assistant" and message.tool_calls:
            raise ApiError(400, f"messages[{index}]: only assistant messages carry tool_calls",
                           param=f"{param}.{index}.tool_calls")


# OpenAI chat fields that ask for something this server does not do: a 400 naming the field, not a
# silent drop. (field, refused when, why)
REFUSED_CHAT_FIELDS = (
    ("modalities", lambda v: v is not None and "audio" in v, "audio output is not supported: this server generates text"),
    ("audio", lambda v: v is not None, "audio output is not supported: this server generates text"),
    ("prediction", lambda v: v is not None, "predicted outputs (speculative decoding from a prediction) are not supported"),
    ("web_search_options", lambda v: v is not None, "web search is not supported"),
    ("functions", lambda v: v is not None, "the deprecated `functions` field is not supported: use `tools`"),
    ("function_call", lambda v: v is not None, "the deprecated `function_call` field is not supported: use `tool_choice`"),
    ("store", lambda v: v is True, "stored completions are not supported: this server keeps no store"),
)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = bounded("logprobs", None)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    # refused when given (REFUSED_CHAT_FIELDS)
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    store: bool | None = None

    prompt_param: ClassVar[str] = "messages"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check(self, api: ApiConfig, num_prompts: int = 1) -> None:
        super().check(api, num_prompts)
        check_messages(self.messages)
        for name, refused, why in REFUSED_CHAT_FIELDS:
            if refused(getattr(self, name)):
                raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.structured_outputs is not None:
            raise ApiError(400, "give one of response_format and structured_outputs", param="structured_outputs")
        if self.tool_choice is not None and not self.tools:
            raise ApiError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ApiError(400, "tools: function names must be unique", param="tools")
        choice = self.tool_choice
        if not isinstance(choice, str) and choice is not None and choice.function.name not in names:
            raise ApiError(400, f"tool_choice names the function {quoted(choice.function.name)}, which is not among "
                                "the tools", param="tool_choice")
        if self.tools and (choice == "required" or not isinstance(choice, (str, type(None)))) and (
                formatted or self.structured_outputs is not None):
            raise ApiError(400, "a required or named tool_choice constrains the output to tool calls: it cannot be "
                                "combined with response_format or structured_outputs", param="tool_choice")


class TokenizeRequest(Schema):
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Schema):
    model: str | None = None
    tokens: list[int]


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
