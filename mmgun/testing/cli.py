"""
Command-line plumbing shared by the end-to-end stub scripts (e2e-tests/dnsstub.py
and e2e-tests/smtpstub.py): their C{--listen} and C{--port-file} options, logging
to stdout, and a clean stop on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.logger import globalLogBeginner, textFileLogObserver

__all__ = [
    "add_listen_option",
    "add_port_file_option",
    "host_port",
    "log_to_stdout",
    "serve_until_shutdown",
    "write_port_file",
]


def host_port(text: str) -> tuple[str, int]:
    """
    Parse C{HOST:PORT} (an IPv6 host may be in brackets), as an argparse C{type}.

    @raise argparse.ArgumentTypeError: there is no host or no colon.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def add_listen_option(parser: argparse.ArgumentParser, *, repeatable: bool) -> None:
    """
    Add C{--listen HOST:PORT}: when C{repeatable}, required and collected in a
    list; else one address, 127.0.0.1:0 by default.
    """
    if repeatable:
        parser.add_argument(
            "--listen",
            type=host_port,
            action="append",
            required=True,
            metavar="HOST:PORT",
            help="address to listen on (repeatable)",
        )
    else:
        parser.add_argument(
            "--listen",
            type=host_port,
            default=("127.0.0.1", 0),
            metavar="HOST:PORT",
            help="address to listen on (default 127.0.0.1:0)",
        )


def add_port_file_option(parser: argparse.ArgumentParser) -> None:
    """Add C{--port-file}, for L{write_port_file}."""
    parser.add_argument("--port-file", help="write the listening port number here")


def write_port_file(path: str, port: int) -> None:
    """
    Write C{port} to C{path} atomically: a harness polling for the file never
    reads it half written.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def log_to_stdout() -> None:
    """Send the global log to stdout, leaving C{print} and stderr alone."""
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout)], redirectStandardIO=False
    )


async def serve_until_shutdown(
    reactor: IReactorCore,
    ports: Sequence[IListeningPort],
    stopping: Callable[[], object],
) -> None:
    """
    Wait forever; when the reactor shuts down (L{twisted.internet.task.react}
    stops it on SIGTERM or SIGINT), call C{stopping} (to log) and then stop
    listening on C{ports}, before the reactor goes away.
    """

    def stop() -> Deferred[list[tuple[bool, object]]]:
        stopping()
        return DeferredList([maybeDeferred(p.stopListening) for p in ports])

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    await Deferred()
