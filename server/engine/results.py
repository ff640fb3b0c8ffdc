"""What comes out of the engine: `RequestOutput` deltas of each request's stream, and the
`EngineObserver` through which it reports what metrics need (without importing prometheus)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol


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


class RequestOutput(NamedTuple):
    """One delta of a request's stream. The last one has `finished` set, a finish reason and usage.

    `finish_reason` is "stop", "length", "abort" or "error" (then `error` says what happened).
    A named tuple, immutable as a frozen dataclass is and made in a fifth of the time: the engine
    makes one per request and step.
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
    # a step computed `num_scheduled_tokens`; `shared`: divided across competing tenants (shared_steps.py)
    def on_step(self, num_scheduled_tokens: int, shared: bool = False) -> None: ...
    def on_preemption(self) -> None: ...
    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None: ...
    def on_request_finished(self, stats: FinishedRequestStats) -> None: ...
    def on_session_evicted(self) -> None: ...
    # speculative decoding: one step verified `num_drafts` requests' `num_draft_tokens` drafts, of which
    # `num_accepted_tokens` were accepted
    def on_spec_decode(self, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int) -> None: ...
    # cache tiers (model/cache/tiers.py): hit_blocks, misses, read_bytes, written_bytes, restore_seconds,
    # invalid_files (reason), write_error, dropped_writes; called from the tiers' threads
    def on_tier_event(self, tier: str, event: str, amount: float = 1.0, reason: str = "") -> None: ...


class NullObserver:
    def on_step(self, num_scheduled_tokens: int, shared: bool = False) -> None: pass
    def on_preemption(self) -> None: pass
    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None: pass
    def on_request_finished(self, stats: FinishedRequestStats) -> None: pass
    def on_session_evicted(self) -> None: pass
    def on_spec_decode(self, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int) -> None: pass
    def on_tier_event(self, tier: str, event: str, amount: float = 1.0, reason: str = "") -> None: pass

