"""Batched sampling with per-row parameters, on the logits' device.

Order (per row): repetition penalty (Hugging Face rule, prompt + output tokens) → presence and
frequency penalties (OpenAI rule, output tokens) → logit_bias → temperature → top-k → top-p →
min-p → sample. Greedy rows (temperature 0) take the argmax of the penalised, biased logits.

Sampling is an exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with
probability p_i. A seeded row draws its E from its own generator (kept in the request state), so
its tokens depend only on its seed and step, never on its batch neighbours. There is one host
transfer per step: the sampled ids (and requested logprobs) at the end.

Logprobs are those of the model's raw distribution, log_softmax of the logits before penalties and
temperature (what vLLM returns by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from server.types import SamplingParams, TokenLogprob


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _column(values, device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)[:, None]          # [N, 1]


def _counts(rows_tokens: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[N, V] occurrence counts of each row's tokens."""
    counts = torch.zeros(len(rows_tokens), vocab, dtype=torch.float32, device=device)
    lengths = [len(t) for t in rows_tokens]
    if sum(lengths):
        row_idx = torch.repeat_interleave(torch.arange(len(rows_tokens), device=device),
                                          torch.tensor(lengths, device=device))
        tok_idx = torch.tensor([t for toks in rows_tokens for t in toks], dtype=torch.long, device=device)
        counts.index_put_((row_idx, tok_idx), torch.ones_like(tok_idx, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties_and_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits [N, V] float32 → penalised and biased logits (new tensor)."""
    device, vocab = logits.device, logits.shape[1]
    logits = logits.clone()
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        seen = _counts([r.prompt_token_ids + r.output_token_ids for r in rows], vocab, device) > 0
        penalty = _column([r.params.repetition_penalty for r in rows], device)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in rows):
        counts = _counts([r.output_token_ids for r in rows], vocab, device)
        logits -= _column([r.params.frequency_penalty for r in rows], device) * counts
        logits -= _column([r.params.presence_penalty for r in rows], device) * (counts > 0).float()
    if any(r.params.logit_bias for r in rows):
        row_idx, tok_idx, values = [], [], []
        for i, r in enumerate(rows):
            for token, bias in r.params.logit_bias:
                row_idx.append(i)
                tok_idx.append(token)
                values.append(bias)
        logits.index_put_((torch.tensor(row_idx, device=device), torch.tensor(tok_idx, device=device)),
                          torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)
    return logits


def filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Penalised logits [N, V] → probabilities after temperature, top-k, top-p and min-p, renormalised.
    Rows with temperature 0 get their argmax as a one-hot distribution."""
    device, vocab = logits.device, logits.shape[1]
    temperature = _column([r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows], device)
    scaled = logits / temperature
    sorted_logits, order = scaled.sort(dim=-1, descending=True)                # [N, V]
    ranks = torch.arange(vocab, device=device)[None, :]
    top_k = _column([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device, torch.long)
    keep = ranks < top_k                                                        # top-k
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    top_p = _column([r.params.top_p for r in rows], device)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep &= mass_before < top_p                                                 # top-p: smallest set reaching p
    keep[:, 0] = True
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    min_p = _column([r.params.min_p for r in rows], device)
    keep &= sorted_probs >= min_p * sorted_probs[:, :1]                         # min-p on the filtered distribution
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
    greedy = torch.tensor([r.params.greedy for r in rows], device=device)
    if bool(greedy.any()):
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).to(probs.dtype)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.shape[0] == len(rows), "one logits row per sampling row"
        logits = logits.float()
        want_logprobs = [r.params.logprobs is not None for r in rows]
        plain_greedy = all(r.params.greedy and r.params.repetition_penalty == 1.0 and not r.params.presence_penalty
                           and not r.params.frequency_penalty and not r.params.logit_bias for r in rows)
        if plain_greedy:
            tokens = logits.argmax(-1)
        else:
            adjusted = apply_penalties_and_bias(logits, rows)
            if all(r.params.greedy for r in rows):
                tokens = adjusted.argmax(-1)
            else:
                tokens = self._sample(filtered_probs(adjusted, rows), rows)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if any(want_logprobs):
            logprobs = self._logprobs(logits, tokens, rows, want_logprobs)
        return SamplerOutput(token_list, logprobs)

    @staticmethod
    def _sample(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_()                              # [N, V]
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=row.generator)
        return (probs / noise).argmax(-1)

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow],
                  wanted: list[bool]) -> list[TokenLogprob | None]:
        logp = torch.log_softmax(logits, dim=-1)                                    # [N, V]
        k = max([r.params.logprobs for r in rows if r.params.logprobs is not None] + [0])
        chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
        token_ids = tokens.tolist()
        top_values, top_ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        out: list[TokenLogprob | None] = []
        for i, row in enumerate(rows):
            if not wanted[i]:
                out.append(None)
                continue
            n = row.params.logprobs
            out.append(TokenLogprob(token_ids[i], chosen[i], tuple(zip(top_ids[i][:n], top_values[i][:n]))))
        return out
