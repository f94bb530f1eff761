#!/usr/bin/env python3
"""
The SMTP bench's load generator: smtp-source's load, with SMTP AUTH.

Postfix's smtp-source (what issue 16's proof names) cannot authenticate, and mmgun's
submission server takes no transaction without AUTH, whatever the listener (never an
open relay, not even for a bench). So this generator sends smtp-source's load —
``-s SESSIONS -m MESSAGES -d -N -l LENGTH``: S sessions at once, each sending its share
of the messages one after the other over one connection, one command at a time (no
PIPELINING, as smtp-source), every message to a recipient of its own
(``<n>bench@alpha.bench.test``, as ``-N``), the same header fields and the same body of
``<n>XXXX…`` lines up to LENGTH octets — with ``EHLO`` and ``AUTH PLAIN`` first when
given ``--api-key``. Without it (``EHLO`` and no AUTH), the same load goes to Postfix's
smtpd, so the bench can show this generator drives Postfix as fast as smtp-source does.

    smtpload.py --port P --sessions 20 --messages 20000 --length 1300 --result FILE [--api-key KEY] [--ready]

The result file (JSON) holds the messages accepted (``250`` to the final dot) and the
replies that refused one (by code), the latency of each message (MAIL to the reply to
its final dot) as percentiles, the first-send and last-answer times (``time.monotonic()``),
this process's CPU seconds, and the recipients accepted. Only the standard library
(asyncio streams). Bounded: every reply is awaited at most --timeout seconds, the whole
run at most --deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import resource
import sys
import time
from email.utils import formatdate
from typing import Any

RECIPIENT_DOMAIN = "alpha.bench.test"


@functools.cache
def body(length: int, head: int) -> bytes:
    """smtp-source's body: lines ``<n>XXXX…`` (80 octets with CRLF) until the message is ``length`` octets."""
    lines, total, n = [], head, 1
    while total < length:
        text = str(n).encode("ascii")
        line = text + b"X" * max(0, min(78, length - total - 2) - len(text))
        lines.append(line + b"\r\n")
        total += len(line) + 2
        n += 1
    return b"".join(lines)


def message(n: int, sender: str, helo: str, length: int) -> bytes:
    """Message ``n`` as smtp-source writes it (its header fields, then the body), dot-stuffing not needed."""
    head = (
        f"From: <{sender}>\r\nTo: <bench@{RECIPIENT_DOMAIN}>\r\nDate: {formatdate()}\r\n"
        f"Message-Id: <{n:x}.{time.monotonic_ns():x}@{helo}>\r\n\r\n"
    ).encode("ascii")
    return head + body(length, len(head)) + b".\r\n"


class Refused(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (multi-line) reply: its code and last line."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"the server closed the connection or sent {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line.rstrip()


async def session(args: argparse.Namespace, numbers: range, results: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    # One timer per session, pushed back at each command (asyncio.wait_for would make a task per reply).
    limit = asyncio.timeout(args.timeout)
    writer: asyncio.StreamWriter | None = None

    async def command(line: bytes, expect: int) -> None:
        assert writer is not None
        limit.reschedule(loop.time() + args.timeout)
        writer.write(line)
        code, text = await reply(reader)
        if code != expect:
            raise Refused(f"{code}", text)

    try:
        async with limit:
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
            code, text = await reply(reader)
            if code != 220:
                raise Refused(f"{code}", text)
            await command(f"EHLO {args.helo}\r\n".encode("ascii"), 250)
            if args.api_key:
                token = base64.b64encode(b"\0api\0" + args.api_key.encode("ascii"))
                await command(b"AUTH PLAIN " + token + b"\r\n", 235)
            mail = f"MAIL FROM:<{args.sender}>\r\n".encode("ascii")
            for n in numbers:
                if time.monotonic() > results["deadline"]:
                    break
                recipient = f"{n}bench@{RECIPIENT_DOMAIN}"
                data = message(n, args.sender, args.helo, args.length)
                started = time.monotonic()
                results["first_send"] = results["first_send"] or started
                try:
                    await command(mail, 250)
                    await command(f"RCPT TO:<{recipient}>\r\n".encode("ascii"), 250)
                    await command(b"DATA\r\n", 354)
                    await command(data, 250)
                except Refused as e:
                    code = e.args[0]
                    results["errors"][code] = results["errors"].get(code, 0) + 1
                    if len(results["error_samples"]) < 5:
                        results["error_samples"].append(e.args[1].decode("ascii", "replace"))
                    await command(b"RSET\r\n", 250)
                    continue
                finished = time.monotonic()
                results["last_answer"] = finished
                results["latencies"].append(finished - started)
                results["recipients"].append([n, [recipient]])
            await command(b"QUIT\r\n", 221)
    except (TimeoutError, Refused, ConnectionError, OSError) as e:
        results["errors"]["session"] = results["errors"].get("session", 0) + 1
        if len(results["error_samples"]) < 5:
            results["error_samples"].append(repr(e)[:300])
    finally:
        if writer is not None:
            writer.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "first_send": None,
        "last_answer": None,
        "latencies": [],
        "recipients": [],
        "errors": {},
        "error_samples": [],
        "deadline": time.monotonic() + args.deadline,
    }
    # Each session its share, numbered 1..messages (smtp-source -N's recipients).
    shares = [range(1 + s, args.messages + 1, args.sessions) for s in range(args.sessions)]
    await asyncio.wait_for(asyncio.gather(*(session(args, share, results) for share in shares)), args.deadline + 30)
    latencies = sorted(results.pop("latencies"))
    results.pop("deadline")
    accepted = len(latencies)

    def percentile(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None

    span = (results["last_answer"] or 0) - (results["first_send"] or 0)
    results.update(
        accepted=accepted,
        rate=accepted / span if span > 0 else None,
        latency={"p50": percentile(0.5), "p99": percentile(0.99), "max": latencies[-1] if latencies else None},
    )
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=20, help="sessions at once (smtp-source -s; default 20)")
    parser.add_argument("--messages", type=int, default=20_000, help="messages in all (smtp-source -m; default 20,000)")
    parser.add_argument("--length", type=int, default=1300, help="octets of each message (smtp-source -l; default 1300)")
    parser.add_argument("--sender", default="bench@sender.bench.test")
    parser.add_argument("--helo", default="source.bench.test")
    parser.add_argument("--api-key", help="AUTH PLAIN as api with this mmgun API key (none: no AUTH)")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait for one reply (seconds)")
    parser.add_argument("--deadline", type=float, default=600.0, help="longest run (seconds)")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--ready", action="store_true", help="print 'ready', wait for a line on stdin, then start")
    args = parser.parse_args(argv)
    if args.ready:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
    result = asyncio.run(run(args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    with open(args.result, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
