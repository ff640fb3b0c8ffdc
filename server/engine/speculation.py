"""Speculative decoding by prompt lookup: draft tokens from the request's own context
(`prompt_lookup.py`), verified in one forward, exact for greedy requests and
distribution-preserving for sampled ones.

The cycle, per request that asked for it (`SamplingParams.speculative`) on an engine started with
`num_speculative_tokens` K > 0:

1. After a step appended tokens to the request, `propose` looks up up to K drafts (fewer near
   `max_tokens` or the end of the context) and keeps them on the request.
2. The scheduler gives the request's decode chunk its drafts, within what is left of the token
   budget and the free blocks (drafts never preempt anything): the step computes the last sampled
   token and the k drafts at consecutive positions, their cache rows written, and the runner
   returns the logits of all 1 + k positions.
3. `verify` turns the logits into the tokens the request gets this step: the accepted drafts and one
   more token. Position j's distribution is the one the plain sampler would use for that token
   (logits processors applied with the drafts before it in the history, then temperature, top-k,
   top-p, min-p):
   - greedy: drafts are accepted while each equals the argmax; then the argmax follows, so the
     output is the plain greedy output token for token;
   - sampled: a draft is a point mass, so it is accepted with probability p(draft); the first one
     rejected is replaced by a token drawn from p with the draft's probability removed and
     renormalised; if all k are accepted a bonus token is drawn from the last position. Every
     token is thereby distributed as plain sampling would have it (the speculative-sampling rule
     with q = δ(draft): min(1, p/q) = p(draft), and norm(max(0, p - q)) is p without the draft).
4. The engine appends the tokens one at a time through output processing, so stops, ending ids,
   `min_tokens` and `max_tokens` act as if each had come in its own step (a token that ends the
   request drops the rest); `num_computed_tokens` advances over the accepted tokens only, so the
   rows of rejected drafts are overwritten later and only accepted tokens ever reach a block
   registered in the prefix cache.

Requests that do not speculate even when asking (they decode as usual): those with a grammar
(structured outputs, forced tool calls: the mask of each draft position would need the grammar
advanced over the drafts before it) and sampled requests with a `seed` (a seed promises the text
of plain decoding, whose random draws speculation would change).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.engine.logits_processors import apply_logits_processors
from server.engine.prompt_lookup import TokenHistory, propose
from server.engine.request import SamplingParams
from server.engine.results import TokenLogprob
from server.engine.sampler import NO_TOKEN, Sampler, SamplingRow, filtered_weights
from server.engine.sequence import Sequence

log = logging.getLogger("customllm.engine")


def speculates(params: SamplingParams) -> bool:
    """Whether a request decodes speculatively when the engine allows it (see the module's doc)."""
    return params.speculative and params.grammar is None and (params.greedy or params.seed is None)


@dataclass
class Verified:
    """What one request gets from a verified step: its tokens in order (the accepted drafts, then
    the target's token), their logprobs when asked, how many drafts were accepted, or an error
    (after the tokens that came before it)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    num_accepted: int
    error: str | None = None


class Speculation:
    """Proposes drafts for the requests that speculate and verifies them; counts what it did
    (`num_drafts` verifications, `num_draft_tokens` drafts verified, `num_accepted_tokens`)."""

    def __init__(self, num_speculative_tokens: int, max_n: int, min_n: int, max_context: int, sampler: Sampler):
        if num_speculative_tokens < 1 or not 1 <= min_n <= max_n:
            raise ValueError("speculation needs num_speculative_tokens >= 1 and 1 <= prompt_lookup_min <= "
                             "prompt_lookup_max")
        self.k = num_speculative_tokens
        self.max_n = max_n
        self.min_n = min_n
        self.max_context = max_context
        self.sampler = sampler
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # ---- proposing ------------------------------------------------------------------------------
    def propose(self, seq: Sequence) -> None:
        """Look up the drafts of a request that just got tokens (none unless it speculates). At most
        k, and few enough that all of them and the bonus token fit in `max_tokens` and the context."""
        params = seq.request.params
        if not speculates(params):
            return
        room = min(self.k, params.max_tokens - len(seq.output_token_ids) - 1,
                   self.max_context - seq.num_tokens - 1)
        if room <= 0:
            seq.draft_token_ids = []
            return
        if seq.lookup is None:
            seq.lookup = TokenHistory(max(256, 2 * seq.num_tokens))
        tokens = seq.lookup.catch_up(seq.prompt_token_ids, seq.output_token_ids)
        seq.draft_token_ids = propose(tokens, room, self.max_n, self.min_n)

    # ---- verifying ------------------------------------------------------------------------------
    def verify(self, logits: torch.Tensor, items: list[tuple[Sequence, tuple[int, ...]]],
               eos_token_ids: tuple[int, ...]) -> list[Verified]:
        """logits [sum(1 + k_i), V]: each request's 1 + k_i positions in order, for `items` (request,
        its k_i ≥ 1 drafts) → what each request gets. The batch is verified at once; only if that
        raises is each request verified on its own, so a request whose parameters break sampling
        fails alone."""
        try:
            results = self._verify(logits, items, eos_token_ids)
        except Exception as exc:  # noqa: BLE001 - find the requests that fail, serve the others
            log.warning("verifying the drafts of %d requests failed (%s); verifying them one by one", len(items), exc)
            results, start = [], 0
            for seq, drafts in items:
                end = start + 1 + len(drafts)
                try:
                    results += self._verify(logits[start:end], [(seq, drafts)], eos_token_ids)
                except Exception as one:  # noqa: BLE001
                    results.append(Verified([], [], 0, f"internal error while sampling: {one}"))
                start = end
        self.num_drafts += len(items)
        self.num_draft_tokens += sum(len(d) for _, d in items)
        self.num_accepted_tokens += sum(r.num_accepted for r in results)
        return results

    def _verify(self, logits: torch.Tensor, items: list[tuple[Sequence, tuple[int, ...]]],
                eos_token_ids: tuple[int, ...]) -> list[Verified]:
        rows: list[SamplingRow] = []              # one per position, its history with the drafts before it
        proposed: list[int] = []                  # the draft each position is checked against (-1: none)
        for seq, drafts in items:
            params, prompt, output = seq.request.params, seq.prompt_token_ids, seq.output_token_ids
            for j in range(len(drafts) + 1):
                rows.append(SamplingRow(params, prompt, output + list(drafts[:j]) if j else output,
                                        None, eos_token_ids, None))
            proposed += [*drafts, -1]
        device = logits.device
        raw = logits.float()                                                                  # [R, V]
        adjusted = apply_logits_processors(raw, rows, self.sampler.processors)              # [R, V]
        draft = torch.tensor(proposed, device=device)                                         # [R]
        has_draft = draft >= 0
        at_draft = draft.clamp_min(0)[:, None]                                                # [R, 1]
        usable = has_draft & ~torch.isnan(adjusted).any(-1) & torch.isfinite(adjusted.gather(1, at_draft)[:, 0])
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            target = adjusted.argmax(-1)                                                      # [R]
            accepted = usable & (target == draft)
        else:
            weights = filtered_weights(adjusted, rows, self.sampler.candidates(device))      # [R, V]
            p_draft = weights.gather(1, at_draft)[:, 0] / weights.sum(-1)                     # [R]
            accepted = usable & (torch.rand(len(rows), device=device) < p_draft)
            # on rejection: p without the draft (its weight zeroed; the draw renormalises)
            residual = weights.scatter(1, at_draft, torch.where(has_draft[:, None], 0.0, weights.gather(1, at_draft)))
            target = self.sampler.draw(residual, rows)                                        # [R]
            if any(greedy):
                greedy_rows = torch.tensor(greedy, device=device)
                argmax = adjusted.argmax(-1)
                target = torch.where(greedy_rows, argmax, target)
                accepted = torch.where(greedy_rows, usable & (argmax == draft), accepted)
        target = Sampler.only_valid(adjusted, target)
        chosen = torch.where(accepted, draft, target)                                         # [R]
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if wanted:
            out = Sampler.with_logprobs(raw, chosen, rows, wanted)
            tokens, logprobs = out.token_ids, out.logprobs
        else:
            tokens, logprobs = chosen.tolist(), [None] * len(rows)
        accepted_host = accepted.tolist()
        results, start = [], 0
        for _seq, drafts in items:
            taken = 0
            while taken < len(drafts) and accepted_host[start + taken]:
                taken += 1
            end = start + taken + 1
            got, lps = tokens[start:end], logprobs[start:end]
            error = None
            if got[-1] == NO_TOKEN:
                got, lps = got[:-1], lps[:-1]
                error = ("the model's logits for this request had no finite value to sample from "
                         "(NaN, or -inf everywhere)")
            results.append(Verified(got, lps, taken, error))
            start += len(drafts) + 1
        return results


def split_draft_logits(logits: torch.Tensor, sampling_chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] of a step's chunks that sample, in order (1 + k rows for a chunk with k drafts,
    one for the others) → (the other chunks' rows [P, V], the drafted chunks' rows [N - P, V])."""
    plain_rows, draft_rows, row = [], [], 0
    for chunk in sampling_chunks:
        count = 1 + len(chunk.draft_token_ids)
        if chunk.draft_token_ids:
            draft_rows.extend(range(row, row + count))
        else:
            plain_rows.append(row)
        row += count
    assert row == logits.shape[0], "one logits row per known token that samples and per draft"

    def rows_of(index: list[int]) -> torch.Tensor:
        return logits[torch.tensor(index, dtype=torch.long, device=logits.device)]
    return rows_of(plain_rows), rows_of(draft_rows)
