"""The benchmarks' streaming client: one HTTP/1.1 POST per connection over asyncio streams, the
response's chunked (or sized, or closed) body and its Server-Sent Events read by hand.

The load generator shares the machine with the servers it measures, and whatever CPU it takes a
server loses, the fastest server most (its tokens come most often). On the 2-core machine at 16
streams of ~900 tokens/s, httpx's streaming took 0.14 s of CPU per 1.2-s round, 12 % of a core,
and this client 0.04-0.05 s (docs/benchmarks.md, "The load generator"). vLLM's own serving
benchmark streams with aiohttp for the same reason.

`sse_data` yields the payload of each `data:` line (a JSON chunk, or `[DONE]`); a status other than
200 raises `HttpStatusError` with the body's first bytes. Plain `http://` URLs only: a benchmark of a
TLS endpoint measures the TLS library as much as the server.
"""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator
from urllib.parse import urlsplit

READ_SIZE = 65536
ERROR_BODY_BYTES = 2048


class HttpStatusError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text}")
        self.status, self.text = status, text


def _request_head(url: str, body: bytes, headers: dict) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the streaming client speaks plain http:// only, not {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Accept: text/event-stream", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return parts.hostname, parts.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status code and the headers (lower-cased names) of a response."""
    status_line = await reader.readline()
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
        raise ConnectionError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return int(fields[1]), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives: de-chunked, or `content-length` bytes, or up to the close."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                return
            piece = await reader.readexactly(size + 2)            # the chunk and its CRLF
            yield piece[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            piece = await reader.read(min(left, READ_SIZE))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)
            yield piece
    else:
        while piece := await reader.read(READ_SIZE):
            yield piece


async def sse_data(url: str, body: dict, headers: dict) -> AsyncIterator[bytes]:
    """POST `body` as JSON to `url` and yield each `data:` line's payload as it arrives."""
    payload = json.dumps(body).encode()
    host, port, head = _request_head(url, payload, headers)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + payload)
        status, response_headers = await _read_head(reader)
        if status != 200:
            text = b""
            async for piece in _body_pieces(reader, response_headers):
                text += piece
                if len(text) >= ERROR_BODY_BYTES:
                    break
            raise HttpStatusError(status, text[:ERROR_BODY_BYTES].decode(errors="replace"))
        pending = b""
        async for piece in _body_pieces(reader, response_headers):
            lines = (pending + piece).split(b"\n")
            pending = lines.pop()                                  # an unfinished line waits for the rest
            for line in lines:
                if line.startswith(b"data:"):
                    yield line[5:].strip()
        if pending.startswith(b"data:"):
            yield pending[5:].strip()
    finally:
        writer.close()
