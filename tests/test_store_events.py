"""
issue 14, the store's side: every state change writes its event in the same transaction,
suppression lists stop mail at submission, a "no such mailbox" bounce joins the bounce list,
and webhooks follow the feed from a cursor with a lease and keep what their receiver refused.
On a real SQLite file.
"""

from __future__ import annotations

import sqlite3
import uuid

from twisted.trial.unittest import SynchronousTestCase

from mmgun.store import (
    LAST_ID,
    EnvelopeOutcome,
    EventCursor,
    NewSubmission,
    RecipientOutcome,
    Suppression,
    Webhook,
)
from mmgun.store.sqlite import SQLiteStore

from .helpers import result, sync_store


def submission(recipients: tuple[str, ...], *, at: float = 100.0, client: str = "c1", tags: tuple[str, ...] = (), test_mode: bool = False) -> NewSubmission:
    return NewSubmission(
        uuid.uuid4().hex, client, "ada@Sender.example", recipients, b"Subject: s\r\n\r\nhi\r\n", at,
        tags=tags, message_id="<m@x>", test_mode=test_mode,
    )


def kinds(store: SQLiteStore, case: SynchronousTestCase, client: str = "c1") -> list[tuple[str, str, str | None, str | None]]:
    return [(e.recipient, e.event, e.severity, e.reason) for e in result(case, store.events(client, limit=1000))]


class EventWritesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def test_accepted_deferred_delivered_and_bounced(self) -> None:
        """issue 14 (event log): accepted per recipient, a deferral, a delivery and a hard bounce, each with its attempt."""
        s = submission(("a@x.example", "b@x.example"))
        result(self, self.store.add_submission(s))
        (envelope,) = result(self, self.store.claim("s1", 110.0, 60.0, 10))
        result(self, self.store.record([EnvelopeOutcome(envelope, (
            RecipientOutcome("a@x.example", "deferred", "451 4.7.1 greylisted", mx_host="mx.x.example"),
            RecipientOutcome("b@x.example", "failed", "550 5.1.1 no such user", mx_host="mx.x.example", bounce=True),
        ), 200.0)], 120.0))
        (envelope,) = result(self, self.store.claim("s1", 200.0, 60.0, 10))
        result(self, self.store.record([EnvelopeOutcome(envelope, (
            RecipientOutcome("a@x.example", "sent", "250 2.0.0 ok", mx_host="mx.x.example"),
        ))], 210.0))
        events = result(self, self.store.events("c1"))
        self.assertEqual(
            [(e.recipient, e.event, e.severity, e.reason, e.attempt, e.reply) for e in events],
            [
                ("a@x.example", "accepted", None, None, None, None),
                ("b@x.example", "accepted", None, None, None, None),
                ("a@x.example", "failed", "temporary", None, 1, "451 4.7.1 greylisted"),
                ("b@x.example", "failed", "permanent", "bounce", 1, "550 5.1.1 no such user"),
                ("a@x.example", "delivered", None, None, 2, "250 2.0.0 ok"),
            ],
        )
        self.assertEqual({e.domain for e in events}, {"sender.example"})
        self.assertEqual({e.message_id for e in events}, {"<m@x>"})
        self.assertEqual(events[-1].mx_host, "mx.x.example")
        self.assertEqual([e.cursor for e in events], sorted(e.cursor for e in events))
        bounce = result(self, self.store.suppression("c1", "bounce", "B@X.example"))
        self.assertEqual((bounce.code, bounce.error), ("550", "550 5.1.1 no such user"))

    def test_a_released_lease_writes_no_event_and_expiry_says_expired(self) -> None:
        """issue 14 (event log): giving a claim back is no attempt; a recipient failed for the queue lifetime says so."""
        result(self, self.store.add_submission(submission(("a@x.example",))))
        (envelope,) = result(self, self.store.claim("s1", 110.0, 60.0, 10))
        result(self, self.store.release([envelope], 111.0))
        (envelope,) = result(self, self.store.claim("s1", 112.0, 60.0, 10))
        result(self, self.store.record([EnvelopeOutcome(envelope, (
            RecipientOutcome("a@x.example", "failed", "expired: not delivered", reason="expired"),
        ))], 120.0))
        self.assertEqual(kinds(self.store, self), [("a@x.example", "accepted", None, None), ("a@x.example", "failed", "permanent", "expired")])
        self.assertIsNone(result(self, self.store.suppression("c1", "bounce", "a@x.example")))

    def test_operator_delete_writes_deleted(self) -> None:
        """issue 14 (event log): a recipient failed by the operator ends with reason deleted."""
        s = submission(("a@x.example",))
        result(self, self.store.add_submission(s))
        result(self, self.store.fail_queued([s.id], 150.0, "554 5.0.0 deleted by the operator"))
        self.assertEqual(kinds(self.store, self)[-1], ("a@x.example", "failed", "permanent", "deleted"))

    def test_test_mode_is_accepted_then_delivered_in_test_mode(self) -> None:
        """issue 14 (event log): o:testmode's recipients show accepted then delivered with reason testmode."""
        result(self, self.store.add_submission(submission(("a@x.example",), test_mode=True)))
        self.assertEqual(kinds(self.store, self), [("a@x.example", "accepted", None, None), ("a@x.example", "delivered", None, "testmode")])

    def test_one_client_sees_only_its_events(self) -> None:
        """issue 14 (event log): a client sees only its own events."""
        result(self, self.store.add_submission(submission(("a@x.example",), client="c1")))
        result(self, self.store.add_submission(submission(("b@x.example",), client="c2")))
        self.assertEqual([e.recipient for e in result(self, self.store.events("c2"))], ["b@x.example"])

    def test_each_transaction_has_its_own_feed_number_and_paging_is_exact(self) -> None:
        """issue 14 (event log): commits take increasing feed numbers; start/descending page without gap or repeat."""
        for i in range(5):
            result(self, self.store.add_submission(submission((f"r{i}@x.example", f"q{i}@x.example"))))
        events = result(self, self.store.events("c1"))
        self.assertEqual(len({e.cursor.seq for e in events}), 5)
        seen = []
        start = None
        while page := result(self, self.store.events("c1", start=start, limit=3)):
            seen += page
            start = page[-1].cursor
        self.assertEqual(seen, events)
        backwards = []
        start = None
        while page := result(self, self.store.events("c1", start=start, limit=4, descending=True)):
            backwards += page
            start = page[-1].cursor
        self.assertEqual(backwards, events[::-1])
        self.assertEqual(EventCursor.parse(str(events[3].cursor)), events[3].cursor)
        for bad in ("", "1", "1-", "-1", "a-b", "1-2-3", "1" * 19 + "-1", "１-1"):
            self.assertRaises(ValueError, EventCursor.parse, bad)


class SuppressionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def test_suppressed_recipient_fails_at_once_and_the_others_are_queued(self) -> None:
        """issue 14 (suppression): a bounced address fails at submission with 'suppressed: …'; the rest are queued."""
        result(self, self.store.add_suppressions([Suppression("c1", "bounce", "Gone@X.example", 50.0, "550", "550 5.1.1 no such user")]))
        s = submission(("gone@x.example", "ok@x.example"))
        result(self, self.store.add_submission(s))
        state = result(self, self.store.submission("c1", s.id))
        by_address = {r.address: r for r in state.recipients}
        self.assertEqual(by_address["gone@x.example"].status, "failed")
        self.assertEqual(by_address["gone@x.example"].last_reply, "suppressed: the address is on this client's bounce list (550 5.1.1 no such user)")
        self.assertEqual(by_address["ok@x.example"].status, "queued")
        (envelope,) = result(self, self.store.claim("s1", 110.0, 60.0, 10))
        self.assertEqual(envelope.recipients, ("ok@x.example",))
        self.assertIn(("gone@x.example", "failed", "permanent", "suppress-bounce"), kinds(self.store, self))

    def test_all_suppressed_finishes_the_submission_and_keeps_no_message(self) -> None:
        """issue 14 (suppression): nothing left to send: nothing queued, the message not kept."""
        result(self, self.store.add_suppressions([Suppression("c1", "complaint", "a@x.example", 50.0)]))
        s = submission(("a@x.example",))
        result(self, self.store.add_submission(s))
        self.assertEqual(result(self, self.store.claim("s1", 110.0, 60.0, 10)), [])
        row = sqlite3.connect(self.path).execute("SELECT finished_at, message FROM submissions WHERE id = ?", (s.id,)).fetchone()
        self.assertEqual(row, (100.0, None))

    def test_lists_are_per_client_and_unsubscribes_may_be_per_tag(self) -> None:
        """issue 14 (suppression): another client's list stops nothing; a tagged unsubscribe stops only that tag."""
        result(self, self.store.add_suppressions([
            Suppression("c2", "bounce", "a@x.example", 50.0),
            Suppression("c1", "unsubscribe", "b@x.example", 50.0, tags=("news",)),
        ]))
        s1 = submission(("a@x.example", "b@x.example"), tags=("receipts",))
        s2 = submission(("b@x.example",), tags=("news",))
        result(self, self.store.add_submission(s1))
        result(self, self.store.add_submission(s2))
        self.assertEqual({r.status for r in result(self, self.store.submission("c1", s1.id)).recipients}, {"queued"})
        self.assertEqual([r.status for r in result(self, self.store.submission("c1", s2.id)).recipients], ["failed"])

    def test_every_spelling_of_a_suppressed_address_is_stopped(self) -> None:
        """issue 14 (review): bob@ and Bob@ in one submission are both the suppressed address."""
        result(self, self.store.add_suppressions([Suppression("c1", "bounce", "bob@x.example", 50.0)]))
        s = submission(("bob@x.example", "Bob@x.example", "ok@x.example"))
        result(self, self.store.add_submission(s))
        statuses = {r.address: r.status for r in result(self, self.store.submission("c1", s.id)).recipients}
        self.assertEqual(statuses, {"bob@x.example": "failed", "Bob@x.example": "failed", "ok@x.example": "queued"})

    def test_clearing_a_long_list_goes_in_batches(self) -> None:
        """issue 14 (review): emptying a list deletes it all, a bounded batch per transaction."""
        from mmgun.store.sqlite import store as backend

        self.patch(backend, "CLEAR_BATCH", 3)
        result(self, self.store.add_suppressions([Suppression("c1", "complaint", f"u{i}@x.example", 1.0) for i in range(8)]))
        result(self, self.store.add_suppressions([Suppression("c2", "complaint", "u0@x.example", 1.0)]))
        self.assertEqual(result(self, self.store.clear_suppressions("c1", "complaint")), 8)
        self.assertEqual(result(self, self.store.suppressions("c1", "complaint")), [])
        self.assertEqual(len(result(self, self.store.suppressions("c2", "complaint"))), 1)

    def test_crud(self) -> None:
        """issue 14 (suppression): add replaces, get is case-insensitive, paging by address, remove and clear."""
        entries = [Suppression("c1", "bounce", f"u{i}@x.example", 10.0 + i) for i in range(5)]
        result(self, self.store.add_suppressions(entries))
        result(self, self.store.add_suppressions([Suppression("c1", "bounce", "U0@x.example", 99.0, "550", "later")]))
        self.assertEqual(result(self, self.store.suppression("c1", "bounce", "u0@X.EXAMPLE")).error, "later")
        page = result(self, self.store.suppressions("c1", "bounce", after="u1@x.example", limit=2))
        self.assertEqual([e.address for e in page], ["u2@x.example", "u3@x.example"])
        page = result(self, self.store.suppressions("c1", "bounce", after="u2@x.example", limit=2, descending=True))
        self.assertEqual([e.address for e in page], ["u1@x.example", "u0@x.example"])
        self.assertTrue(result(self, self.store.remove_suppression("c1", "bounce", "U4@x.example")))
        self.assertFalse(result(self, self.store.remove_suppression("c1", "bounce", "u4@x.example")))
        self.assertEqual(result(self, self.store.clear_suppressions("c2", "bounce")), 0)
        self.assertEqual(result(self, self.store.clear_suppressions("c1", "bounce")), 4)


class EventRetentionTests(SynchronousTestCase):
    def test_old_events_go_even_behind_a_later_stamped_one(self) -> None:
        """issue 14 (review): an event stamped later than its neighbours (another host's clock) does not stop the cleaning."""
        store, _ = sync_store(self)
        for at in [100.0, 100.0, 500.0] + [100.0] * 20:
            result(self, store.add_submission(submission(("a@x.example",), at=at)))
        deleted = result(self, store.clean_events(200.0, 5)) + result(self, store.clean_events(200.0, 5))
        self.assertEqual(deleted, 10)
        while result(self, store.clean_events(200.0, 5)):
            pass
        self.assertEqual([e.created_at for e in result(self, store.events("c1", limit=100))], [500.0])


class WebhookStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def hook(self, ident: str = "w1", client: str = "c1") -> Webhook:
        return result(self, self.store.add_webhook(Webhook(ident, client, None, "https://hooks.example/x", ("delivered",), 100.0)))

    def test_a_new_webhook_starts_after_the_events_committed_so_far(self) -> None:
        """issue 14 (webhooks): a webhook receives what happens after it was made, not the history."""
        result(self, self.store.add_submission(submission(("a@x.example",))))
        hook = self.hook()
        result(self, self.store.add_submission(submission(("b@x.example",))))
        after = result(self, self.store.events("c1", start=hook.cursor))
        self.assertEqual([e.recipient for e in after], ["b@x.example"])

    def test_one_dispatcher_holds_a_webhook_at_a_time(self) -> None:
        """issue 14 (webhooks): a leased webhook is not leased by another until the lease runs out; a lost lease moves nothing."""
        self.hook()
        self.assertEqual([w.id for w in result(self, self.store.lease_webhooks("d1", 100.0, 130.0))], ["w1"])
        self.assertEqual(result(self, self.store.lease_webhooks("d2", 110.0, 140.0)), [])
        self.assertEqual([w.id for w in result(self, self.store.lease_webhooks("d1", 120.0, 150.0))], ["w1"])
        self.assertEqual([w.id for w in result(self, self.store.lease_webhooks("d2", 151.0, 180.0))], ["w1"])
        self.assertFalse(result(self, self.store.advance_webhook("w1", "d1", EventCursor(9, 9), [])))
        self.assertTrue(result(self, self.store.advance_webhook("w1", "d2", EventCursor(9, 9), [])))
        self.assertEqual(result(self, self.store.webhook("w1")).cursor, EventCursor(9, 9))

    def test_taking_without_renewing_writes_only_unheld_webhooks(self) -> None:
        """
        issue 14 (review): lease_webhooks(renew=False) takes only the webhooks no
        dispatcher holds (new or lapsed), writing no other row: its own keep their lease
        end, another's are not taken before theirs lapses.
        """
        self.hook("w1")
        self.assertEqual([w.id for w in result(self, self.store.lease_webhooks("d1", 100.0, 130.0))], ["w1"])
        self.hook("w2")
        self.assertEqual([w.id for w in result(self, self.store.lease_webhooks("d1", 110.0, 140.0, renew=False))], ["w2"])
        self.assertEqual(result(self, self.store.lease_webhooks("d2", 120.0, 150.0, renew=False)), [])
        # d1's take at 110 left w1's lease end at 130: it lapses at 131, not 140.
        self.assertEqual([w.id for w in result(self, self.store.lease_webhooks("d2", 131.0, 161.0, renew=False))], ["w1"])
        self.assertEqual(result(self, self.store.lease_webhooks("d1", 132.0, 162.0, renew=False)), [])

    def test_failed_events_wait_as_retries_until_done(self) -> None:
        """issue 14 (webhooks): an event the receiver refused is kept with its error, leased when due, then deleted or rescheduled."""
        hook = self.hook()
        result(self, self.store.add_submission(submission(("a@x.example", "b@x.example"))))
        a, b = result(self, self.store.events("c1", start=hook.cursor))
        result(self, self.store.lease_webhooks("d1", 100.0, 130.0))
        self.assertTrue(result(self, self.store.advance_webhook("w1", "d1", b.cursor, [(a.cursor.id, 100.0, 700.0, "HTTP 500"), (b.cursor.id, 100.0, 800.0, "timeout")])))
        self.assertEqual(result(self, self.store.due_webhook_retries("d1", 699.0, 760.0, 10)), [])
        (due,) = result(self, self.store.due_webhook_retries("d1", 700.0, 760.0, 10))
        self.assertEqual((due.event.recipient, due.attempts, due.last_error), ("a@x.example", 1, "HTTP 500"))
        self.assertEqual(result(self, self.store.due_webhook_retries("d2", 750.0, 800.0, 10)), [])  # leased
        result(self, self.store.finish_webhook_retries([(due, 1000.0, "HTTP 502")], "d1"))
        later = result(self, self.store.due_webhook_retries("d1", 1000.0, 1060.0, 10))
        self.assertEqual([(r.event.recipient, r.attempts, r.last_error) for r in later], [("a@x.example", 2, "HTTP 502"), ("b@x.example", 1, "timeout")])
        result(self, self.store.finish_webhook_retries([(r, None, None) for r in later], "d1"))
        self.assertEqual(result(self, self.store.due_webhook_retries("d1", 10_000.0, 10_060.0, 10)), [])

    def test_keys_and_webhooks_crud(self) -> None:
        """issue 14 (webhooks): a client's signing key is set and rotated; webhooks are listed per client, changed, removed."""
        self.assertIsNone(result(self, self.store.webhook_key("c1")))
        result(self, self.store.set_webhook_key("c1", "k1", 1.0))
        result(self, self.store.set_webhook_key("c1", "k2", 2.0))
        self.assertEqual(result(self, self.store.webhook_key("c1")), "k2")
        self.hook("w1", "c1")
        self.hook("w2", "c2")
        self.assertEqual([w.id for w in result(self, self.store.webhooks("c2"))], ["w2"])
        self.assertTrue(result(self, self.store.update_webhook("w1", "https://other.example/", ["delivered", "permanent_fail"])))
        self.assertEqual(result(self, self.store.webhook("w1")).events, ("delivered", "permanent_fail"))
        self.assertTrue(result(self, self.store.remove_webhook("w1")))
        self.assertFalse(result(self, self.store.remove_webhook("w1")))
        self.assertEqual([w.id for w in result(self, self.store.webhooks())], ["w2"])

    def test_first_key_race_and_release(self) -> None:
        """issue 14 (webhooks): a first key made twice at once is one key; a clean stop hands its webhooks and retries over at once."""
        self.assertEqual(result(self, self.store.set_webhook_key("c1", "first", 1.0, replace=False)), "first")
        self.assertEqual(result(self, self.store.set_webhook_key("c1", "second", 2.0, replace=False)), "first")
        self.assertEqual(result(self, self.store.set_webhook_key("c1", "rotated", 3.0)), "rotated")
        hook = self.hook()
        result(self, self.store.add_submission(submission(("a@x.example",))))
        (a,) = result(self, self.store.events("c1", start=hook.cursor))
        result(self, self.store.lease_webhooks("d1", 100.0, 130.0))
        result(self, self.store.advance_webhook("w1", "d1", a.cursor, [(a.cursor.id, 100.0, 100.0, "HTTP 500")]))
        self.assertEqual(len(result(self, self.store.due_webhook_retries("d1", 100.0, 160.0, 10))), 1)
        result(self, self.store.release_webhooks("d1", 105.0))
        self.assertEqual([w.id for w in result(self, self.store.lease_webhooks("d2", 106.0, 136.0))], ["w1"])
        self.assertEqual(len(result(self, self.store.due_webhook_retries("d2", 106.0, 166.0, 10))), 1)


class BoundedPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)

    def test_a_filter_that_matches_little_reads_a_bounded_stretch(self) -> None:
        """issue 14 (review): a filter matching one event in 30 looks at `scan` events a call and says how far it got."""
        for i in range(30):
            recipient = "needle@x.example" if i == 25 else f"hay{i}@x.example"
            result(self, self.store.add_submission(submission((recipient,))))
        everything = result(self, self.store.events("c1", limit=100))
        page, reached = result(self, self.store.events_page("c1", recipient="needle@x.example", limit=5, scan=10))
        self.assertEqual((page, reached), ([], everything[9].cursor))
        page, reached = result(self, self.store.events_page("c1", start=reached, recipient="needle@x.example", limit=5, scan=10))
        self.assertEqual((page, reached), ([], everything[19].cursor))
        page, reached = result(self, self.store.events_page("c1", start=reached, recipient="needle@x.example", limit=5, scan=10))
        self.assertEqual([e.recipient for e in page], ["needle@x.example"])
        self.assertEqual(reached, everything[29].cursor)
        # Fewer than `scan` left: the end of the feed as read, after every event committed then.
        page, reached = result(self, self.store.events_page("c1", start=reached, recipient="needle@x.example", limit=5, scan=10))
        self.assertEqual((page, reached), ([], EventCursor(everything[-1].cursor.seq, LAST_ID)))
        result(self, self.store.add_submission(submission(("late@x.example",))))
        page, _ = result(self, self.store.events_page("c1", start=reached, limit=5))
        self.assertEqual([e.recipient for e in page], ["late@x.example"])
        # Backwards: from the end, the same bound.
        page, reached = result(self, self.store.events_page("c1", descending=True, recipient="hay0@x.example", limit=5, scan=10))
        self.assertEqual((page, reached), ([], everything[21].cursor))

    def test_a_full_page_reaches_its_last_event(self) -> None:
        """issue 14 (review): when the limit is found first, the reading stops at the last event returned."""
        for i in range(6):
            result(self, self.store.add_submission(submission((f"r{i}@x.example",))))
        page, reached = result(self, self.store.events_page("c1", limit=4, scan=100))
        self.assertEqual(len(page), 4)
        self.assertEqual(reached, page[-1].cursor)
