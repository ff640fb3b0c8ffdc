"""Per-request state the engine keeps while a request is waiting, running or finishing."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from model.cache.block_table import BlockTable
from server.engine.results import RequestOutput
from server.engine.request import GenerationRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request moving `num_computed_tokens` toward `num_tokens` (vLLM v1's single rule: prefill,
    chunked prefill, prefix hits and decode are all just that)."""

    request: GenerationRequest
    emit: Callable[[RequestOutput], None]
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    blocks: BlockTable = field(default_factory=BlockTable)   # changed by the KV manager only
    num_cached_prompt_tokens: int | None = None              # prefix-cache hit at first scheduling
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    detokenizer: object | None = None
    stop_matcher: object | None = None
    grammar: object | None = None                            # GrammarState of a constrained output
    # the sampler's view of it (engine/sampler.py SamplingRow: parameters, token lists, generator,
    # grammar state, all references fixed at admission), made once when the engine admits it
    sampling_row: object | None = None
    ending_token_ids: frozenset[int] = frozenset()           # the ids that end it (output processing)
    first_scheduled_time: float | None = None
    last_shared_turn: int = -1        # when a shared step last advanced it (server/engine/shared_steps.py)
    first_token_time: float | None = None
    last_token_time: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    # prompt-lookup speculation (server/engine/speculation.py): the tokens proposed to verify in the
    # next step (the scheduler may take fewer) and the request's token history for the lookup
    draft_token_ids: list[int] = field(default_factory=list)
    lookup: object | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def block_ids(self) -> list[int]:
        """The block table (read it; the KV manager changes it)."""
        return self.blocks.block_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        prompt = self.request.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return self.all_token_ids[start:end]

    def record_token_time(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.inter_token_latencies.append(now - self.last_token_time)
        self.last_token_time = now
