#!/usr/bin/env python3
"""
Readiness polling for e2e-tests/run.sh: one small process per wait, no fixed sleeps.

    waitfor.py free-port                       print a free TCP port on 127.0.0.1
    waitfor.py port-file FILE PID [SECONDS]    until FILE holds a port number; print it
    waitfor.py http URL PID [SECONDS]          until GET URL answers 200

Both waits give up early when process PID (the one that should get ready) has
exited, so a start-up failure shows at once instead of after the deadline.
Exit status: 0 ready, 1 the process exited, 2 the deadline (default 30 s) passed.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

POLL = 0.05


def alive(pid: int) -> bool:
    """Whether PID runs (a zombie, having exited, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return True


def poll(check: Callable[[], str | None], pid: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result is not None:
            if result:
                print(result)
            return 0
        if not alive(pid):
            return 1
        if time.monotonic() > deadline:
            return 2
        time.sleep(POLL)


def port_file(path: str) -> str | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return text if text.isdigit() else None


def http_ok(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return "" if response.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str]) -> int:
    if argv[:1] == ["free-port"]:
        print(free_port())
        return 0
    if len(argv) in (3, 4) and argv[0] in ("port-file", "http"):
        what, target, pid = argv[0], argv[1], int(argv[2])
        seconds = float(argv[3]) if len(argv) == 4 else 30.0
        check = port_file if what == "port-file" else http_ok
        return poll(lambda: check(target), pid, seconds)
    sys.stderr.write(__doc__ or "")
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
