"""Running engine requests for the routes: submitting the n choices of a request, racing them
against the client's disconnect, merging their outputs, and answering as JSON or Server-Sent Events.
Cancelling a consumer of `Engine.generate` aborts its request before the engine's next step.

Streams keep up by coalescing: `Engine.generate` already merges the deltas that arrived while its
consumer was busy, and `merged` merges a choice's deltas that wait in its queue, so a client (or an
event loop) that lags gets fewer, larger SSE events with the same text, tokens and logprobs instead
of a growing backlog of one-token events."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from server.api.http_guard import ClientGone
from server.api.errors import ApiError, api_error_from, error_body
from server.engine.streams import merge_outputs
from server.engine.results import RequestOutput
from server.engine.request import GenerationRequest

log = logging.getLogger("customllm.api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_PING_S = 15


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


async def submit_all(engine, requests: list[GenerationRequest], prompt_param: str | None = None):
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
            raise api_error_from(failure, prompt_param)
        accepted = True
        return gens, [t.result() for t in tasks]
    finally:
        if not accepted:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_all(gens)


async def merged(gens, firsts) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with their choice index; a choice's outputs
    that wait together are merged into one. Leaving early (or being cancelled) aborts the requests
    not yet finished."""
    if len(gens) == 1:                       # one choice: read it directly, no pump task
        gen, first = gens[0], firsts[0]
        try:
            yield 0, first
            if not first.finished:
                async for out in gen:
                    yield 0, out
        finally:
            await gen.aclose()
        return
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
            waiting = [await queue.get()]
            while not queue.empty():
                waiting.append(queue.get_nowait())
            for index, out in _coalesced(waiting):
                remaining -= out.finished
                yield index, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _coalesced(items: list[tuple[int, RequestOutput]]) -> list[tuple[int, RequestOutput]]:
    """Each choice's outputs among `items` merged into one, in order of each choice's first."""
    by_choice: dict[int, list[RequestOutput]] = {}
    for index, out in items:
        by_choice.setdefault(index, []).append(out)
    return [(index, merge_outputs(outs)) for index, outs in by_choice.items()]


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
            session: str | None, priority: int = 0) -> list[GenerationRequest]:
    """One engine request per choice (choice index = prompt index * n + i), ids `<id>-<index>`
    when there are several; only choice 0 continues the session, the others are independent."""
    total = len(prompts) * n
    return [GenerationRequest(base_id if total == 1 else f"{base_id}-{index}", prompts[index // n],
                              params[index // n], tenant, session if index == 0 else None, priority)
            for index in range(total)]

