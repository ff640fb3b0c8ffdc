"""Outputs on their way to asyncio consumers: each request's `OutputStream` on its event loop's side,
the batched hand-off to event loops from another thread (`hand_over`: one `call_soon_threadsafe` per
loop and batch, not one per token), and the merging of the deltas a lagging consumer has not read.
The in-process engine (`engine.py`) and the engine-core client (`core_client.py`) both deliver
through it."""
from __future__ import annotations

import asyncio
from collections import defaultdict

from server.engine.results import RequestOutput


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one: text, token ids and logprobs concatenated; the
    finish reason, error and usage of the last (only the last of a stream may be finished)."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    logprobs = None
    if any(o.logprobs is not None for o in outputs):
        logprobs = tuple(lp for o in outputs for lp in (o.logprobs or ()))
    return RequestOutput(last.request_id, "".join(o.text for o in outputs),
                         tuple(t for o in outputs for t in o.token_ids), logprobs,
                         last.finish_reason, last.error, last.usage)


class OutputStream:
    """The deltas of one request on its event loop's side. `put` runs on that loop (the engine's
    batched hand-off calls it); `get` returns everything that arrived since the last `get`, merged."""

    __slots__ = ("loop", "request_id", "_pending", "_waiter", "_error", "cached_tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop, request_id: str):
        self.loop = loop
        self.request_id = request_id
        self._pending: list[RequestOutput] = []
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self.cached_tokens = 0          # prompt tokens the engine found cached (an engine-core process says)

    def put(self, output: RequestOutput) -> None:
        self._pending.append(output)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """`get` raises `error` once what arrived before it is read (an engine in another process
        refusing the request at admission)."""
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        while not self._pending:
            if self._error is not None:
                raise self._error
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pending, self._pending = self._pending, []
        return pending[0] if len(pending) == 1 else merge_outputs(pending)


def _deliver(items: list[tuple[OutputStream, RequestOutput]]) -> None:
    """`put` of each item, inlined (it runs once per stream and step on the event loop)."""
    for stream, output in items:
        stream._pending.append(output)
        waiter = stream._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def hand_over(items: list[tuple[OutputStream, RequestOutput]]) -> set[str]:
    """Give streams their outputs from another thread: one `call_soon_threadsafe` per event loop.
    Returns the request ids whose event loop is gone (nobody reads them any more)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    for item in items:
        by_loop[item[0].loop].append(item)
    orphaned: set[str] = set()
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # that event loop is gone
            orphaned.update(stream.request_id for stream, _ in batch)
    return orphaned
