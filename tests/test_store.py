"""The SQLite store on real files: queueing, claims and leases, results, cleaning."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mmgun.store import EnvelopeOutcome, IdempotencyConflict, NewSubmission, RecipientOutcome, StorageError
from mmgun.store.sqlite import SQLiteStore, connect

from .helpers import result, sync_store


def submission(recipients: tuple[str, ...] = ("a@x.example", "b@x.example", "c@y.example"), *, client: str = "c1", at: float = 100.0, key: str | None = None, digest: str | None = None) -> NewSubmission:
    return NewSubmission(uuid.uuid4().hex, client, "me@example.com", recipients, b"Subject: hi\r\n\r\nbody\r\n", at, key, digest)


class QueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def test_schema_versioned(self) -> None:
        from mmgun.store.sqlite import queries as Q

        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone(), (len(Q.MIGRATIONS),))
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone(), ("wal",))

    def test_hot_statements_use_their_indexes(self) -> None:
        """
        issue 15 (found by review): the statements a submission or a result runs find their
        rows through an index whatever the tables hold — without statistics (mmgun never runs
        ANALYZE) SQLite had taken the suppression look-up through the primary key on the client
        alone, a scan of the client's whole list per recipient (4.2 s for 1,000 recipients
        against 20,000 entries).
        """
        from mmgun.store.sqlite import queries as Q

        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        plans = {
            "SUPPRESSED_AMONG": ("suppressions_address", ('[["c1", "a@x.example"]]',)),
            "LEASES_HELD": ("INTEGER PRIMARY KEY", ('[[1, "l"]]',)),
            "LOCK_SUBMISSIONS": ("sqlite_autoindex_submissions_1", ('["s1"]',)),
        }
        for name, (index, parameters) in plans.items():
            plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + getattr(Q, name), parameters))
            self.assertIn(index, plan, name)
            self.assertNotIn("SCAN s ", plan + " ", name)
            self.assertNotIn("SCAN suppressions", plan, name)

    def test_forward_migration_keeps_data(self) -> None:
        from mmgun.store.sqlite import queries as Q

        path = self.mktemp()
        conn = connect(path)
        for statement in Q.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO submissions (id, client, sender, created_at) VALUES ('s1', 'c1', 'a@b.example', 1.0)")
        conn.close()
        store = SQLiteStore.open_sync(path)
        self.addCleanup(lambda: result(self, store.close()))
        check = sqlite3.connect(path)
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone(), (len(Q.MIGRATIONS),))
        self.assertEqual(check.execute("SELECT id FROM submissions").fetchall(), [("s1",)])
        result(self, store.add_client("acme", 1.0))

    def test_reopen_keeps_data(self) -> None:
        s = submission()
        result(self, self.store.add_submission(s))
        again = SQLiteStore.open_sync(self.path)
        self.addCleanup(lambda: result(self, again.close()))
        self.assertEqual(len(result(self, again.submission("c1", s.id)).recipients), 3)

    def test_newer_schema_refused(self) -> None:
        conn = connect(self.path)
        conn.execute("PRAGMA user_version = 99")
        conn.close()
        self.assertRaises(StorageError, SQLiteStore.open_sync, self.path)

    def test_submission_scoped_by_client(self) -> None:
        s = submission()
        result(self, self.store.add_submission(s))
        self.assertIsNone(result(self, self.store.submission("c2", s.id)))
        self.assertIsNotNone(result(self, self.store.submission("c1", s.id)))

    def test_idempotent_replay_and_conflict(self) -> None:
        first = submission(key="k", digest="h1")
        self.assertEqual(result(self, self.store.add_submission(first)), first.id)
        self.assertEqual(result(self, self.store.add_submission(submission(key="k", digest="h1"))), first.id)
        self.failureResultOf(self.store_add(submission(key="k", digest="h2")), IdempotencyConflict)

    def store_add(self, s: NewSubmission):
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self.store.add_submission(s))

    def test_group_commit_isolates_a_conflict(self) -> None:
        """Submissions committed in one transaction: one conflict fails alone."""
        from twisted.internet.defer import Deferred

        result(self, self.store.add_submission(submission(key="k", digest="h1")))
        runner = self.store._runner
        held: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []
        real_write = runner.write

        def slow_write(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if not held:
                d: Deferred[Any] = Deferred()
                held.append((d, fn, args))
                return d
            return real_write(fn, *args)

        self.patch(runner, "write", slow_write)
        blocker = self.store_add(submission())  # starts a flush that we hold open
        a = self.store_add(submission())
        bad = self.store_add(submission(key="k", digest="other"))
        c = self.store_add(submission())
        d, fn, args = held[0]
        real_write(fn, *args).chainDeferred(d)
        self.successResultOf(blocker)
        self.successResultOf(a)
        self.successResultOf(c)
        self.failureResultOf(bad, IdempotencyConflict)


class ClaimTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.sub = submission()
        result(self, self.store.add_submission(self.sub))

    def claim(self, now: float = 100.0, owner: str = "s1", lease: float = 60.0, limit: int = 10):
        return result(self, self.store.claim(owner, now, lease, limit))

    def test_claim_returns_envelopes_per_domain(self) -> None:
        claimed = self.claim()
        self.assertEqual([(e.domain, e.recipients) for e in claimed], [("x.example", ("a@x.example", "b@x.example")), ("y.example", ("c@y.example",))])
        self.assertEqual(claimed[0].message, self.sub.message)
        self.assertEqual(claimed[0].sender, "me@example.com")

    def test_claimed_envelope_not_claimed_again_until_lease_expires(self) -> None:
        self.assertEqual(len(self.claim(owner="s1")), 2)
        self.assertEqual(self.claim(now=159.0, owner="s2"), [])
        self.assertEqual(len(self.claim(now=160.0, owner="s2")), 2)

    def test_not_due_before_created(self) -> None:
        self.assertEqual(self.claim(now=99.0), [])

    def test_claim_limit(self) -> None:
        self.assertEqual(len(self.claim(limit=1)), 1)
        self.assertEqual(len(self.claim(limit=5)), 1)

    def test_renew_extends_lease(self) -> None:
        claimed = self.claim()
        result(self, self.store.renew(claimed, 100.0, 300.0))
        self.assertEqual(self.claim(now=200.0, owner="s2"), [])
        self.assertEqual(len(self.claim(now=300.0, owner="s2")), 2)

    def test_record_results_and_retry_only_pending(self) -> None:
        x, y = self.claim()
        outcome = EnvelopeOutcome(x, (RecipientOutcome("a@x.example", "sent", "250 ok"), RecipientOutcome("b@x.example", "deferred", "451 later")), next_attempt=500.0)
        result(self, self.store.record([outcome], 101.0))
        state = result(self, self.store.submission("c1", self.sub.id))
        self.assertEqual([(r.status, r.attempts, r.last_reply) for r in state.recipients], [("sent", 1, "250 ok"), ("deferred", 1, "451 later"), ("queued", 0, None)])
        self.assertEqual(state.status, "queued")
        self.assertEqual([e.domain for e in self.claim(now=499.0, owner="s2")], ["y.example"])
        (retry,) = [e for e in self.claim(now=500.0, owner="s2") if e.domain == "x.example"]
        self.assertEqual(retry.recipients, ("b@x.example",))
        self.assertEqual(retry.attempts, 1)

    def test_finished_submission_status_and_body_erased(self) -> None:
        x, y = self.claim()
        result(self, self.store.record([
            EnvelopeOutcome(x, (RecipientOutcome("a@x.example", "sent", "250 ok"), RecipientOutcome("b@x.example", "failed", "550 no"))),
            EnvelopeOutcome(y, (RecipientOutcome("c@y.example", "sent", "250 ok"),)),
        ], 101.0))
        self.assertEqual(result(self, self.store.submission("c1", self.sub.id)).status, "partial")
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT message, finished_at FROM submissions").fetchall(), [(None, 101.0)])
        self.assertEqual(self.claim(now=1e9), [])

    def test_lost_lease_cannot_overwrite_new_owner(self) -> None:
        old = self.claim(owner="s1")
        new = self.claim(now=161.0, owner="s2")
        result(self, self.store.record([EnvelopeOutcome(old[0], (RecipientOutcome("a@x.example", "failed", "550 stale"),))], 162.0))
        state = result(self, self.store.submission("c1", self.sub.id))
        self.assertEqual(state.recipients[0].status, "queued")
        result(self, self.store.record([EnvelopeOutcome(new[0], (RecipientOutcome("a@x.example", "sent", "250 ok"),))], 163.0))
        self.assertEqual(result(self, self.store.submission("c1", self.sub.id)).recipients[0].status, "sent")

    def test_release_makes_due_now_without_counting_attempt(self) -> None:
        claimed = self.claim()
        result(self, self.store.release(claimed, 120.0))
        again = self.claim(now=120.0, owner="s2")
        self.assertEqual([e.attempts for e in again], [0, 0])

    def test_two_stores_on_one_file_never_claim_the_same_envelope(self) -> None:
        for _ in range(20):
            result(self, self.store.add_submission(submission(("a@x.example", "b@y.example", "c@z.example"))))
        other = SQLiteStore.open_sync(self.path)
        self.addCleanup(lambda: result(self, other.close()))
        seen: list[int] = []
        for i in range(40):
            store = self.store if i % 2 else other
            seen += [e.id for e in result(self, store.claim(f"s{i % 2}", 100.0, 60, 3))]
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual(len(seen), 62)


class CleanTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def finish(self, s: NewSubmission, at: float) -> None:
        result(self, self.store.add_submission(s))
        claimed = result(self, self.store.claim("s", s.created_at, 60, 100))
        result(self, self.store.record([EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250") for a in e.recipients)) for e in claimed if e.submission_id == s.id], at))

    def test_clean_deletes_only_old_finished(self) -> None:
        old, recent, unfinished = submission(at=10.0), submission(at=20.0), submission(at=5.0)
        self.finish(old, 50.0)
        self.finish(recent, 500.0)
        result(self, self.store.add_submission(unfinished))
        self.assertEqual(result(self, self.store.clean(100.0, 10, 100.0)), 1)
        self.assertIsNone(result(self, self.store.submission("c1", old.id)))
        self.assertIsNotNone(result(self, self.store.submission("c1", recent.id)))
        self.assertIsNotNone(result(self, self.store.submission("c1", unfinished.id)))
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT count(*) FROM recipients WHERE submission_id = ?", (old.id,)).fetchone(), (0,))
        self.assertEqual(conn.execute("SELECT count(*) FROM envelopes WHERE submission_id = ?", (old.id,)).fetchone(), (0,))

    def test_clean_in_bounded_batches(self) -> None:
        for i in range(5):
            self.finish(submission(at=10.0 + i), 50.0)
        self.assertEqual(result(self, self.store.clean(100.0, 2, 100.0)), 2)
        self.assertEqual(result(self, self.store.clean(100.0, 2, 100.0)), 2)
        self.assertEqual(result(self, self.store.clean(100.0, 2, 100.0)), 1)


class QueueDepthTests(SynchronousTestCase):
    """queue_depth: the /metrics gauges, read from unfinished envelopes only."""

    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def depth(self, now: float = 200.0):
        return result(self, self.store.queue_depth(now))

    def test_empty_queue(self) -> None:
        from mmgun.store import QueueDepth

        self.assertEqual(self.depth(), QueueDepth((), 0, 0, None))

    def test_counts_pending_recipients_only(self) -> None:
        done, pending = submission(("a@x.example", "b@y.example"), at=50.0), submission(at=100.0)
        result(self, self.store.add_submission(done))
        result(self, self.store.add_submission(pending))
        claimed = result(self, self.store.claim("s", 100.0, 60, 10))
        outcomes = [EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250 ok") for a in e.recipients)) for e in claimed if e.submission_id == done.id]
        (x,) = [e for e in claimed if e.submission_id == pending.id and e.domain == "x.example"]
        outcomes.append(EnvelopeOutcome(x, (RecipientOutcome("a@x.example", "failed", "550 no"), RecipientOutcome("b@x.example", "deferred", "451 later")), next_attempt=500.0))
        result(self, self.store.record(outcomes, 101.0))
        depth = self.depth(now=120.0)
        # y.example's envelope is still leased (until 160), x.example's is deferred; done's are finished.
        self.assertEqual(depth.recipients, (("deferred", 1), ("queued", 1)))
        self.assertEqual((depth.unfinished_envelopes, depth.in_delivery, depth.oldest_created_at), (2, 1, 100.0))
        stats = result(self, self.store.queue_stats(120.0))
        self.assertEqual(depth.recipients, tuple((s, n) for s, n in stats.recipients if s in ("queued", "deferred")))

    def test_reads_only_unfinished_envelopes(self) -> None:
        """Its queries walk the partial index of unfinished envelopes, never every recipient row."""
        from mmgun.store.sqlite import queries as Q

        conn = connect(self.path)
        self.addCleanup(conn.close)
        for query, args in ((Q.PENDING_BY_STATUS, ()), (Q.UNFINISHED_SUMMARY, (0.0,))):
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + query, args)]
            self.assertTrue(any("USING INDEX envelopes_due" in step for step in plan), plan)
            self.assertFalse([step for step in plan if step.startswith("SCAN") and "envelopes_due" not in step], plan)

    def test_queue_gauges_show_the_pending_queue(self) -> None:
        from twisted.internet.task import Clock

        from mmgun.metrics import Metrics
        from mmgun.service import QueueGauges

        s = submission(at=100.0)
        result(self, self.store.add_submission(s))
        claimed = result(self, self.store.claim("s", 100.0, 60, 10))
        result(self, self.store.record([EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250 ok") for a in e.recipients)) for e in claimed if e.domain == "y.example"], 101.0))
        clock = Clock()
        clock.advance(130.0)
        metrics = Metrics()
        self.successResultOf(QueueGauges(self.store, metrics, clock).refresh())
        # Finished recipients ("sent") are not read at all.
        self.assertEqual(metrics.queue.depth, {"queued": 2})
        self.assertEqual((metrics.queue.envelopes, metrics.queue.oldest_age), (1, 30.0))
