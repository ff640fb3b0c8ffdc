"""The engine: a loop thread that runs `schedule → execute → sample → update` over all requests,
and an asyncio-facing API (`generate`, `abort`) for the HTTP layer.

Thread model: the HTTP event loop only enqueues (new requests, aborts) and reads gauges; the engine
thread owns the scheduler, block pool and session table and mutates them under `_lock`, which the
session endpoints also take. Outputs go back with `loop.call_soon_threadsafe` into a per-request
asyncio queue. An exception inside a step fails that step's requests and the loop goes on; an
exception outside a step (or repeated step failures) marks the engine dead so /health reports it,
and every caller gets a final error output instead of hanging.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import AsyncIterator

import torch
from torch import nn

from model.cache.kv_cache import KVCache
from model.cache.kv_manager import KVCacheManager
from server.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.executor.runner import ModelRunner
from server.engine.sampler import Sampler, SamplingRow, make_generator
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.stops import StopStringMatcher
from server.engine.errors import (CacheTooSmallError, ContextLengthError, EngineDeadError, EngineShuttingDownError,
                                  InvalidRequestError, QueueFullError)
from server.engine.outputs import EngineObserver, FinishedRequestStats, NullObserver, RequestOutput, TokenLogprob, Usage
from server.engine.request import GenerationRequest

log = logging.getLogger("customllm.engine")
MAX_CONSECUTIVE_STEP_FAILURES = 3


class Engine:
    def __init__(self, model: nn.Module, cache: KVCache, tokenizer, config: EngineConfig,
                 model_name: str, chat_template=None, device: torch.device | str = "cpu",
                 observer: EngineObserver | None = None, stop_token_ids: tuple[int, ...] = (),
                 small_step_model: nn.Module | None = None, decode_graphs=None):
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.config = config
        self.model_name = model_name
        self.model_config = model.config
        self.max_context = model.config.max_context
        self.vocab_size = model.config.vocab_size
        self.observer: EngineObserver = observer or NullObserver()
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = model.config.eos_token_id if eos is None else eos
        self.eos_token_ids = tuple(sorted({t for t in (eos, *stop_token_ids) if t is not None}))

        assert decode_graphs is None or decode_graphs.scratch_block == cache.scratch_block
        self.window = getattr(model.config, "sliding_window", None)
        self.kv = KVCacheManager.for_cache(
            cache, self.window, max_sessions=config.max_sessions, idle_ttl_s=config.session_idle_ttl_s,
            max_pinned_fraction=config.max_session_pinned_fraction,
            on_session_evicted=lambda: self.observer.on_session_evicted())
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, cache, torch.device(device), small_step_model=small_step_model,
                                  decode_graphs=decode_graphs)
        self.sampler = Sampler()
        self.device = torch.device(device)

        self._lock = threading.RLock()
        self._inbox: deque[tuple[str, object]] = deque()
        self._wakeup = threading.Event()
        self._idle = threading.Condition()
        self._seqs: dict[str, Sequence] = {}
        self._alive = True
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._loop_done = threading.Event()
        self._last_expiry = 0.0

    # ---- gauges ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._alive and self._started.is_set() and not self._loop_done.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + sum(1 for kind, _ in list(self._inbox) if kind == "add")

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def num_sessions(self) -> int:
        return self.kv.num_sessions

    @property
    def session_cached_tokens(self) -> int:
        return self.kv.session_cached_tokens

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a new thread."""
        assert self._thread is None, "engine already started"
        self._num_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        self._started.set()

    def run_forever(self) -> None:
        """Run the loop in the calling thread until `stop()`. The server does this in the main thread:
        on the CPU, oneDNN's float16/bfloat16 kernels use only one core when called from a
        secondary thread (float32 MKL kernels are unaffected)."""
        assert self._thread is None, "engine already started"
        self._thread = threading.current_thread()
        self._started.set()
        self._run()

    def wait_started(self, timeout: float) -> bool:
        """For a client thread started before `run_forever`: True once the loop runs (or has run)."""
        return self._started.wait(timeout)

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # not a thread join: under run_forever the loop's thread (the main one) goes on afterwards
            self._loop_done.wait(timeout=30)

    def drain(self, grace_s: float) -> None:
        """Stop taking requests, let running ones finish within `grace_s`, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        with self._idle:
            while self._seqs and self.alive and time.monotonic() < deadline:
                self._idle.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        for request_id in list(self._seqs):
            self.abort(request_id)
        self.flush_inbox()

    def flush_inbox(self, timeout: float = 30.0) -> bool:
        """Block until the loop has handled everything enqueued before this call (aborts included)."""
        if not self.alive:
            return False
        done = threading.Event()
        self._inbox.append(("barrier", done))
        self._wakeup.set()
        return done.wait(timeout)

    # ---- requests -------------------------------------------------------------------------------
    def validate_request(self, request: GenerationRequest) -> None:
        """Admission: InvalidRequestError (or a subclass: ContextLengthError, CacheTooSmallError) for a
        request this engine can never serve; raised before queueing."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("the prompt must contain at least one token", "prompt")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        request.params.validate(self.vocab_size)
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
        bs = self.kv.block_size
        return min(total_tokens, self.window + self.config.max_num_batched_tokens + 2 * bs)

    def submit(self, request: GenerationRequest, emit) -> None:
        """Queue a request whose outputs go to `emit(RequestOutput)` (called on the engine thread)."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if not self._accepting:
            raise EngineShuttingDownError("the server is shutting down")
        self.validate_request(request)
        if request.request_id in self._seqs:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if self.num_waiting >= self.config.max_waiting_requests:
            raise QueueFullError(f"{self.num_waiting} requests are already waiting")
        seq = Sequence(request, emit)
        params = request.params
        if params.seed is not None and not params.greedy:
            seq.generator = make_generator(params.seed, self.device)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        seq.stop_matcher = StopStringMatcher(params.stop)
        self._seqs[request.request_id] = seq
        self._inbox.append(("add", seq))
        self._wakeup.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; the last has `finished`. Leaving the iteration early aborts it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def emit(output: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, output)
            except RuntimeError:  # the caller's event loop is gone
                self.abort(request.request_id)

        self.submit(request, emit)
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wakeup.set()

    # ---- sessions (HTTP thread) -----------------------------------------------------------------
    def list_sessions(self, tenant: str):
        with self._lock:
            return self.kv.list_sessions(tenant)

    def get_session(self, tenant: str, session_id: str):
        with self._lock:
            return self.kv.get_session(tenant, session_id)

    def release_session(self, tenant: str, session_id: str) -> bool:
        with self._lock:
            return self.kv.release_session(tenant, session_id)

    def check_integrity(self) -> None:
        with self._lock:
            self.scheduler.check_integrity()

    # ---- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        # intra-op thread settings are per thread: a new thread would otherwise use the default
        torch.set_num_threads(getattr(self, "_num_threads", torch.get_num_threads()))
        failures = 0
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._process_inbox()
                self._expire_sessions()
                if not self.scheduler.has_work():
                    with self._idle:
                        self._idle.notify_all()
                    self._wakeup.wait(timeout=1.0)
                    continue
                if self._step():
                    failures = 0
                else:
                    failures += 1
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise RuntimeError(f"{failures} engine steps failed in a row")
        except Exception as exc:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("engine loop died: %s", exc)
            self._die(f"engine failure: {exc}")
        finally:
            self._loop_done.set()
            with self._idle:
                self._idle.notify_all()

    def _die(self, message: str) -> None:
        self._alive = False
        with self._lock:
            for seq in list(self._seqs.values()):
                self._finish(seq, "error", error=message)
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "barrier":
                item.set()

    def _process_inbox(self) -> None:
        with self._lock:
            while self._inbox:
                kind, item = self._inbox.popleft()
                if kind == "add":
                    if item.request.request_id in self._seqs:
                        self.scheduler.add(item)
                elif kind == "abort":
                    seq = self._seqs.get(item)
                    if seq is not None:
                        self._finish(seq, "abort")
                elif kind == "barrier":
                    item.set()

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry >= 1.0:
            self._last_expiry = now
            with self._lock:
                self.kv.expire_sessions()

    def _step(self) -> bool:
        """One `schedule → execute → sample → update`. False if the step failed (its requests then
        finish with an error)."""
        with self._lock:
            out = self.scheduler.schedule()
        for _ in out.preempted:
            self.observer.on_preemption()
        for queried, hit in out.prefix_queries:
            self.observer.on_prefix_cache_query(queried, hit)
        if not out.chunks:
            self._fail_unschedulable()
            return True
        now = time.monotonic()
        for chunk in out.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = now
        sampling = [c for c in out.chunks if c.completes_prompt]
        try:
            logits = self.runner.execute(out.chunks)                              # [N, V]
            rows = [SamplingRow(c.seq.request.params, c.seq.prompt_token_ids, c.seq.output_token_ids,
                                c.seq.generator) for c in sampling]
            sampled = self.sampler(logits, rows) if rows else None
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
            log.exception("engine step failed: %s", exc)
            with self._lock:
                for chunk in out.chunks:
                    self._finish(chunk.seq, "error", error=f"internal error during generation: {exc}")
            return False
        self.observer.on_step(out.num_tokens)
        with self._lock:
            for chunk in out.chunks:
                chunk.seq.num_computed_tokens += chunk.num_tokens
                self.scheduler.register_full_blocks(chunk.seq)
            if sampled is not None:
                for chunk, token, logprob in zip(sampling, sampled.token_ids, sampled.logprobs):
                    self._append_token(chunk.seq, token, logprob)
        return True

    def _fail_unschedulable(self) -> None:
        """Nothing could be scheduled although requests wait: the head of the queue cannot get cache
        blocks even with nothing running. Fail it rather than spin."""
        with self._lock:
            if not self.scheduler.running and self.scheduler.waiting:
                seq = self.scheduler.waiting[0]
                self._finish(seq, "error", error="the request does not fit in the free KV cache")

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        params = seq.request.params
        seq.output_token_ids.append(token)
        seq.record_token_time()
        finish_reason = None
        text, stopped_by_string = "", False
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            finish_reason = "stop"
        else:
            text, stopped_by_string = seq.stop_matcher.feed(seq.detokenizer.push([token]))
            if stopped_by_string:
                finish_reason = "stop"
        if finish_reason is None and (len(seq.output_token_ids) >= params.max_tokens
                                      or seq.num_tokens >= self.max_context):
            finish_reason = "length"
        if finish_reason is not None and not stopped_by_string:
            # release what was held back: an incomplete character, a possible stop-string prefix
            tail, stopped_by_string = seq.stop_matcher.feed(seq.detokenizer.flush())
            text += tail
            if stopped_by_string:
                finish_reason = "stop"
            else:
                text += seq.stop_matcher.flush()
        logprobs = (logprob,) if params.logprobs is not None and logprob is not None else None
        if finish_reason is None:
            seq.emit(RequestOutput(seq.request_id, text, (token,), logprobs))
        else:
            self._finish(seq, finish_reason, text=text, token_ids=(token,), logprobs=logprobs)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, text: str = "",
                token_ids: tuple[int, ...] = (), logprobs=None) -> None:
        """Release what the request holds and send its last output (caller holds `_lock`)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        seq.finish_reason = reason
        cached = seq.num_cached_prompt_tokens or 0
        usage = Usage(len(seq.prompt_token_ids), len(seq.output_token_ids), cached)
        seq.emit(RequestOutput(seq.request_id, text, token_ids, logprobs, reason, error, usage))
        now = time.monotonic()
        arrival = seq.request.arrival_time
        self.observer.on_request_finished(FinishedRequestStats(
            finish_reason=reason, prompt_tokens=usage.prompt_tokens, generation_tokens=usage.completion_tokens,
            cached_tokens=cached, queue_time=(seq.first_scheduled_time or now) - arrival,
            time_to_first_token=None if seq.first_token_time is None else seq.first_token_time - arrival,
            inter_token_latencies=tuple(seq.inter_token_latencies), e2e_latency=now - arrival))
