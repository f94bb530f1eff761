#!/usr/bin/env python3
"""
A cheap webhook receiver for the benchmark (``bench.py --webhook``): an HTTP/1.1 server
with keep-alive that answers every request ``200`` with an empty body and counts the POSTs.

    webhook_sink.py [--listen 127.0.0.1] [--port 0]

Prints ``{"port": N}`` on its first stdout line, then answers one JSON line per command
read from stdin (as bench/sink.py does):

    stats   {"posts", "connections", "keepalive_reuses", "bytes", "errors", "first", "last"}
    quit    prints the stats a last time and stops (so does end of file on stdin)

``first`` and ``last`` are the ``time.monotonic()`` of the first and the last POST (the
system-wide CLOCK_MONOTONIC: comparable with the SMTP sink's arrival times).
``keepalive_reuses`` counts requests that arrived on a connection that had already
carried one (so the bench can see whether mmgun reuses its connections).

It parses only what it must: the request line's method, ``Content-Length`` (chunked
bodies are not expected from treq with a known length, and are answered 411 and counted
as errors) and the end of the headers; the body is skipped unread. Pipelined requests
are handled. No JSON is decoded: its CPU per POST must stay far below mmgun's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
LENGTH_REQUIRED = b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEADERS = 64 * 1024


class Counts:
    def __init__(self) -> None:
        self.posts = 0
        self.requests = 0
        self.connections = 0
        self.keepalive_reuses = 0
        self.bytes = 0
        self.errors = 0
        self.first: float | None = None
        self.last: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "posts": self.posts,
            "requests": self.requests,
            "connections": self.connections,
            "keepalive_reuses": self.keepalive_reuses,
            "bytes": self.bytes,
            "errors": self.errors,
            "first": self.first,
            "last": self.last,
        }


class Receiver(asyncio.Protocol):
    def __init__(self, counts: Counts) -> None:
        self._counts = counts
        self._buffer = b""
        #: Body bytes of the current request still to skip.
        self._skip = 0
        self._served = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._counts.connections += 1

    def data_received(self, data: bytes) -> None:
        counts = self._counts
        counts.bytes += len(data)
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        buffer = self._buffer + data if self._buffer else data
        answers = []
        while buffer:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADERS:
                    self._fail()
                    return
                break
            head = buffer[:end]
            length = _content_length(head)
            if length is None:
                answers.append(LENGTH_REQUIRED)
                counts.errors += 1
                assert self._transport is not None
                self._transport.write(b"".join(answers))
                self._transport.close()
                return
            counts.requests += 1
            if self._served:
                counts.keepalive_reuses += 1
            self._served += 1
            if head.startswith(b"POST "):
                counts.posts += 1
                now = time.monotonic()
                if counts.first is None:
                    counts.first = now
                counts.last = now
            answers.append(OK)
            start = end + 4
            available = len(buffer) - start
            if available >= length:
                buffer = buffer[start + length :]
            else:
                self._skip = length - available
                buffer = b""
        self._buffer = buffer
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))

    def _fail(self) -> None:
        self._counts.errors += 1
        if self._transport is not None:
            self._transport.close()


def _content_length(head: bytes) -> int | None:
    """The request's Content-Length (0 without a body-bearing header), or None when it is chunked or malformed."""
    lower = head.lower()
    if b"\r\ntransfer-encoding:" in lower:
        return None
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    stop = lower.find(b"\r\n", at + 17)
    value = lower[at + 17 : stop if stop >= 0 else len(lower)]
    try:
        return int(value.strip())
    except ValueError:
        return None


async def serve(listen: str, port: int) -> None:
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Receiver(counts), listen, port, backlog=128)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": bound}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                break
            if line == "stats":
                print(json.dumps(counts.as_dict()), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {line!r}"}), flush=True)
    finally:
        server.close()
        print(json.dumps(counts.as_dict()), flush=True)
        print(f"webhook_sink: {counts.posts} POSTs on {counts.connections} connections", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.port))


if __name__ == "__main__":
    main()
