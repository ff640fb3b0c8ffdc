"""The engine-core process: loads the model, runs the engine loop (schedule → execute → sample) in
its main thread, and talks to the API process over two ZeroMQ sockets (messages: wire.py).

Threads: the main thread runs `Engine.run_forever`; after each of the loop's hand-offs it sends the
step's outputs, gauges and metrics events as one `Outputs` message. The bridge thread receives the
front's messages (requests, aborts, session queries, drain), answers queries, and sends a heartbeat
`Outputs` when the loop is idle. A message that does not decode is logged and dropped.

The process ignores SIGINT and SIGTERM (the API process decides when to drain it) and dies with its
parent: Linux's parent-death signal, and a check of the parent's pid every poll as a fallback.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections import deque

import msgspec
import zmq

from server.engine import wire
from server.engine.errors import InvalidRequestError
from server.engine.grammar import GrammarError, GrammarSpec
from server.engine.results import FinishedRequestStats

log = logging.getLogger("customllm.core")
POLL_MS = 200             # the bridge's receive timeout: heartbeats and parent checks at this pace
HEARTBEAT_S = 0.5
GAUGES_EVERY_S = 0.1
PR_SET_PDEATHSIG = 1


class ForwardingObserver:
    """EngineObserver whose calls become `Outputs.events` (any thread may call it)."""

    def __init__(self):
        self.events: deque[list] = deque()

    def take(self) -> list[list]:
        taken = []
        while self.events:
            taken.append(self.events.popleft())
        return taken

    def on_step(self, num_scheduled_tokens: int, shared: bool = False) -> None:
        self.events.append(["on_step", num_scheduled_tokens, shared])

    def on_preemption(self) -> None:
        self.events.append(["on_preemption"])

    def on_prefix_cache_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.events.append(["on_prefix_cache_query", queried_tokens, hit_tokens])

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        self.events.append(["on_request_finished", *wire.stats_fields(stats)])

    def on_session_evicted(self) -> None:
        self.events.append(["on_session_evicted"])

    def on_tier_event(self, tier: str, event: str, amount: float = 1.0, reason: str = "") -> None:
        self.events.append(["on_tier_event", tier, event, amount, reason])

    def on_spec_decode(self, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.events.append(["on_spec_decode", num_drafts, num_draft_tokens, num_accepted_tokens])


class CoreServer:
    """Connects one built engine to the front's sockets."""

    def __init__(self, engine, observer: ForwardingObserver, to_front: zmq.Socket, from_front: zmq.Socket,
                 parent_pid: int):
        self.engine = engine
        self.observer = observer
        self.to_front = to_front
        self.from_front = from_front
        self.parent_pid = parent_pid
        self.pending: deque[wire.WireOutput] = deque()       # outputs not yet sent (engine thread appends)
        self.requests = engine.core.requests
        self.send_lock = threading.Lock()
        self.last_sent = 0.0
        self.draining = False
        self.stopped = threading.Event()                      # set by the main thread before closing
        self._gauges: wire.Gauges | None = None
        self._gauges_at = 0.0
        engine.on_outputs_flushed = self.send_outputs

    # ---- sending --------------------------------------------------------------------------------
    def send(self, message) -> None:
        data = wire.encode(message)
        with self.send_lock:
            self.to_front.send(data, copy=False)
            self.last_sent = time.monotonic()

    def gauges(self) -> wire.Gauges:
        """The engine's gauges, read at most every GAUGES_EVERY_S (some are sums over the sessions)."""
        now = time.monotonic()
        if self._gauges is None or now - self._gauges_at >= GAUGES_EVERY_S:
            engine = self.engine
            kv = engine.kv
            self._gauges = wire.Gauges(engine.num_running, engine.num_waiting, engine.num_requests, kv.usage,
                                       kv.num_sessions, kv.session_cached_tokens, kv.tier_bytes_used("host"),
                                       kv.tier_bytes_used("disk"))
            self._gauges_at = now
        return self._gauges

    def send_outputs(self, heartbeat: bool = False) -> None:
        """What the loop handed off since the last call, with the gauges and the metrics events (or,
        for a heartbeat, the gauges alone when nothing else is to be sent)."""
        if not self.pending and not self.observer.events and not heartbeat:
            return
        outputs = []
        while self.pending:
            outputs.append(self.pending.popleft())
        self.send(wire.Outputs(outputs, self.gauges(), self.observer.take()))

    def emit(self, output) -> None:
        seq = self.requests.get(output.request_id)
        cached = (seq.num_cached_prompt_tokens or 0) if seq is not None else 0
        self.pending.append(wire.wire_output(output, cached))

    def ready(self) -> wire.Ready:
        engine = self.engine
        template = engine.chat_template.source if engine.chat_template is not None else None
        config = engine.config
        return wire.Ready(engine.model_name, engine.max_context, engine.vocab_size,
                          list(engine.core.eos_token_ids), engine.tokenizer_source or "",
                          False, template, config.max_waiting_requests, config.waiting_per_tenant_limit)

    # ---- the bridge thread ----------------------------------------------------------------------
    def bridge(self) -> None:
        if not self.engine.wait_started(timeout=60):
            log.error("the engine loop did not start")
            return
        self.send(self.ready())
        poller = zmq.Poller()
        poller.register(self.from_front, zmq.POLLIN)
        while not self.stopped.is_set():
            if os.getppid() != self.parent_pid:
                log.error("the API process is gone: stopping the engine core")
                os._exit(1)
            if poller.poll(POLL_MS):
                while True:
                    try:
                        data = self.from_front.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(data.bytes)
            if time.monotonic() - self.last_sent >= HEARTBEAT_S:
                self.send_outputs(heartbeat=True)

    def handle(self, data: bytes) -> None:
        try:
            message = wire.decode_to_core(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("dropped a malformed message from the API process (%d bytes): %s", len(data), exc)
            return
        try:
            if isinstance(message, wire.AddRequest):
                self.add(message)
            elif isinstance(message, wire.Abort):
                reason = "stop" if message.reason == "stop" else "abort"
                for request_id in message.request_ids:
                    self.engine.abort(request_id, reason)
            elif isinstance(message, wire.Query):
                self.answer(message)
            elif isinstance(message, wire.Drain):
                self.drain(message.grace_s)
        except Exception as exc:  # noqa: BLE001 - a message the engine cannot take must not end the bridge
            log.exception("could not handle a %s message: %s", type(message).__name__, exc)

    def add(self, message: wire.AddRequest) -> None:
        spec = message.params
        if spec.grammar_kind is None:
            self.submit(message, None)
            return
        try:
            grammar_spec = GrammarSpec(spec.grammar_kind, spec.grammar_source or "")
        except AssertionError:
            self.reject(message.request_id, InvalidRequestError(f"unknown grammar kind {spec.grammar_kind!r}"))
            return
        compiler = self.engine.grammars
        # compiled off the bridge thread (the API process has compiled it once already: the cache of
        # this process may not have it)
        compiler.executor.submit(self._compile_and_submit, message, grammar_spec)

    def _compile_and_submit(self, message: wire.AddRequest, grammar_spec: GrammarSpec) -> None:
        try:
            grammar = self.engine.grammars.compile(grammar_spec)
        except GrammarError as exc:
            self.reject(message.request_id, InvalidRequestError(f"the grammar cannot be used: {exc}"))
            return
        self.submit(message, grammar)

    def submit(self, message: wire.AddRequest, grammar) -> None:
        try:
            self.engine.submit(wire.generation_request(message, grammar), self.emit)
        except Exception as exc:  # noqa: BLE001 - admission errors go back as rejections
            self.reject(message.request_id, exc)

    def reject(self, request_id: str, exc: BaseException) -> None:
        rejected = wire.rejection(request_id, exc)
        if rejected is None:
            log.exception("admitting request %s failed: %s", request_id, exc)
            rejected = wire.Rejected(request_id, "invalid", f"the request could not be admitted: {exc}")
        self.send(rejected)

    def answer(self, query: wire.Query) -> None:
        engine = self.engine
        try:
            if query.kind == "list_sessions":
                result = list(engine.list_sessions(query.tenant))
            elif query.kind == "get_session":
                result = engine.get_session(query.tenant, query.session_id)
            elif query.kind == "release_session":
                result = engine.release_session(query.tenant, query.session_id)
            elif query.kind == "check_integrity":
                engine.flush_inbox(timeout=10)
                engine.check_integrity()
                result = engine.num_requests
            else:
                raise ValueError(f"unknown query {query.kind!r}")
            self.send(wire.Reply(query.query_id, result))
        except Exception as exc:  # noqa: BLE001 - the front gets the error as text
            self.send(wire.Reply(query.query_id, None, f"{type(exc).__name__}: {exc}"))

    def drain(self, grace_s: float) -> None:
        if self.draining:
            return
        self.draining = True

        def drain_and_stop() -> None:
            self.engine.drain(grace_s)
            self.engine.stop()
        threading.Thread(target=drain_and_stop, name="drain", daemon=True).start()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):       # not Linux: the bridge's pid check remains
        pass


def core_main(config, to_core: str, to_front: str, parent_pid: int, log_level: str = "info") -> None:
    """The process's entry point (multiprocessing, spawn): build the engine from `config`, say
    `Ready`, serve until drained; exit 0 when drained, 1 when the loop died or loading failed."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != parent_pid:
        os._exit(1)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.executor.build import build_engine, freeze_loaded_objects
    from server.executor.threads import configure_threads

    context = zmq.Context()
    sender = context.socket(zmq.PUSH)
    sender.setsockopt(zmq.LINGER, 5000)
    sender.connect(to_front)
    receiver = context.socket(zmq.PULL)
    receiver.setsockopt(zmq.LINGER, 0)
    receiver.connect(to_core)
    configure_threads()
    observer = ForwardingObserver()
    # the API process detokenizes and matches stop strings (front_text.py)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, detokenize=False))
    try:
        engine = build_engine(config, observer=observer, start=False)
        freeze_loaded_objects()
    except Exception as exc:  # noqa: BLE001 - the front reports it and exits
        log.exception("loading the model failed: %s", exc)
        sender.send(wire.encode(wire.Dead(f"loading the model failed: {exc}")))
        sender.close()
        context.term()
        sys.exit(1)
    server = CoreServer(engine, observer, sender, receiver, parent_pid)
    bridge = threading.Thread(target=server.bridge, name="core-bridge", daemon=True)
    bridge.start()
    log.info("engine core ready (pid %d)", os.getpid())
    engine.run_forever()
    died = not engine.stopping
    server.send_outputs()
    if died:
        server.send(wire.Dead("the engine loop stopped"))
    server.stopped.set()
    bridge.join(timeout=5)
    sender.close()
    receiver.close()
    context.term()
    sys.exit(1 if died else 0)
