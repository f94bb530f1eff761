#!/usr/bin/env python3
"""
A fake DNS server for the end-to-end tests, authoritative for one zone file.

    dnsstub.py --listen 127.0.0.1:PORT --zone e2e-tests/zone.txt [--port-file F]

Serves UDP and TCP on the same port.  Names missing from the zone get
NXDOMAIN.  Port 0 picks a free port and --port-file then receives it, written
atomically, so a harness can poll for the file.  Logs go to stdout; SIGTERM or
SIGINT stops it cleanly.  The zone format is described in
mmgun.testing.dnsserver.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run the checkout's mmgun.testing even when an older mmgun is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver  # noqa: E402

from mmgun.testing.dnsserver import listen_dns, parse_zone  # noqa: E402

_log = Logger()


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--listen",
        type=host_port,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:0)",
    )
    parser.add_argument("--zone", required=True, help="zone file to serve")
    parser.add_argument("--port-file", help="write the listening port number here")
    return parser.parse_args(argv)


async def main(reactor, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    args = parse_args(argv)
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout)], redirectStandardIO=False
    )
    records = parse_zone(Path(args.zone).read_text())
    host, port = args.listen
    udp, tcp = listen_dns(reactor, records, interface=host, port=port)
    chosen = udp.getHost().port
    _log.info(
        "DNS stub serving {count} names from {zone} on {host}:{port}",
        count=len(records),
        zone=args.zone,
        host=host,
        port=chosen,
    )
    if args.port_file:
        write_port_file(args.port_file, chosen)

    def stopping() -> Deferred[object]:
        _log.info("DNS stub stopping")
        return DeferredList(
            [maybeDeferred(udp.stopListening), maybeDeferred(tcp.stopListening)]
        )

    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    await Deferred()  # until SIGTERM/SIGINT stops the reactor


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
