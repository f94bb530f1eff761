"""The cleaner on a Clock: retention, bounded batches, and a database that stops growing."""

from __future__ import annotations

import os
import uuid

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mmgun.cleaner import Cleaner
from mmgun.store import EnvelopeOutcome, NewSubmission, RecipientOutcome

from .helpers import result, sync_store

DAY = 86400.0


class CleanerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.cleaner = Cleaner(self.store, self.clock, interval=60, retention=7 * DAY)

    def submit(self, body: bytes = b"x", recipients: tuple[str, ...] = ("a@x.example",)) -> str:
        s = NewSubmission(uuid.uuid4().hex, "c", "me@example.com", recipients, b"Subject: s\r\n\r\n" + body, self.clock.seconds())
        return result(self, self.store.add_submission(s))

    def deliver_all(self) -> None:
        claimed = result(self, self.store.claim("s", self.clock.seconds(), 60, 100_000))
        outcomes = [EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250 ok") for a in e.recipients)) for e in claimed]
        result(self, self.store.record(outcomes, self.clock.seconds()))

    def exists(self, submission_id: str) -> bool:
        return result(self, self.store.submission("c", submission_id)) is not None

    def test_finished_submissions_deleted_after_retention_on_the_timer(self) -> None:
        done = self.submit()
        self.deliver_all()
        pending = self.submit()
        self.cleaner.startService()
        self.addCleanup(self.cleaner.stopService)
        self.clock.advance(7 * DAY - 60)
        self.assertTrue(self.exists(done))
        self.clock.advance(120)
        self.assertFalse(self.exists(done))
        self.assertTrue(self.exists(pending))

    def test_expired_mta_sts_policies_are_forgotten(self) -> None:
        """issue 18 (MTA-STS): a cached policy past its max_age is deleted by the cleaner's pass; an unexpired one stays."""
        from mmgun.store import MTASTSPolicy

        now = self.clock.seconds()
        old = MTASTSPolicy("old.example", "1", "enforce", ("mx.old.example",), 3600, now - 3601)
        fresh = MTASTSPolicy("fresh.example", "1", "enforce", ("mx.fresh.example",), 86400, now - 3601)
        for policy in (old, fresh):
            result(self, self.store.save_mta_sts_policy(policy))
        self.assertIsNotNone(result(self, self.store.mta_sts_policy("old.example", now - 3602)))
        self.cleaner.startService()
        self.addCleanup(self.cleaner.stopService)
        self.assertIsNone(result(self, self.store.mta_sts_policy("old.example", now - 3602)), "expired: deleted")
        self.assertEqual(result(self, self.store.mta_sts_policy("fresh.example", now)), fresh)

    def test_deletes_in_bounded_batches(self) -> None:
        from mmgun import cleaner

        self.patch(cleaner, "BATCH", 3)
        calls: list[int] = []
        real = self.store.clean

        async def counting(before: float, limit: int, now: float) -> int:
            deleted = await real(before, limit, now)
            calls.append(deleted)
            return deleted

        self.store.clean = counting  # type: ignore[method-assign]
        for _ in range(7):
            self.submit()
        self.deliver_all()
        self.clock.advance(8 * DAY)
        self.assertEqual(self.successResultOf(self.cleaner.clean()), 7)
        self.assertEqual(calls, [3, 3, 1])

    def test_a_failing_pass_does_not_stop_the_loop(self) -> None:
        async def broken(before: float, limit: int, now: float) -> int:
            raise RuntimeError("disk on fire")

        real = self.store.clean
        self.store.clean = broken  # type: ignore[method-assign]
        self.cleaner.startService()
        self.addCleanup(self.cleaner.stopService)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.store.clean = real  # type: ignore[method-assign]
        done = self.submit()
        self.deliver_all()
        self.clock.advance(8 * DAY)
        self.assertFalse(self.exists(done))

    def test_message_body_erased_when_finished(self) -> None:
        import sqlite3

        sid = self.submit(b"very secret body")
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertIsNotNone(conn.execute("SELECT message FROM submissions WHERE id = ?", (sid,)).fetchone()[0])
        self.deliver_all()
        self.assertIsNone(conn.execute("SELECT message FROM submissions WHERE id = ?", (sid,)).fetchone()[0])
        self.assertTrue(self.exists(sid))

    def test_database_file_stops_growing_under_steady_traffic(self) -> None:
        """A day of traffic per round, a day of retention: the file size levels off instead of growing."""
        self.cleaner = Cleaner(self.store, self.clock, interval=60, retention=DAY)
        sizes = []
        body = os.urandom(3000).hex().encode()
        for _ in range(12):
            for _ in range(100):
                self.submit(body, ("a@x.example", "b@y.example"))
            self.deliver_all()
            self.clock.advance(DAY + 1)
            self.successResultOf(self.cleaner.clean())
            sizes.append(os.path.getsize(self.path))
        # The size swings as pages are freed and reused (events and bodies in turn), but its
        # peaks stop rising: the second half's never passes the first half's by a tenth.
        self.assertLessEqual(max(sizes[6:]), max(sizes[:6]) * 1.1, sizes)
        self.assertLess(sizes[-1], 100 * len(body) * 3, sizes)
