"""From request text to prompt token ids: the chat template, then the tokenizer, with the bounds
that keep an oversized input from costing seconds of CPU before it is refused.

Text longer than the model could ever take is refused before it is tokenized whole: no prompt of
more than `max_context` tokens can be served, and no token covers more than `max_token_chars`
characters (the longest token's text, with slack for normalizers that shrink the text), so anything
longer than their product is a 400 at once. A text past `PROBE_CHARS_PER_TOKEN` characters per
context token has only its beginning tokenized first, cut before a space so that its words tokenize
as they do in the whole text: if that alone exceeds the context, the request is refused without
tokenizing the rest. Tokenizing runs off the event loop (`tokenizers` releases the GIL), so one long
prompt does not stall the other requests' streams.
"""
from __future__ import annotations

import asyncio
import weakref

from server.api.errors import ApiError, api_error_from
from server.engine.errors import ContextLengthError

NORMALIZER_SLACK = 4          # input characters per character the tokenizer sees, at most (NFKC, accents)
PROBE_CHARS_PER_TOKEN = 16
_max_token_chars: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int:
    """The most characters one token's text has (computed once per tokenizer)."""
    if tokenizer not in _max_token_chars:
        longest = 1
        for token_id in range(tokenizer.vocab_size):
            text = tokenizer.id_to_token(token_id)
            if text:
                longest = max(longest, len(text))
        _max_token_chars[tokenizer] = longest
    return _max_token_chars[tokenizer]


def max_prompt_chars(engine) -> int:
    return engine.max_context * max_token_chars(engine.tokenizer) * NORMALIZER_SLACK


def render_chat(engine, messages: list[dict], add_generation_prompt: bool, **extra) -> str:
    """The prompt text; `extra` are template variables (tools, reasoning_effort)."""
    if engine.chat_template is None:
        raise ApiError(400, "this model has no chat template: start the server with --chat-template FILE, "
                            "or use /v1/completions", param="messages", code="no_chat_template")
    try:
        return engine.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **extra)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None


async def encode(engine, text: str, param: str) -> list[int]:
    """Token ids of `text`; a 400 (context_length_exceeded) as soon as it is clear that the text
    alone is longer than any prompt the model can take."""
    context = engine.max_context
    if len(text) > max_prompt_chars(engine):
        raise too_long(context, param)
    probe = context * PROBE_CHARS_PER_TOKEN
    if len(text) > probe:
        cut = text.rfind(" ", 0, probe)
        head = await asyncio.to_thread(engine.tokenizer.encode, text[:cut if cut > 0 else probe])
        if len(head) > context:
            raise too_long(context, param)
    return await asyncio.to_thread(engine.tokenizer.encode, text)


def too_long(max_context: int, param: str) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {max_context} tokens, and the prompt alone is "
                         "longer. Please reduce the prompt.", param=param, code="context_length_exceeded")


def resolve_max_tokens(body, prompt_len: int, engine, api) -> int:
    try:
        return body.resolve_max_tokens(prompt_len, engine.max_context, api)
    except ContextLengthError as exc:
        raise api_error_from(exc, body.prompt_param) from None
