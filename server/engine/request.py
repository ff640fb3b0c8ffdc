"""What goes into the engine: a `GenerationRequest` with its `SamplingParams`.

`SAMPLING_BOUNDS` is the one set of bounds on the sampling parameters: the HTTP schemas build their
field constraints from it (server/api/schemas.py) and `SamplingParams.validate` checks engine
requests against it, so the two can never disagree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

from server.engine.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
# temperatures below this are greedy: dividing logits by a tiny positive temperature overflows to inf
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Bound:
    """`low <= value` (`low < value` when `low_open`) and `value <= high`; None: no limit that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"greater than {low}" if self.low_open else f"at least {low}"
        if self.low is None:
            return f"at most {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}]"

    def field_constraints(self) -> dict[str, float]:
        """pydantic `Field` keyword arguments for this range."""
        constraints: dict[str, float] = {}
        if self.low is not None:
            constraints["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            constraints["le"] = self.high
        return constraints


def _number(value: float | None) -> str:
    return "" if value is None else (str(int(value)) if float(value).is_integer() else str(value))


SAMPLING_BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(1),
    "min_tokens": Bound(0),
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "top_k": Bound(-1),                       # -1 or 0: off
    "min_p": Bound(0.0, 1.0),
    "repetition_penalty": Bound(0.0, 10.0, low_open=True),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "logprobs": Bound(0, MAX_TOP_LOGPROBS),
    "logit_bias": Bound(-100.0, 100.0),       # each bias value
}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters. `validate` raises InvalidRequestError on bad input.

    `min_tokens`: the ids that would end the request (`ending_token_ids`: end-of-sequence and
    `stop_token_ids`) cannot be sampled until that many tokens were generated, as in vLLM. Stop
    strings still apply meanwhile (recent vLLM holds them back until min_tokens as well).

    `grammar`: a compiled `server.engine.grammar.Grammar` the output must follow (compiled before
    admission, off the engine loop); each sequence gets its own state from it.

    `speculative`: decode with prompt-lookup speculation when the engine allows it
    (server/engine/speculation.py); it never changes what is generated, only how fast."""

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
    grammar: object | None = field(default=None, compare=False)   # a compiled Grammar (structured output)
    speculative: bool = False           # prompt-lookup speculation asked for (the engine must allow it)

    # computed once per request (the parameters never change; `cached_property` stores its value in
    # the instance's dict, which a frozen dataclass allows): the engine asks on every step

    @cached_property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @cached_property
    def wants_logits_processors(self) -> bool:
        """Whether any logits processor may change this request's logits (penalties, logit_bias,
        min_tokens, a grammar); False lets the sampler skip asking them."""
        return (self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)
                or bool(self.logit_bias) or self.min_tokens > 0 or self.grammar is not None)

    def ending_token_ids(self, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
        """The token ids that end this request: its `stop_token_ids`, and the model's end-of-sequence
        ids `eos_token_ids` unless `ignore_eos`."""
        return tuple(dict.fromkeys(self.stop_token_ids + (() if self.ignore_eos else tuple(eos_token_ids))))

    def validate(self, vocab_size: int) -> None:
        for name, bound in SAMPLING_BOUNDS.items():
            if name == "logit_bias":
                continue
            value = getattr(self, name)
            if value is not None and not bound.contains(value):
                raise InvalidRequestError(f"{name} must be {bound.describe()}", name)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens must not exceed max_tokens", "min_tokens")
        bias_bound = SAMPLING_BOUNDS["logit_bias"]
        for token_id, bias in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(f"logit_bias token id {token_id} is outside the vocabulary", "logit_bias")
            if not bias_bound.contains(bias):
                raise InvalidRequestError(f"logit_bias values must be {bias_bound.describe()}", "logit_bias")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(f"stop_token_ids: {token_id} is outside the vocabulary", "stop_token_ids")
        if not all(self.stop):
            raise InvalidRequestError("stop strings must not be empty", "stop")


@dataclass
class GenerationRequest:
    """One sequence to generate. `tenant` salts the prefix cache and owns the session id."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str = ""
    session_id: str | None = None
    priority: int = 0                   # within a tenant, lower first (tenants take turns regardless)
    arrival_time: float = field(default_factory=time.monotonic)
