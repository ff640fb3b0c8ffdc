"""OpenAI protocol: request schemas (validated with pydantic), response bodies and error shapes.

Unknown fields are ignored, as OpenAI-compatible servers commonly do; our extension fields
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `session_id`) sit beside
OpenAI's in the same body.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.config import ApiConfig
from server.engine.types import MAX_TOP_LOGPROBS, RequestOutput, SamplingParams, TokenLogprob


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.TYPES.get(self.status, "invalid_request_error"), self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
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
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
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

    def check(self, api: ApiConfig, vocab_size: int) -> None:
        """Limits and the features this server does not have; ApiError(400) naming the field."""
        max_tokens = self.requested_max_tokens()
        if self.n > api.max_n:
            raise ApiError(400, f"n must be at most {api.max_n}", param="n")
        if len(self.stop_list()) > api.max_stop_strings:
            raise ApiError(400, f"at most {api.max_stop_strings} stop strings are allowed", param="stop")
        if max_tokens is not None and max_tokens > api.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {api.max_tokens_limit}", param="max_tokens")
        for token in self.stop_token_ids or ():
            if not 0 <= token < vocab_size:
                raise ApiError(400, f"stop_token_ids: {token} is outside the vocabulary", param="stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def resolve_max_tokens(self, prompt_len: int, max_context: int, api: ApiConfig) -> int:
        """max_tokens as requested, else the default within what the context leaves; ApiError(400)
        when the prompt and max_tokens do not fit in the context."""
        requested = self.requested_max_tokens()
        if requested is None:
            room = max_context - prompt_len
            if room >= 1:
                return min(room, self.default_max_tokens(api) or room, api.max_tokens_limit)
        total = prompt_len + (requested or 1)
        if total > max_context:
            raise ApiError(400, f"This model's maximum context length is {max_context} tokens. However, you "
                                f"requested {total} tokens ({prompt_len} in the prompt, {total - prompt_len} for "
                                f"the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens" if requested else self.prompt_param, code="context_length_exceeded")
        return requested

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
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos)


class CompletionRequest(SamplingFields):
    prompt: Any
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def default_max_tokens(self, api: ApiConfig) -> int | None:
        return api.default_max_tokens or 16         # OpenAI's default for completions

    def check(self, api: ApiConfig, vocab_size: int) -> None:
        super().check(api, vocab_size)
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
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list | None = None
    add_generation_prompt: bool = True

    prompt_param: ClassVar[str] = "messages"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check(self, api: ApiConfig, vocab_size: int) -> None:
        super().check(api, vocab_size)
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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ---- response bodies ----------------------------------------------------------------------------
def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def model_card(name: str, max_context: int) -> dict:
    return {"id": name, "object": "model", "created": now(), "owned_by": "customllm", "max_model_len": max_context}


def session_body(info) -> dict:
    return {"id": info.session_id, "object": "session", "num_tokens": info.num_tokens, "bytes": info.bytes,
            "last_used": info.last_used}


def completion_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str],
                        offset: int = 0) -> dict:
    """The legacy completions shape; `offset` is where the first token starts in the choice's text."""
    tokens, offsets = [], []
    for lp in entries:
        text = token_text(lp.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in entries], "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """The chat shape: one entry per token with its text, UTF-8 bytes and the top alternatives."""
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                        for lp in entries]}


def _entries(outputs: list[RequestOutput]) -> list[TokenLogprob]:
    return [lp for o in outputs for lp in (o.logprobs or ())]


class _Shaper:
    """Response bodies and stream chunks of one request with its choices, from engine outputs."""

    response_object = chunk_object = ""

    def __init__(self, base_id: str, model: str, token_text: Callable[[int], str], prompt_tokens: int,
                 include_usage: bool, logprobs: bool):
        self.head = {"id": base_id, "object": self.response_object, "created": now(), "model": model}
        self.token_text = token_text
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.logprobs = logprobs

    def usage(self, finals: list[RequestOutput]) -> dict:
        completion = sum(o.usage.completion_tokens for o in finals if o.usage)
        cached = max((o.usage.cached_tokens for o in finals if o.usage), default=0)
        return usage_body(self.prompt_tokens, completion, cached)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {**self.head, "object": self.chunk_object, "choices": choices}
        return {**out, "usage": usage} if self.include_usage else out

    def usage_chunk(self, finals: list[RequestOutput]) -> dict:
        return self.chunk([], self.usage(finals))

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        raise NotImplementedError

    def response(self, per_choice: list[list[RequestOutput]]) -> dict:
        raise NotImplementedError


class CompletionShaper(_Shaper):
    response_object = chunk_object = "text_completion"

    def __init__(self, *args, echoes: list[str], n: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.echoes = echoes          # per prompt: the echoed prompt text, or ""
        self.n = n
        self.offsets: dict[int, int] = {}

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        text = out.text
        if index not in self.offsets:
            echo = self.echoes[index // self.n]
            text, self.offsets[index] = echo + text, len(echo)
        if not (text or out.finished or out.logprobs):
            return []
        logprobs = None
        if self.logprobs:
            logprobs = completion_logprobs(list(out.logprobs or ()), self.token_text, self.offsets[index])
            self.offsets[index] += sum(len(t) for t in logprobs["tokens"])
        return [self.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}])]

    def response(self, per_choice: list[list[RequestOutput]]) -> dict:
        choices = []
        for index, outputs in enumerate(per_choice):
            echo = self.echoes[index // self.n]
            logprobs = completion_logprobs(_entries(outputs), self.token_text, len(echo)) if self.logprobs else None
            choices.append({"index": index, "text": echo + "".join(o.text for o in outputs), "logprobs": logprobs,
                            "finish_reason": outputs[-1].finish_reason})
        return {**self.head, "choices": choices, "usage": self.usage([o[-1] for o in per_choice])}


class ChatShaper(_Shaper):
    response_object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: set[int] = set()

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        chunks = []
        if index not in self.started:
            self.started.add(index)
            chunks.append(self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
        if out.text or out.finished or out.logprobs:
            logprobs = chat_logprobs(list(out.logprobs or ()), self.token_text) if self.logprobs else None
            chunks.append(self.chunk([{"index": index, "delta": {"content": out.text} if out.text else {},
                                       "logprobs": logprobs, "finish_reason": out.finish_reason}]))
        return chunks

    def response(self, per_choice: list[list[RequestOutput]]) -> dict:
        choices = [{"index": index, "message": {"role": "assistant", "content": "".join(o.text for o in outputs)},
                    "logprobs": chat_logprobs(_entries(outputs), self.token_text) if self.logprobs else None,
                    "finish_reason": outputs[-1].finish_reason}
                   for index, outputs in enumerate(per_choice)]
        return {**self.head, "choices": choices, "usage": self.usage([o[-1] for o in per_choice])}
