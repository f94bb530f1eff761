#!/usr/bin/env python3
"""
A fake MX for the end-to-end tests: records every accepted message in a folder.

    smtpstub.py --listen 127.0.0.2:2525 [--listen 127.0.0.3:2525] --maildir DIR
                [--tls | --no-tls] [--slow-seconds S] [--port-file F]

Scripted faults by recipient (tempfail-N@, reject@, slow@, slowdata@, drop@,
datareject@) are described in mmgun.testing.smtpserver.  Each accepted message
becomes DIR/<unix-nanos>-<counter>.eml, with X-Envelope-From/-To headers
prepended; count "*.eml" files to see how many arrived.  Port 0 picks a free
port (the first --listen's choice is reused by later ones); --port-file then
receives it, written atomically.  Logs go to stdout (never message bodies);
SIGTERM or SIGINT stops it cleanly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Run the checkout's mmgun.testing even when an older mmgun is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.interfaces import IListeningPort  # noqa: E402
from twisted.internet.task import react  # noqa: E402
from twisted.logger import Logger  # noqa: E402

from mmgun.testing import cli  # noqa: E402
from mmgun.testing.ports import port_number  # noqa: E402
from mmgun.testing.smtpserver import Mailbox, smtp_server_factory  # noqa: E402

_log = Logger()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_listen_option(parser, repeatable=True)
    parser.add_argument("--maildir", help="folder to write accepted messages to")
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer STARTTLS with a self-signed certificate (default: yes)",
    )
    parser.add_argument(
        "--slow-seconds",
        type=float,
        default=3600.0,
        help="delay for slow@ and slowdata@ recipients",
    )
    cli.add_port_file_option(parser)
    parser.add_argument(
        "--hostname",
        default="smtpstub.test",
        help="name in the greeting and certificate",
    )
    parser.add_argument(
        "--greeting-code",
        type=int,
        help="refuse every connection with this code (e.g. 421)",
    )
    parser.add_argument("--fsync", action="store_true", help="fsync each message file")
    return parser.parse_args(argv)


async def main(reactor: Any, argv: list[str]) -> None:
    args = parse_args(argv)
    cli.log_to_stdout()
    mailbox = Mailbox()
    factory = smtp_server_factory(
        reactor,
        mailbox,
        tls=args.tls,
        hostname=args.hostname,
        slow_seconds=args.slow_seconds,
        maildir=args.maildir,
        greeting_code=args.greeting_code,
        fsync=args.fsync,
    )
    ports: list[IListeningPort] = []
    for host, port in args.listen:
        if port == 0 and ports:
            port = port_number(ports[0])
        ports.append(reactor.listenTCP(port, factory, backlog=1024, interface=host))
        _log.info(
            "SMTP stub listening on {host}:{port} (tls={tls})",
            host=host,
            port=port_number(ports[-1]),
            tls=args.tls,
        )
    if args.port_file:
        cli.write_port_file(args.port_file, port_number(ports[0]))

    def stopping() -> None:
        _log.info("SMTP stub stopping after {count} messages", count=len(mailbox))

    await cli.serve_until_shutdown(reactor, ports, stopping)


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
