"""The FastAPI application: OpenAI-compatible routes over the engine. Limits, logging, auth and the
error handlers are in server/api/http_guard.py; submitting, merging and streaming engine outputs in
server/api/streaming.py.

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

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.errors import ApiError, api_error_from, quoted
from server.engine.errors import QueueFullError
from server.api.http_guard import HttpMiddleware, authenticator, install_error_handlers
from server.api.metrics import Metrics
from server.api.chat import prepare_chat
from server.api.prompts import encode, render_chat, resolve_max_tokens
from server.api.responses import ChatShaper, CompletionShaper, model_card, new_id, session_body
from server.api.responses_api import STATELESS, ResponsesRequest, responses_error
from server.api.responses_events import ResponsesShaper, response_events
from server.api.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                check_messages, valid_session_id)
from server.api.streaming import collect, fan_out, respond, submit_all, until_disconnect
from server.api.structured import compile_grammar, structured_outputs_spec
from server.api.tools import ToolPlan, template_messages
from server.config import ApiConfig

log = logging.getLogger("customllm.api")
VERSION = "0.1.0"
# OpenAI routes this server knows of but does not serve (text generation only): a 404 that says so
UNSUPPORTED_ROUTES = ("/v1/embeddings", "/v1/moderations", "/v1/images/{rest:path}", "/v1/audio/{rest:path}",
                      "/v1/files", "/v1/files/{rest:path}", "/v1/fine_tuning/{rest:path}", "/v1/batches",
                      "/v1/batches/{rest:path}", "/v1/assistants", "/v1/threads", "/v1/vector_stores",
                      "/v1/realtime/{rest:path}")


# ---- the app ------------------------------------------------------------------------------------
def create_app(engine, api: ApiConfig, metrics: Metrics) -> FastAPI:
    # the interactive docs and the schema are served by the routes below, behind the API keys
    app = FastAPI(title="CustomLLM Server", version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(HttpMiddleware, api=api, metrics=metrics)
    install_error_handlers(app, metrics)
    tenant_of = authenticator(api.api_keys)
    docs_access = authenticator(() if api.public_docs else api.api_keys)

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
            raise ApiError(404, f"The model {quoted(name)} does not exist; this server serves {quoted(eng.model_name)}",
                           param="model", code="model_not_found")

    def room_for(eng, tenant: str, count: int) -> None:
        """429 before any tokenizing when the queue (or this tenant's share of it) is already full."""
        try:
            eng.check_room(tenant, count)
        except QueueFullError as exc:
            raise api_error_from(exc) from None

    def session_of(request: Request, body_session: str | None) -> str | None:
        """The session named by the body or the X-Session-ID header, checked by the same rule."""
        header = request.headers.get("x-session-id")
        if header is not None:
            try:
                valid_session_id(header)
            except ValueError as exc:
                raise ApiError(400, f"X-Session-ID: {exc}", param="session_id") from None
        if header is not None and body_session is not None and header != body_session:
            raise ApiError(400, "the X-Session-ID header and the session_id field disagree", param="session_id")
        return body_session if body_session is not None else header

    def token_texter(eng):
        return lambda token_id: eng.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- docs, behind the keys unless --public-docs ----------------------------------------------
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(tenant: str = Depends(docs_access)):
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def swagger(tenant: str = Depends(docs_access)):
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(tenant: str = Depends(docs_access)):
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

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
        if body.messages is not None:
            check_messages(body.messages)
        text = body.prompt if body.prompt is not None else render_chat(eng, template_messages(
            body.messages, ToolPlan([], "none"), eng.chat_template is not None and eng.chat_template.takes("tools")),
            body.add_generation_prompt)
        tokens = await encode(eng, text, "prompt" if body.prompt is not None else "messages")
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
            raise ApiError(404, f"no session {quoted(session_id)}", param="session_id", code="session_not_found")
        return session_body(info)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, tenant: str = Depends(tenant_of), eng=Depends(loaded)):
        if not eng.release_session(tenant, session_id):
            raise ApiError(404, f"no session {quoted(session_id)}", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    # ---- /v1/completions ------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of),
                          eng=Depends(running)):
        check_model(eng, body.model)
        prompts = body.prompts()
        body.check(api, len(prompts))
        room_for(eng, tenant, len(prompts) * body.n)
        prompt_ids = [list(p) if isinstance(p, list) else await encode(eng, p, "prompt") for p in prompts]
        session = session_of(request, body.session_id)
        if session is not None and len(prompt_ids) > 1:
            raise ApiError(400, "a session continues one conversation: send one prompt", param="session_id")
        grammar = await until_disconnect(request, compile_grammar(
            eng, structured_outputs_spec(body.structured_outputs), api.grammar_compile_timeout_s, "structured_outputs"))
        params = [body.sampling_params(resolve_max_tokens(body, len(ids), eng, api), body.logprobs, grammar)
                  for ids in prompt_ids]
        base_id = new_id("cmpl")
        gens, firsts = await until_disconnect(request, submit_all(
            eng, fan_out(base_id, prompt_ids, params, body.n, tenant, session, body.priority), body.prompt_param))
        echoes = [(p if isinstance(p, str) else eng.tokenizer.decode(p)) if body.echo else "" for p in prompts]
        shaper = CompletionShaper(base_id, eng.model_name, token_texter(eng), sum(map(len, prompt_ids)),
                                  body.include_usage, body.logprobs is not None, echoes=echoes, n=body.n)
        return await respond(request, body.stream, shaper, gens, firsts)

    # ---- /v1/chat/completions -------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of),
                               eng=Depends(running)):
        check_model(eng, body.model)
        room_for(eng, tenant, body.n)
        session = session_of(request, body.session_id)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        chat = await until_disconnect(request, prepare_chat(eng, body, api, logprobs))
        base_id = new_id("chatcmpl")
        gens, firsts = await until_disconnect(request, submit_all(
            eng, fan_out(base_id, [chat.prompt_ids], [chat.params], body.n, tenant, session, body.priority),
            body.prompt_param))
        shaper = ChatShaper(base_id, eng.model_name, token_texter(eng), len(chat.prompt_ids), body.include_usage,
                            body.logprobs, tools=chat.tools)
        return await respond(request, body.stream, shaper, gens, firsts)

    # ---- /v1/responses (stateless) --------------------------------------------------------------
    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request, tenant: str = Depends(tenant_of),
                        eng=Depends(running)):
        check_model(eng, body.model)
        session = session_of(request, body.session_id)
        try:
            chat = await until_disconnect(request, prepare_chat(eng, body.to_chat(), api, None))
            base_id = new_id("resp")
            gens, firsts = await until_disconnect(request, submit_all(
                eng, fan_out(base_id, [chat.prompt_ids], [chat.params], 1, tenant, session), "input"))
        except ApiError as exc:
            raise responses_error(exc) from None
        shaper = ResponsesShaper(base_id, eng.model_name, body, chat.tools, len(chat.prompt_ids))
        if body.stream:
            return response_events(shaper, gens[0], firsts[0])
        outputs = (await until_disconnect(request, collect(gens, firsts)))[0]
        if outputs[-1].finish_reason == "error":
            raise ApiError(500, outputs[-1].error or "generation failed", code="generation_failed")
        return shaper.response(outputs)

    @app.api_route("/v1/responses/{rest:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def stored_response(rest: str, tenant: str = Depends(tenant_of)):
        raise ApiError(404, f"{STATELESS}: there is no stored response to retrieve, cancel or delete",
                       code="response_not_found")

    # ---- known, not served ----------------------------------------------------------------------
    async def not_served(request: Request):
        raise ApiError(404, f"{request.url.path} is not served: this server generates text (completions, chat "
                            "completions and stateless responses) only", code="unsupported_endpoint")

    for route in UNSUPPORTED_ROUTES:
        app.add_api_route(route, not_served, methods=["GET", "POST", "DELETE"], include_in_schema=False)

    return app
