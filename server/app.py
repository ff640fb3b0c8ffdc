"""The FastAPI application: OpenAI-compatible routes over the engine, auth, limits, errors.

Every error leaves as OpenAI's `{"error": {message, type, param, code}}` with the right status and
no traceback. A request whose client goes away is aborted, whatever phase it is in: a watcher on
the connection's `http.disconnect` races the queueing and the generation of non-streaming
requests (and of streaming ones until their first output), and the SSE response cancels its
generator when the client leaves mid-stream. Cancelling a consumer of `Engine.generate` aborts its
request, which the engine handles before its next step.

`create_app` accepts `engine=None` while the model loads: /health then answers 503, and so does
every route that needs the engine, until `app.state.engine` is set.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.config import ApiConfig
from server.metrics import Metrics
from server.protocol import (ApiError, ChatCompletionRequest, ChatShaper, CompletionRequest, CompletionShaper,
                             DetokenizeRequest, TokenizeRequest, error_body, model_card, new_id, session_body)
from server.types import EngineDeadError, GenerationRequest, QueueFullError, RequestOutput

log = logging.getLogger("customllm.api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_PING_S = 15
LONG_TEXT_CHARS = 16_384          # longer prompts are tokenized off the event loop
QUIET_PATHS = ("/health", "/metrics")   # polled by probes and scrapers: logged at DEBUG
CLIENT_CLOSED_REQUEST = 499       # nginx's status for "the client went away"; nobody receives it
REJECT_REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                  413: "body_too_large", 429: "queue_full", 503: "unavailable"}


class ClientGone(Exception):
    """The client closed its connection before the response started."""


class HttpMiddleware:
    """413 for a body over the limit (by Content-Length before reading any of it, or counted while
    reading a chunked body), responses counted by status code, one log line per request."""

    def __init__(self, app, api: ApiConfig, metrics: Metrics):
        self.app = app
        self.api = api
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), None

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.http_responses.labels(str(status)).inc()
            await send(message)

        try:
            await self._limited(scope, receive, counting_send)
        except Exception:
            if status is None:                            # the outer error middleware answers 500
                status = 500
                self.metrics.http_responses.labels("500").inc()
            raise
        finally:
            if self.api.log_requests:
                client = scope.get("client") or ("-", 0)
                level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
                log.log(level, "%s:%s %s %s %s %.0f ms", client[0], client[1], scope["method"], scope["path"],
                        status or "-", 1000 * (time.monotonic() - started))

    async def _limited(self, scope, receive, send):
        limit = self.api.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await self._too_large(send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    async def _too_large(self, send):
        self.metrics.rejected.labels(REJECT_REASONS[413]).inc()
        payload = json.dumps(error_body(f"the request body exceeds {self.api.max_body_bytes} bytes",
                                        "invalid_request_error", None, "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def rejected(status: int) -> None:
        if status in REJECT_REASONS:
            metrics.rejected.labels(REJECT_REASONS[status]).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        rejected(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        rejected(400)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        text = f"{param}: {message}" if param else message
        return JSONResponse(error_body(text, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        rejected(exc.status_code)
        kind = ApiError.TYPES.get(exc.status_code, "invalid_request_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        log.info("client went away: %s %s aborted", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled %s on %s %s (answered 500)", type(exc).__name__, request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)


def _authenticator(api_keys: tuple[str, ...]):
    """A dependency giving the request's tenant: a digest of its API key ("" when keys are off)."""
    digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]

    def tenant_of(request: Request) -> str:
        if not digests:
            return ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        given = hashlib.sha256(token.encode()).digest()   # fixed length: compare_digest then leaks nothing
        match = False
        for digest in digests:                            # every key, no early exit
            match |= hmac.compare_digest(given, digest)
        if not match:
            raise ApiError(401, "incorrect API key", code="invalid_api_key")
        return "key-" + given.hex()[:16]
    return tenant_of


# ---- running engine requests --------------------------------------------------------------------
async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable):
    """The result of `awaitable`, or ClientGone (with `awaitable` cancelled) if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        raise ClientGone
    return work.result()


async def close_all(gens) -> None:
    for gen in gens:
        await gen.aclose()


def to_api_error(exc: BaseException) -> BaseException:
    """The HTTP error for a request the engine refused (other exceptions stay as they are: 500)."""
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"the server is busy ({exc}); retry later", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, ValueError):
        code = "context_length_exceeded" if "context length" in str(exc) else None
        return ApiError(400, str(exc), code=code)
    return exc


async def submit_all(engine, requests: list[GenerationRequest]):
    """Submit every request at once and wait for each one's first output, so that a refusal becomes
    an HTTP error before any response starts. Returns the output generators and first outputs; on a
    refusal, or when cancelled, every request already submitted is aborted."""
    gens = [engine.generate(r) for r in requests]
    tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
    accepted = False
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failure = next((t.exception() for t in tasks if t.done() and t.exception() is not None), None)
        if failure is None:
            failure = next((ApiError(503 if not engine.alive else 500, t.result().error or "generation failed",
                                     code="generation_failed")
                            for t in tasks if t.result().finish_reason == "error" and not t.result().token_ids), None)
        if failure is not None:
            raise to_api_error(failure)
        accepted = True
        return gens, [t.result() for t in tasks]
    finally:
        if not accepted:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_all(gens)


async def merged(gens, firsts) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with their choice index. Leaving early (or
    being cancelled) aborts the requests not yet finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen, first: RequestOutput):
        try:
            await queue.put((index, first))
            if not first.finished:
                async for out in gen:
                    await queue.put((index, out))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, g, f)) for i, (g, f) in enumerate(zip(gens, firsts))]
    remaining = len(tasks)
    try:
        while remaining:
            index, out = await queue.get()
            remaining -= out.finished
            yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(gens, firsts) -> list[list[RequestOutput]]:
    per_choice: list[list[RequestOutput]] = [[] for _ in gens]
    async for index, out in merged(gens, firsts):
        per_choice[index].append(out)
    return per_choice


def event_data(chunk: dict) -> str:
    """Compact JSON on one line. Characters some line splitters (Python's str.splitlines) take for
    line ends are escaped, so every client reads one `data:` line per event."""
    text = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


def sse(chunks: AsyncIterator[dict]) -> EventSourceResponse:
    """`data: {chunk}` events, then `data: [DONE]`; a failure midway becomes an error event first."""
    async def frames():
        try:
            async for chunk in chunks:
                yield event_data(chunk)
        except Exception as exc:  # noqa: BLE001 - the response has started: report in the stream
            log.error("stream failed: %s", exc, exc_info=exc)
            yield event_data(error_body("internal error while streaming", "internal_error", None, "stream_failed"))
        yield "[DONE]"
    return EventSourceResponse(frames(), headers=SSE_HEADERS, sep="\n", ping=SSE_PING_S)


def error_event(out: RequestOutput) -> dict:
    return error_body(out.error or "generation failed", "internal_error", None, "generation_failed")


async def stream_chunks(shaper, gens, firsts) -> AsyncIterator[dict]:
    finals = []
    async for index, out in merged(gens, firsts):
        if out.finish_reason == "error":
            yield error_event(out)
            return
        if out.finished:
            finals.append(out)
        for chunk in shaper.chunks(index, out):
            yield chunk
    if shaper.include_usage:
        yield shaper.usage_chunk(finals)


async def respond(request: Request, stream: bool, shaper, gens, firsts):
    """The SSE response, or the whole body once every choice finished (500 if one failed)."""
    if stream:
        return sse(stream_chunks(shaper, gens, firsts))
    per_choice = await until_disconnect(request, collect(gens, firsts))
    failed = next((o[-1] for o in per_choice if o[-1].finish_reason == "error"), None)
    if failed is not None:
        raise ApiError(500, failed.error or "generation failed", code="generation_failed")
    return shaper.response(per_choice)


def fan_out(base_id: str, prompts: list[list[int]], params: list, n: int, tenant: str,
            session: str | None) -> list[GenerationRequest]:
    """One engine request per choice (choice index = prompt index * n + i), ids `<id>-<index>`
    when there are several; only choice 0 continues the session, the others are independent."""
    total = len(prompts) * n
    return [GenerationRequest(base_id if total == 1 else f"{base_id}-{index}", prompts[index // n],
                              params[index // n], tenant, session if index == 0 else None)
            for index in range(total)]


# ---- the app ------------------------------------------------------------------------------------
def create_app(engine, api: ApiConfig, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="CustomLLM Server", version="0.1.0")
    app.state.engine = engine
    app.add_middleware(HttpMiddleware, api=api, metrics=metrics)
    _install_error_handlers(app, metrics)
    tenant_of = _authenticator(api.api_keys)

    def loaded():
        eng = app.state.engine
        if eng is None:
            raise ApiError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        return eng

    def running():
        eng = loaded()
        if not eng.alive:
            raise ApiError(503, "the engine is not running", code="engine_unavailable")
        return eng

    def check_model(eng, name: str | None) -> None:
        if name is not None and name != eng.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{eng.model_name}`",
                           param="model", code="model_not_found")

    def session_of(request: Request, body_session: str | None) -> str | None:
        header = request.headers.get("x-session-id")
        if header is not None and body_session is not None and header != body_session:
            raise ApiError(400, "the X-Session-ID header and the session_id field disagree", param="session_id")
        return body_session if body_session is not None else header

    def render_chat(eng, messages: list[dict], add_generation_prompt: bool) -> str:
        if eng.chat_template is None:
            raise ApiError(400, "this model has no chat template: start the server with --chat-template FILE, "
                                "or use /v1/completions", param="messages", code="no_chat_template")
        try:
            return eng.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    async def encode(eng, text: str) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            return await asyncio.to_thread(eng.tokenizer.encode, text)
        return eng.tokenizer.encode(text)

    def token_texter(eng):
        return lambda token_id: eng.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- plain endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        eng = app.state.engine
        if eng is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not eng.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        if api.metrics_require_auth:
            tenant_of(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        return {"object": "list", "data": [model_card(eng.model_name, eng.max_context)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        check_model(eng, model_id)
        return model_card(eng.model_name, eng.max_context)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        check_model(eng, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of `prompt` and `messages`", param="prompt")
        text = body.prompt if body.prompt is not None else render_chat(
            eng, [{"role": m.role, "content": m.text()} for m in body.messages], body.add_generation_prompt)
        tokens = await encode(eng, text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": eng.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        check_model(eng, body.model)
        bad = [t for t in body.tokens if not 0 <= t < eng.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {eng.vocab_size})", param="tokens")
        return {"prompt": eng.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # ---- sessions -------------------------------------------------------------------------------
    @app.get("/v1/sessions")
    async def list_sessions(tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        return {"object": "list", "data": [session_body(s) for s in eng.list_sessions(tenant)]}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        info = eng.get_session(tenant, session_id)
        if info is None:
            raise ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return session_body(info)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        if not eng.release_session(tenant, session_id):
            raise ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    # ---- /v1/completions ------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of),
                          eng=Depends(running)):
        check_model(eng, body.model)
        body.check(api, eng.vocab_size)
        prompts = body.prompts()
        if any(not 0 <= t < eng.vocab_size for p in prompts if isinstance(p, list) for t in p):
            raise ApiError(400, f"prompt token ids must be in [0, {eng.vocab_size})", param="prompt")
        prompt_ids = [list(p) if isinstance(p, list) else await encode(eng, p) for p in prompts]
        session = session_of(request, body.session_id)
        if session is not None and len(prompt_ids) > 1:
            raise ApiError(400, "a session continues one conversation: send one prompt", param="session_id")
        params = [body.sampling_params(body.resolve_max_tokens(len(ids), eng.max_context, api), body.logprobs)
                  for ids in prompt_ids]
        base_id = new_id("cmpl")
        gens, firsts = await until_disconnect(request, submit_all(
            eng, fan_out(base_id, prompt_ids, params, body.n, tenant, session)))
        echoes = [(p if isinstance(p, str) else eng.tokenizer.decode(p)) if body.echo else "" for p in prompts]
        shaper = CompletionShaper(base_id, eng.model_name, token_texter(eng), sum(map(len, prompt_ids)),
                                  body.include_usage, body.logprobs is not None, echoes=echoes, n=body.n)
        return await respond(request, body.stream, shaper, gens, firsts)

    # ---- /v1/chat/completions -------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of),
                               eng=Depends(running)):
        check_model(eng, body.model)
        body.check(api, eng.vocab_size)
        prompt_ids = await encode(eng, render_chat(eng, body.template_messages(), body.add_generation_prompt))
        session = session_of(request, body.session_id)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(body.resolve_max_tokens(len(prompt_ids), eng.max_context, api), logprobs)
        base_id = new_id("chatcmpl")
        gens, firsts = await until_disconnect(request, submit_all(
            eng, fan_out(base_id, [prompt_ids], [params], body.n, tenant, session)))
        shaper = ChatShaper(base_id, eng.model_name, token_texter(eng), len(prompt_ids), body.include_usage,
                            body.logprobs)
        return await respond(request, body.stream, shaper, gens, firsts)

    return app
