"""The benchmarks' streaming client (server/cli/bench/sse_client.py) against a scripted HTTP server on
127.0.0.1: chunked bodies cut anywhere (mid-line, mid-CRLF), sized and close-delimited bodies, CRLF
event separators, and statuses other than 200 with their body's text."""
from __future__ import annotations

import asyncio
import json

import pytest

from server.cli.bench.sse_client import HttpStatusError, sse_data

EVENTS = b'data: {"n":1}\n\ndata: {"n":2}\r\n\r\n: a comment\n\nevent: x\ndata: {"n":3}\n\ndata: [DONE]\n\n'


def chunked(body: bytes, cuts: list[int]) -> bytes:
    """`body` as chunked transfer encoding, one chunk per piece between `cuts`."""
    edges = [0, *cuts, len(body)]
    pieces = [body[a:b] for a, b in zip(edges, edges[1:]) if b > a]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def serve_once(response: list[bytes], seen: list[bytes]):
    """A server answering one request with `response`, written piece by piece (each drained)."""
    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        seen.append(head + await reader.readexactly(length))
        for piece in response:
            writer.write(piece)
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def fetch(response: list[bytes], headers: dict | None = None) -> tuple[list[bytes], bytes]:
    async def run():
        seen: list[bytes] = []
        server, port = await serve_once(response, seen)
        async with server:
            got = [d async for d in sse_data(f"http://127.0.0.1:{port}/v1/completions?x=1", {"prompt": "hi"},
                                             headers or {})]
        return got, seen[0]
    return asyncio.run(run())


WANTED = [b'{"n":1}', b'{"n":2}', b'{"n":3}', b"[DONE]"]


@pytest.mark.parametrize("cuts", [[], [1], [7, 8, 9], list(range(1, len(EVENTS)))])
def test_chunked_events_cut_anywhere(cuts):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = chunked(EVENTS, cuts)
    got, request = fetch([head, *[body[i:i + 5] for i in range(0, len(body), 5)]], {"Authorization": "Bearer k"})
    assert got == WANTED
    assert request.startswith(b"POST /v1/completions?x=1 HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in request and json.loads(request.split(b"\r\n\r\n", 1)[1]) == \
        {"prompt": "hi"}


def test_sized_and_close_delimited_bodies():
    sized = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(EVENTS)
    assert fetch([sized, EVENTS[:10], EVENTS[10:]])[0] == WANTED
    assert fetch([b"HTTP/1.0 200 OK\r\n\r\n", EVENTS[:-2]])[0] == WANTED      # the last line unterminated


def test_another_status_raises_with_the_body():
    body = b'{"error":{"message":"bad max_tokens"}}'
    with pytest.raises(HttpStatusError) as caught:
        fetch([b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(body), body])
    assert caught.value.status == 400 and "bad max_tokens" in caught.value.text


def test_only_plain_http():
    async def run():
        return [d async for d in sse_data("https://127.0.0.1:1/v1/completions", {}, {})]
    with pytest.raises(ValueError, match="http://"):
        asyncio.run(run())
