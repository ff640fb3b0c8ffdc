"""The FastAPI application: OpenAI-compatible routes over the engine, auth, limits, errors.

Every error leaves as OpenAI's `{"error": {message, type, param, code}}` with the right status and
no traceback. Requests whose client goes away are aborted: streaming ones when the response task is
cancelled, non-streaming ones by a watcher on the connection's `http.disconnect`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.config import ApiConfig
from server.metrics import Metrics
from server.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                             error_body, new_id, now, usage_body)
from server.types import EngineDeadError, GenerationRequest, QueueFullError, RequestOutput

log = logging.getLogger("customllm.api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BodyLimitMiddleware:
    """413 for bodies over the limit (by Content-Length, or counted while reading a chunked body),
    and a count of responses by status code."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_responses.labels(str(message["status"])).inc()
            await send(message)

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(counting_send)
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self._too_large(counting_send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            return await self.app(scope, replay, counting_send)
        return await self.app(scope, receive, counting_send)

    async def _too_large(self, send):
        self.metrics.rejected.labels("body_too_large").inc()
        payload = json.dumps(error_body(f"request body exceeds {self.max_bytes} bytes", "invalid_request_error",
                                        None, "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def create_app(engine, api: ApiConfig, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="CustomLLM Server", version="0.1.0")
    app.state.engine = engine
    app.add_middleware(BodyLimitMiddleware, max_bytes=api.max_body_bytes, metrics=metrics)
    keys = [k.encode() for k in api.api_keys]

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        param = ".".join(loc) or None
        text = f"{param}: {message}" if param else message
        return JSONResponse(error_body(text, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = ApiError.TYPES.get(exc.status_code, "invalid_request_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)

    # ---- auth -----------------------------------------------------------------------------------
    def tenant_of(request: Request) -> str:
        """The tenant a request belongs to: a digest of its API key ("" when keys are off)."""
        if not keys:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        given = token.strip().encode()
        match = False
        for key in keys:                                  # compare against every key: constant time
            match |= hmac.compare_digest(given, key)
        if not match:
            raise ApiError(401, "incorrect API key", code="invalid_api_key")
        return "key-" + hashlib.sha256(given).hexdigest()[:16]

    def ready_engine():
        if engine is None or not engine.alive:
            raise ApiError(503, "the engine is not running", code="engine_unavailable")
        return engine

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{engine.model_name}`",
                           param="model", code="model_not_found")

    # ---- plain endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine is None or not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        if api.metrics_require_auth:
            tenant_of(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(tenant: str = Depends(tenant_of)):
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": now(),
                                            "owned_by": "customllm", "max_model_len": engine.max_context}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, tenant: str = Depends(tenant_of)):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of `prompt` and `messages`", param="prompt")
        text = body.prompt if body.prompt is not None else render_chat(
            [{"role": m.role, "content": m.text()} for m in body.messages], body.add_generation_prompt)
        tokens = engine.tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, tenant: str = Depends(tenant_of)):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})",
                           param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # ---- sessions -------------------------------------------------------------------------------
    def session_body(info) -> dict:
        return {"id": info.session_id, "object": "session", "num_tokens": info.num_tokens,
                "bytes": info.bytes, "last_used": info.last_used}

    @app.get("/v1/sessions")
    async def list_sessions(tenant: str = Depends(tenant_of)):
        return {"object": "list", "data": [session_body(s) for s in ready_engine().list_sessions(tenant)]}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, tenant: str = Depends(tenant_of)):
        info = ready_engine().get_session(tenant, session_id)
        if info is None:
            raise ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return session_body(info)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, tenant: str = Depends(tenant_of)):
        if not ready_engine().release_session(tenant, session_id):
            raise ApiError(404, f"no session {session_id!r}", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    # ---- generation -----------------------------------------------------------------------------
    def render_chat(messages: list[dict], add_generation_prompt: bool) -> str:
        if engine.chat_template is None:
            raise ApiError(400, "this model has no chat template: start the server with --chat-template FILE, "
                                "or use /v1/completions", param="messages", code="no_chat_template")
        try:
            return engine.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    def session_of(request: Request, body_session: str | None) -> str | None:
        header = request.headers.get("x-session-id")
        if header is not None and body_session is not None and header != body_session:
            raise ApiError(400, "the X-Session-ID header and the session_id field disagree", param="session_id")
        return body_session if body_session is not None else header

    def check_limits(body, max_tokens: int | None) -> None:
        if body.n > api.max_n:
            raise ApiError(400, f"n must be at most {api.max_n}", param="n")
        if len(body.stop_list()) > api.max_stop_strings:
            raise ApiError(400, f"at most {api.max_stop_strings} stop strings are allowed", param="stop")
        if max_tokens is not None and max_tokens > api.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {api.max_tokens_limit}", param="max_tokens")
        for token in body.stop_token_ids or ():
            if not 0 <= token < engine.vocab_size:
                raise ApiError(400, f"stop_token_ids: {token} is outside the vocabulary", param="stop_token_ids")

    def resolve_max_tokens(requested: int | None, prompt_len: int, default: int | None) -> int:
        if requested is not None:
            return requested
        room = engine.max_context - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {engine.max_context} tokens, and the "
                                f"prompt has {prompt_len}", param="messages")
        return min(room, default or room, api.max_tokens_limit)

    async def start(requests: list[GenerationRequest]):
        """Submit every request and wait for its first output, so that a refusal becomes an HTTP
        error before any response starts. Returns the generators and their first outputs."""
        gens, firsts = [], []
        try:
            for req in requests:
                gen = engine.generate(req)
                gens.append(gen)
                firsts.append(await gen.__anext__())
        except BaseException as exc:
            for gen in gens:
                await gen.aclose()
            if isinstance(exc, QueueFullError):
                metrics.rejected.labels("queue_full").inc()
                raise ApiError(429, f"the server is busy ({exc}); retry later", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            if isinstance(exc, EngineDeadError):
                metrics.rejected.labels("unavailable").inc()
                raise ApiError(503, str(exc), code="engine_unavailable") from None
            if isinstance(exc, ValueError):
                metrics.rejected.labels("invalid").inc()
                raise ApiError(400, str(exc)) from None
            raise
        return gens, firsts

    async def merged(gens, firsts) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several requests as they come, tagged with their choice index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, gen, first):
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
                if out.finished:
                    remaining -= 1
                yield index, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect_or_abort(request: Request, gens, firsts) -> list[list[RequestOutput]]:
        """Run non-streaming requests to the end; a client disconnect aborts them."""
        per_choice: list[list[RequestOutput]] = [[] for _ in gens]

        async def consume():
            async for index, out in merged(gens, firsts):
                per_choice[index].append(out)

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            log.info("client went away: aborted %d request(s)", len(gens))
            raise asyncio.CancelledError
        watch.cancel()
        work.result()
        return per_choice

    def token_text(token_id: int) -> str:
        return engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(outputs: list[RequestOutput], offset: int) -> dict | None:
        entries = [lp for o in outputs for lp in (o.logprobs or ())]
        if not entries:
            return None
        tokens, offsets, position = [], [], offset
        for lp in entries:
            text = token_text(lp.token_id)
            tokens.append(text)
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in entries],
                "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in entries], "text_offset": offsets}

    def chat_logprobs(outputs: list[RequestOutput]) -> dict | None:
        entries = [lp for o in outputs for lp in (o.logprobs or ())]
        if not entries:
            return None

        def item(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                            for lp in entries]}

    def usage_of(finals: list[RequestOutput], prompt_tokens: int) -> dict:
        completion = sum(o.usage.completion_tokens for o in finals if o.usage)
        cached = max((o.usage.cached_tokens for o in finals if o.usage), default=0)
        return usage_body(prompt_tokens, completion, cached)

    def make_requests(base_id: str, prompt_ids: list[int], params, tenant: str, session: str | None,
                      n: int) -> list[GenerationRequest]:
        if n == 1:
            return [GenerationRequest(base_id, prompt_ids, params, tenant, session)]
        # only the first choice continues the session; the others are independent samples
        return [GenerationRequest(f"{base_id}-{i}", prompt_ids, params, tenant, session if i == 0 else None)
                for i in range(n)]

    def sse(chunks: AsyncIterator[dict]) -> EventSourceResponse:
        async def frames():
            async for chunk in chunks:
                yield json.dumps(chunk, ensure_ascii=False)
            yield "[DONE]"
        return EventSourceResponse(frames(), headers=SSE_HEADERS, sep="\n", ping=600)

    def error_event(out: RequestOutput) -> dict:
        return error_body(out.error or "generation failed", "internal_error", None, "generation_failed")

    # ---- /v1/completions ------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
        ready_engine()
        check_model(body.model)
        check_limits(body, body.max_tokens)
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo together with logprobs is not supported (no prompt logprobs)", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, body.n):
            raise ApiError(400, "best_of is not supported (it must equal n)", param="best_of")
        try:
            prompts = body.prompts()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        prompt_ids = []
        for p in prompts:
            if isinstance(p, list):
                if not all(isinstance(t, int) for t in p):
                    raise ApiError(400, "a token-id prompt must be a list of integers", param="prompt")
                prompt_ids.append(list(p))
            else:
                prompt_ids.append(engine.tokenizer.encode(p))
        session = session_of(request, body.session_id)
        if session is not None and len(prompt_ids) * body.n > 1:
            raise ApiError(400, "a session continues one sequence: use one prompt and n=1", param="session_id")
        base_id = new_id("cmpl")
        requests = []
        for p_index, ids in enumerate(prompt_ids):
            params = body.sampling_params(resolve_max_tokens(body.max_tokens, len(ids), 16), body.logprobs)
            prefix = base_id if len(prompt_ids) == 1 else f"{base_id}-p{p_index}"
            requests += make_requests(prefix, ids, params, tenant, session, body.n)
        gens, firsts = await start(requests)
        created, model = now(), engine.model_name
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        echo_texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def chunks():
                finals, echoed = [], set()
                async for index, out in merged(gens, firsts):
                    text = out.text
                    if body.echo and index not in echoed:
                        echoed.add(index)
                        text = echo_texts[index // body.n] + text
                    if out.finish_reason == "error":
                        yield error_event(out)
                        return
                    if out.finished:
                        finals.append(out)
                    if text or out.finished or out.logprobs:
                        chunk = {"id": base_id, "object": "text_completion", "created": created, "model": model,
                                 "choices": [{"index": index, "text": text,
                                              "logprobs": completion_logprobs([out], 0) if body.logprobs is not None else None,
                                              "finish_reason": out.finish_reason}]}
                        if include_usage:
                            chunk["usage"] = None
                        yield chunk
                if include_usage:
                    yield {"id": base_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage_of(finals, prompt_tokens)}
            return sse(chunks())

        per_choice = await collect_or_abort(request, gens, firsts)
        choices = []
        for index, outputs in enumerate(per_choice):
            final = outputs[-1]
            if final.finish_reason == "error":
                raise ApiError(500, final.error or "generation failed", code="generation_failed")
            prefix = echo_texts[index // body.n] if body.echo else ""
            text = prefix + "".join(o.text for o in outputs)
            choices.append({"index": index, "text": text,
                            "logprobs": completion_logprobs(outputs, len(prefix)) if body.logprobs is not None else None,
                            "finish_reason": final.finish_reason})
        return {"id": base_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": usage_of([o[-1] for o in per_choice], prompt_tokens)}

    # ---- /v1/chat/completions -------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)):
        ready_engine()
        check_model(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens
        check_limits(body, max_tokens)
        if body.response_format is not None and body.response_format.type != "text":
            raise ApiError(400, "only response_format type 'text' is supported", param="response_format")
        if body.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        text = render_chat(body.template_messages(), body.add_generation_prompt)
        prompt_ids = engine.tokenizer.encode(text)
        session = session_of(request, body.session_id)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(resolve_max_tokens(max_tokens, len(prompt_ids), None), logprobs)
        base_id = new_id("chatcmpl")
        gens, firsts = await start(make_requests(base_id, prompt_ids, params, tenant, session, body.n))
        created, model = now(), engine.model_name

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(choices: list[dict], usage=False, usage_value=None) -> dict:
                out = {"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": choices}
                if include_usage:
                    out["usage"] = usage_value if usage else None
                return out

            async def chunks():
                finals, started = [], set()
                async for index, out in merged(gens, firsts):
                    if out.finish_reason == "error":
                        yield error_event(out)
                        return
                    if index not in started:
                        started.add(index)
                        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    if out.finished:
                        finals.append(out)
                    if out.text or out.finished or out.logprobs:
                        delta = {"content": out.text} if out.text else {}
                        yield chunk([{"index": index, "delta": delta,
                                      "logprobs": chat_logprobs([out]) if body.logprobs else None,
                                      "finish_reason": out.finish_reason}])
                if include_usage:
                    yield chunk([], usage=True, usage_value=usage_of(finals, len(prompt_ids)))
            return sse(chunks())

        per_choice = await collect_or_abort(request, gens, firsts)
        choices = []
        for index, outputs in enumerate(per_choice):
            final = outputs[-1]
            if final.finish_reason == "error":
                raise ApiError(500, final.error or "generation failed", code="generation_failed")
            choices.append({"index": index,
                            "message": {"role": "assistant", "content": "".join(o.text for o in outputs)},
                            "logprobs": chat_logprobs(outputs) if body.logprobs else None,
                            "finish_reason": final.finish_reason})
        return {"id": base_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage_of([o[-1] for o in per_choice], len(prompt_ids))}

    return app
