#!/usr/bin/env python3
"""
A fast SMTP sink for the benchmark: accepts every message, counts it, and records
which (Message-ID, recipient) pairs arrived so the bench can find duplicates and losses.

    sink.py [--listen 127.0.0.1] [--port 0]

(--listen takes a loopback address, or an RFC 5737 TEST-NET one: those exist only in the
network namespaces of the two-host bench, bench/netns.py, where the sink runs on the MX host.)

Prints ``{"port": N}`` on its first stdout line, then answers one JSON line per
command read from stdin:

    stats           {"messages", "recipients", "duplicates", "connections", "first", "last", "errors",
                     "by_peer": messages by client address (which host delivered them)}
    dump PATH       writes one line per accepted message to PATH: monotonic time,
                    Message-ID, recipients (tab-separated); answers {"dumped": N}
    quit            stops the sink (so does end of file on stdin)

Times are ``time.monotonic()``, the system-wide CLOCK_MONOTONIC on Linux, so they
compare with the other bench processes' clocks. It is deliberately not
twisted.mail's ESMTP server: a raw protocol that parses lines from one buffer
keeps the sink's CPU per message far below that of the relays it measures. It
advertises PIPELINING (as real MXes do) and handles pipelined commands.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from array import array
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport, ITransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

MAX_LINE = 4096
MAX_MESSAGE = 64 * 1024 * 1024
EHLO_REPLY = (
    b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class Recorder:
    """Everything the sink accepted, in arrival order."""

    def __init__(self) -> None:
        self.times = array("d")
        self.message_ids: list[bytes] = []
        self.recipients: list[tuple[bytes, ...]] = []
        self.seen: set[tuple[bytes, bytes]] = set()
        self.recipient_count = 0
        self.duplicates = 0
        self.connections = 0
        self.errors = 0
        self.by_peer: dict[str, int] = {}

    def accept(self, message_id: bytes, recipients: tuple[bytes, ...], peer: str = "") -> None:
        self.times.append(time.monotonic())
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
        self.message_ids.append(message_id)
        self.recipients.append(recipients)
        self.recipient_count += len(recipients)
        for rcpt in recipients:
            key = (message_id, rcpt)
            if key in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(key)

    def stats(self) -> dict[str, Any]:
        return {
            "messages": len(self.times),
            "recipients": self.recipient_count,
            "duplicates": self.duplicates,
            "connections": self.connections,
            "errors": self.errors,
            "first": self.times[0] if self.times else None,
            "last": self.times[-1] if self.times else None,
            "by_peer": self.by_peer,
        }

    def dump(self, path: str) -> int:
        with open(path, "wb") as f:
            for t, mid, rcpts in zip(self.times, self.message_ids, self.recipients, strict=True):
                f.write(b"%.6f\t%s\t%s\n" % (t, mid, b",".join(rcpts)))
        return len(self.times)


def message_id(data: bytes) -> bytes:
    """The Message-ID header's value (unfolded, without spaces), or b"" when there is none."""
    end = data.find(b"\r\n\r\n")
    head = b"\r\n" + (data[: end + 2] if end >= 0 else data)
    found = head.lower().find(b"\r\nmessage-id:")
    if found < 0:
        return b""
    start = found + len(b"\r\nmessage-id:")
    stop = head.find(b"\r\n", start)
    while stop >= 0 and head[stop + 2 : stop + 3] in (b" ", b"\t"):
        stop = head.find(b"\r\n", stop + 2)
    return b"".join(head[start : stop if stop >= 0 else len(head)].split())


class SinkProtocol(Protocol):
    """One SMTP server connection: replies to commands, buffers DATA up to the lone "." line."""

    transport: ITCPTransport  # set by makeConnection; the sink listens on TCP only

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._buffer = b""
        self._in_data = False
        self._search_from = 0
        self._recipients: list[bytes] = []
        self._peer = ""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        peer = self.transport.getPeer()
        self._peer = peer.host if isinstance(peer, IPv4Address) else ""
        self._recorder.connections += 1
        self.transport.write(b"220 sink.bench.test ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        replies: list[bytes] = []
        closing = False
        while buffer:
            if self._in_data:
                # The buffer starts with the CRLF that preceded the body, so the
                # terminator is always CRLF "." CRLF, even for an empty body.
                end = buffer.find(b"\r\n.\r\n", self._search_from)
                if end < 0:
                    if len(buffer) > MAX_MESSAGE:
                        self._recorder.errors += 1
                        self.transport.loseConnection()
                        return
                    self._search_from = max(0, len(buffer) - 4)
                    break
                body = buffer[2 : end + 2]
                buffer = buffer[end + 5 :]
                self._in_data = False
                self._search_from = 0
                self._recorder.accept(message_id(body), tuple(self._recipients), self._peer)
                self._recipients = []
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_LINE:
                    self._recorder.errors += 1
                    self.transport.loseConnection()
                    return
                break
            line, buffer = buffer[:end], buffer[end + 2 :]
            verb = line[:4].upper()
            if verb == b"MAIL":
                self._recipients = []
                replies.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                start, stop = line.find(b"<"), line.rfind(b">")
                if start < 0 or stop < start:
                    replies.append(b"501 5.1.3 bad recipient syntax\r\n")
                else:
                    self._recipients.append(line[start + 1 : stop])
                    replies.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if not self._recipients:
                    replies.append(b"503 5.5.1 no valid recipients\r\n")
                else:
                    replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    self._in_data = True
                    buffer = b"\r\n" + buffer
            elif verb == b"EHLO":
                replies.append(EHLO_REPLY)
            elif verb == b"HELO":
                replies.append(b"250 sink.bench.test\r\n")
            elif verb == b"RSET":
                self._recipients = []
                replies.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"NOOP":
                replies.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                closing = True
                buffer = b""
                break
            else:
                replies.append(b"502 5.5.2 command not implemented\r\n")
        self._buffer = buffer
        if replies:
            self.transport.write(b"".join(replies))
        if closing:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._buffer = b""


class SinkFactory(ServerFactory):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        return SinkProtocol(self.recorder)


class Control(LineReceiver):
    """The bench's commands on stdin, one JSON answer per line on stdout."""

    delimiter = b"\n"
    transport: ITransport  # set by makeConnection (StandardIO)

    def __init__(self, recorder: Recorder, reactor: Any) -> None:
        self._recorder = recorder
        self._reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        command, _, argument = line.decode("utf-8").strip().partition(" ")
        if command == "stats":
            self._answer(self._recorder.stats())
        elif command == "dump":
            self._answer({"dumped": self._recorder.dump(argument)})
        elif command == "quit":
            self._reactor.stop()
        else:
            self._answer({"error": f"unknown command {command!r}"})

    def _answer(self, document: dict[str, Any]) -> None:
        self.transport.write(json.dumps(document).encode("utf-8") + b"\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._reactor.running:
            self._reactor.stop()


def _test_net(host: str) -> bool:
    """An RFC 5737 documentation address: reachable only inside the two-host bench's namespaces."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1", help="loopback (or TEST-NET) address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free one)")
    args = parser.parse_args(argv)
    if not args.listen.startswith("127.") and not _test_net(args.listen):
        parser.error("the sink listens on loopback only (127.0.0.0/8), or on a TEST-NET address (RFC 5737)")

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    recorder = Recorder()
    port = reactor.listenTCP(args.port, SinkFactory(recorder), backlog=1024, interface=args.listen)
    address = port.getHost()
    assert isinstance(address, IPv4Address)  # --listen is an IPv4 loopback address
    sys.stdout.write(json.dumps({"port": address.port}) + "\n")
    sys.stdout.flush()
    StandardIO(Control(recorder, reactor), reactor=reactor)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
