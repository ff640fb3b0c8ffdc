"""The engine's host path: the persistent batch (decode steps from per-row buffers), the batched
hand-off of outputs to the event loop, coalescing of deltas a lagging consumer has not read, and
the byte-table detokenizer."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch

from model.cache.batch import PagedBatch, SequenceChunk
from model.loading.builtin import builtin_model_path
from server.engine.detokenizer import ByteDetokenizer, IncrementalDetokenizer, byte_view, whole_texts
from server.engine.streams import merge_outputs
from server.engine.input_batch import PersistentBatch
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.results import NullObserver, RequestOutput, TokenLogprob
from server.engine.sequence import Sequence
from tests.default_model import tokenizer_of_gguf
from tests.helpers import collect, tiny_engine


# ---- PagedBatch.decode: the same tensors as PagedBatch.build --------------------------------------
@pytest.mark.parametrize("window,with_gather", [(None, True), (None, False), (5, True)])
def test_decode_batch_equals_the_batch_built_from_chunks(window, with_gather):
    rng = random.Random(3)
    block_size = 4
    for _ in range(30):
        chunks = []
        for _ in range(rng.randrange(1, 9)):
            position = rng.randrange(0, 40)
            blocks = rng.sample(range(100), position // block_size + 1)
            chunks.append(SequenceChunk([rng.randrange(500)], position, blocks, needs_logits=rng.random() < 0.8))
        if not any(c.needs_logits for c in chunks):
            chunks[0] = SequenceChunk(chunks[0].token_ids, chunks[0].start_pos, chunks[0].block_table, True)
        built = PagedBatch.build(chunks, block_size, window=window, with_gather=with_gather)
        width = max(len(c.block_table) for c in chunks)
        tables = np.full((len(chunks), width), -1, dtype=np.int64)
        for i, c in enumerate(chunks):
            tables[i, :len(c.block_table)] = c.block_table
        decoded = PagedBatch.decode(np.array([c.token_ids[0] for c in chunks]), np.array([c.start_pos for c in chunks]),
                                    tables, np.array([c.needs_logits for c in chunks]), block_size, window=window,
                                    with_gather=with_gather)
        for name, value in vars(built).items():
            other = getattr(decoded, name)
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other, value), name
            else:
                assert other == value, name


# ---- the persistent batch -------------------------------------------------------------------------
class _Chunk:
    def __init__(self, seq, start, drafts=()):
        self.seq, self.start, self.draft_token_ids = seq, start, tuple(drafts)


def _seq(request_id: str, prompt: list[int], **params) -> Sequence:
    return Sequence(GenerationRequest(request_id, prompt, SamplingParams(**params)), lambda out: None)


def test_persistent_batch_rows_follow_their_requests():
    batch = PersistentBatch(max_rows=2, max_blocks_per_row=2, vocab_size=50)
    a, b = _seq("a", [1, 2, 3], temperature=0.5, top_k=7), _seq("b", [4, 5], top_k=500, top_p=0.9)
    a.blocks.block_ids.extend([10])
    b.blocks.block_ids.extend([20])
    tokens, positions, tables, rows = batch.gather([_Chunk(a, 2), _Chunk(b, 1)])
    assert tokens.tolist() == [3, 5] and positions.tolist() == [2, 1] and tables.tolist() == [[10], [20]]
    assert batch.sampling[rows].tolist() == [[0.5, 7.0, 1.0, 0.0], [1.0, 50.0, pytest.approx(0.9), 0.0]]
    # a sampled token and grew a block past the buffer's width: only the new entries are written
    a.output_token_ids.append(33)
    batch.advance(a, 33)
    a.blocks.block_ids.extend([11, 12])
    tokens, positions, tables, _ = batch.gather([_Chunk(a, 3)])
    assert tokens.tolist() == [33] and positions.tolist() == [3] and tables.tolist() == [[10, 11, 12]]
    # preempted: its blocks were freed (a new list) and re-allocated; the row is refilled
    batch.release(a)
    a.blocks.block_ids = [40]
    c = _seq("c", [9])
    c.blocks.block_ids.extend([30])
    assert batch.gather([_Chunk(a, 3), _Chunk(b, 1), _Chunk(c, 0)]) is None        # only two rows
    batch.release(b)
    tokens, positions, tables, _ = batch.gather([_Chunk(a, 3), _Chunk(c, 0)])
    assert tokens.tolist() == [33, 9] and tables.tolist() == [[40], [30]]
    # a table replaced under a live row (freed and re-allocated) is noticed without a release
    c.blocks.block_ids = [31]
    assert batch.gather([_Chunk(c, 0)])[2].tolist() == [[31]]
    assert batch.num_rows == 2


def _run(engine, prompts, params_of):
    async def main():
        return await asyncio.gather(*(collect(engine, GenerationRequest(f"r{i}", p, params_of(i)))
                                      for i, p in enumerate(prompts)))
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


@pytest.mark.parametrize("num_blocks", [256, 22])          # 22: requests get preempted and resume
def test_decode_steps_from_the_persistent_batch_are_exact(num_blocks):
    """Greedy and seeded sampling (top-k/top-p/min-p from the per-row table), logprobs included, give
    the same outputs with the persistent batch as with every step built from chunks."""
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randrange(3, 30))] for _ in range(8)]

    def params_of(i):
        if i % 2:
            return SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=2)
        return SamplingParams(max_tokens=14, temperature=0.9, top_k=20, top_p=0.8, min_p=0.02, seed=i,
                              ignore_eos=True, logprobs=1)

    runs = []
    for persistent in (True, False):
        engine = tiny_engine(num_blocks=num_blocks, max_num_seqs=8, start=False)
        if not persistent:
            engine.core.batch = None
        engine.start()
        runs.append(_run(engine, prompts, params_of))
    with_batch, from_chunks = runs
    for (outs_a, text_a, tokens_a), (outs_b, text_b, tokens_b) in zip(with_batch, from_chunks):
        assert tokens_a == tokens_b and text_a == text_b and len(tokens_a) == 14
        assert [lp for o in outs_a for lp in o.logprobs] == [lp for o in outs_b for lp in o.logprobs]


def test_a_decode_step_leaves_each_row_ready_for_the_next_and_counts_its_decodes():
    """After every step each running request's row holds its last token at its last position (the step
    advances the rows itself: the next gather rewrites none of them), and the scheduler's count of
    decodes is the number of chunks of one known token that complete their request's tokens (chunked
    prompts, one-token prompt chunks and preemptions included)."""
    engine = tiny_engine(num_blocks=40, max_num_seqs=6, max_num_batched_tokens=9, start=False)
    core = engine.core
    rng = random.Random(8)
    for i in range(10):
        prompt = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 25))]
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.0 if i % 2 else 0.7, seed=i,
                                ignore_eos=True)
        core.add(core.admit(GenerationRequest(f"r{i}", prompt, params), lambda out: None, 0))
    schedule, counts = core.scheduler.schedule, []

    def checked_schedule():
        out = schedule()
        counts.append((out.num_decodes, sum(c.num_known_tokens == 1 and c.completes_prompt for c in out.chunks)))
        return out
    core.scheduler.schedule = checked_schedule
    decode_steps = 0
    while core.has_work():
        core.step()
        decode_steps += bool(counts[-1][0]) and counts[-1][0] == counts[-1][1]
        for seq in core.scheduler.running:
            row = core.batch.row_of(seq)
            if row is not None and seq.output_token_ids and seq.num_computed_tokens == seq.num_tokens - 1:
                assert core.batch.tokens[row] == seq.output_token_ids[-1]
                assert core.batch.positions[row] == seq.num_tokens - 1
    assert all(counted == expected for counted, expected in counts)
    assert decode_steps > 5 and not core.requests


# ---- the hand-off and coalescing ------------------------------------------------------------------
class _Steps(NullObserver):
    def __init__(self):
        self.steps = 0

    def on_step(self, num_scheduled_tokens: int, shared: bool = False) -> None:
        self.steps += 1


def test_outputs_cross_to_the_event_loop_once_per_step():
    steps = _Steps()
    engine = tiny_engine(observer=steps)
    calls = []

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args):
            calls.append(callback)
            return original(callback, *args)
        loop.call_soon_threadsafe = counting
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        return await asyncio.gather(*(collect(engine, GenerationRequest(f"r{i}", [5 + i, 6, 7], params))
                                      for i in range(8)))
    try:
        results = asyncio.run(main())
    finally:
        engine.stop()
    assert sum(len(tokens) for _, _, tokens in results) == 80
    assert len(calls) <= steps.steps                       # not one per token (80)


def test_a_consumer_that_lags_gets_the_deltas_merged():
    """A consumer that reads its first delta and then nothing until the request finished gets the rest
    as one output: the same text, tokens and logprobs as a consumer that keeps up."""
    finished = __import__("threading").Event()

    class Finished(NullObserver):
        def on_request_finished(self, stats) -> None:
            finished.set()

    engine = tiny_engine(observer=Finished())
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    prompt = [72, 101, 108, 108, 111]

    async def main():
        eager = await collect(engine, GenerationRequest("eager", prompt, params))
        finished.clear()
        gen = engine.generate(GenerationRequest("slow", prompt, params, tenant="b"))   # no prefix hit: same math
        first = await gen.__anext__()                            # submits it, reads one delta
        await asyncio.get_running_loop().run_in_executor(None, finished.wait, 30)
        # everything the engine sent before this barrier is queued on this loop ahead of its answer
        await asyncio.get_running_loop().run_in_executor(None, engine.flush_inbox)
        lagging = [first] + [out async for out in gen]
        return eager, lagging
    try:
        (eager_outs, eager_text, eager_tokens), lagging = asyncio.run(main())
    finally:
        engine.stop()
    # (even the eager consumer may find two deltas merged on a loaded machine: only the lagging one's
    # count is certain, since it reads nothing more until the request has finished)
    assert len(eager_tokens) == 12 and len(lagging) == 2
    first, rest = lagging
    assert first.token_ids and len(first.token_ids) + len(rest.token_ids) == 12
    assert rest.finished and rest.finish_reason == "length" and rest.usage.completion_tokens == 12
    assert list(first.token_ids + rest.token_ids) == eager_tokens and first.text + rest.text == eager_text
    assert list(first.logprobs + rest.logprobs) == [lp for o in eager_outs for lp in o.logprobs]


def test_merging_outputs_keeps_text_tokens_logprobs_and_the_end():
    lp = [TokenLogprob(i, -0.5 * i, ((i, -0.5 * i),)) for i in range(3)]
    parts = [RequestOutput("r", "a", (1,), (lp[0],)), RequestOutput("r", "", (2,), (lp[1],)),
             RequestOutput("r", "bc", (3,), (lp[2],), "stop")]
    merged = merge_outputs(parts)
    assert merged == RequestOutput("r", "abc", (1, 2, 3), tuple(lp), "stop")
    assert merge_outputs(parts[:1]) is parts[0]
    assert merge_outputs([RequestOutput("r", "x", (1,)), RequestOutput("r", "y", (2,))]).logprobs is None


def test_streams_of_several_choices_coalesce_per_choice():
    """`merged` (the API's reader of n choices): deltas that wait together are merged per choice, in
    order, so a consumer that lags gets fewer events with the same concatenated text."""
    from server.api.streaming import merged

    texts = [["a", "b", "c", "d"], ["w", "x", "y", "z"]]

    async def main():
        drained = [asyncio.Event(), asyncio.Event()]

        async def gen(index, texts):
            for i, text in enumerate(texts):
                yield RequestOutput(f"c{index}", text, (i,), None, "stop" if i == len(texts) - 1 else None)
            drained[index].set()        # asked for more after its last: every output is queued

        gens = [gen(i, t) for i, t in enumerate(texts)]
        firsts = [await g.__anext__() for g in gens]
        events = []
        stream = merged(gens, firsts)
        async for index, out in stream:
            events.append((index, out))
            if len(events) == 1:            # lag until both choices have sent everything
                await drained[0].wait()
                await drained[1].wait()
        return events
    events = asyncio.run(main())
    for index in (0, 1):
        mine = [out for i, out in events if i == index]
        assert "".join(o.text for o in mine) == "".join(texts[index]) and mine[-1].finished
        assert [t for o in mine for t in o.token_ids] == [0, 1, 2, 3]
    assert len(events) < 8


# ---- the byte-table detokenizer -------------------------------------------------------------------
def test_byte_detokenizer_gives_the_text_decoding_gives():
    tokenizer = tokenizer_of_gguf(builtin_model_path())
    view = byte_view(tokenizer)
    assert view is not None and len(view) == tokenizer.vocab_size
    token_texts = whole_texts(view)
    assert sum(text is None for text in token_texts) > 100      # byte fragments of characters have no text of their own
    rng = random.Random(1)
    texts = ["héllo wörld 🙂 — ", "日本語のテキスト", "plain ascii, with spaces  and\nnewlines"]
    for trial in range(300):
        if trial % 2:
            ids = tokenizer.encode(rng.choice(texts) * 2)[rng.randrange(3):]
        else:
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 20))]
        detok = ByteDetokenizer(view)
        pieces = [detok.push([t]) for t in ids] + [detok.flush()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        # with the table of whole-character texts: the same deltas, token by token
        with_texts = ByteDetokenizer(view, token_texts)
        past_the_vocabulary = len(view) + 3
        assert [with_texts.push([t]) for t in ids + [past_the_vocabulary]] + [with_texts.flush()] == \
            pieces[:-1] + ["", pieces[-1]]
    # a character split across tokens is held back, never broken
    ids = tokenizer.encode("🙂🙂")
    detok = ByteDetokenizer(view)
    assert all("\ufffd" not in detok.push([t]) for t in ids)


def test_only_plain_byte_level_tokenizers_get_a_byte_view():
    from tests.helpers import ByteTokenizer
    assert byte_view(ByteTokenizer()) is None
    tokenizer = tokenizer_of_gguf(builtin_model_path())
    window = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"))
    fast = ByteDetokenizer(byte_view(tokenizer))
    ids = tokenizer.encode(" The answer is 42 — ok")
    assert "".join(window.push([t]) for t in ids) + window.flush() == \
        "".join(fast.push([t]) for t in ids) + fast.flush()
