"""Prompt-lookup speculative decoding: the lookup, greedy outputs identical to plain decoding token
for token (drafts from the lookup, and drafts that are mostly right, as a good lookup's are),
stops / ending ids / min_tokens / max_tokens as if one token came per step, the sampled
distribution preserved (chi-square over a tiny vocabulary), the requests that do not speculate,
preemption, sessions, a sliding window and the cache's integrity."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from model.config import preset
from server.engine import speculation as speculation_module
from server.engine.errors import InvalidRequestError
from server.engine.grammar import GrammarSpec
from server.engine.logits_processors import apply_logits_processors
from server.engine.prompt_lookup import TokenHistory, propose
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sampler import Sampler, SamplingRow, filtered_probs
from server.engine.sequence import Sequence
from server.engine.speculation import Speculation
from tests.helpers import collect, make_cache, paged_logits_chunked, tiny_engine

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [65, 66, 67, 68, 69, 65, 66, 67],
           list(range(30, 60)) + list(range(30, 40)), [9, 9, 9, 9, 9, 9, 9]]


# ---- the lookup -----------------------------------------------------------------------------------
def test_the_lookup_proposes_what_followed_the_most_recent_occurrence_of_the_longest_suffix():
    tokens = np.array([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 2, 3, 1, 2, 3])
    assert propose(tokens, 4, max_n=3) == [4, 5, 9, 2]          # "1 2 3" at 0..2, not the later "2 3"s
    assert propose(tokens, 4, max_n=2) == [1, 2, 3]             # "2 3": the most recent is at 10..11
    assert propose(tokens, 2, max_n=2) == [1, 2]
    assert propose(np.array([5, 6, 5, 6, 5]), 4) == [6, 5]      # overlapping the suffix; fewer remain
    assert propose(np.array([1, 2, 3]), 4) == []                # 3 never occurred before
    assert propose(np.array([1, 2, 8, 3, 2]), 4, max_n=3, min_n=2) == []   # only a 1-gram matches
    assert propose(np.array([1, 2, 8, 3, 2]), 4, max_n=3, min_n=1) == [8, 3, 2]
    assert propose(np.array([4, 4]), 3) == [4]
    assert propose(np.array([4]), 3) == [] and propose(tokens, 0) == []


def test_the_token_history_catches_up_with_appended_tokens():
    history, prompt, output = TokenHistory(capacity=2), [1, 2, 3], []
    assert history.catch_up(prompt, output).tolist() == [1, 2, 3]
    output += [4, 5]
    assert history.catch_up(prompt, output).tolist() == [1, 2, 3, 4, 5]
    output += list(range(6, 40))
    assert history.catch_up(prompt, output).tolist() == list(range(1, 40))


# ---- helpers --------------------------------------------------------------------------------------
def run_together(engine, prompts, **params):
    """`collect` results of `prompts` run at once through `engine`."""
    async def all_of():
        return await asyncio.gather(*(collect(engine, GenerationRequest(f"r{i}", p, SamplingParams(**params)))
                                      for i, p in enumerate(prompts)))
    return asyncio.run(all_of())


def plain_and_speculative(prompts, engine_overrides=None, config=None, **params):
    """The same requests on a plain engine and on one with 4 speculative tokens (each request asking
    for speculation there): (plain results, speculative results, the speculative engine's
    Speculation), the speculative engine checked for integrity and left with no block in use."""
    overrides = dict(engine_overrides or {})
    results = []
    for k in (0, 4):
        engine = tiny_engine(config=config, num_speculative_tokens=k, **overrides)
        try:
            results.append(run_together(engine, prompts, speculative=k > 0, **params))
            engine.flush_inbox()
            engine.check_integrity()
            assert engine.kv.pool.num_used_blocks == 0 or engine.kv.num_pinned_blocks
            speculation = engine.core.speculation
        finally:
            engine.stop()
    return results[0], results[1], speculation


def assert_same(plain, speculative, logprob_tol=1e-4, same_usage=True):
    for (p_out, p_text, p_tokens), (s_out, s_text, s_tokens) in zip(plain, speculative):
        assert s_tokens == p_tokens and s_text == p_text
        assert s_out[-1].finish_reason == p_out[-1].finish_reason
        assert s_out[-1].usage == p_out[-1].usage or not same_usage
        p_lps = [lp for o in p_out for lp in o.logprobs or ()]
        s_lps = [lp for o in s_out for lp in o.logprobs or ()]
        assert len(s_lps) == len(p_lps)
        for a, b in zip(p_lps, s_lps):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= logprob_tol
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.fixture
def oracle_drafts(monkeypatch):
    """Replace the lookup by one that proposes the plain run's continuation (`references`: prompt
    → plain output), every `wrong_every`-th position changed: drafts mostly right, as a good lookup's
    are, so that long runs are accepted and some are rejected mid-way."""
    references: dict[tuple[int, ...], list[int]] = {}
    settings = {"wrong_every": 5}

    def lookup(tokens, num_drafts, max_n=3, min_n=1):
        for prompt, output in references.items():
            if tuple(tokens[:len(prompt)].tolist()) == prompt:
                full = list(prompt) + output
                drafts = full[len(tokens):len(tokens) + num_drafts]
                return [(t + 1) % 256 if (len(tokens) + i) % settings["wrong_every"] == 0 else t
                        for i, t in enumerate(drafts)]
        return []

    monkeypatch.setattr(speculation_module, "propose", lookup)
    return references, settings


# ---- greedy: token for token ----------------------------------------------------------------------
@pytest.mark.parametrize("budget", [2048, 12])
def test_greedy_speculation_is_plain_greedy_token_for_token(budget):
    """Drafts from the real lookup; with a 12-token budget, prefill chunks share steps with drafts
    (the chunk path, logits of every draft position)."""
    plain, speculative, counts = plain_and_speculative(PROMPTS, dict(max_num_batched_tokens=budget), max_tokens=40,
                                                       temperature=0, ignore_eos=True, logprobs=3)
    assert_same(plain, speculative)
    assert counts.num_drafts > 0 and counts.num_draft_tokens >= counts.num_drafts


@pytest.mark.parametrize("wrong_every", [5, 2, 1000])
def test_greedy_with_mostly_right_drafts_is_plain_greedy_token_for_token(oracle_drafts, wrong_every):
    references, settings = oracle_drafts
    settings["wrong_every"] = wrong_every
    params = dict(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2, presence_penalty=0.3,
                  logit_bias=((7, 1.5),))
    plain = run_plain(PROMPTS, **params)
    references.update({tuple(p): r[2] for p, r in zip(PROMPTS, plain)})
    _, speculative, counts = plain_and_speculative(PROMPTS, **params)
    assert_same(plain, speculative)
    if wrong_every == 1000:                 # every draft right: all accepted, about 5 tokens a step
        assert counts.num_accepted_tokens == counts.num_draft_tokens
        assert counts.num_drafts <= 40 * len(PROMPTS) / 4
    else:                                   # the first wrong draft stops each run
        assert 0.15 * counts.num_draft_tokens < counts.num_accepted_tokens < counts.num_draft_tokens


def run_plain(prompts, engine_overrides=None, **params):
    engine = tiny_engine(**(engine_overrides or {}))
    try:
        return run_together(engine, prompts, **params)
    finally:
        engine.stop()


def test_stops_ending_ids_min_tokens_and_max_tokens_act_as_if_one_token_came_per_step(oracle_drafts):
    references, settings = oracle_drafts
    settings["wrong_every"] = 1000                                # every draft right: stops fall mid-draft
    prompt = PROMPTS[2]
    free = run_plain([prompt], max_tokens=30, temperature=0, ignore_eos=True)[0]
    _, text, tokens = free
    references[tuple(prompt)] = tokens
    ending = tokens[9]                                            # a token the output reaches mid-way
    cases = [dict(max_tokens=30, ignore_eos=True, stop_token_ids=(ending,)),
             dict(max_tokens=7, ignore_eos=True),
             dict(max_tokens=30, ignore_eos=True, stop_token_ids=(ending,), min_tokens=tokens.index(ending) + 1),
             dict(max_tokens=12, logit_bias=((0, 9.0),), min_tokens=6)]    # eos (0) held back, then taken
    if len(text) >= 8:
        cases.append(dict(max_tokens=30, ignore_eos=True, stop=(text[5:8],)))
    for i, case in enumerate(cases):
        plain, speculative, counts = plain_and_speculative([prompt], temperature=0, logprobs=1, **case)
        assert_same(plain, speculative)
        assert counts.num_accepted_tokens > 0
        if i == 0:       # the ending id came inside accepted drafts and dropped the tokens after it
            assert speculative[0][2] == tokens[:tokens.index(ending) + 1]
            assert speculative[0][0][-1].finish_reason == "stop"


# ---- sampling: the distribution -------------------------------------------------------------------
def chi_square(counts: dict, expected: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic over the cells (those expected fewer than 5 times merged into one) and
    its degrees of freedom."""
    stat, rest_seen, rest_expected, cells = 0.0, 0, 0.0, 0
    for cell, p in expected.items():
        e = p * total
        if e < 5:
            rest_seen += counts.get(cell, 0)
            rest_expected += e
            continue
        stat += (counts.get(cell, 0) - e) ** 2 / e
        cells += 1
    if rest_expected > 0:
        stat += (rest_seen - rest_expected) ** 2 / max(rest_expected, 1e-9)
        cells += 1
    assert sum(counts.values()) == total
    return stat, cells - 1


def generous_bound(dof: int) -> float:
    """A chi-square bound ~9 standard deviations above its mean: a correct sampler never crosses
    it (p < 1e-9); a wrong one with thousands of samples does by far."""
    return dof + 9 * (2 * dof) ** 0.5


def test_sampled_speculation_preserves_the_distribution():
    """A tiny Llama with 8 tokens (the lookup always finds a draft), temperature 0.8, top-k 6 and
    a frequency penalty (so that position 2's distribution depends on the draft before it): 3000
    requests of 4 tokens, the engine stepped in this thread with a fixed torch seed. Token 2 comes
    from a verified step (up to 2 drafts), token 3 from the same one or the next; the joint of tokens 1-2 and the marginal of token 3 are
    compared with the model's exact distributions."""
    config = preset("llama-tiny").replace(vocab_size=8)
    engine = tiny_engine(config=config, start=False, num_speculative_tokens=4, max_num_seqs=256,
                         max_waiting_requests=4000)
    params = SamplingParams(max_tokens=4, temperature=0.8, top_k=6, frequency_penalty=0.7, ignore_eos=True,
                            speculative=True)
    prompt, total = [1, 2, 3, 4, 5, 6, 7, 1, 3], 3000
    torch.manual_seed(1234)
    outputs: dict[str, list[int]] = {}
    try:
        for i in range(total):
            rid = f"s{i}"
            outputs[rid] = []
            seq = engine.core.admit(GenerationRequest(rid, prompt, params),
                                    lambda out, rid=rid: outputs[rid].extend(out.token_ids), 0)
            engine.core.add(seq)
        while engine.core.has_work():
            assert engine.core.step()
        speculation = engine.core.speculation
        assert speculation.num_drafts >= total and speculation.num_draft_tokens > 1.3 * total
        model = engine.model
    finally:
        engine.stop()

    def distribution(history: list[list[int]]) -> list[torch.Tensor]:
        """The plain sampler's distribution of the next token after prompt + each output list."""
        with torch.no_grad():
            logits = paged_logits_chunked(model, make_cache(config, num_blocks=256), [prompt + h for h in history], 64)
        rows = [SamplingRow(params, prompt, h, None, (0,), None) for h in history]
        last = torch.stack([lg[-1] for lg in logits]).float()
        return list(filtered_probs(apply_logits_processors(last, rows), rows))

    vocab = range(config.vocab_size)
    first = distribution([[]])[0]
    second = distribution([[a] for a in vocab])
    third = distribution([[a, b] for a in vocab for b in vocab])
    joint = {(a, b): float(first[a] * second[a][b]) for a in vocab for b in vocab}
    marginal = {c: sum(joint[a, b] * float(third[a * 8 + b][c]) for a in vocab for b in vocab) for c in vocab}
    seen_joint, seen_third = {}, {}
    for tokens in outputs.values():
        assert len(tokens) == 4
        seen_joint[tokens[0], tokens[1]] = seen_joint.get((tokens[0], tokens[1]), 0) + 1
        seen_third[tokens[2]] = seen_third.get(tokens[2], 0) + 1
    for seen, expected in ((seen_joint, joint), (seen_third, marginal)):
        stat, dof = chi_square(seen, expected, total)
        assert dof >= 3 and stat < generous_bound(dof), (stat, dof)


def _fake_sequence(params: SamplingParams, output=()) -> Sequence:
    return Sequence(GenerationRequest("v", [1, 2, 3], params), lambda out: None, output_token_ids=list(output))


def test_verification_accepts_a_draft_with_its_target_probability_and_otherwise_resamples_without_it():
    """The rule itself on fixed logits over 6 tokens, 20000 verifications in one batch: the first
    token is distributed as p0 whatever the draft (a likely one, a certain one, one impossible
    under top-k), the token after an accepted draft as p1 given that draft, whose frequency penalty
    counts the draft in the history. Deterministic (fixed torch seed)."""
    torch.manual_seed(7)
    sampler = Sampler()
    speculation = Speculation(3, 3, 1, 1024, sampler)
    logits = torch.tensor([[1.0, 0.4, 0.2, -0.3, 0.9, -2.0],
                           [0.1, 0.8, 0.3, 0.3, 1.2, 0.2],
                           [0.0, 0.0, 0.5, 0.5, 1.0, -1.0]])                               # [3, 6]
    n = 20000
    for params, drafts in ((SamplingParams(temperature=0.9, top_k=5, frequency_penalty=1.5, max_tokens=9), (4, 1)),
                           (SamplingParams(temperature=1.0, top_k=1, max_tokens=9), (0, 2)),
                           (SamplingParams(temperature=1.1, top_k=5, max_tokens=9), (5, 1))):
        seq = _fake_sequence(params)
        results = speculation.verify(logits[:len(drafts) + 1].repeat(n, 1), [(seq, drafts)] * n, ())
        rows = [SamplingRow(params, [1, 2, 3], list(drafts[:j]), None, (), None) for j in range(len(drafts) + 1)]
        probs = filtered_probs(apply_logits_processors(logits[:len(drafts) + 1], rows), rows)   # [k+1, 6]
        first = {}
        after_draft = {}
        for r in results:
            assert r.error is None and 1 <= len(r.token_ids) <= len(drafts) + 1
            assert r.token_ids[:r.num_accepted] == list(drafts[:r.num_accepted])
            first[r.token_ids[0]] = first.get(r.token_ids[0], 0) + 1
            if r.num_accepted >= 1:
                after_draft[r.token_ids[1]] = after_draft.get(r.token_ids[1], 0) + 1
        stat, dof = chi_square(first, {t: float(p) for t, p in enumerate(probs[0])}, n)
        assert stat < generous_bound(max(dof, 1)), (params, stat)
        accepted = first.get(drafts[0], 0)
        if probs[0][drafts[0]] > 0:
            stat, dof = chi_square(after_draft, {t: float(p) for t, p in enumerate(probs[1])}, accepted)
            assert stat < generous_bound(max(dof, 1)), (params, stat)
        else:
            assert accepted == 0


# ---- who speculates -------------------------------------------------------------------------------
def test_seeded_and_constrained_requests_do_not_speculate_and_keep_their_outputs():
    seeded = dict(max_tokens=24, temperature=0.9, seed=77, ignore_eos=True, logprobs=1)
    plain, speculative, counts = plain_and_speculative(PROMPTS, **seeded)
    assert_same(plain, speculative)
    assert counts.num_drafts == 0

    engine = tiny_engine(num_speculative_tokens=4)
    try:
        grammar = engine.grammars.compile(GrammarSpec("regex", "(ab){2,6}c"))
        results = run_together(engine, PROMPTS[:2], max_tokens=20, temperature=0, grammar=grammar, speculative=True)
        assert all(r[1].startswith("abab") for r in results)
        assert engine.core.speculation.num_drafts == 0
    finally:
        engine.stop()


def test_the_request_field_crosses_to_an_engine_core_process():
    from server.engine import wire
    request = GenerationRequest("w", [1, 2, 3], SamplingParams(max_tokens=5, speculative=True))
    message = wire.decode_to_core(wire.encode(wire.add_request(request)))
    assert wire.generation_request(message).params.speculative is True
    assert wire.OBSERVER_EVENTS["on_spec_decode"](2, 5, 3) == (2, 5, 3)


def test_asking_for_speculation_on_an_engine_without_it_is_refused():
    engine = tiny_engine()
    try:
        with pytest.raises(InvalidRequestError) as refused:
            engine.validate_request(GenerationRequest("x", [1, 2], SamplingParams(speculative=True)))
        assert refused.value.param == "speculative_decoding"
    finally:
        engine.stop()


# ---- the cache --------------------------------------------------------------------------------------
def test_speculation_under_preemption_matches_a_roomy_plain_run():
    """A cache so tight that requests are preempted: drafts only take free blocks, and the outputs
    are those of a plain run with room to spare."""
    prompts = [[(7 * i + j) % 40 + 3 for j in range(6 + i)] * 2 for i in range(6)]
    expected = [r[2] for r in run_plain(prompts, dict(num_blocks=256), max_tokens=24, temperature=0, ignore_eos=True)]
    engine = tiny_engine(num_blocks=20, num_speculative_tokens=4)
    try:
        got = [r[2] for r in run_together(engine, prompts, max_tokens=24, temperature=0, ignore_eos=True,
                                          speculative=True)]
        engine.flush_inbox()
        engine.check_integrity()
        assert engine.kv.pool.num_used_blocks == 0
        assert engine.core.scheduler.num_preemptions > 0 and engine.core.speculation.num_drafts > 0
    finally:
        engine.stop()
    assert got == expected


def test_blocks_registered_during_speculation_hold_the_accepted_tokens(oracle_drafts):
    """A session turn decoded with drafts (a third wrong) pins its blocks; the next turn, whose
    prompt is the whole conversation, reuses them and answers exactly as a cold engine does."""
    references, settings = oracle_drafts
    settings["wrong_every"] = 3
    prompt = PROMPTS[2]
    references[tuple(prompt)] = run_plain([prompt], max_tokens=30, temperature=0, ignore_eos=True)[0][2]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2, speculative=True)
    engine = tiny_engine(num_speculative_tokens=4)
    try:
        first = asyncio.run(collect(engine, GenerationRequest("t1", prompt, params, session_id="s")))
        assert first[2] == references[tuple(prompt)]
        follow_up = prompt + first[2] + [70, 71, 72]
        params_2 = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
        second = asyncio.run(collect(engine, GenerationRequest("t2", follow_up, params_2, session_id="s")))
        assert second[0][-1].usage.cached_tokens >= 64
        engine.flush_inbox()
        engine.check_integrity()
    finally:
        engine.stop()
    cold = run_plain([follow_up], max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    assert_same(cold, [second], same_usage=False)       # the same answer, only the cached count differs


def test_a_sliding_window_model_speculates_through_the_chunk_path():
    config = preset("smart-llm-tiny").replace(sliding_window_size=6)
    plain, speculative, counts = plain_and_speculative(PROMPTS, dict(num_blocks=64), config=config, max_tokens=30,
                                                       temperature=0, ignore_eos=True, logprobs=1)
    assert_same(plain, speculative)
    assert counts.num_drafts > 0


# ---- the scheduler ----------------------------------------------------------------------------------
def _decoding(scheduler, rid: str, prompt_len: int, first_token: int):
    """A request of the scheduler's, prefilled, with one sampled token (so it decodes next)."""
    seq = Sequence(GenerationRequest(rid, list(range(first_token, first_token + prompt_len)),
                                     SamplingParams(max_tokens=50, speculative=True)), lambda out: None)
    scheduler.add(seq)
    return seq


def _step(scheduler):
    out = scheduler.schedule()
    for chunk in out.chunks:
        chunk.seq.num_computed_tokens += chunk.num_known_tokens
        scheduler.register_full_blocks(chunk.seq)
        if chunk.completes_prompt:
            chunk.seq.output_token_ids.append(7)
    scheduler.check_integrity()
    return out


def test_drafts_take_only_the_budget_and_the_free_blocks_left_over():
    from model.cache.kv_manager import KVCacheManager
    from server.engine.scheduler import Scheduler

    kv = KVCacheManager(6, 4, max_sessions=8, idle_ttl_s=60, max_pinned_fraction=0.5)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=6, speculative=True)
    a, b = _decoding(scheduler, "a", 3, 1), _decoding(scheduler, "b", 3, 20)
    _step(scheduler)                                  # both prefill (3 + 3 tokens), each samples one
    a.draft_token_ids, b.draft_token_ids = [1, 2, 3], [5, 6]
    out = _step(scheduler)
    # both decode at position 3 (2 tokens of the budget of 6); a's 3 drafts (positions 4-6, a second
    # block) come first, b gets the one token left
    assert [(c.seq.request_id, c.start, c.num_tokens, c.draft_token_ids) for c in out.chunks] == [
        ("a", 3, 4, (1, 2, 3)), ("b", 3, 2, (5,))]
    assert [len(s.blocks.block_ids) for s in (a, b)] == [2, 2]
    # the engine appended one token each (nothing accepted): the drafts' rows are beyond
    # num_computed_tokens, so the next step recomputes from position 4 and registers nothing past it
    assert (a.num_computed_tokens, b.num_computed_tokens) == (4, 4)
    # a waiting request is admitted before drafts get what is left: here nothing
    a.draft_token_ids, b.draft_token_ids = [9] * 12, [9] * 12
    c = _decoding(scheduler, "c", 8, 40)
    out = _step(scheduler)
    assert [(c.seq.request_id, c.start, c.num_tokens, c.draft_token_ids) for c in out.chunks] == [
        ("a", 4, 1, ()), ("b", 4, 1, ()), ("c", 0, 4, ())]
    # with the budget left but no free block, drafts fill only the room of the blocks a request holds
    scheduler.max_num_batched_tokens = 16
    out = _step(scheduler)                            # c's second block takes the last free one
    assert kv.num_free_blocks == 0 and not out.preempted
    assert [(c.seq.request_id, c.num_tokens, len(c.seq.blocks.block_ids)) for c in out.chunks] == [
        ("a", 3, 2), ("b", 3, 2), ("c", 4, 2)]       # position 5, drafts at 6-7: the rest of their blocks
