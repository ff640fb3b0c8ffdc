"""HTTP guards around every route: body-size limits and request logging (HttpMiddleware), API-key
authentication (a tenant per key), and the handlers that turn every error into OpenAI's
`{"error": {message, type, param, code}}` with the right status and no traceback."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.config import ApiConfig
from server.api.metrics import Metrics
from server.api.errors import ApiError, error_body

log = logging.getLogger("customllm.api")
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
                self.metrics.on_http_response(status)
            await send(message)

        try:
            await self._limited(scope, receive, counting_send)
        except Exception:
            if status is None:                            # the outer error middleware answers 500
                status = 500
                self.metrics.on_http_response(500)
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
            return await self._too_large(headers, receive, send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await self._too_large(headers, receive, send, more)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    async def _too_large(self, headers: dict, receive, send, more: bool = True):
        """413, after reading (and dropping) what the client is still sending, within bounds: a client
        that is mid-upload when the connection closes sees a reset instead of the answer. A client
        that waits for `100 Continue` has sent nothing and is answered at once."""
        self.metrics.on_rejected(REJECT_REASONS[413])
        if more and headers.get(b"expect", b"").lower() != b"100-continue":
            await drain_body(receive)
        payload = json.dumps(error_body(f"the request body exceeds {self.api.max_body_bytes} bytes",
                                        "invalid_request_error", None, "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_SECONDS = 10.0


async def drain_body(receive) -> None:
    """Read a request body to its end and drop it, up to DRAIN_MAX_BYTES and DRAIN_MAX_SECONDS."""
    async def read_all():
        received = 0
        while received <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
            received += len(message.get("body", b""))
    try:
        await asyncio.wait_for(read_all(), DRAIN_MAX_SECONDS)
    except asyncio.TimeoutError:
        pass


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def rejected(status: int) -> None:
        if status in REJECT_REASONS:
            metrics.on_rejected(REJECT_REASONS[status])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        rejected(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        rejected(400)
        errors = exc.errors()
        # a value that fits no branch of a union gets one error per branch: our own checks' reasons
        # (value errors) say more than "not a valid string" of another branch
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        # the location may hold the client's own dict keys: bounded, and only plain characters
        param = re.sub(r"[^\w.\[\]-]", "_", ".".join(str(p)[:64] for p in first.get("loc", ()) if p != "body"))[:200]
        param = param or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
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


def authenticator(api_keys: tuple[str, ...]):
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

