"""Sampler against a plain float64 reference on fixed logits: exact filter sets, penalties, bias,
and distributions over many seeded draws; seeded rows are batch invariant."""
from __future__ import annotations

import math

import pytest
import torch

from server.sampler import Sampler, SamplingRow, apply_penalties_and_bias, filtered_probs, make_generator
from server.types import SamplingParams

V = 12
LOGITS = torch.tensor([2.0, 1.5, 1.5, 0.3, -0.2, 0.9, -1.0, 3.1, 0.0, -2.5, 1.1, 0.4])


def row(prompt=(), output=(), seed=None, **params):
    return SamplingRow(SamplingParams(**params), list(prompt), list(output),
                       make_generator(seed) if seed is not None else None)


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Plain float64 filtering: temperature → top-k → top-p → min-p, renormalised at each stage."""
    z = [float(v) / temperature for v in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order[:top_k] if top_k > 0 else order)

    def normalise(keep_set):
        m = max(z[i] for i in keep_set)
        e = {i: math.exp(z[i] - m) for i in keep_set}
        s = sum(e.values())
        return {i: e[i] / s for i in keep_set}
    p = normalise(keep)
    kept, mass = set(), 0.0
    for i in order:
        if i in keep and mass < top_p:
            kept.add(i)
            mass += p[i]
    keep = kept or {order[0]}
    p = normalise(keep)
    top = max(p.values())
    keep = {i for i in keep if p[i] >= min_p * top}
    p = normalise(keep)
    return torch.tensor([p.get(i, 0.0) for i in range(len(z))], dtype=torch.float64)


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.0, top_p=0.75), dict(temperature=2.0, min_p=0.2), dict(temperature=0.8, top_k=5, top_p=0.9,
                                                                               min_p=0.1),
])
def test_filtered_distribution_equals_reference(params):
    got = filtered_probs(LOGITS[None, :], [row(**params)])[0].double()
    expected = reference_probs(LOGITS, **params)
    assert torch.equal(got > 0, expected > 0), "the kept token set differs"
    assert torch.allclose(got, expected, atol=1e-6)


def test_top_p_ties_and_at_least_one_token():
    probs = filtered_probs(LOGITS[None, :], [row(temperature=1.0, top_p=1e-6)])[0]
    assert int((probs > 0).sum()) == 1 and int(probs.argmax()) == 7
    tied = torch.tensor([1.0, 1.0, 1.0, 1.0])
    kept = filtered_probs(tied[None, :], [row(temperature=1.0, top_p=0.5)])[0]
    assert int((kept > 0).sum()) == 2   # the smallest set reaching p


def test_repetition_penalty_follows_hugging_face():
    out = apply_penalties_and_bias(LOGITS[None, :].clone(), [row(prompt=[0], output=[6], repetition_penalty=2.0)])[0]
    assert out[0] == pytest.approx(2.0 / 2.0)   # positive logit divided
    assert out[6] == pytest.approx(-1.0 * 2.0)  # negative logit multiplied
    assert torch.equal(out[1:6], LOGITS[1:6])


def test_presence_and_frequency_penalties_follow_openai_over_output_only():
    out = apply_penalties_and_bias(LOGITS[None, :].clone(), [row(prompt=[3], output=[1, 1, 2],
                                                                 presence_penalty=0.5, frequency_penalty=0.25)])[0]
    assert out[1] == pytest.approx(1.5 - 2 * 0.25 - 0.5)
    assert out[2] == pytest.approx(1.5 - 0.25 - 0.5)
    assert out[3] == pytest.approx(0.3)       # prompt tokens are not penalised by these


def test_logit_bias_and_greedy():
    sampler = Sampler()
    assert sampler(LOGITS[None, :], [row(temperature=0.0)]).token_ids == [7]
    assert sampler(LOGITS[None, :], [row(temperature=0.0, logit_bias=((4, 10.0),))]).token_ids == [4]
    assert sampler(LOGITS[None, :], [row(temperature=0.7, seed=1, logit_bias=((9, -100.0), (5, 100.0)))]).token_ids \
        == [5]


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8),
                                    dict(temperature=1.0, min_p=0.15)])
def test_sampled_frequencies_match_reference(params):
    draws = 20000
    logits = LOGITS[None, :].repeat(draws, 1)
    rows = [row(**params)] * draws
    torch.manual_seed(0)
    tokens = torch.tensor(Sampler()(logits, rows).token_ids)
    freq = torch.bincount(tokens, minlength=V).double() / draws
    expected = reference_probs(LOGITS, **params)
    assert torch.all(freq[expected == 0] == 0), "a filtered-out token was sampled"
    assert 0.5 * float((freq - expected).abs().sum()) < 0.02   # total variation distance


def test_seeded_rows_are_batch_invariant():
    sampler = Sampler()
    gen_alone = make_generator(42)
    gen_batched = make_generator(42)
    target = SamplingParams(temperature=0.9, top_p=0.95)
    others = torch.randn(15, V, generator=torch.Generator().manual_seed(3))
    seq_alone, seq_batched = [], []
    for step in range(30):
        seq_alone += sampler(LOGITS[None, :], [SamplingRow(target, [], seq_alone[:], gen_alone)]).token_ids
        batch = torch.cat([others[:7], LOGITS[None, :], others[7:]])
        rows = [row(temperature=1.0, top_k=3) for _ in range(7)] + [SamplingRow(target, [], seq_batched[:], gen_batched)] \
            + [row(temperature=0.5, seed=step) for _ in range(8)]
        seq_batched.append(sampler(batch, rows).token_ids[7])
    assert seq_alone == seq_batched


def test_logprobs_are_raw_log_softmax_sorted():
    out = Sampler()(LOGITS[None, :], [row(temperature=0.0, logprobs=3, repetition_penalty=1.5, prompt=[7])])
    lp = out.logprobs[0]
    raw = torch.log_softmax(LOGITS.double(), -1)
    assert lp.logprob == pytest.approx(float(raw[lp.token_id]), abs=1e-5)
    assert [t for t, _ in lp.top] == raw.topk(3).indices.tolist()
    assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
