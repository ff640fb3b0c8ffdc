"""The sampler against a plain float64 reference written here: exact kept sets of top-k, top-p and
min-p (ties included), each penalty's exact effect, logit_bias, greedy, sampled frequencies over
many draws, seeded rows independent of their batch, and raw logprobs."""
from __future__ import annotations

import math
import random

import pytest
import torch

from server.engine.sampler import Sampler, SamplingRow, apply_penalties, filtered_probs, make_generator
from server.engine.request import SamplingParams

LOGITS = [2.0, 1.5, 1.5, 0.3, -0.2, 0.9, -1.0, 3.1, 0.0, -2.5, 1.1, 0.4]
V = len(LOGITS)


def row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output),
                       make_generator(seed) if seed is not None else None)


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---- the reference ------------------------------------------------------------------------------

def softmax_over(z: list[float], kept: set[int]) -> dict[int, float]:
    m = max(z[i] for i in kept)
    e = {i: math.exp(z[i] - m) for i in kept}
    total = sum(e.values())
    return {i: v / total for i, v in e.items()}


def reference_with_margin(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> tuple[dict[int, float], float]:
    """token → probability of the distribution sampled from, by the rules in server/engine/sampler.py:
    top-k keeps logits ≥ the k-th largest; top-p keeps tokens at least as probable as the first one
    (most probable first) at which the cumulative probability of the top-k distribution reaches
    top_p; min-p keeps p ≥ min_p · max p of the top-p distribution. Renormalised after each. And
    how far its top-p and min-p decisions are from a boundary (float32 may flip a decision closer
    than ~1e-6)."""
    z = [float(v) / temperature for v in logits]
    kept = set(range(len(z)))
    if 0 < top_k < len(z):
        kth = sorted(z, reverse=True)[top_k - 1]
        kept = {i for i in kept if z[i] >= kth}
    p = softmax_over(z, kept)
    margin = 1.0
    if top_p < 1.0:
        cumulative, threshold = 0.0, None
        for i in sorted(kept, key=lambda i: -p[i]):
            cumulative += p[i]
            margin = min(margin, abs(cumulative - top_p))
            if cumulative >= top_p:
                threshold = p[i]
                break
        if threshold is not None:
            kept = {i for i in kept if p[i] >= threshold}
        p = softmax_over(z, kept)
    if min_p > 0.0:
        top = max(p.values())
        margin = min([margin] + [abs(q - min_p * top) for q in p.values()])
        kept = {i for i in kept if p[i] >= min_p * top}
        p = softmax_over(z, kept)
    return p, margin


def reference(logits, **params) -> dict[int, float]:
    return reference_with_margin(logits, **params)[0]


def reference_margin(logits, **params) -> float:
    return reference_with_margin(logits, **params)[1]


def as_vector(p: dict[int, float], vocab: int) -> torch.Tensor:
    return torch.tensor([p.get(i, 0.0) for i in range(vocab)], dtype=torch.float64)


def kept_set(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0)[:, 0].tolist())


def sampler_probs(logits, max_candidates=None, **params) -> torch.Tensor:
    return filtered_probs(tensor(logits)[None, :], [row(**params)], max_candidates)[0].double()


# ---- exact filter sets --------------------------------------------------------------------------

@pytest.mark.parametrize("k,expected", [
    (1, {7}), (2, {7, 0}), (3, {7, 0, 1, 2}), (4, {7, 0, 1, 2}), (5, {7, 0, 1, 2, 10}),
    (0, set(range(V))), (-1, set(range(V))), (V, set(range(V))), (100, set(range(V))),
])
def test_top_k_keeps_every_logit_at_least_the_kth_largest(k, expected):
    # logits 1 and 2 tie at 1.5: top-k 3 keeps both (4 tokens), as Hugging Face's rule does
    probs = sampler_probs(LOGITS, top_k=k)
    assert kept_set(probs) == expected
    assert torch.allclose(probs, as_vector(reference(LOGITS, top_k=k), V), atol=1e-6)


P = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
LOG_P = [math.log(x) for x in P]


@pytest.mark.parametrize("top_p,expected", [
    (0.3, {0}), (0.5, {0, 1}), (0.7, {0, 1, 2}), (0.85, {0, 1, 2, 3}), (0.93, {0, 1, 2, 3, 4}),
    (0.99, set(range(6))), (1e-6, {0}), (1.0, set(range(6))),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    probs = sampler_probs(LOG_P, top_p=top_p)
    assert kept_set(probs) == expected
    assert torch.allclose(probs, as_vector(reference(LOG_P, top_p=top_p), 6), atol=1e-6)


@pytest.mark.parametrize("logits,top_p,expected", [
    ([0.0, 0.0, 0.0, 0.0], 0.5, {0, 1, 2, 3}),    # the crossing token ties with all: all are kept
    ([0.0, 0.0, 0.0, 0.0], 0.2, {0, 1, 2, 3}),    # at least one token, and its ties
    ([1.0, 1.0, 0.0, -5.0], 1e-3, {0, 1}),        # at least one: both tied best tokens
    ([2.0, 1.0, 1.0, 1.0, -1.0], 0.7, {0, 1, 2, 3}),
    ([2.0, 1.0, 1.0, 1.0, -1.0], 0.3, {0}),
])
def test_top_p_keeps_ties_with_the_crossing_token(logits, top_p, expected):
    for candidates in (None, 1, 2):
        probs = sampler_probs(logits, max_candidates=candidates, top_p=top_p)
        assert kept_set(probs) == expected
        assert torch.allclose(probs, as_vector(reference(logits, top_p=top_p), len(logits)), atol=1e-6)


@pytest.mark.parametrize("top_p,expected", [
    (0.5, {0}), (0.75, {0, 1}), (0.875, {0, 1, 2}), (0.9, set(range(5))),      # token 3 ties with 4
])
def test_top_p_reached_exactly_is_enough(top_p, expected):
    dyadic = [3 * math.log(2), 2 * math.log(2), math.log(2), 0.0, 0.0]     # float32 probs 1/2, 1/4, 1/8, 1/16, 1/16
    assert filtered_probs(tensor(dyadic)[None, :], [row()])[0].tolist() == [0.5, 0.25, 0.125, 0.0625, 0.0625]
    for candidates in (None, 2):
        assert kept_set(sampler_probs(dyadic, max_candidates=candidates, top_p=top_p)) == expected


@pytest.mark.parametrize("min_p,expected", [
    (0.0, set(range(6))), (0.05, set(range(6))), (0.2, {0, 1, 2, 3}), (0.5, {0, 1}), (0.7, {0}), (1.0, {0}),
])
def test_min_p_keeps_tokens_at_least_min_p_times_the_best(min_p, expected):
    probs = sampler_probs(LOG_P, min_p=min_p)
    assert kept_set(probs) == expected
    assert torch.allclose(probs, as_vector(reference(LOG_P, min_p=min_p), 6), atol=1e-6)


def test_filters_apply_in_order_top_k_then_top_p_then_min_p():
    # top-p on the top-k distribution: 0.4 / 0.65 ≥ 0.6 keeps token 0 alone (on the raw distribution
    # it would need tokens 0 and 1)
    assert kept_set(sampler_probs(LOG_P, top_k=2, top_p=0.6)) == {0}
    assert kept_set(sampler_probs(LOG_P, top_p=0.6)) == {0, 1}
    # temperature first: at 0.5 the distribution sharpens, so top-p 0.7 needs fewer tokens
    assert kept_set(sampler_probs(LOG_P, temperature=0.5, top_p=0.7)) == {0, 1}
    assert kept_set(sampler_probs(LOG_P, temperature=2.0, top_p=0.7)) == {0, 1, 2, 3}
    # min-p after temperature: 0.25/0.4 ≥ 0.5 at T=1, (0.25/0.4)^2 < 0.5 at T=0.5
    assert kept_set(sampler_probs(LOG_P, min_p=0.5)) == {0, 1}
    assert kept_set(sampler_probs(LOG_P, temperature=0.5, min_p=0.5)) == {0}
    for params in (dict(top_k=4, top_p=0.8, min_p=0.3), dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1),
                   dict(temperature=1.7, top_p=0.95, min_p=0.2)):
        expected = as_vector(reference(LOGITS, **params), V)
        assert torch.allclose(sampler_probs(LOGITS, **params), expected, atol=1e-6)


@pytest.mark.parametrize("max_candidates", [None, 3, 8, 1000])
def test_mixed_batch_of_random_parameters_matches_the_reference_row_by_row(max_candidates):
    rng = random.Random(max_candidates or 0)
    vocab, rows, logits, params = 40, [], [], []
    while len(rows) < 48:
        values = [round(rng.gauss(0, 2) * 2) / 2 for _ in range(vocab)]     # a half-integer grid: many ties
        p = dict(temperature=rng.choice([0.3, 0.7, 1.0, 1.5, 4.0]), top_k=rng.choice([0, -1, 1, 3, 10, 39, 40, 60]),
                 top_p=rng.choice([1.0, 0.99, 0.9, 0.6, 0.2, 0.01]), min_p=rng.choice([0.0, 0.0, 0.01, 0.1, 0.5]))
        if reference_margin(values, **p) < 1e-5:
            continue
        rows.append(row(**p))
        logits.append(values)
        params.append(p)
    got = filtered_probs(tensor(logits), rows, max_candidates).double()
    for i, (values, p) in enumerate(zip(logits, params)):
        expected = as_vector(reference(values, **p), vocab)
        assert kept_set(got[i]) == kept_set(expected), (i, p)
        assert torch.allclose(got[i], expected, atol=1e-6), (i, p)


def test_top_p_falls_back_to_a_full_sort_only_for_rows_that_need_it():
    flat = [0.0] * 30 + [0.01 * i for i in range(30)]      # needs most of the vocabulary for top-p 0.9
    peaked = [10.0, 9.0] + [0.0] * 58
    rows = [row(top_p=0.9), row(top_p=0.9), row(top_p=0.5, top_k=50)]
    got = filtered_probs(tensor([flat, peaked, flat]), rows, max_candidates=4).double()
    for i, (values, p) in enumerate([(flat, dict(top_p=0.9)), (peaked, dict(top_p=0.9)),
                                     (flat, dict(top_p=0.5, top_k=50))]):
        assert torch.allclose(got[i], as_vector(reference(values, **p), 60), atol=1e-6)


# ---- penalties and bias -------------------------------------------------------------------------

def penalised(prompt=(), output=(), logits=LOGITS, **params) -> list[float]:
    return apply_penalties(tensor(logits)[None, :], [row(prompt, output, **params)])[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_other_seen_logits():
    logits = [2.0, -1.0, 0.0, 3.0, 1.0, -2.0]
    out = penalised(prompt=[0, 1, 0], output=[2, 1], logits=logits, repetition_penalty=2.0)
    assert out == pytest.approx([1.0, -2.0, 0.0, 3.0, 1.0, -2.0])   # once per token, however often seen
    out = penalised(prompt=[3], output=[5], logits=logits, repetition_penalty=0.5)
    assert out == pytest.approx([2.0, -1.0, 0.0, 6.0, 1.0, -1.0])   # below 1 it rewards repetition


def test_presence_and_frequency_penalties_count_output_tokens_only():
    out = penalised(prompt=[3, 4], output=[1, 1, 1, 2, 4], presence_penalty=0.5, frequency_penalty=0.25)
    expected = list(LOGITS)
    expected[1] -= 3 * 0.25 + 0.5
    expected[2] -= 1 * 0.25 + 0.5
    expected[4] -= 1 * 0.25 + 0.5      # in the prompt once, in the output once: counted once
    assert out == pytest.approx(expected)
    out = penalised(output=[0, 0], presence_penalty=-1.0, frequency_penalty=-0.5)
    assert out[0] == pytest.approx(LOGITS[0] + 1.0 + 1.0)               # negative values encourage


def test_penalties_apply_in_order_repetition_then_frequency_and_presence_then_bias():
    logits = [2.0, -1.0, 0.5]
    out = penalised(prompt=[1], output=[0, 0], logits=logits, repetition_penalty=2.0, frequency_penalty=0.5,
                    presence_penalty=0.25, logit_bias=((1, 3.0), (2, -1.0)))
    assert out == pytest.approx([2.0 / 2 - 2 * 0.5 - 0.25, -1.0 * 2 + 3.0, 0.5 - 1.0])


def test_penalties_are_per_row_and_leave_other_rows_alone():
    logits = tensor([LOGITS] * 3)
    rows = [row(prompt=[0], repetition_penalty=2.0), row(output=[0], logit_bias=((5, -4.0), (5, 1.0))),
            row(prompt=[0], output=[0, 7])]
    out = apply_penalties(logits, rows)
    assert out[0, 0] == pytest.approx(1.0) and torch.equal(out[0, 1:], logits[0, 1:])
    assert out[1, 5] == pytest.approx(LOGITS[5] - 3.0)                 # biases on one token add up
    assert torch.equal(out[1, :5], logits[1, :5]) and torch.equal(out[1, 6:], logits[1, 6:])
    assert torch.equal(out[2], logits[2])
    assert torch.equal(logits, tensor([LOGITS] * 3)), "the input is not modified"


def test_logit_bias_steers_sampling_and_greedy():
    sampler = Sampler()
    assert sampler(tensor(LOGITS)[None, :], [row(temperature=0.0, logit_bias=((4, 10.0),))]).token_ids == [4]
    all_but_9 = tuple((t, -100.0) for t in range(V) if t != 9)
    biased = [row(temperature=1.0, seed=s, logit_bias=all_but_9) for s in range(50)]
    assert set(sampler(tensor([LOGITS] * 50), biased).token_ids) == {9}


# ---- greedy -------------------------------------------------------------------------------------

def test_greedy_is_the_argmax_of_the_penalised_logits_and_ignores_filters():
    sampler = Sampler()
    logits = tensor([LOGITS] * 5)
    rows = [row(temperature=0.0), row(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9),
            row(temperature=0.0, prompt=[7], repetition_penalty=3.0),          # 3.1 / 3 < 2.0
            row(temperature=0.0, output=[7, 7], frequency_penalty=1.0),        # 3.1 - 2 < 2.0
            row(temperature=1.0, top_k=1, seed=3)]                              # a sampled row in between
    assert sampler(logits, rows).token_ids == [7, 7, 0, 0, 7]


def test_greedy_ties_take_the_lowest_id():
    sampler = Sampler()
    assert sampler(tensor([[0.0, 1.0, 1.0]]), [row(temperature=0.0)]).token_ids == [1]
    assert sampler(tensor([[0.0, 1.0, 1.0]]), [row(temperature=0.0, logit_bias=((0, 1.0),))]).token_ids == [0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_any_float_dtype(dtype):
    logits = tensor([LOGITS] * 2).to(dtype)
    out = Sampler()(logits, [row(temperature=0.0, logprobs=2), row(temperature=0.5, seed=1, top_k=1)])
    assert out.token_ids == [7, 7]
    assert out.logprobs[0].logprob == pytest.approx(torch.log_softmax(logits.float()[0], -1)[7].item(), abs=1e-6)


# ---- distributions over many draws --------------------------------------------------------------

def assert_matches(tokens: list[int], expected: torch.Tensor):
    draws = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(expected)).double()
    assert torch.all(counts[expected == 0] == 0), "a filtered-out token was sampled"
    freq = counts / draws
    assert 0.5 * float((freq - expected).abs().sum()) < 0.02, "total variation distance"
    support = expected > 0
    chi2 = float((((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum())
    df = int(support.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df) + 6, f"chi-square {chi2:.1f} with {df} degrees of freedom"


METHODS = Sampler.METHODS


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.5), dict(temperature=0.7, top_k=4),
    dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.15),
    dict(temperature=1.2, top_k=6, top_p=0.9, min_p=0.05),
])
def test_unseeded_sampled_frequencies_match_the_reference(params, method):
    draws = 20000
    torch.manual_seed(1234)
    tokens = Sampler(method=method)(tensor([LOGITS] * draws), [row(**params)] * draws).token_ids
    assert_matches(tokens, as_vector(reference(LOGITS, **params), V))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("params", [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=5, min_p=0.1)])
def test_seeded_sampled_frequencies_match_the_reference(params, method):
    draws = 8000
    sampler = Sampler(method=method)
    tokens = sampler(tensor([LOGITS] * draws), [row(seed=s, **params) for s in range(draws)]).token_ids
    assert_matches(tokens, as_vector(reference(LOGITS, **params), V))
    # and one seeded request over many steps
    generator, single = make_generator(99), []
    for _ in range(2000):
        single += sampler(tensor(LOGITS)[None, :], [SamplingRow(SamplingParams(**params), [], [], generator)]).token_ids
    expected = as_vector(reference(LOGITS, **params), V)
    assert torch.all(torch.bincount(torch.tensor(single), minlength=V)[expected == 0] == 0)
    assert 0.5 * float((torch.bincount(torch.tensor(single), minlength=V) / 2000 - expected).abs().sum()) < 0.05


@pytest.mark.parametrize("method", METHODS)
def test_large_vocabulary_with_few_candidates_matches_the_reference(method):
    vocab, draws = 3000, 4000
    gen = torch.Generator().manual_seed(5)
    flat = torch.randn(vocab, generator=gen) * 0.3              # top-p 0.95 needs most of it
    peaked = flat.clone()
    peaked[:5] += torch.tensor([8.0, 7.5, 7.0, 6.0, 5.0])       # top-p 0.6 needs three tokens
    for logits, params in ((flat, dict(top_p=0.95)), (peaked, dict(top_p=0.6)), (flat, dict(top_p=0.6, min_p=0.9))):
        assert reference_margin(logits.tolist(), **params) > 1e-5
        expected = as_vector(reference(logits.tolist(), **params), vocab)
        got = filtered_probs(logits[None, :], [row(**params)], max_candidates=64)[0].double()
        assert kept_set(got) == kept_set(expected)
        assert torch.allclose(got, expected, atol=1e-6)
    assert len(kept_set(filtered_probs(flat[None, :], [row(top_p=0.95)], max_candidates=64)[0])) > 2000
    torch.manual_seed(0)
    params = dict(temperature=1.0, top_p=0.6)
    tokens = Sampler(max_candidates=64, method=method)(peaked[None, :].repeat(draws, 1),
                                                       [row(**params)] * draws).token_ids
    assert_matches(tokens, as_vector(reference(peaked.tolist(), **params), vocab))


def test_inverse_cdf_never_lands_on_a_zero_weight_token(monkeypatch):
    weights = tensor([[0.0, 0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [0.0, 1e-30, 0.0, 0.0, 0.0, 0.0, 2.0]])
    rows = [row(), row()]
    for u, expected in ((0.0, [2, 1]), (0.2999, [2, 6]), (0.3001, [4, 6]), (1.0 - 2 ** -24, [4, 6]), (1.0, [4, 6])):
        monkeypatch.setattr(Sampler, "_uniform", staticmethod(lambda rows, shape, device, u=u: torch.full(shape, u)))
        assert Sampler._inverse_cdf(weights, rows).tolist() == expected, u


# ---- seeds --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("max_candidates", [None, 2, 1000])
def test_a_seeded_request_draws_the_same_tokens_alone_and_in_any_batch(max_candidates, method):
    sampler = Sampler(max_candidates=max_candidates, method=method)
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=8, repetition_penalty=1.2, frequency_penalty=0.1)
    gen = torch.Generator().manual_seed(3)
    target_logits = torch.randn(30, 16, generator=gen) * 2          # one row of logits per step
    neighbour_logits = torch.randn(30, 15, 16, generator=gen)
    rng = random.Random(0)
    neighbours = [SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 3.0]), top_k=rng.choice([0, 2, 5]),
                                 top_p=rng.choice([1.0, 0.3, 0.99]), min_p=rng.choice([0.0, 0.2]),
                                 presence_penalty=rng.choice([0.0, 1.0]), seed=rng.choice([None, 7]))
                  for _ in range(15)]

    def run(batched: bool) -> list[int]:
        torch.manual_seed(1000 + batched)       # unseeded neighbours draw differently in each run
        generator, out = make_generator(42), []
        neighbour_gens = [make_generator(p.seed) if p.seed is not None else None for p in neighbours]
        for step in range(30):
            me = SamplingRow(target, [1, 2, 3], list(out), generator)
            if not batched:
                out += sampler(target_logits[step][None, :], [me]).token_ids
                continue
            position = step % 16
            others = [SamplingRow(p, [4], [], g) for p, g in zip(neighbours, neighbour_gens)]
            rows = others[:position] + [me] + others[position:]
            logits = torch.cat([neighbour_logits[step][:position], target_logits[step][None, :],
                                neighbour_logits[step][position:]])
            out.append(sampler(logits, rows).token_ids[position])
        return out

    alone = run(False)
    assert alone == run(True)
    assert len(set(alone)) > 3, "the target actually samples"


@pytest.mark.parametrize("method", METHODS)
def test_seeds_reproduce_and_differ(method):
    sampler, logits = Sampler(method=method), tensor([LOGITS] * 4)

    def draw(seeds):
        gens = [make_generator(s) for s in seeds]
        params = SamplingParams(temperature=1.5)
        return [tuple(sampler(logits, [SamplingRow(params, [], [], g) for g in gens]).token_ids) for _ in range(20)]

    a, b = draw([1, 1, 2, 3]), draw([1, 1, 2, 3])
    assert a == b
    assert all(x[0] == x[1] for x in a), "the same seed in one batch draws the same tokens"
    assert [x[0] for x in a] != [x[2] for x in a]
    assert make_generator(-1).initial_seed() == 2 ** 64 - 1


# ---- logprobs -----------------------------------------------------------------------------------

def test_logprobs_are_the_raw_log_softmax_with_sorted_top_lists():
    logits = tensor([LOGITS, LOGITS[::-1], LOGITS, LOGITS])
    rows = [row(temperature=0.0, logprobs=3, repetition_penalty=2.0, prompt=[7]),
            row(temperature=2.0, seed=4, logprobs=20, top_k=2, logit_bias=((3, 5.0),)),
            row(temperature=0.7, seed=5),
            row(temperature=0.0, logprobs=0)]
    out = Sampler()(logits, rows)
    assert out.logprobs[2] is None
    for i, k in ((0, 3), (1, V), (3, 0)):     # k = 20 > V: every token
        lp = out.logprobs[i]
        raw = torch.log_softmax(logits[i].double(), -1)
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(raw[lp.token_id]), abs=1e-5)
        assert len(lp.top) == k
        assert len({t for t, _ in lp.top}) == k
        assert all(v == pytest.approx(float(raw[t]), abs=1e-5) for t, v in lp.top)
        assert [v for _, v in lp.top] == pytest.approx(raw.topk(k).values.tolist(), abs=1e-5)   # best first
    assert out.token_ids[0] == 0            # greedy on the penalised logits, logprobs from the raw ones


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_seeded_rows_match_alone_and_batched():
    sampler = Sampler()
    logits = torch.randn(8, 1000, device="cuda")
    params = SamplingParams(temperature=0.8, top_p=0.9, logprobs=5)
    alone = sampler(logits[3:4], [SamplingRow(params, [], [], make_generator(7, "cuda"))])
    rows = [row(temperature=1.0) for _ in range(8)]
    rows[3] = SamplingRow(params, [], [], make_generator(7, "cuda"))
    batched = sampler(logits, rows)
    assert alone.token_ids[0] == batched.token_ids[3]
    assert alone.logprobs[0].top == pytest.approx(batched.logprobs[3].top)
