"""Shared test helpers: random models with non-trivial norms and biases, paged greedy runs."""
from __future__ import annotations

import torch

from model.loading.init_weights import random_model
from model.cache.kv_cache import KVCache
from model.cache.batch import PagedBatch, SequenceChunk
from model.cache.block_pool import RELEASED


@torch.no_grad()
def perturbed_model(config, seed: int = 0, std: float = 0.08, dtype=torch.float32):
    """A random model whose 1-D parameters (norm scales, biases) are also random, so tests notice
    a norm or a bias that is skipped or applied in the wrong place."""
    model = random_model(config, seed=seed, std=std, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            base = 1.0 if torch.all(param == 1) else 0.0
            param.copy_(base + 0.2 * torch.randn(param.shape, generator=generator))
    return model


def make_cache(config, num_blocks: int = 64, block_size: int = 4, dtype=torch.float32) -> KVCache:
    return KVCache(config, num_blocks, block_size, dtype)


def paged_logits_chunked(model, cache: KVCache, sequences: list[list[int]], chunk_size: int,
                         first_block: int = 0, prefix_len: int = 0, release_behind_window: bool = False
                         ) -> list[torch.Tensor]:
    """Run `sequences` through forward_paged, all interleaved in the same steps, each advancing by up
    to `chunk_size` tokens per step; returns logits [len(seq), V] per sequence. Positions below
    `prefix_len` are assumed to be in the cache already (a prefix hit) and are not recomputed.
    Blocks are laid out consecutively per sequence starting at `first_block`. The model's sliding
    window, if it has one, is passed to PagedBatch.build; `release_behind_window`: blocks wholly
    before every key a step's queries may see are given up, as a runner may: -1 in the block table,
    and their rows overwritten with large garbage that must never be read."""
    window = getattr(model.config, "sliding_window", None)
    bs = cache.block_size
    tables, next_block = [], first_block
    for seq in sequences:
        n = -(-len(seq) // bs)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    done = [prefix_len] * len(sequences)
    out = [[] for _ in sequences]
    garbage = torch.Generator().manual_seed(0)
    while any(d < len(s) for d, s in zip(done, sequences)):
        chunks, owners = [], []
        for i, seq in enumerate(sequences):
            if done[i] < len(seq):
                end = min(len(seq), done[i] + chunk_size)
                table = tables[i][: -(-end // bs)]
                if release_behind_window and window is not None:
                    gone = max(0, done[i] - window) // bs        # blocks below the first visible key
                    for block in table[:gone]:
                        for layer in cache.layers:
                            layer[block * bs:(block + 1) * bs] = 1e3 * torch.randn(bs, layer.shape[1],
                                                                                   generator=garbage)
                    table = [-1] * gone + table[gone:]
                chunks.append(SequenceChunk(seq[done[i]:end], done[i], table))
                owners.append((i, end))
        batch = PagedBatch.build(chunks, bs, window=window)
        batch.logits_index = torch.arange(batch.token_ids.shape[0])  # every position's logits
        logits = model.forward_paged(batch, cache.layers)
        start = 0
        for (i, end), chunk in zip(owners, chunks):
            n = len(chunk.token_ids)
            out[i].append(logits[start:start + n])
            start += n
            done[i] = end
    return [torch.cat(o) for o in out]


class ByteTokenizer:
    """A tokenizer for tiny test models: token i < 256 is the byte i (so multi-byte characters
    span several tokens), ids 256.. decode to nothing; id 0 is eos."""

    eos_token_id = 0
    bos_token_id = None

    def __init__(self, vocab_size: int = 512):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if 0 < i < 256 or (i == 0 and not skip_special_tokens))
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes]:
        """The bytes of each id, for grammars: byte i for 0 < i < 256, none for the others."""
        return [bytes([i]) if 0 < i < 256 else b"" for i in range(self.vocab_size)]


def tiny_engine(config=None, num_blocks: int = 256, block_size: int = 4, seed: int = 11, std: float = 0.15,
                observer=None, prepare_model=None, start: bool = True, **engine_overrides):
    """An engine over a random custom-llm-tiny model and a byte tokenizer, started in its own thread
    unless `start` is False; `prepare_model(model)` runs before the engine is built (decode kernels,
    routing...)."""
    from model.config import preset
    from server.config import EngineConfig
    from server.engine.engine import Engine

    config = config or preset("custom-llm-tiny")
    model = perturbed_model(config, seed=seed, std=std)
    if prepare_model is not None:
        prepare_model(model)
    cache = make_cache(config, num_blocks=num_blocks, block_size=block_size)
    engine = Engine(model, cache, ByteTokenizer(config.vocab_size),
                    EngineConfig(block_size=block_size, **engine_overrides), model_name="tiny", observer=observer)
    if start:
        engine.start()
    return engine


async def collect(engine, request):
    """All deltas of one request, and their concatenated text and token ids."""
    outputs = [out async for out in engine.generate(request)]
    text = "".join(o.text for o in outputs)
    tokens = [t for o in outputs for t in o.token_ids]
    return outputs, text, tokens


def greedy_outputs_with_and_without(config, prepare, prompts: list[list[int]], max_tokens: int = 12,
                                    std: float = 0.15):
    """The same prompts, run together through two tiny engines over `config` (greedy, logprobs 5):
    a plain one and one whose model `prepare(model)` changed (a kernel, another routing...). Returns
    the two lists of `collect` results, for `assert_same_outputs`."""
    import asyncio

    from server.engine.request import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=5, ignore_eos=True)
    results = []
    for changed in (False, True):
        engine = tiny_engine(config=config, num_blocks=64, block_size=4, std=std,
                             prepare_model=prepare if changed else None)
        try:
            async def all_of():
                return await asyncio.gather(*(collect(engine, GenerationRequest(f"r{j}", p, params))
                                              for j, p in enumerate(prompts)))
            results.append(asyncio.run(all_of()))
        finally:
            engine.stop()
    return results


def assert_same_outputs(plain, changed, logprob_tol: float = 1e-4) -> None:
    """Greedy tokens equal, and the chosen tokens' logprobs within `logprob_tol`."""
    for (plain_out, _, plain_tokens), (changed_out, _, changed_tokens) in zip(plain, changed):
        assert plain_tokens == changed_tokens
        plain_lps = [lp for o in plain_out for lp in o.logprobs]
        changed_lps = [lp for o in changed_out for lp in o.logprobs]
        assert all(abs(a.logprob - b.logprob) <= logprob_tol for a, b in zip(plain_lps, changed_lps))


def roomy_and_tight_runs(prompts: list[list[int]], max_tokens: int, tight_blocks: int, config=None,
                         std: float = 0.15, **tight_overrides):
    """Greedy tokens of `prompts` run together on a roomy cache and on one of `tight_blocks` blocks
    (where requests get preempted). The tight engine is checked for integrity and left with no block
    in use; returns (roomy tokens, tight tokens, the tight engine's scheduler)."""
    import asyncio

    from server.engine.request import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def run_all(engine):
        return await asyncio.gather(*(collect(engine, GenerationRequest(f"p{i}", p, params))
                                      for i, p in enumerate(prompts)))

    roomy = tiny_engine(config=config, num_blocks=256, std=std)
    tight = tiny_engine(config=config, num_blocks=tight_blocks, std=std, **tight_overrides)
    try:
        expected = [r[2] for r in asyncio.run(run_all(roomy))]
        got = [r[2] for r in asyncio.run(run_all(tight))]
        tight.flush_inbox()
        tight.check_integrity()
        assert tight.kv.pool.num_used_blocks == 0
        return expected, got, tight.core.scheduler
    finally:
        roomy.stop()
        tight.stop()


class TierEvents:
    """Records what the cache tiers report (`on_tier_event`), to count events by name and reason."""

    def __init__(self):
        self.seen: list[tuple[str, str, float, str]] = []

    def on_tier_event(self, tier, event, amount=1.0, reason=""):
        self.seen.append((tier, event, amount, reason))

    def count(self, event, reason=None):
        return sum(a for _, e, a, r in self.seen if e == event and (reason is None or r == reason))


def random_tables(lens, block_size, window, gen):
    """Shuffled block tables; with a window, the blocks wholly behind it released (-1) and their rows
    left as garbage nobody may read."""
    max_blocks = max(-(-n // block_size) for n in lens) + 1
    num_blocks = len(lens) * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.long)
    for b, n in enumerate(lens):
        used = -(-n // block_size)
        tables[b, :used] = perm[b * max_blocks: b * max_blocks + used]
        if window is not None:
            tables[b, : max(0, n - 1 - window) // block_size] = RELEASED
    return tables, num_blocks
