"""
The store's contract (issue 15), one suite run against every backend: what several hosts
on one database rely on, as :class:`mmgun.store.Store`'s docstrings state it. Each test
opens its stores with :meth:`StoreContract.open_store` (each one its own connection, as a
second host would have); the concurrent ones run one synchronous store per thread and
join the threads with a deadline. In the manner of ranger-ims-server's ``store/test/``:
a mixin of tests, and one TestCase per backend that says how to open a store.

Times are real POSIX times near now (:attr:`StoreContract.now`): PostgreSQL judges leases
on its own clock, so a test's times must be the database's, give or take the test's length.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mmgun.store import (
    Backoff,
    ClaimedEnvelope,
    EnvelopeOutcome,
    EventCursor,
    MTASTSPolicy,
    NewSubmission,
    RecipientOutcome,
    Store,
    StoredKey,
    SubmissionState,
    Suppression,
    Webhook,
)

from . import pgcluster

T = TypeVar("T")

#: How long a test waits for its threads.
DEADLINE = 60.0
MESSAGE = b"Subject: contract\r\n\r\nthe body\r\n"


def run(call: Coroutine[Any, Any, T] | Deferred[T]) -> T:
    """The result of a synchronous store's call (its Deferred fires at once); its exception raised here."""
    d = call if isinstance(call, Deferred) else ensureDeferred(call)
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        raise AssertionError("a synchronous store's call did not complete at once")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    value: T = box[0]
    return value


def in_threads(calls: Sequence[Callable[[], T]], deadline: float = DEADLINE) -> list[T]:
    """Run each call in its own thread; their results in order. The first exception is raised; a thread still running past ``deadline`` fails."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def target(i: int, call: Callable[[], T]) -> None:
        try:
            results[i] = call()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    running = sum(thread.is_alive() for thread in threads)
    if running:
        raise AssertionError(f"{running} of {len(threads)} threads still running after {deadline:g} s")
    if errors:
        raise errors[0]
    return results


def sent(envelope: ClaimedEnvelope) -> EnvelopeOutcome:
    """Every pending recipient of ``envelope`` delivered."""
    return EnvelopeOutcome(envelope, tuple(RecipientOutcome(a, "sent", "250 2.0.0 ok", mx_host="mx.test") for a in envelope.recipients))


class StoreContract:
    """
    The tests; a backend's TestCase (also a SynchronousTestCase) provides
    :meth:`backend_store` (a new store, its own connection, on this test's database) and
    :meth:`stored_message` (a submission's message and finished_at, read behind the store's back).
    """

    #: Why the clock-skew test does not apply to this backend, or None.
    clock_skew_skip: str | None = None

    # Given by SynchronousTestCase.
    addCleanup: Callable[..., Any]
    assertEqual: Callable[..., Any]
    assertTrue: Callable[..., Any]
    assertFalse: Callable[..., Any]
    assertIsNone: Callable[..., Any]
    assertIsNotNone: Callable[..., Any]
    assertIn: Callable[..., Any]
    assertNotIn: Callable[..., Any]
    assertNotEqual: Callable[..., Any]
    assertGreater: Callable[..., Any]

    def backend_store(self) -> Store:
        raise NotImplementedError

    def stored_message(self, submission_id: str) -> tuple[bytes | None, float | None]:
        raise NotImplementedError

    def setUp(self) -> None:
        #: Now, in whole seconds: the base of every time a test gives its stores.
        self.now = float(int(time.time()))

    def open_store(self) -> Store:
        """A store on this test's database, closed by the test's cleanup."""
        store = self.backend_store()
        self.addCleanup(lambda: run(store.close()))
        return store

    def open_second_store(self) -> Store:
        """Another store on the same database, through its own connection (as another host's would be)."""
        return self.open_store()

    def submission(
        self,
        recipients: tuple[str, ...] = ("a@one.example", "b@two.example"),
        *,
        client: str = "c1",
        at: float | None = None,
        key: str | None = None,
        digest: str | None = None,
        message: bytes = MESSAGE,
        test_mode: bool = False,
    ) -> NewSubmission:
        return NewSubmission(
            uuid.uuid4().hex,
            client,
            "me@sender.example",
            recipients,
            message,
            self.now if at is None else at,
            key,
            digest,
            test_mode=test_mode,
        )

    def state(self, store: Store, submission_id: str) -> SubmissionState:
        """The state of c1's submission ``submission_id``, which must exist."""
        found = run(store.submission("c1", submission_id))
        assert found is not None, f"no submission {submission_id}"
        return found

    # -- claims and leases -------------------------------------------------------------------------

    def test_concurrent_claimers_never_share_an_envelope(self) -> None:
        """issue 15: contract: many concurrent claimers, each with its own connection, never share an envelope."""
        store = self.open_store()
        batch = [self.submission(tuple(f"r{i}@d{j}.example" for j in range(4))) for i in range(100)]
        run(store.add_batch(batch))
        claimers = [self.open_second_store() for _ in range(8)]
        barrier = threading.Barrier(len(claimers), timeout=DEADLINE)

        def claim_all(claimer: Store, name: str) -> list[int]:
            mine: list[int] = []
            barrier.wait()
            # Bounded: a store that hands out leased envelopes again must fail the test, not hang it.
            while len(mine) <= 400:
                envelopes = run(claimer.claim(name, self.now, 300.0, 5))
                if not envelopes:
                    break
                mine.extend(e.id for e in envelopes)
            return mine

        claimed = in_threads([partial(claim_all, c, f"claimer-{i}") for i, c in enumerate(claimers)])
        every = [eid for mine in claimed for eid in mine]
        self.assertEqual(len(every), 400)
        self.assertEqual(len(set(every)), 400, "an envelope was claimed twice")
        self.assertEqual(run(store.claim("late", self.now, 300.0, 10)), [])
        # The claims ran side by side, not one claimer after the other.
        self.assertGreater(sum(1 for mine in claimed if mine), 1)

    def test_lease_judged_on_database_clock(self) -> None:
        """issue 15: contract: lease expiry is judged on the database's clock: a claimer 30 s ahead never takes a live lease early."""
        if self.clock_skew_skip:
            raise SkipTest(self.clock_skew_skip)
        first, second = self.open_store(), self.open_second_store()
        s = self.submission(("a@one.example",))
        run(first.add_submission(s))
        real = time.time()
        (envelope,) = run(first.claim("host-1", real, 20.0, 10))
        # Host 2's clock is 30 s ahead: by it, host 1's 20-second lease ran out 10 s ago.
        self.assertEqual(run(second.claim("host-2", time.time() + 30.0, 60.0, 10)), [])
        # Host 1's result still lands: its lease is live.
        run(first.record([sent(envelope)], time.time()))
        state = self.state(second, s.id)
        self.assertEqual([r.status for r in state.recipients], ["sent"])

    def test_expired_lease_taken_over_by_a_host_whose_clock_is_behind(self) -> None:
        """issue 15: contract: a lease that ran out on the database's clock is taken over even by a host whose clock is 30 s behind."""
        if self.clock_skew_skip:
            raise SkipTest(self.clock_skew_skip)
        first, second = self.open_store(), self.open_second_store()
        run(first.add_submission(self.submission(("a@one.example",))))
        # A lease of no time at all has run out by the next statement, on the database's clock.
        (envelope,) = run(first.claim("host-1", time.time(), 0.0, 10))
        (again,) = run(second.claim("host-2", time.time() - 30.0, 60.0, 10))
        self.assertEqual(again.id, envelope.id)

    def test_result_under_a_lost_lease_changes_nothing(self) -> None:
        """issue 15: contract: every write of a result is guarded by the lease: a record or release after the envelope was reclaimed changes nothing."""
        first, second = self.open_store(), self.open_second_store()
        s = self.submission(("a@one.example",))
        run(first.add_submission(s))
        (lost,) = run(first.claim("host-1", self.now, 0.0, 10))
        (taken,) = run(second.claim("host-2", self.now, 300.0, 10))
        self.assertEqual(taken.id, lost.id)
        self.assertNotEqual(taken.lease, lost.lease)

        run(first.record([sent(lost)], self.now))
        run(first.release([lost], self.now))
        run(first.renew([lost], self.now, self.now + 600.0))
        state = self.state(second, s.id)
        self.assertEqual([(r.status, r.attempts) for r in state.recipients], [("queued", 0)])
        self.assertEqual([e.event for e in run(second.events("c1"))], ["accepted"])
        # Still host 2's: nobody else can claim it, and its result lands.
        self.assertEqual(run(first.claim("host-3", self.now, 300.0, 10)), [])
        run(second.record([sent(taken)], self.now))
        state = self.state(first, s.id)
        self.assertEqual([(r.status, r.attempts) for r in state.recipients], [("sent", 1)])
        self.assertEqual([e.event for e in run(first.events("c1"))], ["accepted", "delivered"])

    def test_stale_and_current_results_in_one_group(self) -> None:
        """
        issue 15: contract (found by review): one record group holding a stale outcome
        (under a lease that was lost) and the current one for the same envelope records the
        current one only, whatever their order: the stale one changes nothing.
        """
        first, second = self.open_store(), self.open_second_store()
        for stale_first in (True, False):
            s = self.submission(("a@one.example",))
            run(first.add_submission(s))
            (lost,) = run(first.claim("host-1", self.now, 0.0, 10))
            (taken,) = run(second.claim("host-2", self.now, 300.0, 10))
            refused = EnvelopeOutcome(lost, (RecipientOutcome("a@one.example", "failed", "550 5.1.1 stale says no"),))
            outcomes = [refused, sent(taken)] if stale_first else [sent(taken), refused]
            run(second.record(outcomes, self.now))
            state = self.state(first, s.id)
            self.assertEqual([(r.status, r.last_reply) for r in state.recipients], [("sent", "250 2.0.0 ok")], stale_first)
            self.assertEqual(run(first.claim("host-3", self.now + 1000.0, 300.0, 10)), [], "the envelope was left leased")
            self.assertEqual(self.stored_message(s.id)[0], None, "the finished submission kept its message")

    def test_last_two_envelopes_finished_at_once_finish_the_submission(self) -> None:
        """issue 15: contract: the last two envelopes of a submission finished at the same moment by two stores finish it and erase its body."""
        first, second = self.open_store(), self.open_second_store()
        for _ in range(10):
            s = self.submission(("a@one.example", "b@two.example"))
            run(first.add_submission(s))
            (one,) = run(first.claim("host-1", self.now, 300.0, 1))
            (two,) = run(second.claim("host-2", self.now, 300.0, 1))
            self.assertEqual({one.submission_id, two.submission_id}, {s.id})
            barrier = threading.Barrier(2, timeout=DEADLINE)
            in_threads([partial(self.finish, first, one, barrier), partial(self.finish, second, two, barrier)])
            message, finished_at = self.stored_message(s.id)
            self.assertIsNone(message, "the message of a finished submission was kept")
            self.assertIsNotNone(finished_at, "a submission whose every envelope is done was not finished")
            self.assertEqual(self.state(first, s.id).status, "sent")
        self.assertEqual(run(second.queued_bytes_by_client()).get("c1", 0), 0)

    def finish(self, store: Store, envelope: ClaimedEnvelope, barrier: threading.Barrier) -> None:
        """Record ``envelope`` delivered through ``store`` as soon as the other thread at ``barrier`` is ready too."""
        barrier.wait()
        run(store.record([sent(envelope)], self.now))

    def test_sender_identity_held_by_one_store_at_a_time(self) -> None:
        """issue 15: contract: a sender identity is held by one open store at a time, and free again once its holder closes."""
        first, second = self.open_store(), self.open_second_store()
        self.assertTrue(run(first.lock_identity("sender-1")))
        self.assertTrue(run(first.lock_identity("sender-1")), "the holder asking again")
        self.assertFalse(run(second.lock_identity("sender-1")))
        self.assertTrue(run(second.lock_identity("sender-2")))
        run(first.close())
        self.assertTrue(run(second.lock_identity("sender-1")))

    # -- submissions -------------------------------------------------------------------------------

    def test_concurrent_replays_of_one_idempotency_key_get_one_submission(self) -> None:
        """issue 15: contract: 50 concurrent replays of one Idempotency-Key, each on its own connection, all get the original submission id."""
        stores = [self.open_store() for _ in range(50)]
        barrier = threading.Barrier(len(stores), timeout=DEADLINE)

        def replay(store: Store) -> str:
            s = self.submission(("a@one.example",), key="the-key", digest="the-request")
            barrier.wait()
            return str(run(store.add_submission(s)))

        ids = in_threads([partial(replay, store) for store in stores])
        self.assertEqual(len(set(ids)), 1, "replays got different submissions")
        (original,) = set(ids)
        self.assertIsNotNone(run(stores[0].submission("c1", original)))
        self.assertEqual(run(stores[1].queued_by_client()), {"c1": 1})
        self.assertEqual([e.submission_id for e in run(stores[2].events("c1"))], [original])

    def test_queue_caps_seen_from_another_store(self) -> None:
        """issue 15: contract: queue caps: queued recipients and bytes per client, as another store sees them."""
        first, second = self.open_store(), self.open_second_store()
        big = MESSAGE + b"x" * 1000
        subs = [self.submission(message=big) for _ in range(3)]
        for s in subs:
            run(first.add_submission(s))
        run(first.add_submission(self.submission(("z@one.example",), client="c2")))
        self.assertEqual(run(second.queued_by_client()), {"c1": 6, "c2": 1})
        self.assertEqual(run(second.queued_bytes_by_client()), {"c1": 3 * len(big), "c2": len(MESSAGE)})
        # Finished mail no longer counts.
        self.assertEqual(run(first.fail_queued([subs[0].id], self.now, "deleted by a test")), (2, 2))
        self.assertEqual(run(second.queued_by_client()), {"c1": 4, "c2": 1})
        self.assertEqual(run(second.queued_bytes_by_client()), {"c1": 2 * len(big), "c2": len(MESSAGE)})

    # -- keys ----------------------------------------------------------------------------------------

    def test_key_revoked_in_one_store_is_revoked_in_another(self) -> None:
        """issue 15: contract: key revocation: a key revoked through one store is revoked for every other."""
        first, second = self.open_store(), self.open_second_store()
        run(first.add_client("c1", self.now))
        run(first.add_key("c1", "key-1", b"\x00hash\xff", self.now))
        self.assertEqual(run(second.find_key("key-1")), StoredKey("c1", b"\x00hash\xff", False))
        self.assertTrue(run(first.revoke_key("key-1", self.now + 1)))
        self.assertEqual(run(second.find_key("key-1")), StoredKey("c1", b"\x00hash\xff", True))
        self.assertFalse(run(second.revoke_key("key-1", self.now + 2)))
        self.assertEqual(run(second.key_ids()), {"key-1"})

    # -- the cleaner ----------------------------------------------------------------------------------

    def test_clean_deletes_finished_keeps_unfinished_and_young_keys(self) -> None:
        """issue 15: contract: cleaning deletes finished submissions, keeps unfinished ones and those whose Idempotency-Key is young."""
        first, second = self.open_store(), self.open_second_store()
        day = 24 * 3600.0
        old_keyed = self.submission(at=self.now - 3 * day, key="old", digest="h", test_mode=True)
        plain = self.submission(at=self.now - 2 * day, test_mode=True)
        young_keyed = self.submission(at=self.now - 3600.0, key="young", digest="h", test_mode=True)
        unfinished = self.submission(at=self.now - 3 * day)
        for s in (old_keyed, plain, young_keyed, unfinished):
            run(first.add_submission(s))
        self.assertEqual(run(second.clean(self.now - 60.0, 100, self.now)), 2)
        self.assertIsNone(run(first.submission("c1", old_keyed.id)))
        self.assertIsNone(run(first.submission("c1", plain.id)))
        self.assertIsNotNone(run(first.submission("c1", young_keyed.id)))
        self.assertIsNotNone(run(first.submission("c1", unfinished.id)))
        # The young key's replay still finds its submission.
        replay = self.submission(at=self.now, key="young", digest="h", test_mode=True)
        self.assertEqual(run(first.add_submission(replay)), young_keyed.id)

    # -- events, suppressions, webhooks ------------------------------------------------------------

    def test_feed_followed_during_concurrent_writers_gets_every_event_once_in_order(self) -> None:
        """issue 15: contract: events feed order across writers (four stores): a reader following the feed gets every event once, in order."""
        writers = [self.open_store()] + [self.open_second_store() for _ in range(3)]
        reader = self.open_second_store()
        done = threading.Event()
        expected: set[tuple[str, str]] = set()
        subs = [[self.submission((f"a{i}@one.example", f"b{i}@two.example")) for i in range(40)] for _ in writers]
        for batch in subs:
            expected |= {(s.id, r) for s in batch for r in s.recipients}

        def write(store: Store, batch: list[NewSubmission]) -> None:
            for s in batch:
                run(store.add_submission(s))

        def follow() -> list[Any]:
            seen: list[Any] = []
            cursor: EventCursor | None = None
            while True:
                finished = done.is_set()
                page = run(reader.events("c1", start=cursor, limit=7))
                seen.extend(page)
                if page:
                    cursor = page[-1].cursor
                elif finished:
                    return seen

        def writers_then_done() -> list[Any]:
            try:
                in_threads([partial(write, w, b) for w, b in zip(writers, subs, strict=True)])
            finally:
                done.set()
            return []

        seen = in_threads([writers_then_done, follow])[1]
        cursors = [e.cursor for e in seen]
        self.assertEqual(cursors, sorted(cursors))
        self.assertEqual(len(set(cursors)), len(cursors), "an event was read twice")
        self.assertEqual({e.event for e in seen}, {"accepted"})
        self.assertEqual({(e.submission_id, e.recipient) for e in seen}, expected)
        self.assertEqual(len(seen), len(expected))

    def test_suppression_in_one_store_stops_mail_queued_through_another(self) -> None:
        """issue 15: contract: suppressions: an address added through one store is not sent to through another; removal too."""
        first, second = self.open_store(), self.open_second_store()
        entry = Suppression("c1", "bounce", "gone@one.example", self.now, code="550", error="550 no such user")
        run(first.add_suppressions([entry]))
        s = self.submission(("Gone@one.example", "here@one.example"))
        run(second.add_submission(s))
        state = self.state(first, s.id)
        self.assertEqual([(r.address, r.status) for r in state.recipients], [("Gone@one.example", "failed"), ("here@one.example", "queued")])
        reasons = {(e.recipient, e.event, e.reason) for e in run(first.events("c1"))}
        self.assertIn(("Gone@one.example", "failed", "suppress-bounce"), reasons)
        self.assertEqual(run(second.suppression("c1", "bounce", "GONE@one.example")), entry)
        self.assertTrue(run(second.remove_suppression("c1", "bounce", "gone@one.example")))
        self.assertIsNone(run(first.suppression("c1", "bounce", "gone@one.example")))

    def test_utf8_addresses_and_header_round_trip(self) -> None:
        """
        issue 18 (SMTPUTF8): contract: UTF-8 local parts (RFC 6531) and a UTF-8 header (RFC 6532) come back from a claim
        exactly as stored, on the A-label domain; a suppression matches a UTF-8 address whatever its case.
        """
        store = self.open_store()
        run(store.add_suppressions([Suppression("c1", "bounce", "δοκιμή@one.example", self.now, code="550", error="550 no such user")]))
        message = "From: josé@sender.example\r\nTo: 用户@xn--fsqu00a.example\r\n\r\ncafé\r\n".encode()
        s = NewSubmission(
            uuid.uuid4().hex, "c1", "josé@sender.example", ("用户@xn--fsqu00a.example", "ΔΟΚΙΜΉ@one.example"), message, self.now, None, None
        )
        run(store.add_submission(s))
        (envelope,) = run(store.claim("host-1", self.now, 300.0, 10))
        self.assertEqual((envelope.sender, envelope.domain, envelope.recipients, envelope.message), ("josé@sender.example", "xn--fsqu00a.example", ("用户@xn--fsqu00a.example",), message))
        state = self.state(store, s.id)
        self.assertEqual([(r.address, r.status) for r in state.recipients], [("用户@xn--fsqu00a.example", "queued"), ("ΔΟΚΙΜΉ@one.example", "failed")])

    def test_one_dispatcher_leases_a_webhook_at_a_time(self) -> None:
        """issue 15: contract: webhook leases: concurrent dispatchers never hold one webhook at once; a lost lease cannot advance it."""
        store = self.open_store()
        hooks = [run(store.add_webhook(Webhook(f"hook-{i}", "c1", None, "https://receiver.test/", ("delivered",), self.now))) for i in range(6)]
        dispatchers = [self.open_second_store() for _ in range(4)]
        barrier = threading.Barrier(len(dispatchers), timeout=DEADLINE)

        def lease(dispatcher: Store, name: str) -> list[str]:
            barrier.wait()
            return [w.id for w in run(dispatcher.lease_webhooks(name, self.now, self.now + 300.0))]

        leased = in_threads([partial(lease, d, f"dispatcher-{i}") for i, d in enumerate(dispatchers)])
        every = [hook for mine in leased for hook in mine]
        self.assertEqual(sorted(every), sorted(h.id for h in hooks), "a webhook was leased twice, or not at all")
        holder = next(i for i, mine in enumerate(leased) if "hook-0" in mine)
        other = (holder + 1) % len(dispatchers)
        cursor = EventCursor(hooks[0].cursor.seq, hooks[0].cursor.id)
        self.assertFalse(run(dispatchers[other].advance_webhook("hook-0", f"dispatcher-{other}", cursor, [])))
        self.assertTrue(run(dispatchers[holder].advance_webhook("hook-0", f"dispatcher-{holder}", cursor, [])))
        # The holder's lease runs out (a lease of no time): another takes it, and the old holder cannot advance it.
        run(dispatchers[holder].lease_webhooks(f"dispatcher-{holder}", time.time(), time.time()))
        taken = run(dispatchers[other].lease_webhooks(f"dispatcher-{other}", time.time(), time.time() + 300.0, renew=False))
        self.assertIn("hook-0", [w.id for w in taken])
        third = (other + 1) % len(dispatchers)
        again = run(dispatchers[third].lease_webhooks(f"dispatcher-{third}", time.time(), time.time() + 300.0, renew=False))
        self.assertNotIn("hook-0", [w.id for w in again])
        self.assertFalse(run(dispatchers[holder].advance_webhook("hook-0", f"dispatcher-{holder}", cursor, [])))

    def test_mta_sts_policy_shared_replaced_and_expired(self) -> None:
        """
        issue 18 MTA-STS (cache): a policy one sender stores is read by another (restarts and other
        senders share it) until its max_age has passed; a newer fetch replaces it; expired ones are deleted.
        """
        first, second = self.open_store(), self.open_second_store()
        policy = MTASTSPolicy("example.com", "20260101T000000", "enforce", ("mx1.example.com", "*.mx.example.net"), 86400, self.now)
        run(first.save_mta_sts_policy(policy))
        self.assertEqual(run(second.mta_sts_policy("example.com", self.now + 86399)), policy)
        self.assertIsNone(run(second.mta_sts_policy("example.com", self.now + 86400)), "an expired policy was returned")
        self.assertIsNone(run(second.mta_sts_policy("other.example", self.now)))
        newer = MTASTSPolicy("example.com", "2", "none", (), 600, self.now + 10)
        run(second.save_mta_sts_policy(newer))
        self.assertEqual(run(first.mta_sts_policy("example.com", self.now + 11)), newer)
        run(first.save_mta_sts_policy(MTASTSPolicy("gone.example", "1", "testing", ("mx.gone.example",), 60, self.now)))
        self.assertEqual(run(second.forget_expired_mta_sts_policies(self.now + 60)), 1)
        self.assertIsNone(run(first.mta_sts_policy("gone.example", self.now)))
        self.assertEqual(run(first.mta_sts_policy("example.com", self.now + 11)), newer)

    def test_older_mta_sts_fetch_never_replaces_a_newer_one(self) -> None:
        """
        issue 18 review MF item 3 (MTA-STS cache): writes that commit out of order (two senders, or a
        background refresh racing a fetch for a new id) keep the policy fetched last: a save with an
        earlier fetched_at leaves the stored one alone; one with the same or a later fetched_at replaces it.
        """
        first, second = self.open_store(), self.open_second_store()
        newer = MTASTSPolicy("example.com", "2", "enforce", ("mx2.example.com",), 86400, self.now + 100)
        older = MTASTSPolicy("example.com", "1", "none", (), 600, self.now)
        run(first.save_mta_sts_policy(newer))
        run(second.save_mta_sts_policy(older))
        self.assertEqual(run(first.mta_sts_policy("example.com", self.now + 101)), newer, "an older fetch replaced a newer one")
        same_time = attrs.evolve(newer, policy_id="3", mode="testing")
        run(second.save_mta_sts_policy(same_time))
        self.assertEqual(run(first.mta_sts_policy("example.com", self.now + 101)), same_time)
        later = attrs.evolve(newer, policy_id="4", fetched_at=self.now + 200)
        run(second.save_mta_sts_policy(later))
        self.assertEqual(run(first.mta_sts_policy("example.com", self.now + 201)), later)

    def test_destination_backoffs_shared_replaced_and_ended(self) -> None:
        """
        issue 18 destination back-off (shared): a domain pause one sender writes is read by another
        until it ends; a later write of the same entry replaces it (one row per kind, name and
        sender); an entry written as ended, or whose time has passed, is no longer returned.
        """
        first, second = self.open_store(), self.open_second_store()
        pause = Backoff("domain", "gmail.com", "host-a", self.now + 60, "421 4.7.28 rate limited", updated_at=self.now)
        lowered = Backoff("mx", "mx.b.example [192.0.2.7]", "host-a", self.now + 600, "421 4.3.2 busy", concurrency=3, updated_at=self.now)
        theirs = Backoff("domain", "gmail.com", "host-b", self.now + 30, "450 4.7.1 rate", updated_at=self.now)
        run(first.save_backoffs([pause, lowered], self.now))
        run(second.save_backoffs([theirs], self.now))
        self.assertEqual(run(second.backoffs(self.now)), [pause, theirs, lowered])
        self.assertEqual(run(first.backoffs(self.now + 30)), [pause, lowered], "an ended pause was returned")
        longer = attrs.evolve(pause, until=self.now + 120, reply="421 4.7.28 again", updated_at=self.now + 61)
        back = attrs.evolve(lowered, until=self.now + 61, concurrency=10, updated_at=self.now + 61)
        run(first.save_backoffs([longer, back], self.now + 61))
        self.assertEqual(run(second.backoffs(self.now + 61)), [longer])
        self.assertEqual(run(second.backoffs(self.now + 120)), [])

    def test_older_backoff_write_does_not_replace_a_newer_one(self) -> None:
        """
        issue 18 review BF item 4: back-off writes go out in the background and may commit out
        of order; one made earlier (an older updated_at) that commits after a newer one leaves
        the newer in place, whichever store writes it.
        """
        first, second = self.open_store(), self.open_second_store()
        older = Backoff("mx", "mx.b.example [192.0.2.7]", "host-a", self.now + 600, "421 4.3.2 busy", concurrency=2, updated_at=self.now)
        newer = attrs.evolve(older, until=self.now + 601, reply="421 4.3.2 busier", concurrency=1, updated_at=self.now + 1)
        run(first.save_backoffs([newer], self.now + 1))
        run(second.save_backoffs([older], self.now + 1))
        self.assertEqual(run(first.backoffs(self.now + 1)), [newer])
        again = attrs.evolve(newer, reply="421 4.3.2 same time", updated_at=self.now + 1)
        run(second.save_backoffs([again], self.now + 1))
        self.assertEqual(run(first.backoffs(self.now + 1)), [again], "a write as recent as the stored one was refused")


class SQLiteContractTests(StoreContract, SynchronousTestCase):
    """The contract on SQLite: stores on one real file."""

    clock_skew_skip = "SQLite is one machine with one clock: every store's time is the database's"

    def setUp(self) -> None:
        super().setUp()
        self.path = self.mktemp() + ".sqlite3"

    def backend_store(self) -> Store:
        from mmgun.store.sqlite import SQLiteStore

        return SQLiteStore.open_sync(self.path)

    def stored_message(self, submission_id: str) -> tuple[bytes | None, float | None]:
        import sqlite3

        conn = sqlite3.connect(self.path)
        try:
            row = conn.execute("SELECT message, finished_at FROM submissions WHERE id = ?", (submission_id,)).fetchone()
        finally:
            conn.close()
        return row[0], row[1]


class PostgresContractTests(StoreContract, SynchronousTestCase):
    """The contract on PostgreSQL: a fresh database of the test run's private cluster (tests/pgcluster.py) per test."""

    def setUp(self) -> None:
        super().setUp()
        self.url = pgcluster.new_database(self._testMethodName)

    def backend_store(self) -> Store:
        from mmgun.store.postgres import PostgresStore

        return PostgresStore.open_sync(self.url)

    def stored_message(self, submission_id: str) -> tuple[bytes | None, float | None]:
        import psycopg

        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT message, finished_at FROM submissions WHERE id = %s", (submission_id,)).fetchone()
        assert row is not None, f"no submission {submission_id}"
        return None if row[0] is None else bytes(row[0]), row[1]
