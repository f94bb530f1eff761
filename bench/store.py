#!/usr/bin/env python3
"""
The store alone, on either backend: ``.venv/bin/python bench/store.py sqlite|postgres [N]``.

N submissions (two recipients in two domains, a ~1 KB message) added with 32 in flight
through the daemon's store (``open_store``: the pool runner and group commit), then every
envelope claimed and recorded delivered by 4 concurrent claimers, 50 at a time. Prints the
rates and this process's CPU per message and per envelope. PostgreSQL runs on a private
cluster (tests/pgcluster.py). What issue 15's rewrite of the transactions was measured with.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from mmgun.store import EnvelopeOutcome, NewSubmission, RecipientOutcome, open_store  # noqa: E402

IN_FLIGHT = 32
CLAIMERS = 4
BODY = b"From: a@x.example\r\nTo: b@y.example\r\nSubject: hi\r\n\r\n" + b"x" * 1000 + b"\r\n"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def bench(reactor: Any, backend: str, count: int) -> None:
    if backend == "sqlite":
        database = os.path.join(tempfile.mkdtemp(prefix="mmgun-store-bench-"), "mmgun.sqlite3")
    else:
        from tests import pgcluster

        database = pgcluster.start().url
    store = open_store(database, reactor)
    await store.add_client("acme", time.time())

    def submission(i: int) -> NewSubmission:
        recipients = (f"r{i}@a{i % 50}.example", f"s{i}@b{i % 37}.example")
        return NewSubmission(uuid.uuid4().hex, "acme", "a@x.example", recipients, BODY, time.time())

    slots = defer.DeferredSemaphore(IN_FLIGHT)
    began, used = time.perf_counter(), cpu()
    def add(i: int) -> defer.Deferred[str]:
        return defer.ensureDeferred(store.add_submission(submission(i)))

    await defer.gatherResults([slots.run(add, i) for i in range(count)])
    seconds, spent = time.perf_counter() - began, cpu() - used
    print(f"{backend}: ingest {count / seconds:,.0f} submissions/s, {1000 * spent / count:.3f} CPU-ms each", flush=True)

    delivered = 0

    async def claimer(n: int) -> None:
        nonlocal delivered
        while True:
            envelopes = await store.claim(f"bench-{n}", time.time(), 60.0, 50)
            if not envelopes:
                return
            outcomes = [
                EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250 2.0.0 ok") for a in e.recipients))
                for e in envelopes
            ]
            await store.record(outcomes, time.time())
            delivered += len(envelopes)

    began, used = time.perf_counter(), cpu()
    await defer.gatherResults([defer.ensureDeferred(claimer(n)) for n in range(CLAIMERS)])
    seconds, spent = time.perf_counter() - began, cpu() - used
    print(f"{backend}: claim + record {delivered / seconds:,.0f} envelopes/s, {1000 * spent / delivered:.3f} CPU-ms each")
    await store.close()


def main(reactor: Any) -> defer.Deferred[None]:
    backend = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    if backend not in ("sqlite", "postgres"):
        raise SystemExit("usage: bench/store.py sqlite|postgres [N]")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    return defer.ensureDeferred(bench(reactor, backend, count))


if __name__ == "__main__":
    task.react(main)
