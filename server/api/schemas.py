"""OpenAI request schemas, validated with pydantic: malformed input is a 400 before anything runs.
Bounds on sampling parameters come from `server.engine.request.SAMPLING_BOUNDS` (the one set).

Unknown fields are ignored, as OpenAI-compatible servers commonly do; our extension fields
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `session_id`) sit beside
OpenAI's in the same body.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.config import ApiConfig
from server.api.errors import ApiError
from server.engine.errors import ContextLengthError
from server.engine.request import SAMPLING_BOUNDS, SamplingParams


def bounded(name: str, default):
    """A field whose range is `SAMPLING_BOUNDS[name]`."""
    return Field(default=default, **SAMPLING_BOUNDS[name].field_constraints())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = bounded("max_tokens", None)
    temperature: float = bounded("temperature", 1.0)
    top_p: float = bounded("top_p", 1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
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
    session_id: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        if value is None:
            return value
        for key, bias in value.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not SAMPLING_BOUNDS["logit_bias"].contains(bias):
                raise ValueError(f"logit_bias values must be {SAMPLING_BOUNDS['logit_bias'].describe()}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    # the field that holds the prompt, and the default of max_tokens (None: what the context leaves)
    prompt_param: ClassVar[str] = "prompt"

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def default_max_tokens(self, api: ApiConfig) -> int | None:
        return api.default_max_tokens

    def check(self, api: ApiConfig) -> None:
        """The server's limits (flags) and the features it does not have; ApiError(400) naming the field.
        What depends on the model (token ids, context length) is the engine's admission check."""
        max_tokens = self.requested_max_tokens()
        if self.n > api.max_n:
            raise ApiError(400, f"n must be at most {api.max_n}", param="n")
        if len(self.stop_list()) > api.max_stop_strings:
            raise ApiError(400, f"at most {api.max_stop_strings} stop strings are allowed", param="stop")
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
        return min(room, self.default_max_tokens(api) or room, api.max_tokens_limit)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            seed=self.seed, logprobs=logprobs, stop=tuple(self.stop_list()),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens)


class CompletionRequest(SamplingFields):
    prompt: Any
    echo: bool = False
    logprobs: int | None = bounded("logprobs", None)
    best_of: int | None = None
    suffix: str | None = None

    def default_max_tokens(self, api: ApiConfig) -> int | None:
        return api.default_max_tokens or 16         # OpenAI's default for completions

    def check(self, api: ApiConfig) -> None:
        super().check(api)
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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = bounded("logprobs", None)
    response_format: ResponseFormat | None = None
    tools: list | None = None
    add_generation_prompt: bool = True

    prompt_param: ClassVar[str] = "messages"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check(self, api: ApiConfig) -> None:
        super().check(api)
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "only response_format type 'text' is supported", param="response_format")
        if self.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def template_messages(self) -> list[dict]:
        out = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name:
                message["name"] = m.name
            out.append(message)
        return out


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
