"""The logits-processor stage between raw logits and sampling: processors run in order, only when a
row wants them, on a copy of the float32 logits on their device; logprobs stay the raw ones."""
from __future__ import annotations

import pytest
import torch

from server.engine.logits_processors import DEFAULT_PROCESSORS, apply_logits_processors
from server.engine.request import SamplingParams
from server.engine.sampler import Sampler, SamplingRow

LOGITS = [0.5, 2.0, 1.0, -1.0, 0.0]


class BanToken:
    """A custom processor, as a grammar would be: masks one token in the rows that ask for it
    (here: rows with a stop token id), and records what it was given."""

    def __init__(self, token: int):
        self.token = token
        self.calls: list[tuple[torch.dtype, tuple[int, ...], list[float]]] = []

    def wants(self, row: SamplingRow) -> bool:
        return bool(row.params.stop_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        self.calls.append((logits.dtype, tuple(logits.shape), logits[:, self.token].tolist()))
        wanted = torch.tensor([self.wants(r) for r in rows], device=logits.device)
        logits[wanted, self.token] = float("-inf")          # in place: the stage's own copy
        return logits


def rows_of(*params: SamplingParams) -> list[SamplingRow]:
    return [SamplingRow(p, [], []) for p in params]


def test_no_wanted_processor_costs_nothing_and_the_input_is_never_modified():
    logits = torch.tensor([LOGITS, LOGITS])
    plain = rows_of(SamplingParams(), SamplingParams(temperature=0.0))
    assert apply_logits_processors(logits, plain) is logits
    biased = rows_of(SamplingParams(), SamplingParams(logit_bias=((0, 1.0),)))
    out = apply_logits_processors(logits, biased)
    assert out is not logits and torch.equal(logits, torch.tensor([LOGITS, LOGITS]))
    assert out[1, 0] == pytest.approx(1.5) and torch.equal(out[0], logits[0])


def test_processors_run_in_order_after_the_defaults_and_logprobs_stay_raw():
    ban = BanToken(1)
    sampler = Sampler(processors=(*DEFAULT_PROCESSORS, ban))
    logits = torch.tensor([LOGITS, LOGITS, LOGITS], dtype=torch.bfloat16)
    rows = rows_of(SamplingParams(temperature=0.0, logprobs=1),
                   SamplingParams(temperature=0.0, logprobs=1, stop_token_ids=(4,)),
                   SamplingParams(temperature=0.0, stop_token_ids=(4,), logit_bias=((1, 5.0),)))
    out = sampler(logits, rows)
    # one batched call, float32, after logit_bias (row 2's +5 is already in)
    assert ban.calls == [(torch.float32, (3, 5), [2.0, 2.0, 7.0])]
    assert out.token_ids == [1, 2, 2]
    raw = torch.log_softmax(logits[1].float(), -1)
    assert out.logprobs[1].token_id == 2 and out.logprobs[1].logprob == pytest.approx(float(raw[2]), abs=1e-6)
    assert out.logprobs[1].top[0][0] == 1               # the raw distribution's best, banned or not


def test_the_default_order_is_penalties_then_bias_then_the_min_tokens_mask_then_the_grammar():
    assert [type(p).__name__ for p in DEFAULT_PROCESSORS] == ["RepetitionPenalty", "PresenceFrequencyPenalty",
                                                               "LogitBias", "MinTokens", "GrammarMask"]


# ---- min_tokens ---------------------------------------------------------------------------------
def test_min_tokens_masks_the_ending_ids_until_enough_tokens_were_generated():
    eos = (0,)
    biased = ((0, 100.0), (3, 50.0))                   # eos is by far the best, then token 3
    sampler = Sampler()

    def greedy(output, **params):
        row = SamplingRow(SamplingParams(temperature=0.0, logit_bias=biased, logprobs=1, **params), [], list(output),
                          eos_token_ids=eos)
        return sampler(torch.tensor([LOGITS]), [row])

    assert greedy([], min_tokens=0).token_ids == [0]
    masked = greedy([7, 7], min_tokens=3)              # 2 of 3 generated: eos cannot come yet
    assert masked.token_ids == [3]
    assert masked.logprobs[0].top[0][0] == 1           # logprobs stay those of the raw logits
    assert greedy([7, 7, 7], min_tokens=3).token_ids == [0]
    # stop_token_ids are masked as well; with ignore_eos only they are
    assert greedy([], min_tokens=1, stop_token_ids=(3,)).token_ids == [1]
    assert greedy([], min_tokens=1, ignore_eos=True).token_ids == [0]
    assert greedy([], min_tokens=1, ignore_eos=True, stop_token_ids=(0,)).token_ids == [3]


def test_min_tokens_is_per_row_in_a_batch_and_holds_for_sampled_rows():
    eos = (0, 4)
    rows = [SamplingRow(SamplingParams(temperature=1.0, min_tokens=2, logit_bias=((0, 100.0), (4, 100.0))),
                        [], [5], eos_token_ids=eos),
            SamplingRow(SamplingParams(temperature=0.0, logit_bias=((0, 100.0),)), [], [5], eos_token_ids=eos),
            SamplingRow(SamplingParams(temperature=0.0, min_tokens=2, logit_bias=((0, 100.0),)), [], [5, 5],
                        eos_token_ids=eos)]
    logits = torch.tensor([LOGITS] * 3)
    for _ in range(20):
        tokens = Sampler()(logits, rows).token_ids
        assert tokens[0] not in eos and tokens[1:] == [0, 0]
    assert torch.equal(logits, torch.tensor([LOGITS] * 3))
