"""Batched sampling with per-row parameters, on the logits' device, in float32.

Order (per row): the logits processors (`logits_processors.py`: repetition penalty, presence and
frequency penalties, logit_bias, the min_tokens mask, the structured-output grammar mask, each
batched over the rows) → temperature → top-k → top-p → min-p → sample. Greedy rows (temperature
0) take the argmax of the processed logits (lowest id on ties); top-k/top-p/min-p do not apply to them.

Filters keep every token tied with the boundary token, so the kept set depends on values only,
never on how a sort orders equal values:
- top-k keeps tokens whose logit is ≥ the k-th largest (Hugging Face's rule; more than k on ties);
- top-p sorts the top-k distribution (renormalised), finds the first token at which the cumulative
  probability reaches top_p, and keeps tokens at least as probable as it: the smallest tie-closed
  set of most probable tokens reaching top_p, never empty;
- min-p keeps tokens with prob ≥ min_p × max prob. Renormalising does not change p / max p, so the
  result equals computing it on the top-k/top-p-filtered, renormalised distribution.

Sampling draws with one of two methods, each exact up to float32 rounding. Inverse CDF (default on
the CPU): one uniform per row against the row's cumulative weights, cheap on a CPU (a 49k cumsum
is ~0.03 ms, 49k random numbers ~0.15 ms); CPU cumsum accumulates in float64, so each token's
probability is within a float32 rounding of the cumulative sum (~6e-8) of its own. Exponential
race (default elsewhere): argmax(p / E), E = -log U ~ Exp(1) i.i.d. per token, purely elementwise.
A seeded row draws its uniforms from its own generator, kept in the request state, so its tokens
depend only on its seed, its step and its own logits, never on its batch neighbours; unseeded rows
share one batched draw from the default generator. (A seed reproduces on the same device and
method; CPU and CUDA generators differ anyway.)

Top-p needs the tokens in order, and a full sort of a 49k vocabulary costs ~3 ms a row on the CPU,
so there the sampler sorts only the top 64 (topk, ~0.05 ms), then 1024, then everything, for the
rows whose top-p set may reach past the candidates; deciding that is the only host sync before the
end. On other devices it sorts the whole vocabulary at once.

Logprobs are those of the model's raw distribution, log_softmax of the logits before the logits
processors and temperature (what vLLM returns by default): the sampled token's and the top k (k =
params.logprobs), best first. The token ids and logprobs of the whole batch cross to the host in
one transfer at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from server.engine.logits_processors import DEFAULT_PROCESSORS, PENALTIES, LogitsProcessor, apply_logits_processors
from server.engine.results import TokenLogprob
from server.engine.request import SamplingParams

DEFAULT_CPU_CANDIDATES = 64


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one seeded request; make it once and keep it with the request."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


@dataclass
class SamplingRow:
    """One row of the logits: its request's parameters, tokens so far, generator when seeded, the
    model's end-of-sequence ids (masked before `min_tokens`) and its grammar state when its output
    is constrained (server/engine/grammar.py)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    eos_token_ids: tuple[int, ...] = ()
    grammar: object | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]                      # NO_TOKEN for a row nothing could be sampled from
    logprobs: list[TokenLogprob | None]       # None for rows that did not ask for logprobs


# the token id of a row whose logits left nothing to sample (NaN, or no finite value): its request fails
NO_TOKEN = -1


def row_argmax(values: torch.Tensor) -> torch.Tensor:
    """values [N, V] → [N] int64: each row's index of its largest value, the lowest on ties (a NaN
    counts as the largest). On the CPU through numpy, whose argmax is vectorised (PyTorch's CPU
    argmax walks the values one at a time: ~10x slower, 11 ms for 256 rows of a 49k vocabulary);
    both take the first maximum."""
    if values.device.type == "cpu" and values.dtype == torch.float32 and not values.requires_grad:
        return torch.from_numpy(values.numpy().argmax(-1).astype(np.int64, copy=False))
    return values.argmax(-1)


def rows_with_nan(values: torch.Tensor) -> torch.Tensor:
    """values [N, V] → [N] bool: whether the row holds a NaN. The row maximum propagates NaN, and a
    max-reduction is vectorised where `isnan(values).any(-1)` is not (PyTorch's CPU any over a
    bool [N, V] costs as much as its argmax)."""
    return torch.isnan(values.amax(-1))


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """float32 logits [N, V] → the logits with repetition, frequency and presence penalties and
    logit_bias applied (the input is never modified). Rows that ask for none are left as they are."""
    return apply_logits_processors(logits, rows, PENALTIES)


def _top_p_threshold(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_probs [n, M] descending, top_p [n, 1] → ([n, 1] the probability of the first token at
    which the cumulative probability reaches top_p, or of the last one if it never does; [n, 1]
    whether it did)."""
    before = (sorted_probs.cumsum(-1) < top_p).sum(-1, keepdim=True)                           # [n, 1]
    last = sorted_probs.shape[1] - 1
    return sorted_probs.gather(1, before.clamp_max(last)), before <= last


def _top_p_thresholds(probs: torch.Tensor, top_p: torch.Tensor, max_candidates: int | None) -> torch.Tensor:
    """probs [N, V], top_p [N, 1] → [N, 1] top-p thresholds (0 for rows with top_p 1). Sorts the top
    `max_candidates` tokens, 16 times more for the rows whose top-p set may reach past them, and so
    on up to the whole vocabulary (None: the whole vocabulary at once, no host sync)."""
    vocab = probs.shape[1]
    if max_candidates is None or max_candidates >= vocab:
        found = _top_p_threshold(probs.sort(dim=-1, descending=True).values, top_p)[0]
        return torch.where(top_p < 1.0, found, torch.zeros_like(found))
    threshold = torch.zeros_like(top_p)                                                       # [N, 1]
    pending = (top_p[:, 0] < 1.0).nonzero()[:, 0]                                             # open rows
    limit = max_candidates
    while len(pending):
        open_probs = probs if len(pending) == len(probs) else probs[pending]                 # [n, V]
        top = open_probs.sort(dim=-1, descending=True).values if limit >= vocab \
            else open_probs.topk(limit, dim=-1).values                                        # [n, limit]
        found, done = _top_p_threshold(top, top_p[pending])
        done = done[:, 0]
        if limit < vocab and not bool(done.all()):
            # not reached within the candidates: done only if no other token has a probability
            done |= (open_probs > 0).sum(-1) <= limit
        threshold[pending[done]] = found[done]
        pending = pending[~done]
        limit *= 16
    return threshold


def sampling_row(params: SamplingParams, vocab: int) -> tuple[float, float, float, float]:
    """(temperature, top-k, top-p, min-p) as the sampler's per-row table holds them: greedy rows
    with temperature 1, top-k off as `vocab`."""
    top_k = min(params.top_k, vocab) if params.top_k > 0 else vocab
    return (1.0 if params.greedy else params.temperature, float(top_k), params.top_p, params.min_p)


def parameter_table(rows: list[SamplingRow], vocab: int) -> torch.Tensor:
    """[N, 4] float32 `sampling_row`s, on the host. The persistent batch keeps these rows from when
    each request joined (server/engine/input_batch.py)."""
    return torch.tensor([sampling_row(r.params, vocab) for r in rows], dtype=torch.float32)


def filtered_weights(logits: torch.Tensor, rows: list[SamplingRow],
                     max_candidates: int | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
    """Processed float32 logits [N, V] → [N, V] weights proportional to the distribution sampled from
    (0 for the tokens top-k, top-p and min-p remove; not renormalised after top-p and min-p).
    Greedy rows are treated as temperature 1. `max_candidates`: see `_top_p_thresholds`. `table`:
    the rows' `parameter_table` when the caller keeps it already."""
    device, vocab = logits.device, logits.shape[1]
    params = [r.params for r in rows]
    table = (parameter_table(rows, vocab) if table is None else table).to(device)             # [N, 4]
    temperature, top_k, top_p, min_p = table.split(1, dim=1)                                 # [N, 1] each
    scaled = logits / temperature if any(not p.greedy and p.temperature != 1.0 for p in params) else logits
    if any(0 < p.top_k < vocab for p in params):
        k_max = max(p.top_k for p in params if 0 < p.top_k < vocab)
        kth = scaled.topk(k_max, dim=-1).values.gather(1, (top_k.long() - 1).clamp_max(k_max - 1))  # [N, 1]
        kth = torch.where(top_k < vocab, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)                                                    # [N, V]
    use_top_p = any(p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0.0 for p in params)
    if not (use_top_p or use_min_p):
        return probs
    floor = min_p * probs.amax(-1, keepdim=True) if use_min_p else torch.zeros_like(min_p)  # [N, 1]
    if use_top_p:
        floor = torch.maximum(floor, _top_p_thresholds(probs, top_p, max_candidates))
    return probs.masked_fill(probs < floor, 0.0)


def filtered_probs(logits: torch.Tensor, rows: list[SamplingRow], max_candidates: int | None = None) -> torch.Tensor:
    """Processed logits [N, V] → the distribution sampled from (float32, renormalised)."""
    weights = filtered_weights(logits.float(), rows, max_candidates)
    return weights / weights.sum(-1, keepdim=True)


class Sampler:
    """`sampler(logits [N, V], rows) → SamplerOutput`, one token per row.

    `processors`: the logits processors, in order (see `logits_processors.py`). `max_candidates`: how many top tokens top-p sorts first (None: 64 on the CPU, the whole
    vocabulary on other devices). `method`: "inverse_cdf" or "exponential_race" (None: inverse CDF
    on the CPU, exponential race elsewhere)."""

    METHODS = ("inverse_cdf", "exponential_race")

    def __init__(self, max_candidates: int | None = None, method: str | None = None,
                 processors: Sequence[LogitsProcessor] = DEFAULT_PROCESSORS):
        assert method is None or method in self.METHODS, method
        self.max_candidates = max_candidates
        self.method = method
        self.processors = tuple(processors)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor | None = None,
                 plain: bool = False) -> SamplerOutput:
        """`table`: the rows' [N, 4] `parameter_table`, when the caller keeps it (a persistent batch).
        `plain`: the caller knows that no row wants any logits processor (no penalty, bias,
        min_tokens or grammar), so asking each processor about each row is skipped."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), "one logits row per sampling row"
        device = logits.device
        raw = logits.float()                                                                  # [N, V]
        adjusted = raw if plain else apply_logits_processors(raw, rows, self.processors)     # [N, V]
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = self.only_valid(adjusted, row_argmax(adjusted), argmax=True)             # [N]
        else:
            weights = filtered_weights(adjusted, rows, self.candidates(device), table)        # [N, V]
            tokens = self.draw(weights, rows)                                                 # [N]
            if any(greedy):
                tokens = torch.where(torch.tensor(greedy).to(device), row_argmax(adjusted), tokens)
            tokens = self.only_valid(adjusted, tokens)                                        # [N]
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return SamplerOutput(tokens.tolist(), [None] * len(rows))
        return self.with_logprobs(raw, tokens, rows, wanted)

    def candidates(self, device: torch.device) -> int | None:
        """How many top tokens top-p sorts first on `device` (`_top_p_thresholds`)."""
        return self.max_candidates or (DEFAULT_CPU_CANDIDATES if device.type == "cpu" else None)

    def draw(self, weights: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """weights [N, V] (not necessarily normalised) → [N] one token per row, by this sampler's
        method (seeded rows from their own generators)."""
        method = self.method or ("inverse_cdf" if weights.device.type == "cpu" else "exponential_race")
        if method == "inverse_cdf":
            return self._inverse_cdf(weights, rows)
        return self._exponential_race(weights, rows)

    @staticmethod
    def only_valid(adjusted: torch.Tensor, tokens: torch.Tensor, argmax: bool = False) -> torch.Tensor:
        """tokens [N] with NO_TOKEN for the rows that had nothing to sample from: a NaN anywhere in
        the row, no finite logit, or a token that is not a finite-logit id of the vocabulary (what a
        NaN or infinite weight makes of a draw). No host sync: one `where` on the device.
        `argmax`: the tokens are the rows' `row_argmax`, which takes a NaN for the largest value, so
        a row holding one chose it and the chosen logit's test finds it without a pass over the row."""
        vocab = adjusted.shape[1]
        if adjusted.device.type == "cpu" and adjusted.dtype == torch.float32 and not adjusted.requires_grad:
            # the same test in numpy: a handful of small torch operations cost more than the work
            values, ids = adjusted.numpy(), tokens.numpy()                                    # [N, V], [N]
            in_range = (ids >= 0) & (ids < vocab)                                             # [N]
            chosen = values[np.arange(len(ids)), np.where(in_range, ids, 0)]                  # [N]
            valid = in_range & np.isfinite(chosen)
            if not argmax:
                valid &= ~np.isnan(values.max(-1))
            return torch.from_numpy(np.where(valid, ids, NO_TOKEN))
        in_range = (tokens >= 0) & (tokens < vocab)                                           # [N]
        chosen = adjusted.gather(1, tokens.clamp(0, vocab - 1)[:, None])[:, 0]                # [N]
        valid = in_range & torch.isfinite(chosen)
        if not argmax:
            valid &= ~rows_with_nan(adjusted)
        return torch.where(valid, tokens, torch.full_like(tokens, NO_TOKEN))

    @staticmethod
    def _uniform(rows: list[SamplingRow], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[N, M] i.i.d. U[0, 1): a seeded row's from its own generator, the rest from the default one."""
        uniform = torch.rand(shape, device=device)
        for i, row in enumerate(rows):
            if row.generator is not None and not row.params.greedy:
                uniform[i] = torch.rand(shape[1], device=device, generator=row.generator)
        return uniform

    @classmethod
    def _inverse_cdf(cls, weights: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One uniform per row against the cumulative weights [N, V]."""
        cdf = weights.cumsum(-1)                                                              # [N, V]
        total = cdf[:, -1:]                                                                   # [N, 1]
        point = cls._uniform(rows, (len(rows), 1), weights.device) * total                   # [N, 1]
        point = torch.minimum(point, torch.nextafter(total, torch.zeros_like(total)))        # < total
        # the first token whose cdf exceeds the point: its cdf rose, so its weight is positive
        return torch.searchsorted(cdf, point, right=True)[:, 0]

    @classmethod
    def _exponential_race(cls, weights: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """argmax(w / E), E = -log U ~ Exp(1): elementwise, so a row's result never depends on others."""
        exponential = cls._uniform(rows, tuple(weights.shape), weights.device).log_().neg_()  # [N, V]
        return (weights / exponential).argmax(-1)          # U in [0, 1): E in (0, inf], w / inf = 0, no NaN

    @staticmethod
    def with_logprobs(raw: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow],
                       wanted: list[int]) -> SamplerOutput:
        n, vocab = raw.shape
        assert vocab <= 1 << 24, "token ids travel as float32"
        idx = torch.tensor(wanted).to(raw.device)
        logp = torch.log_softmax(raw[idx], dim=-1)                                            # [W, V]
        k = min(vocab, max(rows[i].params.logprobs for i in wanted))
        top_values, top_ids = logp.topk(k, dim=-1)                                            # [W, k]
        chosen = logp.gather(1, tokens[idx].clamp_min(0).unsqueeze(1))                        # [W, 1]
        packed = torch.cat([tokens.float(), chosen[:, 0], top_ids.float().flatten(), top_values.flatten()])
        host = packed.tolist()                                                                # one transfer
        token_ids = [int(t) for t in host[:n]]
        w = len(wanted)
        chosen_lp = host[n:n + w]
        ids_flat, values_flat = host[n + w:n + w + w * k], host[n + w + w * k:]
        logprobs: list[TokenLogprob | None] = [None] * n
        for j, i in enumerate(wanted):
            m = min(rows[i].params.logprobs, k)
            top = tuple((int(t), v) for t, v in zip(ids_flat[j * k:j * k + m], values_flat[j * k:j * k + m]))
            logprobs[i] = TokenLogprob(token_ids[i], chosen_lp[j], top)
        return SamplerOutput(token_ids, logprobs)
