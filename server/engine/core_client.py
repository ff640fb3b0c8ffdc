"""The API process's side of an engine core running in its own process (server/engine/core_process.py).

`EngineCoreClient` offers what the HTTP layer uses of an in-process `Engine` (generate, abort,
check_room, sessions, gauges, alive, drain, stop) and owns the core's process: it spawns it, waits
for its `Ready`, and watches it. One receiver thread reads the core's messages and the process's exit
together (a ZeroMQ poll on the socket and the process sentinel): a step's outputs reach each event loop
with one `call_soon_threadsafe`, a lagging stream finds them merged (OutputStream); a core that exits
without being asked to is seen at once: every in-flight request ends with an error output, `alive`
turns false (/health answers 503) and `run_forever` returns (the server then exits non-zero).

The tokenizer, chat template and grammar compiler live here too (read from the same files as the
core's): prompts are tokenized and grammars checked before a request crosses to the core, which
compiles each grammar again for its own matcher (cached). The core sends token ids; their text and
the stop strings are made here (front_text.py), and a request a stop string ends is then aborted in
the core with reason "stop".
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import tempfile
import threading
from collections import Counter
from typing import AsyncIterator

import msgspec
import zmq

from model.cache.sessions import SessionInfo
from server.config import ServerConfig
from server.engine import wire
from server.engine.core_process import core_main
from server.engine.streams import OutputStream, hand_over
from server.engine.errors import (EngineDeadError, EngineShuttingDownError, InvalidRequestError, QueueFullError)
from server.engine.front_text import RequestText
from server.engine.request import GenerationRequest
from server.engine.results import EngineObserver, NullObserver, RequestOutput

log = logging.getLogger("customllm.engine")
QUERY_TIMEOUT_S = 10.0
EXIT_GRACE_S = 10.0


class _RemoteCache:
    """`engine.kv` as the metrics read it: the tiers' sizes from the core's last gauges."""

    def __init__(self, client: "EngineCoreClient"):
        self._client = client

    def tier_bytes_used(self, tier: str) -> int:
        gauges = self._client.gauges
        return gauges.host_tier_bytes if tier == "host" else gauges.disk_tier_bytes if tier == "disk" else 0


class EngineCoreClient:
    def __init__(self, config: ServerConfig, observer: EngineObserver | None = None, log_level: str = "info"):
        self.config = config
        self.observer: EngineObserver = observer or NullObserver()
        self.log_level = log_level
        self.gauges = wire.Gauges()
        self.kv = _RemoteCache(self)
        self.model_name = self.tokenizer = self.chat_template = self.grammars = None
        self.max_context = self.vocab_size = 0
        self._ready: wire.Ready | None = None
        self._ready_event = threading.Event()
        self._closed = threading.Event()
        self._dead_message: str | None = None
        self._accepting = True
        self._stopping = False
        self._lock = threading.Lock()
        self._streams: dict[str, OutputStream] = {}
        self._unstarted: dict[str, str] = {}          # request id → tenant, until its first output
        self._replies: dict[int, list] = {}           # query id → [event, Reply | None]
        self._query_ids = itertools.count()
        self._ipc_dir = tempfile.TemporaryDirectory(prefix="customllm-core-")
        self._context = zmq.Context()
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.LINGER, 0)
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.setsockopt(zmq.LINGER, 0)
        to_core, to_front = (f"ipc://{self._ipc_dir.name}/{name}" for name in ("to-core", "to-front"))
        self._to_core.bind(to_core)
        self._from_core.bind(to_front)
        self._send_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(target=core_main, name="customllm-engine-core", daemon=False,
                                     args=(config, to_core, to_front, os.getpid(), log_level))
        self._receiver = threading.Thread(target=self._receive, name="core-receiver", daemon=True)
        # set once `start` has the process: an exception while it spawns can end `start` before then, and a
        # child spawned that far reads no parent data and exits by itself (serve holds its stop-while-
        # loading signal until the spawn is done, so that child does not print a traceback)
        self._process_started = False

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "EngineCoreClient":
        self.process.start()
        self._process_started = True
        log.info("engine core process started (pid %d); loading the model there", self.process.pid)
        self._receiver.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the core has loaded its model (RuntimeError if it failed or exited first),
        then load the tokenizer, chat template and grammar compiler on this side."""
        while not self._ready_event.wait(timeout=0.1 if timeout is None else min(0.1, timeout)):
            if self._closed.is_set():
                raise RuntimeError(self._dead_message or f"the engine core process exited ({self.process.exitcode})")
            if timeout is not None:
                timeout -= 0.1
                if timeout <= 0:
                    raise TimeoutError("the engine core did not become ready")
        ready = self._ready
        from model.text.chat_template import ChatTemplate
        from model.text.tokenizer import load_tokenizer
        from server.engine.detokenizer import byte_view, whole_texts
        from server.engine.grammar import GrammarCompiler
        from server.executor.build import special_token_texts
        self.tokenizer = load_tokenizer(ready.tokenizer_source, self.config.model.byte_level_decoder)
        self.chat_template = (ChatTemplate(ready.chat_template_source, **special_token_texts(self.tokenizer))
                              if ready.chat_template_source else None)
        self.grammars = GrammarCompiler(self.tokenizer, ready.vocab_size, tuple(ready.eos_token_ids),
                                        cache_size=self.config.engine.grammar_cache_size,
                                        wrap_up=self.config.engine.grammar_wrap_up)
        self.max_context, self.vocab_size = ready.max_context, ready.vocab_size
        self.model_name = ready.model_name
        self._byte_view = byte_view(self.tokenizer)
        self._byte_texts = whole_texts(self._byte_view) if self._byte_view is not None else None
        self._eos_token_ids = tuple(ready.eos_token_ids)

    def run_forever(self) -> int | None:
        """Block until the core process has exited; its exit code."""
        self._closed.wait()
        return self.process.exitcode

    def drain(self, grace_s: float) -> None:
        """Stop taking requests; the core lets running ones finish within `grace_s`, aborts the rest,
        sends their last outputs and exits."""
        self._accepting = False
        self._stopping = True
        if self.process.is_alive():
            self._send(wire.Drain(grace_s))
        self._closed.wait(timeout=grace_s + EXIT_GRACE_S)

    def stop(self) -> None:
        """Stop the core (drained at once if still running, killed if it does not exit) and release
        the sockets; safe to call more than once."""
        self._stopping = True
        self._accepting = False
        with self._stop_lock:
            if not self._context.closed:
                self._stop()

    def _stop(self) -> None:
        if self._process_started:
            if self.process.is_alive():
                self._send(wire.Drain(0.0))
                self.process.join(timeout=EXIT_GRACE_S)
            if self.process.is_alive():
                log.warning("the engine core did not stop within %.0f s: killing it", EXIT_GRACE_S)
                self.process.kill()
            self.process.join(timeout=EXIT_GRACE_S)
            self._closed.wait(timeout=EXIT_GRACE_S)
        if self._receiver.ident is not None:           # started
            self._receiver.join(timeout=EXIT_GRACE_S)
        if self.grammars is not None:
            self.grammars.close()
        self._to_core.close()
        self._from_core.close()
        self._context.term()
        self._ipc_dir.cleanup()

    @property
    def alive(self) -> bool:
        return self._ready_event.is_set() and self._dead_message is None and not self._closed.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ---- gauges (the core's, as of its last message) -----------------------------------------------
    num_running = property(lambda self: self.gauges.num_running)
    num_waiting = property(lambda self: self.gauges.num_waiting)
    num_requests = property(lambda self: self.gauges.num_requests)
    kv_cache_usage = property(lambda self: self.gauges.kv_cache_usage)
    num_sessions = property(lambda self: self.gauges.num_sessions)
    session_cached_tokens = property(lambda self: self.gauges.session_cached_tokens)

    # ---- requests -------------------------------------------------------------------------------
    def check_room(self, tenant: str, count: int) -> None:
        """QueueFullError now if `count` more requests would overfill the queue, counting the requests
        sent to the core that have no output yet (the core's admission still decides)."""
        ready = self._ready
        if ready is None:
            return
        with self._lock:
            unstarted = list(self._unstarted.values())
        if len(unstarted) + count > ready.max_waiting_requests:
            raise QueueFullError(f"{len(unstarted)} requests are already waiting")
        limit = ready.waiting_per_tenant_limit
        if tenant and Counter(unstarted)[tenant] + count > limit:
            raise QueueFullError(f"this tenant already has requests waiting, and at most {limit} may wait")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; the last has `finished`. Leaving the iteration early aborts it."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if not self._accepting:
            raise EngineShuttingDownError("the server is shutting down")
        request_id = request.request_id
        stream = OutputStream(asyncio.get_running_loop(), request_id)
        text = RequestText(self.tokenizer, self._byte_view, request, self._eos_token_ids, self._byte_texts)
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._unstarted[request_id] = request.tenant
        finished = False
        try:
            self._send(wire.add_request(request, with_stop_strings=False))
            while not finished:
                output = text.apply(await stream.get(), stream.cached_tokens)
                finished = output.finished
                yield output
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
                self._unstarted.pop(request_id, None)
            if text.stopped_by_string:      # the core has not seen the stop string: end the request there
                self._send(wire.Abort([request_id], "stop"))
            elif not finished and self.alive:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(wire.Abort([request_id]))

    def _send(self, message) -> None:
        self._send_bytes(wire.encode(message))

    def _send_bytes(self, data: bytes) -> None:
        with self._send_lock:
            self._to_core.send(data, copy=False)

    # ---- sessions and invariants ------------------------------------------------------------------
    def _query(self, kind: str, tenant: str = "", session_id: str = ""):
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        query_id = next(self._query_ids)
        slot = [threading.Event(), None]
        with self._lock:
            self._replies[query_id] = slot
        try:
            self._send(wire.Query(query_id, kind, tenant, session_id))
            if not slot[0].wait(QUERY_TIMEOUT_S) or slot[1] is None:
                raise EngineDeadError(f"the engine core did not answer a {kind} query")
        finally:
            with self._lock:
                self._replies.pop(query_id, None)
        reply: wire.Reply = slot[1]
        if reply.error is not None:
            raise RuntimeError(f"the engine core could not answer a {kind} query: {reply.error}")
        return reply.result

    def list_sessions(self, tenant: str) -> list[SessionInfo]:
        return [SessionInfo(**info) for info in self._query("list_sessions", tenant)]

    def get_session(self, tenant: str, session_id: str) -> SessionInfo | None:
        info = self._query("get_session", tenant, session_id)
        return None if info is None else SessionInfo(**info)

    def release_session(self, tenant: str, session_id: str) -> bool:
        return bool(self._query("release_session", tenant, session_id))

    def check_integrity(self) -> int:
        """After everything sent before it was handled: the scheduler's and block pool's invariants
        (AssertionError when they fail); the number of requests the core still holds."""
        try:
            return int(self._query("check_integrity"))
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None

    # ---- the receiver thread ----------------------------------------------------------------------
    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._from_core, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll(1000))
            if self._from_core in events:
                self._read_available()
            if self.process.sentinel in events:
                break
        # the process has exited: read what it sent before exiting, then report
        while poller.poll(100) and self._read_available():
            pass
        self.process.join()
        self._on_core_exit(self.process.exitcode)

    def _read_available(self) -> int:
        count = 0
        while True:
            try:
                data = self._from_core.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return count
            count += 1
            try:
                message = wire.decode_to_front(data.bytes)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("dropped a malformed message from the engine core: %s", exc)
                continue
            try:
                self._dispatch(message)
            except Exception as exc:  # noqa: BLE001 - the receiver must outlive one bad message
                log.exception("could not handle a %s message from the engine core: %s", type(message).__name__, exc)

    def _dispatch(self, message) -> None:
        if isinstance(message, wire.Outputs):
            self.gauges = message.gauges
            self._deliver_outputs(message.outputs)
            for event in message.events:
                self._observe(event)
        elif isinstance(message, wire.Rejected):
            with self._lock:
                stream = self._streams.pop(message.request_id, None)
                self._unstarted.pop(message.request_id, None)
            if stream is not None:
                self._call_soon(stream.loop, stream.fail, wire.rejection_error(message))
        elif isinstance(message, wire.Reply):
            with self._lock:
                slot = self._replies.get(message.query_id)
            if slot is not None:
                slot[1] = message
                slot[0].set()
        elif isinstance(message, wire.Ready):
            self._ready = message
            self._ready_event.set()
        elif isinstance(message, wire.Dead):
            self._dead_message = message.message
            log.error("engine core: %s", message.message)
            self._fail_all(message.message)

    def _deliver_outputs(self, outputs: list[wire.WireOutput]) -> None:
        items = []
        with self._lock:
            for w in outputs:
                stream = self._streams.get(w.request_id)
                if stream is None:          # aborted here meanwhile
                    continue
                self._unstarted.pop(w.request_id, None)
                stream.cached_tokens = w.cached_tokens
                if w.finish_reason is not None:
                    del self._streams[w.request_id]
                items.append((stream, wire.request_output(w)))
        hand_over(items)          # a stream whose event loop is gone has nobody to read it

    def _call_soon(self, loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # that event loop is gone: nobody reads these requests any more
            pass

    def _observe(self, event: list) -> None:
        if not event or not isinstance(event[0], str) or event[0] not in wire.OBSERVER_EVENTS:
            return
        try:
            arguments = wire.OBSERVER_EVENTS[event[0]](*event[1:])
        except (TypeError, ValueError, IndexError):
            log.debug("dropped a malformed metrics event %r", event[:1])
            return
        getattr(self.observer, event[0])(*arguments)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            self._unstarted.clear()
            for slot in self._replies.values():
                slot[0].set()
        hand_over([(stream, RequestOutput(stream.request_id, finish_reason="error", error=message))
                   for stream in streams])

    def _on_core_exit(self, exitcode: int | None) -> None:
        asked = self._stopping and exitcode == 0
        if not asked:
            message = self._dead_message or f"the engine core process exited unexpectedly (exit code {exitcode})"
            self._dead_message = message
            log.error("%s", message)
        self._fail_all(self._dead_message or "the engine stopped")
        self._closed.set()
