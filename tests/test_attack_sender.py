"""
Attacks on the sender (issue 11 items 2, 3, 5, 8, 11 and 12): a full disk, wall-clock
steps, a restart after kill -9 and two processes sharing an identity, a large message to
many domains, a slow DNS lookup beside a fast one, and MX hosts that never greet.

Everything runs on a Clock: a real SQLite file (tests.helpers.sync_store), the real
ESMTP client (mmgun.smtp.send_session) on a MemoryReactorClock, wired in memory
(twisted.test.iosim) to mmgun's scriptable ESMTP server.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mmgun.clock import use_monotonic_time
from mmgun.mx import MXHost
from mmgun.sender import Sender, SenderSettings
from mmgun.smtp import Reply
from mmgun.store import ClaimedEnvelope, StorageError
from mmgun.store.sqlite import SQLiteStore, SyncRunner

from .fakes import (
    HARNESS_SETTINGS as SETTINGS,
    HARNESS_SMTP as SMTP,
    FakeRouter,
    Harness,
    ScriptedSessions,
    smtp_server,
)
from .helpers import result

T0 = 1_800_000_000.0






class Silent(Protocol):
    """Accepts the connection and never says a word (a tarpit MX)."""


class CountingStore:
    """
    The real store, counting claims and failing commits; ``fail_records`` fails that many
    record() calls; a call with an envelope for a domain in ``poisoned`` fails with
    ``poison`` (another way a record can fail); ``fail_renewals`` fails every renew();
    ``after_claim`` runs after each claim.
    """

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.claims: list[list[int]] = []
        #: Every envelope each claim returned, as the store returned it.
        self.claimed: list[list[ClaimedEnvelope]] = []
        self.record_failures = 0
        self.fail_records = 0
        self.poisoned: set[str] = set()
        self.poison: Callable[[], Exception] = lambda: StorageError("CHECK constraint failed")
        self.fail_renewals = False
        self.after_claim: Callable[[], None] = lambda: None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        claimed = await self.store.claim(*args, **kwargs)
        self.claims.append([e.id for e in claimed])
        self.claimed.append(list(claimed))
        self.after_claim()
        return claimed

    async def renew(self, envelopes: Any, now: float, until: float) -> None:
        if self.fail_renewals:
            raise StorageError("disk I/O error")
        await self.store.renew(envelopes, now, until)

    async def record(self, outcomes: Any, now: float) -> None:
        try:
            if self.fail_records > 0:
                self.fail_records -= 1
                raise StorageError("database or disk is full")
            if any(o.envelope.domain in self.poisoned for o in outcomes):
                raise self.poison()
            await self.store.record(outcomes, now)
        except StorageError:
            self.record_failures += 1
            raise




def kill(sender: Sender) -> None:
    """As kill -9 would: the loops stop, nothing is released or recorded."""
    sender._stopping = True
    for loop in (sender._poller, sender._renewer):
        if loop.running:
            loop.stop()




# -- item 2: a full disk -----------------------------------------------------------------------


class FullDiskTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox)
        runner = self.h.store._runner
        assert isinstance(runner, SyncRunner), "sync_store runs transactions on this thread"
        self.conn = runner._conn

    def fill_disk(self) -> None:
        """SQLite's own limit: the database may not grow by one page (SQLITE_FULL at commit)."""
        (pages,) = self.conn.execute("PRAGMA page_count").fetchone()
        (free,) = self.conn.execute("PRAGMA freelist_count").fetchone()
        self.assertEqual(free, 0, "a free page would let the commit succeed")
        self.conn.execute(f"PRAGMA max_page_count = {pages:d}")

    def make_room(self) -> None:
        self.conn.execute("PRAGMA max_page_count = 1073741823")

    def test_result_kept_and_committed_once_the_disk_has_room(self) -> None:
        """
        issue 11 item 2: the MX says 250 while the disk is full (a real SQLITE_FULL). The
        result is kept, the lease renewed, no new envelope claimed for minutes; once there
        is room the result is committed: delivered exactly once, recorded as sent.
        """
        store = CountingStore(self.h.store)
        # 300 recipients: recording their replies needs new pages.
        recipients = tuple(f"user{i:03d}@a.example" for i in range(300))
        first = self.h.submit(*recipients)
        self.fill_disk()
        with capturedLogs() as events:
            self.h.sender(store)
            self.h.net.advance(1)
            self.assertEqual(len(self.h.mailbox), 1)
            self.assertGreaterEqual(store.record_failures, 1)
            claims = [c for c in store.claims if c]
            self.assertEqual(self.h.state(first).status, "queued")
            # Meanwhile more mail is queued (by a frontend with room: another connection).
            self.make_room()
            second = self.h.submit("late@a.example")
            self.fill_disk()
            failures = store.record_failures
            # Three whole leases: without renewal another sender would have sent it again.
            self.h.net.advance(3 * SETTINGS.lease_time)
            self.assertGreater(store.record_failures, failures)
            # Its lease is still held (renewed), though it was taken three leases ago.
            other = SQLiteStore.open_sync(self.h.path)
            self.addCleanup(lambda: result(self, other.close()))
            entries = result(self, other.queue_entries(self.h.wall()))
            self.assertEqual({e.submission_id: e.leased for e in entries}, {first: True, second: False})
            self.assertEqual([c for c in store.claims if c], claims, "claimed new work while a result was waiting")
            self.assertEqual(len(claims), 1)
            self.make_room()
            self.h.net.advance(10)
        self.assertEqual(self.h.state(first).status, "sent")
        self.assertEqual({r.attempts for r in self.h.state(first).recipients}, {1})
        self.assertEqual(self.h.state(second).status, "sent")
        self.assertEqual(len(self.h.mailbox), 2)
        self.assertEqual([sorted(m.recipients) for m in self.h.mailbox], [sorted(recipients), ["late@a.example"]])
        formats = [e.get("log_format", "") for e in events]
        self.assertEqual(sum("claiming no new envelopes" in f for f in formats), 1)
        self.assertEqual(sum("claiming again" in f for f in formats), 1)

    def test_commit_retried_with_backoff(self) -> None:
        """issue 11 item 2: failed commits are retried after 0.5, 1, 2, 4 … 10 s (the injected clock), not lost."""
        store = CountingStore(self.h.store)
        store.fail_records = 7
        sid = self.h.submit("x@a.example")
        self.h.sender(store)
        self.h.net.run()
        self.assertEqual(store.record_failures, 1)
        # Retries at +0.5, +1.5, +3.5, +7.5, +15.5, +25.5 (capped at 10): failures 2 to 7; the next, at +35.5, succeeds.
        self.h.net.advance(0.25)
        self.assertEqual(store.record_failures, 1)
        self.h.net.advance(0.25)
        self.assertEqual(store.record_failures, 2)
        self.h.net.advance(34.5, step=0.5)
        self.assertEqual(store.record_failures, 7)
        self.assertEqual(self.h.state(sid).status, "queued")
        self.h.net.advance(0.5)
        self.assertEqual(self.h.state(sid).status, "sent")
        self.assertEqual(len(self.h.mailbox), 1)

    def test_shutdown_leaves_an_unrecorded_result_leased_until_its_sender_restarts(self) -> None:
        """
        issue 11 item 2: stopping with a result unrecorded does not release the envelope
        (no other sender takes it before the lease expires), and the log says both ways it
        is sent again: at once when a sender starts again under this identity (reclaim),
        otherwise when the lease expires.
        """
        store = CountingStore(self.h.store)
        store.fail_records = 10**6
        sid = self.h.submit("x@a.example")
        sender = self.h.sender(store)
        self.h.net.run()
        with capturedLogs() as events:
            d = sender.stopService()
            self.h.net.advance(SETTINGS.shutdown_timeout + 1)
            self.successResultOf(d)
        (line,) = [formatEvent(e) for e in events if "not recorded" in e.get("log_format", "")]
        self.assertIn("at once when a sender starts again as sender-1", line)
        self.assertIn("otherwise when their leases expire", line)
        other = SQLiteStore.open_sync(self.h.path)
        self.addCleanup(lambda: result(self, other.close()))
        self.assertEqual(result(self, other.claim("another-sender", self.h.wall(), 60, 10)), [])
        self.assertEqual(self.h.state(sid).status, "queued")
        # What the next run of sender-1 does at start: takes it back at once.
        self.assertEqual(result(self, other.reclaim("sender-1", self.h.wall())), 1)
        self.assertEqual(len(result(self, other.claim("sender-1", self.h.wall(), 60, 10))), 1)

    def test_result_that_fails_for_a_bug_is_dropped_and_claiming_goes_on(self) -> None:
        """
        issue 11 item 2: recording one result raises something other than a StorageError
        (a bug, not the disk) every time. It is not kept and retried for ever, which would
        stop every claim: it is dropped with a critical line naming its envelope, the
        other results are recorded, new mail is claimed and sent, and the dropped one's
        envelope is sent again once its lease expires.
        """
        store = CountingStore(self.h.store)
        store.poisoned = {"bug.example"}
        store.poison = lambda: TypeError("an outcome the store cannot handle")
        route = [MXHost("mx.a.example", "127.0.0.2", 25)]
        router = FakeRouter({"a.example": route, "bug.example": route, "late.example": route})
        good = self.h.submit("x@a.example")
        bad = self.h.submit("y@bug.example")
        with capturedLogs() as events:
            sender = self.h.sender(store, router=router)
            self.h.net.run()
        self.assertEqual(len(self.h.mailbox), 2)
        self.assertEqual(self.h.state(good).status, "sent")
        self.assertEqual(self.h.state(bad).status, "queued")
        critical = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertEqual([len(e["envelopes"]) for e in critical], [1])
        self.assertIn("dropping them", formatEvent(critical[0]))
        self.assertEqual(sender.in_flight, {})
        self.assertEqual(sender.held_bytes, 0)
        late = self.h.submit("z@late.example")
        self.h.net.advance(SETTINGS.poll_interval)
        self.assertEqual(self.h.state(late).status, "sent", "a result that can never be recorded stopped claiming")
        self.assertEqual(len(self.h.mailbox), 3)
        self.h.net.advance(SETTINGS.lease_time)
        self.assertEqual(len(self.h.mailbox), 4, "the dropped result's envelope is sent again after its lease")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 2)

    def test_one_result_that_always_fails_does_not_hold_back_the_others(self) -> None:
        """
        issue 11 item 2: two results wait after a failed commit (a full disk); then the disk
        has room but one of them fails every commit (a StorageError). After a few retries
        together, each is retried on its own: the other is recorded.
        """
        store = CountingStore(self.h.store)
        store.fail_records = 1
        store.poisoned = {"bad.example"}
        route = [MXHost("mx.a.example", "127.0.0.2", 25)]
        router = FakeRouter({"a.example": route, "bad.example": route})
        good = self.h.submit("x@a.example")
        bad = self.h.submit("y@bad.example")
        sender = self.h.sender(store, router=router)
        self.h.net.run()
        self.assertEqual(len(self.h.mailbox), 2)
        self.assertEqual(sorted(e.domain for e in sender.in_flight.values()), ["a.example", "bad.example"])
        self.assertEqual(len(sender._unrecorded), 2)
        # Retries together at +0.5, +1.5, +3.5 s; on their own from +7.5 s.
        self.h.net.advance(7, step=0.5)
        self.assertEqual(self.h.state(good).status, "queued")
        self.h.net.advance(1, step=0.5)
        self.assertEqual(self.h.state(good).status, "sent")
        self.assertEqual([e.domain for e in sender.in_flight.values()], ["bad.example"])
        self.assertEqual(self.h.state(bad).status, "queued")
        # The one left is still kept (a StorageError may be the disk): retried, its lease renewed.
        failures = store.record_failures
        self.h.net.advance(3 * SETTINGS.lease_time)
        self.assertGreater(store.record_failures, failures)
        store.poisoned = set()
        self.h.net.advance(10)
        self.assertEqual(self.h.state(bad).status, "sent")
        self.assertEqual(len(self.h.mailbox), 2)


# -- item 3: wall-clock steps ----------------------------------------------------------------------


class ClockStepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=30)

    def test_forward_step_while_waiting_for_the_reply_to_the_dot(self) -> None:
        """
        issue 11 item 3: +2 h while the MX takes 30 s to answer the final ".": no timeout,
        and neither this sender nor another one (which saw the same step) sends it again.
        """
        sid = self.h.submit("slowdata@a.example")
        self.h.sender(owner="sender-1")
        self.h.net.advance(5)
        self.assertEqual(self.h.net.attempts, ["127.0.0.2"])
        other = SQLiteStore.open_sync(self.h.path)
        self.addCleanup(lambda: result(self, other.close()))
        self.h.sender(other, owner="sender-2")
        self.h.net.advance(1)
        self.h.step += 2 * 3600
        self.h.net.advance(40)
        state = self.h.state(sid)
        self.assertEqual((state.status, state.recipients[0].attempts), ("sent", 1))
        self.assertEqual(len(self.h.mailbox), 1)
        self.assertEqual(self.h.net.attempts, ["127.0.0.2"])

    def test_forward_step_after_another_sender_polled(self) -> None:
        """
        issue 11 item 3: sender-2 polls half a poll after sender-1, and +2 h lands just
        before sender-2's poll: sender-1's lease looks expired to sender-2, which has not
        yet seen sender-1 renew it. sender-2 claims nothing for two polls (long enough for
        sender-1 to notice the step and renew): one copy.
        """
        sid = self.h.submit("slowdata@a.example")
        self.h.sender(owner="sender-1")  # polls at whole seconds
        self.h.net.advance(5)
        self.assertEqual(self.h.net.attempts, ["127.0.0.2"])
        self.h.net.advance(0.5)
        other = SQLiteStore.open_sync(self.h.path)
        self.addCleanup(lambda: result(self, other.close()))
        self.h.sender(other, owner="sender-2")  # polls at half seconds
        self.h.net.advance(0.5)
        self.h.net.advance(0.4)  # sender-1 polled at +6.0; sender-2 polls next, at +6.5
        self.h.step += 2 * 3600
        self.h.net.advance(40, step=0.1)
        state = self.h.state(sid)
        self.assertEqual((state.status, state.recipients[0].attempts), ("sent", 1))
        self.assertEqual(len(self.h.mailbox), 1)
        self.assertEqual(self.h.net.attempts, ["127.0.0.2"])

    def test_forward_step_between_two_claims_of_one_poll(self) -> None:
        """
        issue 11 item 3: 600 envelopes are due, claimed 500 at a time; +2 h lands while the
        first claim runs. The second claim must not take the first one's envelopes (whose
        leases now look expired) again: each is sent once, and the bytes held drop to 0.
        """
        domains = [f"d{i:03d}.example" for i in range(600)]
        self.h.submit(*(f"u@{d}" for d in domains))
        store = CountingStore(self.h.store)

        def step_once() -> None:
            if len(store.claims) == 1:
                self.h.step += 2 * 3600

        store.after_claim = step_once
        smtp = ScriptedSessions()
        smtp.hold = Deferred()
        router = FakeRouter({d: [MXHost("mx.shared", "127.0.0.2", 25)] for d in domains})
        sender = self.h.sender(store, router=router, session=smtp)
        self.assertEqual(len(store.claims[0]), 500)
        self.assertEqual(len(sender.in_flight), 500)
        self.h.net.advance(3 * SETTINGS.poll_interval)
        self.assertEqual(len(sender.in_flight), 600)
        smtp.hold.callback(None)
        keys = [key for key, _ in smtp.delivered()]
        self.assertEqual(len(keys), 600)
        self.assertEqual(len(set(keys)), 600, "an envelope was sent twice")
        self.assertEqual(sender.in_flight, {})
        self.assertEqual(sender.held_bytes, 0)

    def test_claim_of_an_envelope_in_delivery_here_sends_it_once(self) -> None:
        """
        issue 11 item 3: lease renewals fail for longer than a lease while the MX takes its
        time, so this sender's next claim returns the envelope it is delivering. It is not
        sent again nor counted twice; its new lease is kept, and the result recorded under it.
        """
        store = CountingStore(self.h.store)
        store.fail_renewals = True
        sid = self.h.submit("x@a.example")
        smtp = ScriptedSessions()
        smtp.hold = Deferred()
        with capturedLogs() as events:
            sender = self.h.sender(store, session=smtp)
            self.h.net.advance(SETTINGS.lease_time + 5)
        self.assertEqual([len(c) for c in store.claims if c], [1, 1], "the expired lease was not claimed again")
        self.assertEqual(len(smtp.sessions), 1)
        self.assertEqual(len(sender.in_flight), 1)
        self.assertEqual(sender.held_bytes, len(b"Subject: x\r\n\r\nhi\r\n"))
        (envelope,) = sender.in_flight.values()
        self.assertEqual(envelope.lease, [c for c in store.claimed if c][1][0].lease)
        self.assertIn("already in delivery here", " ".join(e.get("log_format", "") for e in events))
        store.fail_renewals = False
        smtp.hold.callback(None)
        state = self.h.state(sid)
        self.assertEqual((state.status, state.recipients[0].attempts), ("sent", 1))
        self.assertEqual(len(smtp.sessions), 1)
        self.assertEqual(sender.in_flight, {})
        self.assertEqual(sender.held_bytes, 0)
        self.flushLoggedErrors(StorageError)

    def test_backward_step_does_not_delay_queued_mail(self) -> None:
        """issue 11 item 3: -10 min just after a message was queued: it is delivered within a poll interval."""
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=0)
        self.h.sender()
        self.h.net.advance(5)
        sid = self.h.submit("x@a.example")
        self.h.step -= 600
        self.h.net.advance(SETTINGS.poll_interval)
        self.assertEqual(self.h.state(sid).status, "sent")
        self.assertEqual(len(self.h.mailbox), 1)

    def test_reactor_timers_ignore_wall_clock_steps(self) -> None:
        """
        issue 11 item 3: with use_monotonic_time, a real reactor's callLater is neither
        fired early by a forward step of the wall clock nor held back by a backward one.
        """
        from twisted.internet.selectreactor import SelectReactor

        reactor = SelectReactor()

        def close() -> None:
            reactor.removeReader(reactor.waker)
            reactor.waker.connectionLost(None)

        self.addCleanup(close)
        monotonic, wall = [1000.0], [T0]
        use_monotonic_time(reactor, monotonic=lambda: monotonic[0], wall=lambda: wall[0])
        self.assertEqual(reactor.seconds(), T0)
        fired: list[str] = []
        timeout = reactor.callLater(600, fired.append, "timeout")
        poll = reactor.callLater(1, fired.append, "poll")
        wall[0] += 2 * 3600  # forward: the 10-minute timeout must not fire now
        reactor.runUntilCurrent()
        self.assertEqual(fired, [])
        self.assertAlmostEqual(reactor.timeout(), 1.0)
        wall[0] -= 4 * 3600  # back: the 1-second poll must not wait for the clock to catch up
        monotonic[0] += 1
        reactor.runUntilCurrent()
        self.assertEqual(fired, ["poll"])
        timeout.reset(600)  # DelayedCall.reset measures from the same clock
        monotonic[0] += 599
        reactor.runUntilCurrent()
        self.assertEqual(fired, ["poll"])
        monotonic[0] += 1
        reactor.runUntilCurrent()
        self.assertEqual(fired, ["poll", "timeout"])
        self.assertFalse(poll.active())

    def test_timers_on_the_clock_class_too(self) -> None:
        """issue 11 item 3: the same patch on task.Clock (what tests inject): a wall step moves no timer."""
        clock = Clock()
        monotonic, wall = [50.0], [T0]
        use_monotonic_time(clock, monotonic=lambda: monotonic[0], wall=lambda: wall[0])
        fired: list[int] = []
        clock.callLater(10, fired.append, 1)
        wall[0] += 3600
        clock.advance(0)
        self.assertEqual(fired, [])
        monotonic[0] += 10
        clock.advance(0)
        self.assertEqual(fired, [1])


# -- item 5: restart recovery and a shared identity -------------------------------------------------


class IdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=0)

    def open(self) -> SQLiteStore:
        store = SQLiteStore.open_sync(self.h.path)
        self.addCleanup(lambda: self.successResultOf(Deferred.fromCoroutine(store.close())))
        return store

    def test_identity_lock_is_exclusive_between_stores(self) -> None:
        """issue 11 item 5: two stores on one real file: the second cannot take an identity the first holds."""
        first, second = self.open(), self.open()
        self.assertTrue(result(self, first.lock_identity("host-a")))
        self.assertTrue(result(self, first.lock_identity("host-a")), "held already: still ours")
        self.assertFalse(result(self, second.lock_identity("host-a")))
        self.assertTrue(result(self, second.lock_identity("host-b")))
        result(self, first.close())
        self.assertTrue(result(self, second.lock_identity("host-a")), "freed when its holder closed")

    def test_identity_lock_is_named_after_the_real_path(self) -> None:
        """issue 11 item 5: a store opened through a symlink to the same file shares its identity locks."""
        link = self.mktemp() + ".sqlite3"
        os.symlink(os.path.abspath(self.h.path), link)
        first = self.open()
        second = SQLiteStore.open_sync(link)
        self.addCleanup(lambda: self.successResultOf(Deferred.fromCoroutine(second.close())))
        self.assertTrue(result(self, first.lock_identity("host-a")))
        self.assertFalse(result(self, second.lock_identity("host-a")))
        self.assertTrue(os.path.exists(os.path.realpath(self.h.path) + "-sender-host-a.lock"))

    def test_reclaim_touches_only_that_identitys_leases(self) -> None:
        """issue 11 item 5: reclaim matches "<identity>/" exactly (no LIKE: "_" is no wildcard, no prefix match)."""
        store = self.h.store
        for _ in range(4):
            self.h.submit("x@a.example")
        now = self.h.wall()
        owners = ["a_b", "axb", "a", "a_b"]
        for owner in owners:
            (claimed,) = result(self, store.claim(owner, now, 60, 1))
        self.assertEqual(result(self, store.claim("z", now, 60, 10)), [])
        self.assertEqual(result(self, store.reclaim("a_b", now)), 2)
        again = result(self, store.claim("z", now, 60, 10))
        self.assertEqual(len(again), 2)
        self.assertEqual(result(self, store.reclaim("a_b", now)), 0)
        self.assertEqual(result(self, store.reclaim("a", now)), 1)

    def test_restarted_sender_takes_back_its_envelopes_at_once(self) -> None:
        """issue 11 item 5: a sender killed mid-delivery, restarted under its identity, resumes without waiting for the lease."""
        silent = ScriptedSessions()
        silent.hold = Deferred()  # the first run dies with its session open
        store = self.open()
        dead = Sender(store, FakeRouter({"a.example": [MXHost("mx", "127.0.0.2", 25)]}), self.h.reactor, SMTP, SETTINGS, session=silent, owner="host-a", wall=self.h.wall)
        sid = self.h.submit("x@a.example")
        dead.startService()
        self.assertEqual(len(silent.sessions), 1)
        kill(dead)
        result(self, store.close())  # kill -9: the kernel drops its lock; its leases stay in the database
        with capturedLogs() as events:
            self.h.sender(self.open(), owner="host-a")
            self.h.net.run()
        self.assertEqual(self.h.state(sid).status, "sent")
        self.assertEqual(len(self.h.mailbox), 1)
        self.assertIn("took back", " ".join(e.get("log_format", "") for e in events))

    def test_second_process_with_the_same_identity_reclaims_nothing(self) -> None:
        """
        issue 11 item 5: two senders started with the same identity by mistake: the second
        runs under a fresh identity and never takes the first one's envelopes in flight.
        """
        slow = ScriptedSessions()
        slow.hold = Deferred()
        first = Sender(self.open(), FakeRouter({"a.example": [MXHost("mx", "127.0.0.2", 25)]}), self.h.reactor, SMTP, SETTINGS, session=slow, owner="host-a", wall=self.h.wall)
        sid = self.h.submit("x@a.example")
        first.startService()
        self.assertEqual(len(slow.sessions), 1)
        with capturedLogs() as events:
            second = self.h.sender(self.open(), owner="host-a")
            self.h.net.advance(SETTINGS.lease_time / 2)
        self.assertNotEqual(second.owner, "host-a")
        self.assertTrue(second.owner.startswith("host-a-"))
        self.assertEqual(self.h.net.attempts, [], "the second sender took the first one's envelope")
        self.assertIn("held by another running process", " ".join(e.get("log_format", "") for e in events))
        slow.hold.callback(None)
        self.assertEqual(self.h.state(sid).status, "sent")
        self.assertEqual(len(self.h.mailbox), 0)
        self.assertEqual(len(slow.delivered()), 1)
        first.stopService()


# -- item 8: one copy of a message per submission, and a byte budget --------------------------------


class MemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)

    def test_one_copy_of_a_2mb_message_for_1000_domains(self) -> None:
        """
        issue 11 item 8: one 2 MB submission to 1,000 domains: every claimed envelope and
        every transaction share one message object and one wire form, and the claim plus
        the delivery allocate a few copies, not one per domain (2.1 GB before).
        """
        size = 2 * 1024 * 1024
        message = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (size // 1000)
        recipients = tuple(f"u@d{i:04d}.example" for i in range(1000))
        self.h.submit(*recipients, message=message)
        del message
        smtp = ScriptedSessions()
        # Every session waits: all 1,000 envelopes are in flight at once (two claims of 500).
        smtp.hold = Deferred()
        router = FakeRouter({f"d{i:04d}.example": [MXHost("mx.shared", "127.0.0.2", 25)] for i in range(1000)})
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        sender = Sender(self.h.store, router, self.h.reactor, SMTP, SETTINGS, session=smtp, owner="s", wall=self.h.wall)
        self.successResultOf(sender.poll())
        self.assertEqual(len(sender.in_flight), 1000)
        self.assertEqual(len({id(e.message) for e in sender.in_flight.values()}), 1)
        smtp.hold.callback(None)
        _, peak = tracemalloc.get_traced_memory()
        transactions = [t for _, ts in smtp.sessions for t in ts]
        self.assertEqual(len(transactions), 1000)
        self.assertEqual(len({id(t.message) for t in transactions}), 1)
        self.assertEqual(len({id(t.wire) for t in transactions}), 1)
        self.assertEqual(sender.in_flight, {})
        self.assertEqual(sender.held_bytes, 0)
        # Read once (2 MB), its wire form (2 MB), wire_form's intermediates: well under 20 MB.
        self.assertLess(peak - before, 20 * 1024 * 1024, f"peak {peak - before} bytes")

    def test_claim_stops_at_the_byte_budget(self) -> None:
        """issue 11 item 8: three 1 MB messages with a 1.5 MB budget: one submission's envelopes at a time."""
        one_mb = b"Subject: m\r\n\r\n" + b"y" * (1024 * 1024)
        ids = [self.h.submit("a@a.example", "b@b.example", message=one_mb) for _ in range(3)]
        smtp = ScriptedSessions()
        smtp.hold = Deferred()
        router = FakeRouter({"a.example": [MXHost("mx.a", "127.0.0.2", 25)], "b.example": [MXHost("mx.b", "127.0.0.3", 25)]})
        settings = SenderSettings(max_bytes_in_flight=1536 * 1024)
        sender = self.h.sender(settings=settings, router=router, session=smtp)
        self.assertEqual({e.submission_id for e in sender.in_flight.values()}, {ids[0]})
        self.assertEqual(len(sender.in_flight), 2)
        self.assertEqual(sender.held_bytes, len(one_mb))
        self.h.reactor.advance(settings.poll_interval)
        self.assertEqual(len(sender.in_flight), 2, "claimed past the budget")
        hold, smtp.hold = smtp.hold, None
        hold.callback(None)
        self.assertEqual(self.h.state(ids[0]).status, "sent")
        self.assertEqual(self.h.state(ids[1]).status, "sent")
        self.assertEqual(self.h.state(ids[2]).status, "sent")
        self.assertEqual(sender.held_bytes, 0)

    def test_second_claim_for_a_held_submission_reads_no_message(self) -> None:
        """
        issue 11 item 8: one submission to two domains; a.example's MX holds the session,
        b.example's defers. When b's envelope is claimed again (a.example's still in
        flight), the store returns no message bytes for it (the sender holds them) and the
        envelope shares the held message object, counted once.
        """
        message = b"Subject: m\r\n\r\n" + b"q" * 50_000
        sid = self.h.submit("x@a.example", "y@b.example", message=message)
        store = CountingStore(self.h.store)
        smtp = HoldHost("mx.a")
        smtp.replies = {"y": [Reply(451, "4.3.0 try later")]}
        router = FakeRouter({"a.example": [MXHost("mx.a", "127.0.0.2", 25)], "b.example": [MXHost("mx.b", "127.0.0.3", 25)]})
        sender = self.h.sender(store, router=router, session=smtp)
        (first,) = [c for c in store.claimed if c]
        self.assertEqual([e.message for e in first], [message, message])
        self.assertEqual([e.domain for e in sender.in_flight.values()], ["a.example"])
        self.h.net.advance(SETTINGS.retry_min * 1.1 + SETTINGS.poll_interval)
        (_, second) = [c for c in store.claimed if c]
        self.assertEqual([(e.domain, e.message) for e in second], [("b.example", b"")])
        self.assertEqual([host for host, _ in smtp.sessions], ["mx.b", "mx.b"])
        (held,) = smtp.waiting[0]
        self.assertIs(smtp.sessions[1][1][0].message, held.message, "a second copy of the message")
        self.assertEqual(sender.held_bytes, len(message))
        self.assertEqual(self.h.state(sid).recipients[1].status, "sent")
        smtp.gate.callback(None)
        self.assertEqual(self.h.state(sid).status, "sent")
        self.assertEqual(sender.held_bytes, 0)

    def test_first_envelope_is_claimed_even_above_the_budget(self) -> None:
        """issue 11 item 8: a message larger than the whole budget still goes (alone)."""
        sid = self.h.submit("a@a.example", message=b"Subject: m\r\n\r\n" + b"z" * 100_000)
        smtp = ScriptedSessions()
        router = FakeRouter({"a.example": [MXHost("mx.a", "127.0.0.2", 25)]})
        sender = Sender(self.h.store, router, self.h.reactor, SMTP, SenderSettings(max_bytes_in_flight=1000), session=smtp, owner="s", wall=self.h.wall)
        self.successResultOf(sender.poll())
        self.assertEqual(self.h.state(sid).status, "sent")


# -- item 12: each domain leaves as soon as its lookup is done -------------------------------------


class HoldHost(ScriptedSessions):
    """Sessions to ``host`` wait for ``gate``; the others answer at once."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host
        self.gate: Deferred[None] = Deferred()
        #: The transactions of each session waiting for the gate.
        self.waiting: list[list[Any]] = []

    async def __call__(self, reactor: Any, host: str, *args: Any, **kwargs: Any) -> Any:
        if host == self.host:
            self.waiting.append(list(args[2]))
            await self.gate
        return await super().__call__(reactor, host, *args, **kwargs)


class ManualRouter(FakeRouter):
    """Lookups that wait until the test fires them."""

    def __init__(self) -> None:
        super().__init__({})
        self.pending: dict[str, Deferred[list[MXHost]]] = {}

    async def hosts(self, domain: str) -> list[MXHost]:
        d: Deferred[list[MXHost]] = Deferred()
        self.pending[domain] = d
        return await d


class HeadOfLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.router = ManualRouter()
        self.smtp = ScriptedSessions()
        self.sender = Sender(self.h.store, self.router, self.h.reactor, SMTP, SETTINGS, session=self.smtp, owner="s", wall=self.h.wall)

    def test_fast_domain_not_held_back_by_a_slow_lookup(self) -> None:
        """issue 11 item 12: domain A's delivery starts while domain B's lookup is still pending."""
        a = self.h.submit("x@fast.example")
        b = self.h.submit("y@slow.example")
        self.sender.poll()
        self.assertEqual(sorted(self.router.pending), ["fast.example", "slow.example"])
        self.router.pending["fast.example"].callback([MXHost("mx.fast", "127.0.0.2", 25)])
        self.h.reactor.advance(0)
        self.assertEqual([h for h, _ in self.smtp.sessions], ["mx.fast"])
        self.assertEqual(self.h.state(a).status, "sent")
        self.assertFalse(self.router.pending["slow.example"].called)
        self.router.pending["slow.example"].callback([MXHost("mx.slow", "127.0.0.3", 25)])
        self.h.reactor.advance(0)
        self.assertEqual(self.h.state(b).status, "sent")

    def test_lookups_done_in_one_turn_share_a_session(self) -> None:
        """issue 11 item 12: two domains whose lookups finish in the same reactor turn and share an MX share a session."""
        self.h.submit("x@c.example")
        self.h.submit("y@d.example")
        self.h.submit("z@slow.example")
        self.sender.poll()
        shared = [MXHost("mx.shared", "127.0.0.2", 25)]
        self.router.pending["c.example"].callback(list(shared))
        self.router.pending["d.example"].callback(list(shared))
        self.assertEqual(self.smtp.sessions, [])
        self.h.reactor.advance(0)
        self.assertEqual([(h, len(ts)) for h, ts in self.smtp.sessions], [("mx.shared", 2)])
        self.router.pending["slow.example"].callback([MXHost("mx.slow", "127.0.0.3", 25)])
        self.assertEqual(len(self.smtp.sessions), 2)


# -- item 11: sessions and addresses tried per attempt -------------------------------------------------


class FanOutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.hosts = [MXHost(f"mx{i}.tarpit.example", f"10.0.{i // 250}.{i % 250 + 1}", 25) for i in range(40)]
        self.router = FakeRouter({"tarpit.example": self.hosts})

    def test_forty_hosts_that_never_greet(self) -> None:
        """issue 11 item 11: 40 MX hosts accept TCP and never greet: one attempt opens 2 sessions, not 40."""
        self.h.net.default = Silent
        sid = self.h.submit("x@tarpit.example")
        self.h.sender(router=self.router)
        self.h.net.advance(3 * SMTP.command_timeout)
        self.assertEqual(self.h.net.attempts, ["10.0.0.1", "10.0.0.2"])
        (r,) = self.h.state(sid).recipients
        self.assertEqual((r.status, r.attempts), ("deferred", 1))
        self.assertIn("timed out", r.last_reply)

    def test_forty_refusing_hosts(self) -> None:
        """issue 11 item 11: refused connections are no sessions, but one attempt tries at most 5 addresses."""
        self.h.net.default = None
        sid = self.h.submit("x@tarpit.example")
        self.h.sender(router=self.router)
        self.h.net.run()
        self.assertEqual(self.h.net.attempts, [h.address for h in self.hosts[:5]])
        (r,) = self.h.state(sid).recipients
        self.assertEqual((r.status, r.attempts), ("deferred", 1))
        self.assertIn("refused", r.last_reply)
