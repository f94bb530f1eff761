"""
Issue 12, the store's part: send_at (nothing claimed before it, "scheduled" in /status,
the clock-step code and the operator's listing stay right), tags and metadata kept with
the submission. On real SQLite files.
"""

from __future__ import annotations

import io
import json
import sqlite3
import uuid

from twisted.trial.unittest import SynchronousTestCase

from mmgun.admin import main
from mmgun.store import EnvelopeOutcome, NewSubmission, RecipientOutcome, submission_status
from mmgun.store.sqlite import SQLiteStore, connect, queries as Q

from .helpers import result, sync_store

T0 = 1_800_000_000.0
HOUR = 3600.0


def scheduled(
    recipients: tuple[str, ...] = ("a@x.example", "b@y.example"),
    *,
    at: float = T0,
    send_at: float | None = T0 + HOUR,
    tags: tuple[str, ...] = (),
    metadata: str | None = None,
) -> NewSubmission:
    return NewSubmission(
        uuid.uuid4().hex,
        "c1",
        "me@example.com",
        recipients,
        b"Subject: hi\r\n\r\nbody\r\n",
        at,
        send_at=send_at,
        tags=tags,
        metadata=metadata,
    )


class ScheduleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def add(self, submission: NewSubmission) -> str:
        return result(self, self.store.add_submission(submission))

    def claim(self, now: float) -> list:
        # A long lease: an envelope claimed once is not claimed again here (as if its sender died).
        return result(self, self.store.claim("sender", now, 100 * HOUR, 100))

    def test_nothing_is_claimed_before_send_at(self) -> None:
        """issue 12 (send_at): an envelope's first next_attempt is send_at; the claim query takes nothing earlier."""
        s = self.add(scheduled())
        now_one = self.add(scheduled(("c@z.example",), send_at=None))
        self.assertEqual({e.submission_id for e in self.claim(T0 + 1)}, {now_one})
        self.assertEqual(self.claim(T0 + HOUR - 0.001), [])
        claimed = self.claim(T0 + HOUR)
        self.assertEqual({e.submission_id for e in claimed}, {s})
        self.assertEqual(len(claimed), 2)
        # The queue lifetime (and the delivery-time metric) count from send_at, not from the request.
        self.assertEqual({e.created_at for e in claimed}, {T0 + HOUR})

    def test_send_at_not_after_creation_is_now(self) -> None:
        """issue 12 (send_at): a send_at in the past (or now) is delivered at once and never shown as scheduled."""
        s = self.add(scheduled(send_at=T0 - 10))
        state = result(self, self.store.submission("c1", s, T0))
        self.assertEqual(state.status, "queued")
        self.assertIsNone(state.send_at)
        self.assertEqual(len(self.claim(T0)), 2)

    def test_status_shows_scheduled_until_send_at(self) -> None:
        """issue 12 (send_at): /status says scheduled for each recipient and the submission until send_at, then queued."""
        s = self.add(scheduled())
        state = result(self, self.store.submission("c1", s, T0 + 10))
        self.assertEqual([r.status for r in state.recipients], ["scheduled", "scheduled"])
        self.assertEqual(state.status, "scheduled")
        self.assertEqual(state.send_at, T0 + HOUR)
        later = result(self, self.store.submission("c1", s, T0 + HOUR))
        self.assertEqual(later.status, "queued")
        self.assertEqual({r.status for r in later.recipients}, {"queued"})
        # Without a time (the store's older callers), the stored statuses as they are.
        self.assertEqual(result(self, self.store.submission("c1", s)).status, "queued")

    def test_deleted_scheduled_recipient_mixes_as_queued(self) -> None:
        """issue 12 (send_at): a submission with one domain deleted by the operator and one still scheduled is queued (unfinished)."""
        s = self.add(scheduled())
        envelopes = result(self, self.store.queue_entries(T0 + 10, domain="x.example"))
        result(self, self.store.fail_queued([str(envelopes[0].envelope_id)], T0 + 10, "550 deleted"))
        state = result(self, self.store.submission("c1", s, T0 + 20))
        self.assertEqual([r.status for r in state.recipients], ["failed", "scheduled"])
        self.assertEqual(state.status, "queued")
        self.assertEqual(submission_status(["scheduled"]), "scheduled")
        self.assertEqual(submission_status(["scheduled", "sent"]), "queued")

    def test_tags_and_metadata_are_kept(self) -> None:
        """issue 12 (tags, metadata): kept with the submission and returned with its state."""
        metadata = json.dumps({"user": 42, "name": "Zoë"}, ensure_ascii=False, separators=(",", ":"))
        s = self.add(scheduled(tags=("newsletter", "é"), metadata=metadata, send_at=None))
        state = result(self, self.store.submission("c1", s, T0))
        self.assertEqual(state.tags, ("newsletter", "é"))
        self.assertEqual(state.metadata, metadata)
        plain = result(self, self.store.submission("c1", self.add(scheduled(send_at=None)), T0))
        self.assertEqual((plain.tags, plain.metadata, plain.send_at), ((), None, None))

    def test_clock_step_back_does_not_make_scheduled_mail_due(self) -> None:
        """issue 12 (send_at): after a backward wall-clock step, due_unattempted makes unscheduled envelopes due, never a scheduled one early."""
        s = self.add(scheduled(at=T0, send_at=T0 + HOUR))
        plain = self.add(scheduled(("c@z.example",), at=T0 + 100, send_at=None))
        # The clock steps back 50 s: the plain envelope (due at T0+100) is due now; the scheduled ones are not.
        self.assertEqual(result(self, self.store.due_unattempted(T0 + 50)), 1)
        self.assertEqual({e.submission_id for e in self.claim(T0 + 50)}, {plain})
        self.assertEqual(self.claim(T0 + HOUR - 1), [])
        self.assertEqual({e.submission_id for e in self.claim(T0 + HOUR)}, {s})

    def test_cleaner_keeps_a_scheduled_submission(self) -> None:
        """issue 12 (send_at): a submission waiting for its send_at is unfinished; the cleaner leaves it whatever the retention."""
        s = self.add(scheduled(send_at=T0 + 6 * 24 * HOUR))
        self.assertEqual(result(self, self.store.clean(T0 + 7 * 24 * HOUR, 100, T0 + 7 * 24 * HOUR)), 0)
        self.assertIsNotNone(result(self, self.store.submission("c1", s)))
        # Delivered after its time, it is finished and cleaned like any other.
        claimed = self.claim(T0 + 6 * 24 * HOUR)
        outcomes = [
            EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250 ok") for a in e.recipients)) for e in claimed
        ]
        result(self, self.store.record(outcomes, T0 + 6 * 24 * HOUR))
        self.assertEqual(result(self, self.store.clean(T0 + 7 * 24 * HOUR, 100, T0 + 8 * 24 * HOUR)), 1)

    def test_queue_listing_and_age_with_scheduled_envelopes(self) -> None:
        """issue 12 (send_at): mmgun queue shows scheduled envelopes as such (and filters them); queue age ignores mail not yet due."""
        s = self.add(scheduled(("a@x.example",), send_at=T0 + HOUR))
        entries = result(self, self.store.queue_entries(T0 + 10))
        self.assertEqual([(e.submission_id, e.status, e.next_attempt) for e in entries], [(s, "scheduled", T0 + HOUR)])
        self.assertEqual(result(self, self.store.queue_entries(T0 + 10, "queued")), [])
        self.assertEqual(len(result(self, self.store.queue_entries(T0 + 10, "scheduled"))), 1)
        # Only scheduled mail: nothing is waiting, so no age (not a negative one).
        self.assertIsNone(result(self, self.store.queue_depth(T0 + 10)).oldest_created_at)
        self.assertIsNone(result(self, self.store.queue_stats(T0 + 10)).oldest_created_at)
        plain = self.add(scheduled(("b@y.example",), at=T0 + 5, send_at=None))
        self.assertEqual(result(self, self.store.queue_depth(T0 + 10)).oldest_created_at, T0 + 5)
        self.assertEqual([e.status for e in result(self, self.store.queue_entries(T0 + 10, "queued"))], ["queued"])
        # flush (deferred only) leaves a scheduled envelope alone.
        self.assertEqual(result(self, self.store.flush_deferred(T0 + 10)), (0, 0))
        self.assertEqual(self.claim(T0 + 10)[0].submission_id, plain)
        self.assertEqual(self.claim(T0 + 20), [])
        # Once its time has come it is plain queued mail.
        self.assertEqual(result(self, self.store.queue_entries(T0 + HOUR))[0].status, "queued")

    def test_admin_command_lists_scheduled(self) -> None:
        """issue 12 (send_at): `mmgun queue --status scheduled` lists the scheduled envelopes with their status."""
        s = self.add(scheduled(("a@x.example",), send_at=T0 + HOUR))
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["queue", "--database", self.path, "--status", "scheduled", "--json"],
            now=lambda: T0 + 10,
            environ={},
            stdout=out,
            stderr=err,
        )
        self.assertEqual((code, err.getvalue()), (0, ""))
        (entry,) = json.loads(out.getvalue())
        self.assertEqual((entry["submission_id"], entry["status"]), (s, "scheduled"))


class MigrationTests(SynchronousTestCase):
    def test_database_of_the_previous_version_is_upgraded(self) -> None:
        """issue 12 (store): a database at the previous schema gains send_at, tags and metadata; its submissions read as unscheduled."""
        path = self.mktemp()
        conn = connect(path)
        for statements in Q.MIGRATIONS[:-1]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(Q.MIGRATIONS) - 1}")
        conn.execute(
            "INSERT INTO submissions (id, client, sender, created_at, message) VALUES ('s1', 'c1', 'a@b.example', ?, x'00')",
            (T0,),
        )
        conn.execute(
            "INSERT INTO envelopes (submission_id, domain, next_attempt, created_at) VALUES ('s1', 'x.example', ?, ?)",
            (T0, T0),
        )
        conn.execute("INSERT INTO recipients VALUES (1, 0, 's1', 'a@x.example', 'queued', 0, NULL, ?)", (T0,))
        conn.close()
        store = SQLiteStore.open_sync(path)
        self.addCleanup(lambda: result(self, store.close()))
        state = result(self, store.submission("c1", "s1", T0))
        self.assertEqual((state.status, state.tags, state.metadata, state.send_at), ("queued", (), None, None))
        self.assertEqual(len(result(self, store.claim("s", T0, 60, 10))), 1)
        check = sqlite3.connect(path)
        self.addCleanup(check.close)
        self.assertEqual(check.execute("PRAGMA user_version").fetchone(), (len(Q.MIGRATIONS),))
