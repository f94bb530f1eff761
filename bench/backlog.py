#!/usr/bin/env python3
"""
Fill an mmgun database with a backlog of queued envelopes, quickly, through mmgun's own store.

    backlog.py --database PATH --envelopes 100000 [--recipients 1-3]

Submissions are built as the frontend builds them (:func:`mmgun.message.build_message`,
1–3 recipients over the two bench domains, ~1 KB bodies) and queued with
``SQLiteStore.add_submission``, so the rows are exactly what the daemon would have
written. Two things differ from the daemon, because the fill is set-up and not what is
measured: the connection runs with ``synchronous = OFF`` (the rows are made durable by
the checkpoint at close, before any sender starts), and the writes are handed to the
store's group commit in large batches instead of one fsync'd transaction per request.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import make_body, make_recipients  # noqa: E402

CLIENT = "c-bench"
SENDER = "bench@sender.bench.test"
#: Submissions handed to the store before its queued writes are run.
CHUNK = 4096


class BatchingRunner:
    """
    The runner interface SQLiteStore calls (write/read/autocommit/close), on one
    connection of our own; each write is queued and run only by :meth:`run_pending`,
    so the add_submission calls made in between pile up in the store's group commit.
    """

    def __init__(self, path: str) -> None:
        from mmgun.store.sqlite import connect

        self._conn = connect(path)
        self._conn.execute("PRAGMA synchronous = OFF")
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...], Any]] = deque()

    def _later(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self._queue.append((fn, args, d))
        return d

    def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._later(fn, args)

    read = write

    def autocommit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._later(fn, args)

    def run_pending(self) -> int:
        transactions = 0
        while self._queue:
            fn, args, d = self._queue.popleft()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                result = fn(self._conn, *args)
                self._conn.execute("COMMIT")
            except Exception as e:
                if self._conn.in_transaction:
                    self._conn.rollback()
                d.errback(e)
            else:
                d.callback(result)
            transactions += 1
        return transactions

    def close(self) -> None:
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()


def fill(
    path: str, envelopes: int, recipients: tuple[int, int] = (1, 3), seed: int = 7, body_size: int = 1000
) -> dict[str, Any]:
    """Queue submissions until ``envelopes`` envelopes are queued; returns counts and the time taken."""
    from twisted.internet.defer import Deferred

    from mmgun.message import SendRequest, build_message
    from mmgun.store import NewSubmission
    from mmgun.store.sqlite import SQLiteStore, prepare

    # Older mmguns kept the client's id in the request record.
    request_fields: dict[str, Any] = {"sender": SENDER}
    if "client_id" in attrs.fields_dict(SendRequest):
        request_fields["client_id"] = CLIENT
    started = time.monotonic()
    prepare(path)
    runner = BatchingRunner(path)
    store = SQLiteStore(runner)  # type: ignore[arg-type]  # a duck-typed runner: SQLiteStore names its two concrete ones
    rng = random.Random(seed)
    bodies = [make_body(rng, body_size) for _ in range(64)]
    queued_envelopes = queued_recipients = submissions = 0
    failures: list[Any] = []
    while queued_envelopes < envelopes:
        waiting: list[Deferred[Any]] = []
        while queued_envelopes < envelopes and len(waiting) < CHUNK:
            count = min(rng.randint(*recipients), envelopes - queued_envelopes)
            addresses = make_recipients(submissions, count, rng)
            request = SendRequest(
                **request_fields,
                recipients=tuple(addresses),
                subject=f"backlog message {submissions}",
                body=bodies[submissions % 64],
            )
            now = time.time()
            submission = NewSubmission(
                id=uuid.uuid4().hex,
                client=CLIENT,
                sender=SENDER,
                recipients=tuple(addresses),
                message=build_message(request, hostname="backlog.bench.test", now=now),
                created_at=now,
            )
            queued_envelopes += len(submission.envelopes())
            queued_recipients += len(addresses)
            submissions += 1
            d = Deferred.fromCoroutine(store.add_submission(submission))
            d.addErrback(failures.append)
            waiting.append(d)
        runner.run_pending()
        if failures:
            raise RuntimeError(f"backlog fill failed: {failures[0].getErrorMessage()}")
        if not all(d.called for d in waiting):
            raise RuntimeError("backlog fill: the store left submissions uncommitted")
    runner.close()
    with sqlite3.connect(path) as conn:
        (in_db,) = conn.execute("SELECT count(*) FROM envelopes WHERE done = 0").fetchone()
    if in_db != queued_envelopes:
        raise RuntimeError(f"backlog fill: {in_db} envelopes in the database, {queued_envelopes} expected")
    return {
        "envelopes": queued_envelopes,
        "recipients": queued_recipients,
        "submissions": submissions,
        "seconds": time.monotonic() - started,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", required=True)
    parser.add_argument("--envelopes", type=int, default=100_000)
    parser.add_argument("--recipients", default="1-3", help="recipients per submission: N or LOW-HIGH")
    args = parser.parse_args(argv)
    low, _, high = args.recipients.partition("-")
    print(fill(args.database, args.envelopes, (int(low), int(high or low))))


if __name__ == "__main__":
    main(sys.argv[1:])
