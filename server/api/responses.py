"""Response bodies and stream chunks in OpenAI's shapes, built from engine outputs."""
from __future__ import annotations

import time
import uuid
from typing import Callable

from server.engine.results import RequestOutput, TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def model_card(name: str, max_context: int) -> dict:
    return {"id": name, "object": "model", "created": now(), "owned_by": "customllm", "max_model_len": max_context}


def session_body(info) -> dict:
    """`num_tokens`: the conversation's tokens at its last turn; `cached_tokens`: those whose cache a
    next turn finds; `blocks`: where that cache is (pool: pinned in memory, disk: files of a disk tier);
    `bytes`: pool memory the pin holds."""
    return {"id": info.session_id, "object": "session", "num_tokens": info.num_tokens,
            "cached_tokens": info.cached_tokens, "blocks": {"pool": info.num_pinned_blocks, "disk": info.num_disk_blocks},
            "bytes": info.bytes, "last_used": info.last_used}


def completion_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str],
                        offset: int = 0) -> dict:
    """The legacy completions shape; `offset` is where the first token starts in the choice's text."""
    tokens, offsets = [], []
    for lp in entries:
        text = token_text(lp.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in entries], "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """The chat shape: one entry per token with its text, UTF-8 bytes and the top alternatives."""
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                        for lp in entries]}


def _entries(outputs: list[RequestOutput]) -> list[TokenLogprob]:
    return [lp for o in outputs for lp in (o.logprobs or ())]


class _Shaper:
    """Response bodies and stream chunks of one request with its choices, from engine outputs."""

    response_object = chunk_object = ""

    def __init__(self, base_id: str, model: str, token_text: Callable[[int], str], prompt_tokens: int,
                 include_usage: bool, logprobs: bool):
        self.head = {"id": base_id, "object": self.response_object, "created": now(), "model": model}
        self.token_text = token_text
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.logprobs = logprobs

    def usage(self, finals: list[RequestOutput]) -> dict:
        completion = sum(o.usage.completion_tokens for o in finals if o.usage)
        cached = max((o.usage.cached_tokens for o in finals if o.usage), default=0)
        return usage_body(self.prompt_tokens, completion, cached)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {**self.head, "object": self.chunk_object, "choices": choices}
        return {**out, "usage": usage} if self.include_usage else out

    def usage_chunk(self, finals: list[RequestOutput]) -> dict:
        return self.chunk([], self.usage(finals))

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        raise NotImplementedError

    def response(self, per_choice: list[list[RequestOutput]]) -> dict:
        raise NotImplementedError


class CompletionShaper(_Shaper):
    response_object = chunk_object = "text_completion"

    def __init__(self, *args, echoes: list[str], n: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.echoes = echoes          # per prompt: the echoed prompt text, or ""
        self.n = n
        self.offsets: dict[int, int] = {}

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        text = out.text
        if index not in self.offsets:
            echo = self.echoes[index // self.n]
            text, self.offsets[index] = echo + text, len(echo)
        if not (text or out.finished or out.logprobs):
            return []
        logprobs = None
        if self.logprobs:
            logprobs = completion_logprobs(list(out.logprobs or ()), self.token_text, self.offsets[index])
            self.offsets[index] += sum(len(t) for t in logprobs["tokens"])
        return [self.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}])]

    def response(self, per_choice: list[list[RequestOutput]]) -> dict:
        choices = []
        for index, outputs in enumerate(per_choice):
            echo = self.echoes[index // self.n]
            logprobs = completion_logprobs(_entries(outputs), self.token_text, len(echo)) if self.logprobs else None
            choices.append({"index": index, "text": echo + "".join(o.text for o in outputs), "logprobs": logprobs,
                            "finish_reason": outputs[-1].finish_reason})
        return {**self.head, "choices": choices, "usage": self.usage([o[-1] for o in per_choice])}


def tool_call_body(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ChatShaper(_Shaper):
    """Chat bodies and chunks. With a tool plan (`server/api/tools.py`) each choice's text goes
    through its own tool-call parser: content deltas as they come, each call as two
    `delta.tool_calls` chunks (id, type and name with empty arguments, then the arguments), and the
    finish reason "tool_calls" when the model called tools."""

    response_object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, *args, tools=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.started: set[int] = set()
        self.plan = tools if tools is not None and tools.active else None
        self.parsers: dict = {}

    def _deltas(self, index: int, out: RequestOutput) -> list[dict]:
        if self.plan is None:
            return [{"content": out.text}] if out.text else []
        parser = self.parsers.setdefault(index, self.plan.parser())
        events = parser.feed(out.text) + (parser.finish() if out.finished else [])
        deltas = []
        for kind, value in events:
            if kind == "content":
                deltas.append({"content": value})
                continue
            k = parser.calls.index(value)
            deltas.append({"tool_calls": [{"index": k, "id": value.id, "type": "function",
                                           "function": {"name": value.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": value.arguments}}]})
        return deltas

    def _finish_reason(self, index: int, reason: str | None) -> str | None:
        if self.plan is None or reason is None:
            return reason
        return self.plan.finish_reason(reason, bool(self.parsers[index].calls))

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        chunks = []
        if index not in self.started:
            self.started.add(index)
            chunks.append(self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
        deltas = self._deltas(index, out)
        if not deltas and (out.finished or out.logprobs):
            deltas = [{}]
        logprobs = chat_logprobs(list(out.logprobs or ()), self.token_text) if self.logprobs else None
        finish_reason = self._finish_reason(index, out.finish_reason)
        for j, delta in enumerate(deltas):
            last = j == len(deltas) - 1
            chunks.append(self.chunk([{"index": index, "delta": delta, "logprobs": logprobs if last else None,
                                       "finish_reason": finish_reason if last else None}]))
        return chunks

    def message(self, index: int, outputs: list[RequestOutput]) -> tuple[dict, str | None]:
        """The choice's message and finish reason."""
        text = "".join(o.text for o in outputs)
        if self.plan is None:
            return {"role": "assistant", "content": text}, outputs[-1].finish_reason
        parser = self.parsers[index] = self.plan.parser()
        events = parser.feed(text) + parser.finish()
        content = "".join(value for kind, value in events if kind == "content")
        message = {"role": "assistant", "content": content or None if parser.calls else content}
        if parser.calls:
            message["tool_calls"] = [tool_call_body(c) for c in parser.calls]
        return message, self._finish_reason(index, outputs[-1].finish_reason)

    def response(self, per_choice: list[list[RequestOutput]]) -> dict:
        choices = []
        for index, outputs in enumerate(per_choice):
            message, finish_reason = self.message(index, outputs)
            choices.append({"index": index, "message": message,
                            "logprobs": chat_logprobs(_entries(outputs), self.token_text) if self.logprobs else None,
                            "finish_reason": finish_reason})
        return {**self.head, "choices": choices, "usage": self.usage([o[-1] for o in per_choice])}
