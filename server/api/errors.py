"""Errors in OpenAI's shape, `{"error": {message, type, param, code}}`, and the one mapping from the
engine's typed admission errors to HTTP statuses (no status is ever chosen from an error's text)."""
from __future__ import annotations

import json

from server.engine.errors import (ContextLengthError, EngineUnavailableError, InvalidRequestError,
                                  QueueFullError)


QUOTE_LIMIT = 64


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """User input as it may appear in an error message: JSON-quoted (control characters, quotes and
    markup-significant characters escaped) and cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit]
    body = json.dumps(cut, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return body + ("…" if len(text) > limit else "")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.TYPES.get(self.status, "invalid_request_error"), self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def api_error_from(exc: BaseException, prompt_param: str | None = None) -> BaseException:
    """The HTTP error for a request the engine refused; any other exception is returned as it is (a
    500 for the generic handler). `prompt_param` names the request's prompt field (`prompt` or
    `messages`) for errors the engine attributes to the prompt."""
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"the server is busy ({exc}); retry later", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineUnavailableError):
        return ApiError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, InvalidRequestError):
        param = prompt_param if exc.param == "prompt" and prompt_param else exc.param
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return ApiError(400, str(exc), param=param, code=code)
    return exc
