"""Continuous-batching scheduler: policy only, plain Python over token counts, no tensors.

Each step every running request advances `num_computed_tokens` toward `num_tokens` within the token
budget (`max_num_batched_tokens`) and `max_num_seqs`: decodes take one token, prefills take what is
left of the budget (chunked prefill). Running requests go first, oldest first; then waiting ones, the
tenants taking turns (`server.engine.waiting.WaitingQueue`: round robin across tenants, lower
`priority` first within one). When blocks run out (the KV manager has already evicted session pins, least
recently used first), the newest running request is preempted: its blocks are released (they stay
in the prefix cache until evicted), it goes back to the front of the queue and later resumes with
prefix reuse. A full batch also makes room for a tenant that waits with nothing running: the newest
request of a tenant holding more than its fair share of `max_num_seqs` yields its slot (it resumes
later, from its cached prefix), so one tenant's flood cannot keep another out of the batch.

Speculative decoding (server/engine/speculation.py): once running and waiting requests have their
chunks, a decoding request that carries draft tokens gets them added to its chunk (1 + k tokens at
consecutive positions), within what is left of the budget and of the free blocks, so drafts never
preempt a request, evict a session pin or delay an admission.

Everything about blocks goes through the KV manager (`model.cache.kv_manager`): taking a cached
prefix, making room for a chunk, giving back what a sliding window left behind, registering newly
full blocks, freeing and pinning. The scheduler never edits a block table. A waiting request whose
cached prefix the manager is still reading from a slower tier is passed over until it is ready.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from model.cache.batch import SequenceChunk
from model.cache.kv_manager import KVCacheManager
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.shared_steps import (LINGER_S, PREFILL_BOOST, lightest_tenants_prefill_only, requests_by_tenant,
                                        shared_step_cap, tenant_parts)
from server.engine.waiting import WaitingQueue


# a named tuple made from its fields without the Python-level __new__ (half the cost, in loops that run
# once per request and step)
_new_tuple = tuple.__new__


class ScheduledChunk(NamedTuple):
    """What one request computes this step (a named tuple: immutable, and quick to make, one per
    running request and step)."""

    seq: Sequence
    start: int          # first position computed this step (= num_computed_tokens before the step)
    num_tokens: int     # known tokens, then the drafts
    draft_token_ids: tuple[int, ...] = ()     # speculative tokens verified after the known ones

    @property
    def num_known_tokens(self) -> int:
        return self.num_tokens - len(self.draft_token_ids)

    @property
    def completes_prompt(self) -> bool:
        """After this chunk every known token is computed, so a new token is sampled."""
        return self.start + self.num_known_tokens == self.seq.num_tokens

    @property
    def num_logits(self) -> int:
        """Logits rows the step returns for this chunk: one per draft and one after them when it
        samples, none otherwise."""
        return 1 + len(self.draft_token_ids) if self.completes_prompt else 0

    def sequence_chunk(self, block_size: int) -> SequenceChunk:
        """What the runner needs of this chunk: its tokens, first position, the block table up to its
        last position, and whether it samples."""
        end = self.start + self.num_tokens
        known = self.seq.token_slice(self.start, self.start + self.num_known_tokens)
        return SequenceChunk(token_ids=known + list(self.draft_token_ids) if self.draft_token_ids else known,
                             start_pos=self.start, block_table=self.seq.blocks.block_ids[: -(-end // block_size)],
                             needs_logits=self.completes_prompt)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_queries: list[tuple[int, int]] = field(default_factory=list)  # (queried, hit) tokens
    restoring: list[Sequence] = field(default_factory=list)   # waiting while their prefix is read
    # chunks of one known token that completes its request's tokens (decodes, drafts or not): when
    # that is every chunk, the step samples each of them and takes its inputs from the persistent batch
    num_decodes: int = 0
    shared: bool = False        # divided across competing tenants (server/engine/shared_steps.py)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, speculative: bool = False,
                 fair_step_tokens: int = 0):
        """`speculative`: requests may carry draft tokens (the engine speculates). `fair_step_tokens`:
        the least token cap of a step while tenants compete (server/engine/shared_steps.py; 0: off)."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or fair_step_tokens < 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1, fair_step_tokens at least 0")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.speculative = speculative
        self.fair_step_tokens = fair_step_tokens
        self.block_size = kv.block_size
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.tenant_requests: Counter = Counter()    # tenant → its requests running or waiting (no zeros)
        self.lingering: dict[str, float] = {}         # tenant → when its last request ended (shared steps)
        self.clock = time.monotonic
        self.num_shared_steps = 0
        self._shared_turns = 0

    def shared_step_cap(self) -> int | None:
        """The token cap of the next step while tenants compete (None: the ordinary budget applies)."""
        if self.lingering:
            now = self.clock()
            for tenant in [t for t, ended in self.lingering.items() if now - ended >= LINGER_S]:
                del self.lingering[tenant]
        cap = shared_step_cap(self.tenant_requests, self.fair_step_tokens, len(self.lingering))
        return cap if cap is not None and cap < self.max_num_batched_tokens else None

    def add(self, seq: Sequence) -> None:
        self.tenant_requests[seq.request.tenant] += 1
        self.lingering.pop(seq.request.tenant, None)
        seq.status = SequenceStatus.WAITING
        if seq.request.session_id is not None:
            self.kv.begin_session_turn(seq.blocks, seq.request.tenant, seq.request.session_id)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._yield_slots_to_waiting_tenants(out)
        yielded = len(out.preempted)
        cap = self.shared_step_cap() if self.fair_step_tokens else None
        budget = self._schedule_running(out) if cap is None else self._schedule_running_shared(out, cap)
        budget = self._admit_waiting(out, budget, yielded)
        if cap is not None:
            out.shared = True
            self._finish_shared_step(out, budget)
            budget = 0
        if self.speculative and budget > 0 and len(out.preempted) == yielded:
            self._add_drafts(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput) -> int:
        """Every running request's chunk, oldest first, within the token budget; returns what is left."""
        budget = self.max_num_batched_tokens
        windowed = self.kv.window is not None
        index = num_decodes = 0
        block_size, chunks, running = self.block_size, out.chunks, self.running
        while index < len(running) and budget > 0:     # (the loop runs once per running request and step)
            seq = running[index]
            computed = seq.num_computed_tokens
            left = seq.num_tokens - computed
            num = left if left < budget else budget
            if windowed:
                self.kv.release_behind_window(seq.blocks, computed)
            # the blocks held already cover the chunk (the KV manager's own test, checked here cheaply:
            # a decode needs a new block only every block_size tokens)
            if len(seq.blocks.block_ids) * block_size < computed + num and not self._make_room(seq, num, out):
                break  # `seq` itself was preempted; everything after it already was
            chunks.append(_new_tuple(ScheduledChunk, (seq, computed, num, ())))    # ScheduledChunk(seq, computed, num)
            if left == 1:
                num_decodes += 1
            budget -= num
            index += 1
        out.num_decodes = num_decodes
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int, yielded: int) -> int:
        """Waiting requests join, tenants taking turns, within `budget` and `max_num_seqs`; returns
        what is left of the budget."""
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and len(out.preempted) == yielded):        # no admission while blocks ran short
            seq = self.waiting.peek()
            if seq.num_computed_tokens == 0 and not self._reuse_cached_prefix(seq, out):
                out.restoring.append(self.waiting.pop_head())
                continue
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate(seq.blocks, seq.num_computed_tokens, num):
                self._release_blocks(seq)
                break
            self.waiting.pop_head()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            if num == seq.num_tokens - seq.num_computed_tokens == 1:
                out.num_decodes += 1
            budget -= num
        for seq in reversed(out.restoring):     # back at the head of their tenants' queues
            self.waiting.appendleft(seq)
        return budget

    # ---- a shared step (tenants compete: server/engine/shared_steps.py) ---------------------------
    def _schedule_running_shared(self, out: SchedulerOutput, cap: int) -> int:
        """Each tenant's part of `cap` to its least recently advanced running requests; returns what
        the tenants left (for admissions, then any running request)."""
        self.num_shared_steps += 1
        groups = requests_by_tenant(self.running)
        if not self.lingering and lightest_tenants_prefill_only(self.tenant_requests, groups, self.waiting.count):
            cap *= PREFILL_BOOST
        budget = cap
        for tenant, part in tenant_parts(list(self.tenant_requests), cap, self.num_shared_steps):
            for seq in groups.get(tenant, ()):
                if part <= 0:
                    break
                if seq.status is SequenceStatus.RUNNING:
                    num = self._schedule_chunk(seq, part, out)
                    part -= num
                    budget -= num
        return budget

    def _finish_shared_step(self, out: SchedulerOutput, budget: int) -> None:
        """The tokens left after admissions go to running requests not yet in the step (least recently
        advanced first); requests preempted on the way lose their chunks; the step's requests are
        marked as advanced now."""
        scheduled = {id(chunk.seq) for chunk in out.chunks}
        for seq in sorted(self.running, key=lambda s: s.last_shared_turn):
            if budget <= 0:
                break
            if id(seq) not in scheduled and seq.status is SequenceStatus.RUNNING:
                budget -= self._schedule_chunk(seq, budget, out)
        out.chunks[:] = [c for c in out.chunks if c.seq.status is SequenceStatus.RUNNING]
        out.num_decodes = 0
        for chunk in out.chunks:
            self._shared_turns += 1         # one turn per chunk: no two requests tie, so turns go round exactly
            chunk.seq.last_shared_turn = self._shared_turns
            if chunk.num_tokens == 1 and chunk.completes_prompt:
                out.num_decodes += 1

    def _schedule_chunk(self, seq: Sequence, most: int, out: SchedulerOutput) -> int:
        """A chunk of at most `most` tokens for a running request (making room, which may preempt the
        newest running requests, `seq` included); returns its tokens (0 if `seq` was preempted)."""
        computed = seq.num_computed_tokens
        num = min(seq.num_tokens - computed, most)
        if self.kv.window is not None:
            self.kv.release_behind_window(seq.blocks, computed)
        if not self._make_room(seq, num, out):
            return 0
        out.chunks.append(ScheduledChunk(seq, computed, num))
        return num

    def _add_drafts(self, out: SchedulerOutput, budget: int) -> None:
        """Give each decode chunk of a request with draft tokens as many of them as the budget and
        the blocks it holds or that are free allow (allocating free blocks only: no eviction of a
        pin, no preemption)."""
        block_size = self.kv.block_size
        for i, chunk in enumerate(out.chunks):
            seq = chunk.seq
            if not seq.draft_token_ids or chunk.num_tokens != 1 or not chunk.completes_prompt:
                continue
            room = (len(seq.blocks.block_ids) + self.kv.num_free_blocks) * block_size - seq.num_tokens
            num = min(len(seq.draft_token_ids), budget, room)
            if num <= 0 or not self.kv.allocate(seq.blocks, chunk.start, 1 + num):
                continue
            out.chunks[i] = ScheduledChunk(seq, chunk.start, 1 + num, tuple(seq.draft_token_ids[:num]))
            budget -= num
            if budget <= 0:
                return

    def _yield_slots_to_waiting_tenants(self, out: SchedulerOutput) -> None:
        """A full batch makes room for tenants that wait with nothing running: for each, the newest
        running request of the tenant holding the most slots goes back to waiting, if that tenant holds
        more than its fair share (`max_num_seqs` over the tenants with work). So one tenant's flood
        cannot keep another waiting for a slot for as long as its own requests take to finish; the
        request that yields resumes later from its cached prefix."""
        if len(self.running) < self.max_num_seqs or not self.waiting:
            return
        slots = Counter(seq.request.tenant for seq in self.running)
        starved = [tenant for tenant in self.waiting.tenants() if tenant not in slots]
        fair_share = max(1, self.max_num_seqs // len(set(slots) | set(self.waiting.tenants())))
        for _ in starved:
            heaviest, held = slots.most_common(1)[0]
            if held <= fair_share:
                return
            victim = next(seq for seq in reversed(self.running) if seq.request.tenant == heaviest)
            self._preempt(victim, out, yielded=True)
            slots[heaviest] -= 1

    def _reuse_cached_prefix(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Start from the longest cached prefix of this request's tokens (its tenant's only); False
        while the KV manager still reads part of it from a slower tier."""
        request = seq.request
        cached = self.kv.take_cached_prefix(seq.blocks, seq.all_token_ids, request.tenant, request.session_id)
        if cached is None:
            return False
        seq.num_computed_tokens = cached
        if seq.num_cached_prompt_tokens is None:
            seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, len(seq.prompt_token_ids))
            out.prefix_queries.append((len(seq.prompt_token_ids), seq.num_cached_prompt_tokens))
        return True

    def _make_room(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate for a running request, preempting the newest running ones until it fits.
        Returns False when `seq` itself had to be preempted."""
        while not self.kv.allocate(seq.blocks, seq.num_computed_tokens, num_new_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput, yielded: bool = False) -> None:
        """Back to waiting, first of its tenant's; it resumes next unless it `yielded` its slot to
        another tenant (then its tenant keeps its place in the turn order)."""
        self.running.remove(seq)
        self._release_blocks(seq)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq, resume_next=not yielded)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _release_blocks(self, seq: Sequence) -> None:
        self.kv.free(seq.blocks)
        seq.num_computed_tokens = 0

    # ---- after the step ------------------------------------------------------------------------
    def register_full_blocks(self, seq: Sequence) -> None:
        """Make the request's newly filled blocks findable by later requests of the same tenant."""
        table, full = seq.blocks, seq.num_computed_tokens // self.block_size
        if len(table.block_hashes) >= full and (table.num_registered >= full
                                                or table.num_registered >= len(table.block_ids)):
            return                  # nothing new (the KV manager's own conditions, checked here cheaply)
        self.kv.register_full_blocks(seq.blocks, seq.num_computed_tokens, seq.token_slice, seq.request.tenant)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted request wherever it is and release what it holds; a request
        of a session first hands its full cached blocks to the session's pin."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return
        tenant = seq.request.tenant
        self.tenant_requests[tenant] -= 1
        if not self.tenant_requests[tenant]:
            del self.tenant_requests[tenant]
            if self.fair_step_tokens:
                self.lingering[tenant] = self.clock()
        if seq.request.session_id is not None:
            self.kv.pin_to_session(seq.blocks, seq.request.tenant, seq.request.session_id, seq.all_token_ids)
        self._release_blocks(seq)
        seq.status = SequenceStatus.FINISHED

    def check_integrity(self) -> None:
        """The KV manager's invariants, with every request this scheduler knows of as a holder."""
        self.kv.check_integrity([s.blocks for s in self.running] + [s.blocks for s in self.waiting])
