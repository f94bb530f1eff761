#!/usr/bin/env python3
"""
Issue 11 item 8: the sender's memory while it drains one maximum-size message to many domains.

    bench/bigmessage.py [--size 10M] [--domains 1000] [--workdir DIR]

Queues one submission of ``--size`` bytes (default: --max-message-size's default) to one
recipient in each of ``--domains`` domains (default: --max-recipients's default) straight
through mmgun's store, starts bench/sink.py and one ``twistd mmgun --role sender`` process
relaying everything to the sink (``--relay-host``: no DNS needed), and samples the
sender's RSS every 50 ms until the sink has every recipient. Prints one JSON line: the
sender's peak RSS (VmHWM, and the largest VmRSS sampled), its RSS before the claim, the
drain time and the sink's counts. Exits 1 if a recipient is missing or duplicated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procs import free_port, status_kib, stop_process  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from mmgun.config import parse_size  # noqa: E402
from mmgun.store import NewSubmission  # noqa: E402
from mmgun.store.sqlite import SQLiteStore  # noqa: E402


def message_of(size: int) -> bytes:
    head = f"Message-ID: <{uuid.uuid4().hex}@bench.test>\r\nSubject: big\r\nFrom: bench@bench.test\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


def queue(database: Path, size: int, domains: int) -> int:
    store = SQLiteStore.open_sync(str(database))
    message = message_of(size)
    recipients = tuple(f"u@d{i:05d}.bench.test" for i in range(domains))
    submission = NewSubmission(uuid.uuid4().hex, "bench", "bench@bench.test", recipients, message, time.time())
    d = Deferred.fromCoroutine(store.add_submission(submission))  # the sync store: fires at once
    failures: list[object] = []
    d.addErrback(failures.append)
    store._runner.close()
    if failures:
        raise SystemExit(f"queueing failed: {failures[0]}")
    return len(message)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--size", default="10M", help="message size (default 10M: --max-message-size's default)")
    parser.add_argument("--domains", type=int, default=1000, help="recipients, one per domain (default 1000)")
    parser.add_argument("--workdir", help="folder for the database and logs (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmgun-bigmessage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "mmgun.sqlite3"
    size = queue(database, parse_size(args.size), args.domains)

    sink = subprocess.Popen(
        [sys.executable, str(HERE / "sink.py"), "--listen", "127.0.0.1", "--port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdin is not None and sink.stdout is not None
    # Named, so that the narrowing holds inside stats() too.
    sink_in, sink_out = sink.stdin, sink.stdout
    port = json.loads(sink_out.readline())["port"]

    def stats() -> dict[str, int]:
        sink_in.write("stats\n")
        sink_in.flush()
        return json.loads(sink_out.readline())

    twistd = Path(sys.executable).with_name("twistd")
    command = [
        str(twistd), "-n", "--pidfile=", "--logfile", str(workdir / "sender.log"), "mmgun",
        "--role", "sender", "--database", str(database), "--relay-host", f"127.0.0.1:{port}",
        "--helo", "bench.test", "--poll-interval", "0.1",
        "--metrics-listen", f"tcp:{free_port()}:interface=127.0.0.1",
    ]  # fmt: skip
    started = time.monotonic()
    sender = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL)
    rss_max = 0
    samples = 0
    try:
        deadline = started + args.timeout
        got: dict[str, int] = {}
        while time.monotonic() < deadline:
            rss = status_kib(sender.pid, "VmRSS")
            if rss is None:
                raise SystemExit("the sender exited; see " + str(workdir / "sender.log"))
            rss_max, samples = max(rss_max, rss), samples + 1
            got = stats()
            if got["recipients"] >= args.domains:
                break
            time.sleep(0.05)
        drained = time.monotonic() - started
        hwm = status_kib(sender.pid, "VmHWM")
    finally:
        stop_process(sender)
        sink.stdin.write("quit\n")
        sink.stdin.flush()
        sink.wait(10)
    report = {
        "message_bytes": size,
        "domains": args.domains,
        "sender_peak_rss_mib": round((hwm or 0) / 1024, 1),
        "sender_max_sampled_rss_mib": round(rss_max / 1024, 1),
        "samples": samples,
        "drain_seconds": round(drained, 2),
        "sink": {k: got.get(k) for k in ("messages", "recipients", "duplicates", "connections")},
    }
    print(json.dumps(report))
    if got.get("recipients") != args.domains or got.get("duplicates"):
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
