"""Why the engine refuses a request at admission. The API maps each type to an HTTP status
(server/api/errors.py); nothing chooses a status from an error's text.

Errors about the request itself subclass `InvalidRequestError` (a ValueError: the caller sent
something this engine cannot serve); the others say the engine cannot take work now.
"""
from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request can never be served as it is. `param` names the field at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt and completion together exceed the model's context."""

    def __init__(self, max_context: int, prompt_tokens: int, max_tokens: int, param: str | None = None):
        total = prompt_tokens + max_tokens
        super().__init__(
            f"This model's maximum context length is {max_context} tokens. However, you requested {total} "
            f"tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). Please reduce the prompt "
            f"or max_tokens.", param)
        self.max_context, self.prompt_tokens, self.max_tokens = max_context, prompt_tokens, max_tokens


class CacheTooSmallError(InvalidRequestError):
    """The request needs more KV cache than the whole cache holds."""

    def __init__(self, needed_tokens: int, capacity_tokens: int):
        super().__init__(f"the request needs {needed_tokens} tokens of KV cache but the cache holds only "
                         f"{capacity_tokens}; reduce max_tokens or raise --kv-cache-memory", "max_tokens")


class QueueFullError(Exception):
    """The engine's waiting queue is at its limit: retry later."""


class EngineUnavailableError(Exception):
    """The engine cannot take requests: it is shutting down, or its loop has stopped."""


class EngineShuttingDownError(EngineUnavailableError):
    """The server is draining after a signal."""


class EngineDeadError(EngineUnavailableError):
    """The engine loop has stopped and cannot serve."""
