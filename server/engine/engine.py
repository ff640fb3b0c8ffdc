"""The engine's front: the loop thread and its inbox, and the asyncio-facing API (`generate`,
`submit`, `abort`, `drain`, gauges, sessions) the HTTP layer uses.

The work itself is the core's (`core.py`: admission, the request table, `schedule → execute →
sample → update`, output processing through `output.py`). Thread model: the HTTP event loop only
admits and enqueues (new requests, aborts) and reads gauges; the loop thread drains the inbox and
runs the core's steps, which mutate the scheduler and KV manager under the core's lock (session
endpoints take it too). Outputs of `generate` streams cross back in batches: what a step (or an
inbox pass) emitted is handed to each event loop with one `loop.call_soon_threadsafe`, not one per
token, and lands in the request's `OutputStream` (`streams.py`); a consumer that lags finds several deltas there
and gets them merged into one (text, token ids and logprobs concatenated). An exception inside a step fails that step's requests and the loop goes on; an exception
outside a step (or repeated step failures) marks the engine dead so /health reports it, and every
caller gets a final error output instead of hanging.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable

import torch
from torch import nn

from model.cache.kv_cache import KVCache
from model.cache.kv_manager import KVCacheManager
from server.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.errors import EngineDeadError, EngineShuttingDownError, QueueFullError
from server.engine.grammar import GrammarCompiler
from server.engine.results import EngineObserver, NullObserver, RequestOutput
from server.engine.request import GenerationRequest
from server.engine.streams import OutputStream, hand_over, merge_outputs

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
        self.tokenizer_source: str | None = None      # the tokenizer's file (build_engine sets it)
        self.model_config = model.config
        self.max_context = model.config.max_context
        self.vocab_size = model.config.vocab_size
        self.device = torch.device(device)
        self.observer: EngineObserver = observer or NullObserver()
        self.core = EngineCore(model, cache, tokenizer, config, self.device, self.observer,
                               stop_token_ids=stop_token_ids, small_step_model=small_step_model,
                               decode_graphs=decode_graphs)
        # structured outputs: grammars compiled for this vocabulary, off the loop (server/engine/grammar.py)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.core.eos_token_ids,
                                        cache_size=config.grammar_cache_size, wrap_up=config.grammar_wrap_up)

        self._inbox: deque[tuple[str, object]] = deque()
        self._wakeup = threading.Event()
        self._idle = threading.Condition()
        self._alive = True
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._loop_done = threading.Event()
        self._last_expiry = 0.0
        # what `generate` streams were sent since the last hand-off (engine thread only)
        self._outbox: list[tuple[OutputStream, RequestOutput]] = []
        self._loop_thread_id: int | None = None
        # called by the loop after each hand-off (the engine-core process sends its outputs there)
        self.on_outputs_flushed: Callable[[], None] | None = None

    # ---- gauges ---------------------------------------------------------------------------------
    @property
    def kv(self) -> KVCacheManager:
        return self.core.kv

    @property
    def alive(self) -> bool:
        return self._alive and self._started.is_set() and not self._loop_done.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def num_running(self) -> int:
        return len(self.core.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting) + sum(1 for kind, _ in list(self._inbox) if kind == "add")

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
        return len(self.core.requests)

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
        self.grammars.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            # not a thread join: under run_forever the loop's thread (the main one) goes on afterwards
            self._loop_done.wait(timeout=30)

    def drain(self, grace_s: float) -> None:
        """Stop taking requests, let running ones finish within `grace_s`, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        with self._idle:
            while self.core.requests and self.alive and time.monotonic() < deadline:
                self._idle.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        for request_id in list(self.core.requests):
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
        self.core.validate_request(request)

    def kv_tokens_held_at_most(self, total_tokens: int) -> int:
        return self.core.kv_tokens_held_at_most(total_tokens)

    def check_room(self, tenant: str, count: int) -> None:
        """QueueFullError now if `count` more requests of `tenant` would be refused at admission: a
        flood's refusals then cost no tokenizing or engine work. (Admission still decides.)"""
        if self.num_waiting + count > self.core.config.max_waiting_requests:
            raise QueueFullError(f"{self.num_waiting} requests are already waiting")
        limit = self.core.config.waiting_per_tenant_limit
        if tenant and self.core.num_waiting_of(tenant) + count > limit:
            raise QueueFullError(f"this tenant already has requests waiting, and at most {limit} may wait")

    def submit(self, request: GenerationRequest, emit) -> None:
        """Queue a request whose outputs go to `emit(RequestOutput)` (called on the engine thread)."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if not self._accepting:
            raise EngineShuttingDownError("the server is shutting down")
        seq = self.core.admit(request, emit, self.num_waiting)
        self._inbox.append(("add", seq))
        self._wakeup.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; the last has `finished`. Leaving the iteration early aborts it."""
        stream = OutputStream(asyncio.get_running_loop(), request.request_id)
        outbox = self._outbox

        def emit(output: RequestOutput) -> None:
            if threading.get_ident() == self._loop_thread_id:
                outbox.append((stream, output))         # handed over with the step's other outputs
            else:
                self._hand_over([(stream, output)])

        self.submit(request, emit)
        finished = False
        loop = stream.loop
        try:
            while not finished:
                # `stream.get()` inlined (one coroutine fewer per delta: this runs once per stream and step)
                while not stream._pending:
                    if stream._error is not None:
                        raise stream._error
                    stream._waiter = waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        stream._waiter = None
                pending, stream._pending = stream._pending, []
                output = pending[0] if len(pending) == 1 else merge_outputs(pending)
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """End a request before its next step with `reason` ("abort"; "stop" when a stop string was
        found outside the engine)."""
        self._inbox.append(("abort", (request_id, reason)))
        self._wakeup.set()

    # ---- sessions (HTTP thread) -----------------------------------------------------------------
    def list_sessions(self, tenant: str):
        return self.core.list_sessions(tenant)

    def get_session(self, tenant: str, session_id: str):
        return self.core.get_session(tenant, session_id)

    def release_session(self, tenant: str, session_id: str) -> bool:
        return self.core.release_session(tenant, session_id)

    def check_integrity(self) -> None:
        self.core.check_integrity()

    # ---- the loop -------------------------------------------------------------------------------
    def _hand_over(self, items: list[tuple[OutputStream, RequestOutput]]) -> None:
        """Give streams their outputs (`hand_over`); a request whose event loop is gone is aborted."""
        for request_id in hand_over(items):
            self.abort(request_id)

    def _flush_outbox(self) -> None:
        if self._outbox:
            items = self._outbox[:]
            self._outbox.clear()
            self._hand_over(items)
        if self.on_outputs_flushed is not None:
            self.on_outputs_flushed()

    def _run(self) -> None:
        # intra-op thread settings are per thread: a new thread would otherwise use the default
        torch.set_num_threads(getattr(self, "_num_threads", torch.get_num_threads()))
        self._loop_thread_id = threading.get_ident()
        failures = 0
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._process_inbox()
                self._expire_sessions()
                self._flush_outbox()
                if not self.core.has_work():
                    self.core.on_idle()
                    with self._idle:
                        self._idle.notify_all()
                    self._wakeup.wait(timeout=1.0)
                    continue
                stepped = self.core.step()
                self._flush_outbox()
                if stepped:
                    failures = 0
                else:
                    failures += 1
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise RuntimeError(f"{failures} engine steps failed in a row")
        except Exception as exc:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("engine loop died: %s", exc)
            self._die(f"engine failure: {exc}")
        finally:
            self._flush_outbox()
            self._loop_thread_id = None
            self.core.close()
            self._loop_done.set()
            with self._idle:
                self._idle.notify_all()

    def _die(self, message: str) -> None:
        self._alive = False
        self.core.fail_all(message)
        self._flush_outbox()
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "barrier":
                item.set()

    def _process_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self.core.add(item)
            elif kind == "abort":
                self.core.abort(*item)
            elif kind == "barrier":
                self._flush_outbox()        # what came before the barrier is on its way first
                item.set()

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry >= 1.0:
            self._last_expiry = now
            self.core.expire_sessions()
