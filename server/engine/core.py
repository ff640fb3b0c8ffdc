"""The engine core: admission, the table of live requests, and the step
`schedule → execute → sample → update`.

It knows nothing of threads or event loops: the front (`engine.py`) calls `admit` from the HTTP side
and `add`, `abort`, `expire_sessions` and `step` from its loop. What the step mutates (scheduler, KV
manager, request table) is guarded by `lock`, which session queries from other threads take too;
the model runs outside it. Kept apart so that it can later run in a process of its own, with the
front passing requests in and outputs out.

A request the engine can never serve is refused at admission with a typed error
(`server/engine/errors.py`); an exception inside a step fails that step's requests and the step
reports it (the front decides when too many failures mean the engine is dead).
"""
from __future__ import annotations

import logging
import threading
import time
from itertools import repeat
from typing import Callable

import numpy as np
import torch
from torch import nn

from model.cache.kv_cache import KVCache
from model.cache.kv_manager import KVCacheManager
from model.cache.tiers import CacheTiers
from server.config import EngineConfig
from server.engine.errors import CacheTooSmallError, ContextLengthError, InvalidRequestError, QueueFullError
from server.engine.input_batch import PersistentBatch
from server.engine.output import OutputProcessor
from server.engine.overlap import StepPipeline
from server.engine.results import EngineObserver, RequestOutput
from server.engine.request import GenerationRequest
from server.engine.sampler import NO_TOKEN, Sampler, SamplingRow, make_generator
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.speculation import Speculation, split_draft_logits
from server.executor.runner import ModelRunner
from server.executor.thread_governor import governor_for_this_process

log = logging.getLogger("customllm.engine")


class EngineCore:
    def __init__(self, model: nn.Module, cache: KVCache, tokenizer, config: EngineConfig,
                 device: torch.device, observer: EngineObserver, stop_token_ids: tuple[int, ...] = (),
                 small_step_model: nn.Module | None = None, decode_graphs=None):
        self.config = config
        self.device = device
        self.observer = observer
        self.max_context = model.config.max_context
        self.vocab_size = model.config.vocab_size
        self.window = getattr(model.config, "sliding_window", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = model.config.eos_token_id if eos is None else eos
        self.eos_token_ids = tuple(sorted({t for t in (eos, *stop_token_ids) if t is not None}))

        assert decode_graphs is None or decode_graphs.scratch_block == cache.scratch_block
        tiers = CacheTiers.open(cache, model, config.kv_disk_dir, config.kv_disk_gib, config.kv_host_gib, observer)
        self.kv = KVCacheManager.for_cache(
            cache, self.window, tiers, max_sessions=config.max_sessions, idle_ttl_s=config.session_idle_ttl_s,
            max_pinned_fraction=config.max_session_pinned_fraction,
            on_session_evicted=lambda: self.observer.on_session_evicted())
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   speculative=config.num_speculative_tokens > 0,
                                   fair_step_tokens=config.fair_step_tokens)
        self.runner = ModelRunner(model, cache, device, small_step_model=small_step_model,
                                  decode_graphs=decode_graphs)
        # (not with overlapped steps: their forward runs on a worker thread with its own thread count)
        self.threads = governor_for_this_process(torch.get_num_threads()) \
            if config.adaptive_threads and device.type == "cpu" and not config.overlap_steps else None
        self.sampler = Sampler()
        # prompt-lookup speculation for the requests that ask for it (server/engine/speculation.py)
        self.speculation = Speculation(config.num_speculative_tokens, config.prompt_lookup_max,
                                       config.prompt_lookup_min, self.max_context, self.sampler) \
            if config.num_speculative_tokens > 0 else None
        # decode steps take their inputs from the persistent batch (not with a sliding window, whose
        # tables lose entries behind it; those steps are built from chunks like prefill steps)
        self.batch = None if self.window is not None else PersistentBatch(
            config.max_num_seqs, -(-self.max_context // self.kv.block_size) + 1, self.vocab_size)
        # decode steps pipelined one deep, the host's work overlapping the forward (server/engine/overlap.py)
        self.pipeline = StepPipeline(self) if config.overlap_steps and self.batch is not None else None
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, self.max_context, observer, config.detokenize)
        self.requests: dict[str, Sequence] = {}
        self.lock = threading.RLock()

    # ---- admission (any thread) -----------------------------------------------------------------
    def validate_request(self, request: GenerationRequest) -> None:
        """InvalidRequestError (or a subclass: ContextLengthError, CacheTooSmallError) for a request
        this engine can never serve."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("the prompt must contain at least one token", "prompt")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        request.params.validate(self.vocab_size)
        if request.params.speculative and self.speculation is None:
            raise InvalidRequestError("speculative_decoding: this server does not speculate (it is started without "
                                      "--num-speculative-tokens)", "speculative_decoding")
        total = len(prompt) + request.params.max_tokens
        if total > self.max_context:
            raise ContextLengthError(self.max_context, len(prompt), request.params.max_tokens, "max_tokens")
        capacity = self.kv.capacity_tokens
        if (needed := self.kv_tokens_held_at_most(total)) > capacity:
            raise CacheTooSmallError(needed, capacity)

    def kv_tokens_held_at_most(self, total_tokens: int) -> int:
        """Cache a request of `total_tokens` holds at its peak: all of them, or with a sliding window
        the window, one chunk and the two blocks its edges may fall inside."""
        if self.window is None:
            return total_tokens
        return min(total_tokens, self.window + self.config.max_num_batched_tokens + 2 * self.kv.block_size)

    def admit(self, request: GenerationRequest, emit: Callable[[RequestOutput], None], num_waiting: int) -> Sequence:
        """Validate a request and enter it in the request table (`num_waiting`: requests queued
        before it, QueueFullError at the limit); `add` then queues it for scheduling."""
        self.validate_request(request)
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if num_waiting >= self.config.max_waiting_requests:
            raise QueueFullError(f"{num_waiting} requests are already waiting")
        # with API keys each key is a tenant with its own limit; without them ("") the one tenant is the
        # whole server, which the global limit bounds
        tenant_limit = self.config.waiting_per_tenant_limit
        if request.tenant and self.num_waiting_of(request.tenant) >= tenant_limit:
            raise QueueFullError(f"this tenant already has {tenant_limit} requests waiting")
        seq = Sequence(request, emit)
        params = request.params
        if params.seed is not None and not params.greedy:
            seq.generator = make_generator(params.seed, self.device)
        self.output.start(seq)
        seq.sampling_row = SamplingRow(params, request.prompt_token_ids, seq.output_token_ids, seq.generator,
                                       self.eos_token_ids, seq.grammar)
        self.requests[request.request_id] = seq
        return seq

    def num_waiting_of(self, tenant: str) -> int:
        """The tenant's admitted requests not yet running (queued, or still in the engine's inbox);
        any thread may ask (it reads a snapshot of the request table)."""
        return sum(1 for seq in list(self.requests.values())
                   if seq.status is SequenceStatus.WAITING and seq.request.tenant == tenant)

    # ---- the loop's calls -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue an admitted request (unless it was aborted meanwhile)."""
        with self.lock:
            if self.requests.get(seq.request_id) is seq:
                self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        with self.lock:
            seq = self.requests.get(request_id)
            if seq is not None:
                self.finish(seq, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or (self.pipeline is not None and self.pipeline.in_flight is not None)

    def on_idle(self) -> None:
        """The loop is about to wait for work."""
        if self.threads is not None:
            self.threads.idle()

    def expire_sessions(self) -> None:
        with self.lock:
            self.kv.expire_sessions()

    def fail_all(self, message: str) -> None:
        """Finish every live request with an error (the engine is going down)."""
        if self.pipeline is not None:
            self.pipeline.discard()
        with self.lock:
            for seq in list(self.requests.values()):
                self.finish(seq, "error", error=message)

    def step(self) -> bool:
        """One `schedule → execute → sample → update`. False if the step failed (its requests then
        finish with an error)."""
        if self.pipeline is not None and self.pipeline.in_flight is not None:
            return self.pipeline.advance()
        if self.threads is not None:
            self.threads.poll()
        with self.lock:
            out = self.scheduler.schedule()
        for seq in out.preempted:
            if self.batch is not None:
                self.batch.release(seq)
            self.observer.on_preemption()
        for queried, hit in out.prefix_queries:
            self.observer.on_prefix_cache_query(queried, hit)
        if not out.chunks:
            self._fail_unschedulable(out.restoring)
            if out.restoring:      # nothing to run until a slower cache tier has read their blocks
                self.kv.wait_for_restores([seq.blocks for seq in out.restoring], timeout=0.05)
            return True
        now = time.monotonic()
        for chunk in out.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = now
        decodes = out.num_decodes == len(out.chunks)    # every chunk: one known token, then a sample
        sampling = out.chunks if decodes else [c for c in out.chunks if c.completes_prompt]
        speculating = [c for c in sampling if c.draft_token_ids] if self.scheduler.speculative else []
        plain_sampling = [c for c in sampling if not c.draft_token_ids] if speculating else sampling
        table = None                            # the sampling rows' parameters, from the persistent batch
        advance = None                          # (rows, positions) of a plain decode step's batch rows
        try:
            inputs = None
            if self.batch is not None and (decodes or all((c.num_known_tokens if speculating else c.num_tokens) == 1
                                                          for c in out.chunks)):
                inputs = self.batch.gather(out.chunks)
            if inputs is not None and self.pipeline is not None and not speculating \
                    and self.pipeline.can_start(out.chunks):
                self.pipeline.start(out.chunks, inputs)     # its outputs come with the next step
                return True
            if inputs is not None:
                token_ids, positions, tables, rows = inputs
                needs = (np.ones(len(out.chunks), dtype=bool) if decodes
                         else np.array([c.completes_prompt for c in out.chunks], dtype=bool))
                plain = needs
                if speculating:                 # one entry per known token and draft
                    plain = needs & np.array([not c.draft_token_ids for c in out.chunks], dtype=bool)
                    needs = np.repeat(needs, [c.num_tokens for c in out.chunks])
                table = torch.from_numpy(self.batch.sampling.numpy()[rows[plain]])    # [B, 4] (numpy indexing: cheaper)
                if decodes and not speculating:
                    advance = rows, positions + 1
                logits = self.runner.execute_batch(self.runner.build_decode_batch(token_ids, positions, tables,
                                                                                  needs))          # [N, V]
            else:
                block_size = self.kv.block_size
                chunks = [c.sequence_chunk(block_size) for c in out.chunks]
                logits = (self.runner.execute(chunks, [c.num_logits for c in out.chunks]) if speculating
                          else self.runner.execute(chunks))                                        # [N, V]
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
            log.exception("engine step failed: %s", exc)
            with self.lock:
                for chunk in out.chunks:
                    self.finish(chunk.seq, "error", error=f"internal error during generation: {exc}")
            return False
        verified = []
        if speculating:
            logits, draft_logits = split_draft_logits(logits, sampling)
            verified = self.speculation.verify(draft_logits, [(c.seq, c.draft_token_ids) for c in speculating],
                                               self.eos_token_ids)
            self.observer.on_spec_decode(len(speculating), sum(len(c.draft_token_ids) for c in speculating),
                                         sum(v.num_accepted for v in verified))
        sampling_rows = [chunk.seq.sampling_row for chunk in plain_sampling]
        plain = not any(row.params.wants_logits_processors for row in sampling_rows)
        sampled = self.sample_rows(logits, sampling_rows, table, plain)
        self.observer.on_step(out.num_tokens, out.shared)
        now = time.monotonic()
        with self.lock:
            register_full_blocks = self.scheduler.register_full_blocks
            for chunk in out.chunks:
                if chunk.draft_token_ids:
                    chunk.seq.num_computed_tokens += chunk.num_known_tokens
                else:
                    chunk.seq.num_computed_tokens += chunk.num_tokens
                    register_full_blocks(chunk.seq)
            if advance is not None:             # every row computes its new token next
                advance_rows, advance_positions = advance
                self.batch.advance_rows(advance_rows, np.array([token for token, _, _ in sampled], dtype=np.int64),
                                        advance_positions)
            for chunk, (token, logprob, error) in zip(plain_sampling, sampled):
                if error is None:
                    self.append_token(chunk.seq, token, logprob, now, advance is None)
                else:
                    self.append_tokens(chunk.seq, [], [logprob], error, now)
            for chunk, result in zip(speculating, verified):
                self.append_tokens(chunk.seq, result.token_ids, result.logprobs, result.error, now, verified=True)
        return True

    def append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list, error: str | None, now: float,
                verified: bool = False) -> None:
        """Append a step's tokens to a request one at a time, as if each came in its own step (one
        that ends the request drops the rest), then finish it (with `error` when given, after the
        tokens) or propose its next drafts. After a `verified` step (drafts) the positions computed
        are those before the last token kept, so the blocks registered hold accepted tokens only
        (caller holds `lock`)."""
        last = None
        for token, logprob in zip(tokens, logprobs):
            last = self.output.append_token(seq, token, logprob, now)
            if last is not None:
                break
        if verified and tokens:
            seq.num_computed_tokens = seq.num_tokens - 1
            self.scheduler.register_full_blocks(seq)
        if error is not None and last is None:
            self.finish(seq, "error", error=error)
            return
        if self.batch is not None and tokens:
            self.batch.advance(seq, seq.output_token_ids[-1])
        if last is not None:
            self.finish(seq, last.finish_reason, last=last)
        elif self.speculation is not None:
            self.speculation.propose(seq)

    def append_token(self, seq: Sequence, token: int, logprob, now: float, advance: bool = True) -> None:
        """`append_tokens` of one sampled token and no error (a plain step's case), without its lists
        (`advance` False: the caller has advanced the request's batch row already)."""
        last = self.output.append_token(seq, token, logprob, now)
        if advance and self.batch is not None:
            self.batch.advance(seq, token)
        if last is not None:
            self.finish(seq, last.finish_reason, last=last)
        elif self.speculation is not None:
            self.speculation.propose(seq)

    def sample_rows(self, logits: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor | None = None,
                plain: bool = False) -> list[tuple[int, object, str | None]]:
        """(token, logprob, error) per row. One row's failure stays that row's: the batch is sampled
        at once, and only if that raises is each row sampled on its own, so that a request whose
        parameters break sampling fails alone instead of failing its batch neighbours. A row with
        nothing to sample from (NaN or no finite logit) gets an error, never a token."""
        if not rows:
            return []
        try:
            out = self.sampler(logits, rows, table, plain)
            if NO_TOKEN not in out.token_ids:
                return list(zip(out.token_ids, out.logprobs, repeat(None)))
            return [self._checked(token, logprob) for token, logprob in zip(out.token_ids, out.logprobs)]
        except Exception as exc:  # noqa: BLE001 - find the rows that fail, serve the others
            log.warning("sampling a batch of %d failed (%s); sampling its rows one by one", len(rows), exc)
        results = []
        for i, row in enumerate(rows):
            try:
                one = self.sampler(logits[i:i + 1], [row])
                results.append(self._checked(one.token_ids[0], one.logprobs[0]))
            except Exception as exc:  # noqa: BLE001
                results.append((NO_TOKEN, None, f"internal error while sampling: {exc}"))
        return results

    @staticmethod
    def _checked(token: int, logprob) -> tuple[int, object, str | None]:
        if token == NO_TOKEN:
            return NO_TOKEN, None, ("the model's logits for this request had no finite value to sample from "
                                    "(NaN, or -inf everywhere)")
        return token, logprob, None

    def _fail_unschedulable(self, restoring: list[Sequence]) -> None:
        """Nothing could be scheduled although requests wait: the first one not waiting for a restore
        cannot get cache blocks even with nothing running. Fail it rather than spin."""
        with self.lock:
            waiting = [s for s in self.scheduler.waiting if all(s is not r for r in restoring)]
            if not self.scheduler.running and waiting:
                self.finish(waiting[0], "error", error="the request does not fit in the free KV cache")

    def finish(self, seq: Sequence, reason: str, error: str | None = None, last: RequestOutput | None = None) -> None:
        """Release what the request holds and send its last output (caller holds `lock`)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self.scheduler.finish(seq)
        if self.batch is not None:
            self.batch.release(seq)
        self.requests.pop(seq.request_id, None)
        self.output.finish(seq, reason, error, last)

    # ---- sessions and invariants (any thread) ---------------------------------------------------
    def list_sessions(self, tenant: str):
        with self.lock:
            return self.kv.list_sessions(tenant)

    def get_session(self, tenant: str, session_id: str):
        with self.lock:
            return self.kv.get_session(tenant, session_id)

    def release_session(self, tenant: str, session_id: str) -> bool:
        with self.lock:
            return self.kv.release_session(tenant, session_id)

    def check_integrity(self) -> None:
        with self.lock:
            self.scheduler.check_integrity()

    def close(self) -> None:
        """The loop has stopped: write what the cache tiers still hold queued and stop their threads."""
        if self.pipeline is not None:
            self.pipeline.close()
        self.kv.close()
