#!/usr/bin/env python3
"""
The benchmark's load generator: POSTs N messages to mmgun's /send over C
keep-alive HTTP/1.1 connections (one request in flight on each), and records
the latency and the answer of every request.

    loadgen.py --port P --messages N --concurrency C --result FILE [--recipients 1-3] [--content text|rich]
               [--api-key KEY --sender ADDRESS] [--target HOST:PORT ...]

``--target`` (repeated) spreads the connections over several frontends instead of --host and
--port: connection k goes to target k mod T, all of them taking from one queue of requests
(the two-host bench, bench/netns.py; its targets are TEST-NET addresses, which exist only in
that bench's network namespaces).

Authentication: the deprecated ``client_id`` field (--client-id, a clients-file id), or
with --api-key an ``Authorization: Bearer`` header instead (a key of ``mmgun keys create``;
what the DKIM runs use, their client owning the sending domain of --sender).

``--content text`` (the default) sends the seed's message: a ~1 KB plain-text body.
``--content rich`` sends issue 12's: the same text body as the text alternative of a
~30 KB HTML part (--html-size; table markup with inline styles, lines longer than 76, so
it travels quoted-printable as real newsletters do) and a ~100 KB attachment of random
bytes (--attachment-size; incompressible, like a PDF or a JPEG; base64 in the JSON).

Request i goes to recipients whose addresses are unique in the run
(``r<i>x<j>@alpha.bench.test`` / ``@beta.bench.test``), so the sink can tell
every delivery apart. The result file (JSON) holds the counts, the latency
percentiles, the first-send and last-answer times (``time.monotonic()``,
comparable across processes on Linux) and the recipients of every accepted
submission. Only the standard library: asyncio protocols with pre-built
requests, so that one process drives far more requests per second than the
server under test answers. Bounded: each request times out, and the whole run
stops at --deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import ipaddress
import json
import random
import resource
import sys
import time
from typing import Any

DOMAINS = ("alpha.bench.test", "beta.bench.test")
WORDS = (
    "relay queue durable envelope sender recipient message body lorem ipsum dolor sit amet "
    "consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna aliqua"
).split()


def make_recipients(index: int, count: int, rng: random.Random) -> list[str]:
    """count unique addresses over the two bench domains (both appear once count >= 2)."""
    first = rng.randrange(2)
    return [f"r{index}x{j}@{DOMAINS[(first + j) % 2]}" for j in range(count)]


def make_body(rng: random.Random, size: int) -> str:
    """About ``size`` characters of plain ASCII text in lines of ~70 (quoted-printable leaves it as is)."""
    lines, line, total = [], [], 0
    while total < size:
        word = rng.choice(WORDS)
        line.append(word)
        total += len(word) + 1
        if sum(len(w) + 1 for w in line) > 70:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines)


def make_html(rng: random.Random, size: int) -> str:
    """
    About ``size`` characters of newsletter-like HTML: a table of rows with inline styles,
    each line 120-200 characters (so mmgun sends it quoted-printable, as it would a real one).
    """
    style = "padding:8px 16px;font-family:Helvetica,Arial,sans-serif;font-size:14px;line-height:20px;color:#333333"
    lines = ['<!DOCTYPE html><html><head><meta charset="utf-8"><title>bench</title></head>', "<body><table>"]
    total = sum(len(line) + 1 for line in lines)
    while total < size:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        line = f'<tr><td style="{style}"><a href="https://example.com/{rng.randrange(10**6)}">{words}</a></td></tr>'
        lines.append(line)
        total += len(line) + 1
    lines.append("</table></body></html>")
    return "\n".join(lines)


#: A request as the pieces written for it (so that the large shared part of a rich request is held once).
Request = tuple[bytes, ...]


def build_requests(
    count: int,
    client_id: str,
    host: str,
    recipients: tuple[int, int],
    body_size: int,
    seed: int,
    content: str = "text",
    html_size: int = 30_000,
    attachment_size: int = 100_000,
    api_key: str | None = None,
    sender: str = "bench@sender.bench.test",
) -> tuple[list[Request], list[list[str]]]:
    rng = random.Random(seed)
    bodies = [make_body(rng, body_size) for _ in range(64)]
    # A rich request's HTML part and attachment: the end of its JSON object, one of four, shared.
    tails = [b"}"]
    if content == "rich":
        tails = []
        for variant in range(4):
            attachment = {
                "filename": f"invoice-{variant}.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(rng.randbytes(attachment_size)).decode("ascii"),
            }
            html = json.dumps(make_html(rng, html_size))
            tails.append(f', "html": {html}, "attachments": [{json.dumps(attachment)}]}}'.encode())
    authorization = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    requests: list[Request] = []
    addresses = []
    for i in range(count):
        rcpts = make_recipients(i, rng.randint(*recipients), rng)
        document: dict[str, Any] = {} if api_key else {"client_id": client_id}
        document |= {
            "sender": sender,
            "recipients": rcpts,
            "subject": f"bench message {i}",
            "body": bodies[i % len(bodies)],
        }
        payload = json.dumps(document).encode("utf-8")[:-1]  # without its closing brace
        tail = tails[i % len(tails)]
        head = (
            f"POST /send HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{authorization}"
            f"Content-Length: {len(payload) + len(tail)}\r\n\r\n"
        ).encode("ascii")
        requests.append((head + payload, tail))
        addresses.append(rcpts)
    return requests, addresses


class Shared:
    """The work queue and the results, shared by every connection of the run."""

    def __init__(self, requests: list[Request], deadline: float) -> None:
        self.requests = requests
        self.next = 0
        self.deadline = deadline
        self.latencies: list[float] = []
        self.status: list[int] = [0] * len(requests)
        self.submission_ids: list[str | None] = [None] * len(requests)
        self.first_send: float | None = None
        self.last_answer: float | None = None
        self.errors: dict[str, int] = {}
        #: Accepted requests by target ("HOST:PORT"), for --target.
        self.accepted_by: dict[str, int] = {}

    def take(self) -> int | None:
        if self.next >= len(self.requests) or time.monotonic() > self.deadline:
            return None
        self.next += 1
        return self.next - 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Client(asyncio.Protocol):
    """One keep-alive connection: send a request, read the whole response, send the next."""

    def __init__(self, shared: Shared, done: asyncio.Future[None], timeout: float, target: str = "") -> None:
        self._shared = shared
        self._target = target
        self._done = done
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._index: int | None = None
        self._sent_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # create_connection's are
        self._transport = transport
        self._next()

    def _next(self) -> None:
        index = self._shared.take()
        if index is None:
            self._finish()
            return
        self._index = index
        self._buffer = b""
        self._sent_at = time.monotonic()
        if self._shared.first_send is None:
            self._shared.first_send = self._sent_at
        self._timer = self._loop.call_later(self._timeout, self._timed_out)
        assert self._transport is not None
        self._transport.writelines(self._shared.requests[index])

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        parsed = parse_response(self._buffer)
        if parsed is None:
            return
        code, body, keep_alive = parsed
        now = time.monotonic()
        if self._timer is not None:
            self._timer.cancel()
        assert self._index is not None
        self._shared.latencies.append(now - self._sent_at)
        self._shared.status[self._index] = code
        self._shared.last_answer = now
        if code == 200:
            self._shared.accepted_by[self._target] = self._shared.accepted_by.get(self._target, 0) + 1
            try:
                self._shared.submission_ids[self._index] = json.loads(body)["submission_id"]
            except (ValueError, KeyError, TypeError):
                self._shared.error("bad 200 body")
        else:
            self._shared.error(f"HTTP {code}")
        self._index = None
        if keep_alive:
            self._next()
        else:
            self._shared.error("server closed keep-alive")
            self._finish()

    def _timed_out(self) -> None:
        self._shared.error("timeout")
        self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._index is not None:
            self._shared.error("connection lost")
            self._index = None
        self._finish()

    def _finish(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self._done.done():
            self._done.set_result(None)


def parse_response(buffer: bytes) -> tuple[int, bytes, bool] | None:
    """(status, body, keep-alive) once the whole response is in buffer; Content-Length or chunked."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].decode("latin-1").split("\r\n")
    code = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get("connection", "").lower() != "close"
    rest = buffer[end + 4 :]
    if "content-length" in headers:
        length = int(headers["content-length"])
        if len(rest) < length:
            return None
        return code, rest[:length], keep_alive
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, position = b"", 0
        while True:
            line_end = rest.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(rest[position:line_end].split(b";")[0], 16)
            start = line_end + 2
            if size == 0:
                if rest.find(b"\r\n", start) < 0:
                    return None
                return code, body, keep_alive
            if len(rest) < start + size + 2:
                return None
            body += rest[start : start + size]
            position = start + size + 2
    return None


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


async def run(args: argparse.Namespace, requests: list[Request], addresses: list[list[str]]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    shared = Shared(requests, time.monotonic() + args.deadline)
    futures = []
    targets: list[tuple[str, int]] = args.targets or [(args.host, args.port)]
    for k in range(args.concurrency):
        done: asyncio.Future[None] = loop.create_future()
        futures.append(done)
        host, port = targets[k % len(targets)]
        try:
            await loop.create_connection(
                functools.partial(Client, shared, done, args.timeout, f"{host}:{port}"), host, port
            )
        except OSError as e:
            shared.error(f"connect: {e.strerror}")
            done.set_result(None)
    await asyncio.wait_for(asyncio.gather(*futures), args.deadline + args.timeout + 5)
    latencies = sorted(shared.latencies)
    accepted = [i for i, code in enumerate(shared.status) if code == 200]
    duration = (shared.last_answer or 0) - (shared.first_send or 0)
    return {
        "requested": args.messages,
        "sent": shared.next,
        "accepted": len(accepted),
        "accepted_recipients": sum(len(addresses[i]) for i in accepted),
        "errors": shared.errors,
        "first_send": shared.first_send,
        "last_answer": shared.last_answer,
        "duration": duration,
        "rate": len(accepted) / duration if duration > 0 else None,
        "latency": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": latencies[-1] if latencies else None,
            "mean": sum(latencies) / len(latencies) if latencies else None,
        },
        "recipients": [[shared.submission_ids[i], addresses[i]] for i in accepted],
        **({"accepted_by_target": shared.accepted_by} if args.targets else {}),
    }


def _test_net_or_loopback(host: str) -> bool:
    """127.0.0.0/8, or an RFC 5737 documentation network (reachable only inside the bench's namespaces)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    networks = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
    return address.is_loopback or any(address in ipaddress.ip_network(n) for n in networks)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a frontend (repeat: the connections are spread over them); replaces --host and --port",
    )
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--recipients", default="1-3", help="recipients per message: N or LOW-HIGH")
    parser.add_argument("--body-size", type=int, default=1000, help="characters of body text")
    parser.add_argument(
        "--content", choices=("text", "rich"), default="text", help="the message: text (default) or rich (see above)"
    )
    parser.add_argument("--html-size", type=int, default=30_000, help="characters of HTML (rich; default 30,000)")
    parser.add_argument(
        "--attachment-size", type=int, default=100_000, help="octets of attachment (rich; default 100,000)"
    )
    parser.add_argument("--client-id", default="demo-client-0123456789abcdef")
    parser.add_argument("--api-key", help="authenticate with this key (Bearer) instead of --client-id")
    parser.add_argument("--sender", default="bench@sender.bench.test", help="the sender (From) address")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for one request")
    parser.add_argument("--deadline", type=float, default=300.0, help="no new request after this many seconds")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument(
        "--ready", action="store_true", help="build the requests, print 'ready', wait for a line on stdin, then start"
    )
    args = parser.parse_args(argv)
    args.targets = []
    for target in args.target:
        host, _, port = target.rpartition(":")
        if not _test_net_or_loopback(host) or not port.isdigit():
            parser.error(f"--target {target!r}: HOST:PORT, HOST in 127.0.0.0/8 or a TEST-NET (RFC 5737)")
        args.targets.append((host, int(port)))
    if not args.targets:
        if args.port is None:
            parser.error("--port (or --target) is required")
        if not args.host.startswith("127."):
            parser.error("the load generator targets loopback only (127.0.0.0/8)")
    low, _, high = args.recipients.partition("-")
    requests, addresses = build_requests(
        args.messages,
        args.client_id,
        "{}:{}".format(*(args.targets[0] if args.targets else (args.host, args.port))),
        (int(low), int(high or low)),
        args.body_size,
        args.seed,
        args.content,
        args.html_size,
        args.attachment_size,
        args.api_key,
        args.sender,
    )
    if args.ready:
        # Building 20k requests takes a moment: the bench starts its clocks after it.
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
    result = asyncio.run(run(args, requests, addresses))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
