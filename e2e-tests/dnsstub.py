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
import sys
from pathlib import Path
from typing import Any

# Run the checkout's mmgun.testing even when an older mmgun is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import react  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from mmgun.testing import cli  # noqa: E402
from mmgun.testing.dnsserver import listen_dns, parse_zone  # noqa: E402
from mmgun.testing.ports import port_number  # noqa: E402

_log = Logger()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_listen_option(parser, repeatable=False)
    parser.add_argument("--zone", required=True, help="zone file to serve")
    cli.add_port_file_option(parser)
    return parser.parse_args(argv)


async def main(reactor: Any, argv: list[str]) -> None:
    args = parse_args(argv)
    cli.log_to_stdout()
    records = parse_zone(Path(args.zone).read_text())
    host, port = args.listen
    udp, tcp = listen_dns(reactor, records, interface=host, port=port)
    chosen = port_number(udp)
    _log.info(
        "DNS stub serving {count} names from {zone} on {host}:{port}",
        count=len(records),
        zone=args.zone,
        host=host,
        port=chosen,
    )
    if args.port_file:
        cli.write_port_file(args.port_file, chosen)

    await cli.serve_until_shutdown(
        reactor, [udp, tcp], lambda: _log.info("DNS stub stopping")
    )


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
