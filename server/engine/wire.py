"""The messages between the API process and the engine-core process (server/engine/core_client.py,
server/engine/core_process.py), encoded with msgspec's MessagePack: typed, compact, no pickle.

Front → core: `AddRequest`, `Abort`, `Query` (sessions, integrity), `Drain`.
Core → front: `Ready` (once, after loading), `Outputs` (one per engine step or heartbeat: the step's
request deltas, the gauges, the metrics events), `Rejected` (a request refused at admission), `Reply`
(to a `Query`), `Dead` (the engine loop stopped).

A message that does not decode is dropped by the side that received it and logged: a malformed
message never takes either process down.
"""
from __future__ import annotations

from typing import Union

import msgspec

from server.engine.errors import (ContextLengthError, EngineDeadError, EngineShuttingDownError,
                                  InvalidRequestError, QueueFullError)
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.results import FinishedRequestStats, RequestOutput, TokenLogprob, Usage


# ---- front → core ---------------------------------------------------------------------------------
class WireParams(msgspec.Struct, array_like=True):
    """SamplingParams without the compiled grammar: its spec travels instead, and the core compiles it."""
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: list[tuple[int, float]]
    seed: Union[int, None]
    logprobs: Union[int, None]
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    min_tokens: int
    grammar_kind: Union[str, None] = None
    grammar_source: Union[str, None] = None
    speculative: bool = False


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: WireParams
    tenant: str
    session_id: Union[str, None]
    priority: int
    arrival_time: float          # time.monotonic(): one clock for all processes of a machine


class Abort(msgspec.Struct, tag="abort", array_like=True):
    """`reason` "stop": the API process found a stop string in the text (the request ends as stopped)."""
    request_ids: list[str]
    reason: str = "abort"


class Query(msgspec.Struct, tag="query", array_like=True):
    """kind: list_sessions, get_session, release_session or check_integrity."""
    query_id: int
    kind: str
    tenant: str = ""
    session_id: str = ""


class Drain(msgspec.Struct, tag="drain", array_like=True):
    """Stop taking requests, give running ones `grace_s`, abort the rest, stop the loop and exit."""
    grace_s: float


# ---- core → front ---------------------------------------------------------------------------------
class Ready(msgspec.Struct, tag="ready", array_like=True):
    model_name: str
    max_context: int
    vocab_size: int
    eos_token_ids: list[int]
    tokenizer_source: str
    byte_level_decoder: bool
    chat_template_source: Union[str, None]
    max_waiting_requests: int
    waiting_per_tenant_limit: int


class Gauges(msgspec.Struct, array_like=True):
    num_running: int = 0
    num_waiting: int = 0
    num_requests: int = 0
    kv_cache_usage: float = 0.0
    num_sessions: int = 0
    session_cached_tokens: int = 0
    host_tier_bytes: int = 0
    disk_tier_bytes: int = 0


class WireOutput(msgspec.Struct, array_like=True):
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: Union[list[tuple[int, float, list[tuple[int, float]]]], None]
    finish_reason: Union[str, None]
    error: Union[str, None]
    usage: Union[tuple[int, int, int], None]
    cached_tokens: int = 0      # prompt tokens found in the cache (for a usage the API process writes)


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[WireOutput]
    gauges: Gauges
    events: list[list] = []     # observer calls: [method name, *arguments] (`OBSERVER_EVENTS`)


class Rejected(msgspec.Struct, tag="rejected", array_like=True):
    """kind: invalid, context_length, queue_full, shutting_down or dead (`rejection_of`)."""
    request_id: str
    kind: str
    message: str
    param: Union[str, None] = None
    numbers: list[int] = []


class Reply(msgspec.Struct, tag="reply", array_like=True):
    query_id: int
    result: object = None
    error: Union[str, None] = None


class Dead(msgspec.Struct, tag="dead", array_like=True):
    message: str


ToCore = Union[AddRequest, Abort, Query, Drain]
ToFront = Union[Ready, Outputs, Rejected, Reply, Dead]
_to_core = msgspec.msgpack.Decoder(ToCore)
_to_front = msgspec.msgpack.Decoder(ToFront)
_encoder = msgspec.msgpack.Encoder()


def encode(message) -> bytes:
    return _encoder.encode(message)


def decode_to_core(data: bytes) -> ToCore:
    """msgspec.DecodeError (a ValueError) for anything that is not one of the front's messages."""
    return _to_core.decode(data)


def decode_to_front(data: bytes) -> ToFront:
    return _to_front.decode(data)


# ---- conversions ----------------------------------------------------------------------------------
def add_request(request: GenerationRequest, with_stop_strings: bool = True) -> AddRequest:
    """The message for `request`; without its stop strings when the API process matches them."""
    p = request.params
    spec = getattr(p.grammar, "spec", None)
    params = WireParams(p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty,
                        p.presence_penalty, p.frequency_penalty, list(p.logit_bias), p.seed, p.logprobs,
                        list(p.stop) if with_stop_strings else [], list(p.stop_token_ids), p.ignore_eos, p.min_tokens,
                        spec.kind if spec else None, spec.source if spec else None, p.speculative)
    return AddRequest(request.request_id, list(request.prompt_token_ids), params, request.tenant,
                      request.session_id, request.priority, request.arrival_time)


def generation_request(message: AddRequest, grammar=None) -> GenerationRequest:
    """The engine's request (`grammar`: the core's compilation of the message's grammar spec)."""
    w = message.params
    params = SamplingParams(w.max_tokens, w.temperature, w.top_p, w.top_k, w.min_p, w.repetition_penalty,
                            w.presence_penalty, w.frequency_penalty, tuple(map(tuple, w.logit_bias)), w.seed,
                            w.logprobs, tuple(w.stop), tuple(w.stop_token_ids), w.ignore_eos, w.min_tokens, grammar,
                            w.speculative)
    return GenerationRequest(message.request_id, list(message.prompt_token_ids), params, message.tenant,
                             message.session_id, message.priority, message.arrival_time)


def wire_output(output: RequestOutput, cached_tokens: int = 0) -> WireOutput:
    logprobs = None if output.logprobs is None else [(lp.token_id, lp.logprob, list(lp.top)) for lp in output.logprobs]
    usage = None if output.usage is None else (output.usage.prompt_tokens, output.usage.completion_tokens,
                                               output.usage.cached_tokens)
    return WireOutput(output.request_id, output.text, list(output.token_ids), logprobs, output.finish_reason,
                      output.error, usage, cached_tokens)


def request_output(w: WireOutput) -> RequestOutput:
    logprobs = None if w.logprobs is None else tuple(
        TokenLogprob(token_id, logprob, tuple(map(tuple, top))) for token_id, logprob, top in w.logprobs)
    return RequestOutput(w.request_id, w.text, tuple(w.token_ids), logprobs, w.finish_reason, w.error,
                         None if w.usage is None else Usage(*w.usage))


def rejection(request_id: str, exc: BaseException) -> Rejected | None:
    """The message for an admission error (None: not one, a bug to report as an error output)."""
    if isinstance(exc, ContextLengthError):
        return Rejected(request_id, "context_length", str(exc), exc.param,
                        [exc.max_context, exc.prompt_tokens, exc.max_tokens])
    if isinstance(exc, InvalidRequestError):
        return Rejected(request_id, "invalid", str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return Rejected(request_id, "queue_full", str(exc))
    if isinstance(exc, EngineShuttingDownError):
        return Rejected(request_id, "shutting_down", str(exc))
    if isinstance(exc, EngineDeadError):
        return Rejected(request_id, "dead", str(exc))
    return None


def rejection_error(message: Rejected) -> Exception:
    """The admission error the in-process engine would have raised."""
    if message.kind == "context_length" and len(message.numbers) == 3:
        return ContextLengthError(*message.numbers, message.param)
    if message.kind in ("invalid", "context_length"):
        return InvalidRequestError(message.message, message.param)
    if message.kind == "queue_full":
        return QueueFullError(message.message)
    if message.kind == "shutting_down":
        return EngineShuttingDownError(message.message)
    return EngineDeadError(message.message)


# observer calls that cross the wire: method name → argument converter (`EngineObserver`)
OBSERVER_EVENTS = {
    "on_step": lambda n, shared=False: (int(n), bool(shared)),
    "on_preemption": lambda: (),
    "on_prefix_cache_query": lambda queried, hit: (int(queried), int(hit)),
    "on_request_finished": lambda *fields: (FinishedRequestStats(
        str(fields[0]), int(fields[1]), int(fields[2]), int(fields[3]), float(fields[4]),
        None if fields[5] is None else float(fields[5]), tuple(map(float, fields[6])), float(fields[7])),),
    "on_session_evicted": lambda: (),
    "on_tier_event": lambda tier, event, amount=1.0, reason="": (str(tier), str(event), float(amount), str(reason)),
    "on_spec_decode": lambda drafts, draft_tokens, accepted: (int(drafts), int(draft_tokens), int(accepted)),
}


def stats_fields(stats: FinishedRequestStats) -> list:
    return [stats.finish_reason, stats.prompt_tokens, stats.generation_tokens, stats.cached_tokens, stats.queue_time,
            stats.time_to_first_token, list(stats.inter_token_latencies), stats.e2e_latency]

