"""Continuous-batching scheduler: plain Python over block ids and token counts, no tensors.

Each step every running request advances `num_computed_tokens` toward `num_tokens` within the token
budget (`max_num_batched_tokens`) and `max_num_seqs`: decodes take one token, prefills take what is
left of the budget (chunked prefill). Running requests go first, oldest first; then waiting ones,
first come first served. When blocks run out, session pins are evicted first (least recently used),
then the newest running request is preempted: its blocks are released (they stay in the prefix cache
until evicted), it goes back to the front of the queue and later resumes with prefix reuse.

With a sliding window W, each running request gives back, before its next chunk, the blocks wholly
behind the window of that chunk's first query (their table entries become `RELEASED`), so a long
generation holds about W + one chunk of cache. Released blocks keep their hashes in the pool until
evicted; a later request or session turn needs only the blocks its own window reaches.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model.cache.block_pool import RELEASED, BlockPool
from model.cache.sessions import SessionTable
from server.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int          # first position computed this step (= num_computed_tokens before the step)
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this chunk every known token is computed, so a new token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_queries: list[tuple[int, int]] = field(default_factory=list)  # (queried, hit) tokens

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, sessions: SessionTable, max_num_seqs: int,
                 max_num_batched_tokens: int, window: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.pool = pool
        self.sessions = sessions
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.window = window
        self.num_window_released_blocks = 0

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self._release_behind_window(seq)
            if not self._make_room(seq, num, out):
                break  # `seq` itself was preempted; everything after it already was
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
            index += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0:
                self._reuse_cached_prefix(seq, out)
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate(seq, num):
                self._release_blocks(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        return out

    def _reuse_cached_prefix(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Take the longest cached run of full blocks of this request's tokens (same tenant only),
        leaving at least one token to compute so there are logits to sample from."""
        if seq.request.session_id is not None:
            self.sessions.touch(seq.request.tenant, seq.request.session_id)
        tokens = seq.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hits = self.pool.lookup_prefix(tokens, seq.request.tenant, max_blocks=max_blocks, window=self.window)
        self.pool.acquire(held(hits))
        seq.block_ids = list(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_cached_prompt_tokens is None:
            seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, len(seq.prompt_token_ids))
            out.prefix_queries.append((len(seq.prompt_token_ids), seq.num_cached_prompt_tokens))

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_ids))

    def _allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self._blocks_needed(seq, num_new_tokens)
        if needed == 0:
            return True
        if self.pool.num_free_blocks < needed:
            self.sessions.evict_for_pressure(needed)
        blocks = self.pool.allocate(needed)
        if blocks is None:
            return False
        seq.block_ids.extend(blocks)
        return True

    def _make_room(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate for a running request, preempting the newest running ones until it fits.
        Returns False when `seq` itself had to be preempted."""
        while not self._allocate(seq, num_new_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release_blocks(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _release_behind_window(self, seq: Sequence) -> None:
        """Give back the blocks no query from `num_computed_tokens` on can see."""
        end = min(BlockPool.first_needed_block(seq.num_computed_tokens, self.block_size, self.window),
                  seq.num_registered_blocks, len(seq.block_ids))
        behind = [b for b in seq.block_ids[:end] if b != RELEASED]
        if behind:
            self.pool.release(behind)
            seq.block_ids[:end] = [RELEASED] * end
            self.num_window_released_blocks += len(behind)

    def _release_blocks(self, seq: Sequence) -> None:
        self.pool.release(held(seq.block_ids))
        seq.block_ids = []
        seq.num_registered_blocks = 0
        seq.num_computed_tokens = 0

    # ---- after the step ------------------------------------------------------------------------
    def register_full_blocks(self, seq: Sequence) -> None:
        """Give every newly filled block (all its rows computed) its chained hash, so later requests
        of the same tenant can reuse it."""
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(self.pool.hash_block(parent, seq.token_slice(i * bs, (i + 1) * bs),
                                                         seq.request.tenant))
        while seq.num_registered_blocks < min(full, len(seq.block_ids)):
            i = seq.num_registered_blocks
            if seq.block_ids[i] != RELEASED:
                self.pool.cache_block(seq.block_ids[i], seq.block_hashes[i])
            seq.num_registered_blocks += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted request wherever it is and release what it holds; a request
        of a session first hands its full cached blocks to the session's pin."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.request.session_id is not None and seq.num_registered_blocks:
            num_pinned_tokens = seq.num_registered_blocks * self.block_size
            self.sessions.pin(seq.request.tenant, seq.request.session_id, seq.all_token_ids[:num_pinned_tokens],
                              held(seq.block_ids[:seq.num_registered_blocks]))
        self._release_blocks(seq)
        seq.status = SequenceStatus.FINISHED

    def holders(self) -> list[list[int]]:
        return [held(s.block_ids) for s in self.running] + [held(s.block_ids) for s in self.waiting if s.block_ids] \
            + self.sessions.holders()

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.holders())


def held(block_table: list[int]) -> list[int]:
    """The blocks a table actually holds (entries released behind a window left out)."""
    return [b for b in block_table if b != RELEASED]
