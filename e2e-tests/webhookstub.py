#!/usr/bin/env python3
"""
A webhook receiver for the end-to-end tests: records every POST, answers 200.

    webhookstub.py --listen 127.0.0.1:PORT --record FILE [--delay-seconds S] [--port-file F]

Each request, as it arrives, becomes one JSON line of FILE (appended, flushed at once):
C{{"method", "path", "authorization", "body"}} (the body as text). It verifies nothing —
the tests do, with their own implementation of Mailgun's rule — and answers C{200 ok}
S seconds (default 0) after the request arrived, over HTTP/1.1 with keep-alive. Port 0 picks
a free port; --port-file then receives it, written atomically once the port listens. Its
log (stdout) names each request's path and status, never a body nor a header: the bodies
are signed and the Authorization header holds the URL's password. SIGTERM or SIGINT stops
it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Any

# Run the checkout's mmgun.testing even when an older mmgun is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import react  # noqa: E402
from twisted.logger import Logger  # noqa: E402
from twisted.web import http  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET, Request, Site  # noqa: E402

from mmgun.testing import cli  # noqa: E402
from mmgun.testing.ports import port_number  # noqa: E402

_log = Logger()


class Receiver(Resource):
    isLeaf = True

    def __init__(self, reactor: Any, record: IO[str], delay: float) -> None:
        super().__init__()
        self._reactor = reactor
        self._record = record
        self._delay = delay
        self.count = 0

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        authorization = request.getHeader("authorization")
        line = {
            "method": request.method.decode("ascii", "replace"),
            "path": request.uri.decode("ascii", "replace"),
            "authorization": authorization,
            "body": request.content.read().decode("utf-8", "replace"),
        }
        self._record.write(json.dumps(line) + "\n")
        self._record.flush()
        self.count += 1
        _log.info("{method} {path} #{count}: 200 after {delay:g}s", method=line["method"], path=line["path"], count=self.count, delay=self._delay)
        if self._delay <= 0:
            return b"ok"
        call = self._reactor.callLater(self._delay, self._answer, request)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return NOT_DONE_YET

    def _answer(self, request: Request) -> None:
        request.write(b"ok")
        request.finish()


class _QuietSite(Site):
    def log(self, request: http.Request) -> None:
        """No access log: L{Receiver} logs each request its own way."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    cli.add_listen_option(parser, repeatable=False)
    parser.add_argument("--record", required=True, help="JSON lines file, one line per request")
    parser.add_argument("--delay-seconds", type=float, default=0.0, help="answer each request this long after it arrived")
    cli.add_port_file_option(parser)
    return parser.parse_args(argv)


async def main(reactor: Any, argv: list[str]) -> None:
    args = parse_args(argv)
    cli.log_to_stdout()
    host, port = args.listen
    with open(args.record, "a", encoding="utf-8") as record:
        receiver = Receiver(reactor, record, args.delay_seconds)
        listening = reactor.listenTCP(port, _QuietSite(receiver), interface=host)
        _log.info("webhook receiver on {host}:{port}", host=host, port=port_number(listening))
        if args.port_file:
            cli.write_port_file(args.port_file, port_number(listening))

        def stopping() -> None:
            _log.info("webhook receiver stopping after {count} requests", count=receiver.count)

        await cli.serve_until_shutdown(reactor, [listening], stopping)


if __name__ == "__main__":
    react(main, (sys.argv[1:],))
