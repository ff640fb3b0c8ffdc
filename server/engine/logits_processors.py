"""The logits-processor stage: the step between the model's raw logits and sampling.

It is an ordered list of processors. The interface (`LogitsProcessor`):
- `wants(row) -> bool`, on the host: whether this processor changes that row at all. A step in
  which no row wants any processor costs nothing (the raw logits go straight to sampling).
- `__call__(logits, rows) -> logits`: `logits` are float32 `[N, V]` on the model's device, one row
  per `SamplingRow` (its request's parameters, prompt and output tokens, generator and the ids
  that end it); the processor returns the processed `[N, V]` logits, on the same device. It may
  modify `logits` in place (the stage hands it its own copy, never the raw logits, which logprobs
  are computed from), must leave the rows it does not want unchanged, and works on all rows at
  once with batched tensor operations (no per-row device work, no host sync).

The default order: repetition penalty (Hugging Face rule, prompt + output tokens) → presence and
frequency penalties (OpenAI rule, output tokens) → logit_bias (added) → min_tokens (the ids that
would end the request masked to -inf while it has fewer tokens, whatever the bias) → the grammar
mask of structured outputs (`GrammarMask`: its row state is the request's `GrammarState`,
server/engine/grammar.py; tokens the grammar does not allow next are set to -inf). Any later
per-request constraint on the next token is one more processor.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from server.engine.sampler import SamplingRow


class LogitsProcessor(Protocol):
    def wants(self, row: "SamplingRow") -> bool: ...
    def __call__(self, logits: torch.Tensor, rows: list["SamplingRow"]) -> torch.Tensor: ...


def token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, V] float32 occurrence counts of each row's tokens."""
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.float32, device=device)
    lengths = [len(t) for t in token_lists]
    if sum(lengths):
        rows = torch.repeat_interleave(torch.arange(len(token_lists)), torch.tensor(lengths)).to(device)
        tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long).to(device)
        counts.index_put_((rows, tokens), torch.ones(len(tokens), device=device), accumulate=True)
    return counts


class RepetitionPenalty:
    """Hugging Face's rule over prompt and output tokens: a seen token's logit is divided by the
    penalty when positive, multiplied by it otherwise."""

    def wants(self, row: "SamplingRow") -> bool:
        return row.params.repetition_penalty != 1.0

    def __call__(self, logits: torch.Tensor, rows: list["SamplingRow"]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[1]
        seen = token_counts([r.prompt_token_ids + r.output_token_ids if self.wants(r) else [] for r in rows],
                            vocab, device) > 0                                                  # [N, V]
        penalty = torch.tensor([[r.params.repetition_penalty] for r in rows]).to(device)      # [N, 1]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(seen, penalised, logits)


class PresenceFrequencyPenalty:
    """OpenAI's rule over output tokens: minus frequency_penalty per occurrence, minus
    presence_penalty once for any."""

    def wants(self, row: "SamplingRow") -> bool:
        return bool(row.params.presence_penalty or row.params.frequency_penalty)

    def __call__(self, logits: torch.Tensor, rows: list["SamplingRow"]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[1]
        counts = token_counts([r.output_token_ids if self.wants(r) else [] for r in rows], vocab, device)  # [N, V]
        coef = torch.tensor([[r.params.frequency_penalty, r.params.presence_penalty] for r in rows]).to(device)
        logits -= coef[:, :1] * counts + coef[:, 1:] * (counts > 0).float()
        return logits


class LogitBias:
    """OpenAI's logit_bias: each (token id, bias) added to that token's logit."""

    def wants(self, row: "SamplingRow") -> bool:
        return bool(row.params.logit_bias)

    def __call__(self, logits: torch.Tensor, rows: list["SamplingRow"]) -> torch.Tensor:
        device = logits.device
        entries = [(i, token, bias) for i, r in enumerate(rows) for token, bias in r.params.logit_bias]
        row_idx, tok_idx, values = zip(*entries)
        logits.index_put_((torch.tensor(row_idx).to(device), torch.tensor(tok_idx).to(device)),
                          torch.tensor(values, dtype=torch.float32).to(device), accumulate=True)
        return logits


class MinTokens:
    """While a row has generated fewer than `min_tokens` tokens, the ids that would end it (its
    stop_token_ids, and the end-of-sequence ids unless ignore_eos) cannot be sampled: -inf."""

    def wants(self, row: "SamplingRow") -> bool:
        return len(row.output_token_ids) < row.params.min_tokens and bool(self._masked(row))

    @staticmethod
    def _masked(row: "SamplingRow") -> tuple[int, ...]:
        return row.params.ending_token_ids(row.eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list["SamplingRow"]) -> torch.Tensor:
        vocab = logits.shape[1]
        entries = [(i, token) for i, r in enumerate(rows) if self.wants(r) for token in self._masked(r)
                   if 0 <= token < vocab]
        if entries:
            row_idx, tok_idx = zip(*entries)
            logits[torch.tensor(row_idx).to(logits.device), torch.tensor(tok_idx).to(logits.device)] = float("-inf")
        return logits


def unpack_token_mask(packed: torch.Tensor, vocab: int, allowed: bool = True) -> torch.Tensor:
    """[N, W] int32 packed masks (bit j of word i: token 32 i + j) → [N, vocab] bool, on packed's
    device: the allowed tokens, or with `allowed=False` the others."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)                       # [32]
    bits = (packed.unsqueeze(-1) >> shifts) & 1                                               # [N, W, 32]
    return (bits if allowed else bits == 0).flatten(1)[:, :vocab].bool()                      # [N, V]


class GrammarMask:
    """Structured outputs: each constrained row keeps only the tokens its grammar allows next. The
    packed masks of those rows ([G, V / 32] int32, computed on the host by llguidance, usually
    already in the background) cross to the device in one transfer and are unpacked there; the
    other tokens are set to -inf in place. A row whose `min_tokens` mask may have removed every
    token its grammar allows samples uniformly among those rather than from nothing."""

    def wants(self, row: "SamplingRow") -> bool:
        return row.grammar is not None

    def __call__(self, logits: torch.Tensor, rows: list["SamplingRow"]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[1]
        index = [i for i, r in enumerate(rows) if r.grammar is not None]
        packed = torch.from_numpy(np.stack([rows[i].grammar.next_mask() for i in index]))   # [G, W] host
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        banned = unpack_token_mask(packed.to(device), vocab, allowed=False)                   # [G, V]
        whole = len(index) == len(rows)
        rows_at = None if whole else torch.tensor(index, device=device)
        picked = logits if whole else logits[rows_at]                                         # [G, V]
        picked.masked_fill_(banned, float("-inf"))
        if any(_MIN_TOKENS.wants(rows[i]) for i in index):
            stranded = picked.amax(-1, keepdim=True) == float("-inf")                        # [G, 1]
            picked.masked_fill_(stranded & ~banned, 0.0)
        if not whole:
            logits[rows_at] = picked
        return logits


_MIN_TOKENS = MinTokens()
PENALTIES: tuple[LogitsProcessor, ...] = (RepetitionPenalty(), PresenceFrequencyPenalty(), LogitBias())
DEFAULT_PROCESSORS: tuple[LogitsProcessor, ...] = (*PENALTIES, MinTokens(), GrammarMask())


def apply_logits_processors(logits: torch.Tensor, rows: list["SamplingRow"],
                            processors: Sequence[LogitsProcessor] = DEFAULT_PROCESSORS) -> torch.Tensor:
    """float32 logits [N, V] → the processed logits: `logits` itself when no row wants any
    processor, else a new tensor (the input is never modified)."""
    active = [p for p in processors if any(p.wants(r) for r in rows)]
    if not active:
        return logits
    processed = logits.clone()
    for processor in active:
        processed = processor(processed, rows)
    return processed
