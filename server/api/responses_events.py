"""/v1/responses output: the `response` object and its stream of typed events, in the shapes of
OpenAI's Responses API (the `openai` client's `responses.create` parses both).

The generated text goes through the request's tool-call parser (`tools.py`), so the output is a
list of items: `message` items (one `output_text` part) for text, `function_call` items for calls.
Streaming sends `response.created` and `response.in_progress`, then per item
`response.output_item.added`, its content (`response.content_part.added`,
`response.output_text.delta`…, `.done`; or `response.function_call_arguments.delta`/`.done`),
`response.output_item.done`, and at the end `response.completed` (or `response.incomplete` when
max_output_tokens cut it). Each SSE frame names its event type; every event has a sequence number.
"""
from __future__ import annotations

import json
import logging
import uuid

from sse_starlette.sse import EventSourceResponse

from server.api.responses import now
from server.api.streaming import SSE_HEADERS, SSE_PING_S, merged
from server.engine.results import RequestOutput

log = logging.getLogger("customllm.api")


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesShaper:
    """Builds the response object and stream events of one /v1/responses request."""

    def __init__(self, response_id: str, model: str, body, plan, prompt_tokens: int):
        self.id = response_id
        self.model = model
        self.body = body
        self.created = now()
        self.parser = plan.parser() if plan.active else None
        self.prompt_tokens = prompt_tokens
        self.sequence = 0
        self.output: list[dict] = []         # items so far
        self.open_message: dict | None = None

    # ---- the response object ----------------------------------------------------------------------
    def envelope(self, status: str, usage: dict | None = None, incomplete: str | None = None) -> dict:
        body = self.body
        fmt = body.text.format if body.text and body.text.format else None
        text_format = {"type": "text"} if fmt is None else {k: v for k, v in {
            "type": fmt.type, "name": fmt.name if fmt.type == "json_schema" else None,
            "schema": fmt.schema_ if fmt.type == "json_schema" else None,
            "strict": fmt.strict, "description": fmt.description}.items() if v is not None}
        choice = body.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": [dict(item) for item in self.output],
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature,
            "top_p": body.top_p, "tool_choice": choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto"),
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or ()],
            "text": {"format": text_format}, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "metadata": body.metadata or {}, "usage": usage, "store": False, "previous_response_id": None,
            "truncation": "disabled", "user": body.user,
        }

    def usage(self, final: RequestOutput) -> dict:
        completion = final.usage.completion_tokens if final.usage else 0
        cached = final.usage.cached_tokens if final.usage else 0
        return {"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + completion}

    # ---- items --------------------------------------------------------------------------------------
    def _events_of(self, text: str, finished: bool) -> list:
        if self.parser is None:
            return [("content", text)] if text else []
        return self.parser.feed(text) + (self.parser.finish() if finished else [])

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _close_message(self, status: str) -> list[dict]:
        message, self.open_message = self.open_message, None
        if message is None:
            return []
        index, part = self.output.index(message), message["content"][0]
        message["status"] = status
        return [self._event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=message["id"], output_index=index,
                            content_index=0, part=dict(part)),
                self._event("response.output_item.done", output_index=index, item=_copy(message))]

    def _add(self, kind: str, value) -> list[dict]:
        events: list[dict] = []
        if kind == "content":
            if self.open_message is None:
                self.open_message = {"type": "message", "id": _item_id("msg"), "status": "in_progress",
                                     "role": "assistant", "content": []}
                self.output.append(self.open_message)
                index = len(self.output) - 1
                events.append(self._event("response.output_item.added", output_index=index,
                                          item=_copy(self.open_message)))
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                self.open_message["content"].append(part)
                events.append(self._event("response.content_part.added", item_id=self.open_message["id"],
                                          output_index=index, content_index=0, part=dict(part)))
            message = self.open_message
            message["content"][0]["text"] += value
            events.append(self._event("response.output_text.delta", item_id=message["id"],
                                      output_index=self.output.index(message), content_index=0, delta=value,
                                      logprobs=[]))
            return events
        events += self._close_message("completed")
        item = {"type": "function_call", "id": _item_id("fc"), "call_id": value.id, "name": value.name,
                "arguments": "", "status": "in_progress"}
        self.output.append(item)
        index = len(self.output) - 1
        events.append(self._event("response.output_item.added", output_index=index, item=dict(item)))
        events.append(self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                  delta=value.arguments))
        item.update(arguments=value.arguments, status="completed")
        events.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=value.name, arguments=value.arguments))
        events.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        return events

    def feed(self, out: RequestOutput) -> list[dict]:
        """Stream events for one engine output (the closing ones included when it is the last)."""
        events: list[dict] = []
        for kind, value in self._events_of(out.text, out.finished):
            events += self._add(kind, value)
        if out.finished:
            incomplete = "max_output_tokens" if out.finish_reason == "length" else None
            events += self._close_message("incomplete" if incomplete else "completed")
            status = "incomplete" if incomplete else "completed"
            events.append(self._event(f"response.{status}",
                                      response=self.envelope(status, self.usage(out), incomplete)))
        return events

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.envelope("in_progress")),
                self._event("response.in_progress", response=self.envelope("in_progress"))]

    def response(self, outputs: list[RequestOutput]) -> dict:
        """The whole response object, once generation finished."""
        events = []
        for out in outputs:
            events += self.feed(out)
        return events[-1]["response"]


def _copy(message: dict) -> dict:
    return {**message, "content": [dict(part) for part in message["content"]]}


def response_events(shaper: ResponsesShaper, gen, first: RequestOutput) -> EventSourceResponse:
    """The SSE stream of a /v1/responses request: `event: <type>` and `data: {event}` per event."""
    async def frames():
        try:
            for event in shaper.start():
                yield _frame(event)
            async for _, out in merged([gen], [first]):
                if out.finish_reason == "error":
                    yield _frame(shaper._event("error", code="generation_failed", param=None,
                                               message=out.error or "generation failed"))
                    return
                for event in shaper.feed(out):
                    yield _frame(event)
        except Exception as exc:  # noqa: BLE001 - the response has started: report in the stream
            log.error("stream failed: %s", exc, exc_info=exc)
            yield _frame(shaper._event("error", code="stream_failed", param=None,
                                       message="internal error while streaming"))
    return EventSourceResponse(frames(), headers=SSE_HEADERS, sep="\n", ping=SSE_PING_S)


def _frame(event: dict) -> dict:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    data = data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return {"event": event["type"], "data": data}
