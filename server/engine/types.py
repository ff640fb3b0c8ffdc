"""What crosses the boundary between the HTTP layer and the engine.

`SamplingParams` and `GenerationRequest` go in; `RequestOutput` deltas come out of
`Engine.generate`. `EngineObserver` is how the engine reports what metrics need, without
importing prometheus.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters. `validate` raises ValueError on bad input."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0     # Hugging Face rule, over prompt and output tokens
    presence_penalty: float = 0.0       # OpenAI rule, over output tokens
    frequency_penalty: float = 0.0      # OpenAI rule, over output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    logprobs: int | None = None         # None: no logprobs; k: the sampled token's + k top ones
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.max_tokens >= 1, "max_tokens must be at least 1")
        need(0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]")
        need(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        need(self.top_k == -1 or self.top_k >= 0, "top_k must be -1, 0 (off) or a positive integer")
        need(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        need(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]")
        need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        need(self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        need(self.min_tokens >= 0, "min_tokens must be non-negative")
        for token_id, bias in self.logit_bias:
            need(0 <= token_id < vocab_size, f"logit_bias token id {token_id} is outside the vocabulary")
            need(-100.0 <= bias <= 100.0, "logit_bias values must be in [-100, 100]")
        for token_id in self.stop_token_ids:
            need(0 <= token_id < vocab_size, f"stop_token_ids: {token_id} is outside the vocabulary")
        need(all(s for s in self.stop), "stop strings must not be empty")


@dataclass
class GenerationRequest:
    """One sequence to generate. `tenant` salts the prefix cache and owns the session id."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str = ""
    session_id: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    """One delta of a request's stream. The last one has `finished` set, a finish reason and usage.

    `finish_reason` is "stop", "length", "abort" or "error" (then `error` says what happened).
    """

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class FinishedRequestStats:
    """Timings of one finished request, in seconds, for histograms."""

    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    queue_time: float
    time_to_first_token: float | None
    inter_token_latencies: tuple[float, ...]
    e2e_latency: float


class EngineObserver(Protocol):
    def on_step(self, num_scheduled_tokens: int) -> None: ...
    def on_preemption(self) -> None: ...
    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None: ...
    def on_request_finished(self, stats: FinishedRequestStats) -> None: ...
    def on_session_evicted(self) -> None: ...


class NullObserver:
    def on_step(self, num_scheduled_tokens: int) -> None: pass
    def on_preemption(self) -> None: pass
    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None: pass
    def on_request_finished(self, stats: FinishedRequestStats) -> None: pass
    def on_session_evicted(self) -> None: pass


class QueueFullError(Exception):
    """The engine's waiting queue is at its limit (HTTP 429)."""


class EngineDeadError(Exception):
    """The engine loop has stopped and cannot serve (HTTP 503)."""
