"""
Attacks on the sender's leases (issue 15, the sender's two bugs the multi-host suite found):
a sender cut off from its database keeps delivering what it had claimed (A), and a
graceful shutdown releases envelopes whose SMTP transaction is still in flight (B).

Everything runs on a MemoryReactorClock: a real SQLite file, the real ESMTP client
(mmgun.smtp.send_session) wired in memory to mmgun's scriptable ESMTP server (the
Harness of tests.test_attack_sender). "The database is cut off" is a store wrapper whose
calls raise DatabaseUnavailable, as the PostgreSQL store does when its connection is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mmgun.mx import MXHost
from mmgun.sender import LEASE_MARGIN
from mmgun.smtp import Transaction, send_session
from mmgun.store import DatabaseUnavailable, StorageError
from mmgun.store.sqlite import SQLiteStore

from .fakes import (
    ADDRESS,
    HARNESS_SETTINGS as SETTINGS,
    HOST,
    PORT,
    SMTP_SETTINGS,
    FakeMX,
    FakeRouter,
    Harness,
    Session,
    smtp_server,
    transaction,
)
from .helpers import result

#: A grace shorter than the SMTP client's command timeout (8 s): a session blocked at RCPT is still open at its end.
STOP_SETTINGS = attrs.evolve(SETTINGS, shutdown_timeout=5.0)
A = [MXHost("mx.a.example", "127.0.0.2", 25)]
B = [MXHost("mx.b.example", "127.0.0.3", 25)]


class CutStore:
    """
    The real store, as a host cut off from the database sees it: while ``cut``, every call
    this wrapper knows raises DatabaseUnavailable (nothing is committed); while
    ``hang_renewals`` (``hang_claims``), a renewal (a claim) never answers (a network path
    that drops packets: no error for a long time). ``after_claim`` runs after each claim.
    """

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.cut = False
        self.hang_renewals = False
        self.hang_claims = False
        self.hang_records = False
        #: While set, a renewal fails at once with an error that is not a lost database (a disk error).
        self.fail_renewals = False
        self.failed_renewals = 0
        #: The calls left hanging.
        self.hanging: list[Deferred[None]] = []
        self.after_claim: Callable[[], None] = lambda: None
        #: How many calls failed because of the cut.
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _check(self) -> None:
        if self.cut:
            self.refused += 1
            raise DatabaseUnavailable("the connection to the database was lost: server closed the connection")

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        if self.hang_claims:
            d: Deferred[None] = Deferred()
            self.hanging.append(d)
            await d
        self._check()
        claimed = await self.store.claim(*args, **kwargs)
        self.after_claim()
        return claimed

    async def renew(self, *args: Any) -> None:
        if self.fail_renewals:
            self.failed_renewals += 1
            raise StorageError("disk I/O error")
        if self.hang_renewals:
            d: Deferred[None] = Deferred()
            self.hanging.append(d)
            await d
        self._check()
        await self.store.renew(*args)

    async def record(self, *args: Any) -> None:
        if self.hang_records:
            d: Deferred[None] = Deferred()
            self.hanging.append(d)
            await d
        self._check()
        await self.store.record(*args)

    async def release(self, *args: Any) -> None:
        self._check()
        await self.store.release(*args)

    async def ping(self) -> None:
        self._check()
        await self.store.ping()


class SlowLookups(FakeRouter):
    """Routes every domain to ``hosts``, each lookup once the test fires it (``pending``, in order)."""

    def __init__(self, hosts: list[MXHost]) -> None:
        super().__init__({})
        self.all = hosts
        self.pending: list[Deferred[None]] = []

    async def hosts(self, domain: str) -> list[MXHost]:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        await d
        return self.all


class CutOffTests(SynchronousTestCase):
    """Bug A: what a sender that cannot write to its database must not start."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=25)

    def other_store(self) -> SQLiteStore:
        other = SQLiteStore.open_sync(self.h.path)
        self.addCleanup(lambda: result(self, other.close()))
        return other

    def delivered(self) -> list[str]:
        return sorted(r for m in self.h.mailbox for r in m.recipients)

    def test_no_next_transaction_once_a_record_fails_for_a_lost_database(self) -> None:
        """
        issue 15 (sender, bug A): three envelopes for one MX go over one session; the
        database is cut off while the MX takes the first message. Its result cannot be
        recorded (DatabaseUnavailable): the session starts no second transaction (the
        second's commands, pipelined behind the first "." before the cut, are dropped with
        the connection, before its message). Healed, the result is recorded and the other
        two are claimed again and delivered: each exactly once, one attempt each.
        """
        store = CutStore(self.h.store)
        sids = [self.h.submit(f"u{i}@a.example") for i in range(3)]

        def cut(_: object) -> None:
            store.cut = True

        # Fires as the server takes the first message, before its 250 goes out.
        self.h.mailbox.wait_for(1).addCallback(cut)
        with capturedLogs() as events:
            sender = self.h.sender(store)
            self.h.net.advance(30, step=0.5)
        self.assertEqual(self.delivered(), ["u0@a.example"], "a transaction started after the database was lost")
        self.assertEqual(self.h.net.attempts, ["127.0.0.2"])
        self.assertEqual(len(sender.in_flight), 3, "held back, the envelopes stay held until their release is written")
        lines = [formatEvent(e) for e in events]
        self.assertEqual(sum("no SMTP transaction is started" in line for line in lines), 1, lines)
        store.cut = False
        self.h.net.advance(60, step=0.5)
        self.assertEqual(self.delivered(), ["u0@a.example", "u1@a.example", "u2@a.example"])
        for sid in sids:
            state = self.h.state(sid)
            self.assertEqual((state.status, state.recipients[0].attempts), ("sent", 1))
        self.assertEqual(sender.in_flight, {})

    def test_no_transaction_while_a_result_goes_unanswered(self) -> None:
        """
        issue 15 (sender, bug A, the silent cut the netns suite measured: 149 sent twice): the
        database's path drops packets, so a result's write neither succeeds nor fails for as
        long as TCP waits (10 s). Four messages for one MX over one pipelined session (25 s
        each); from the first message on, writes hang. The second went out before the first
        result was written; by the time the third's turn comes the first result's write has
        gone unanswered for 25 s (more than UNANSWERED_LIMIT, at most a sixth of the lease):
        neither the third (its commands pipelined behind the second's dot are dropped with
        the connection) nor the fourth goes out. Answered, all four are delivered once.
        """
        store = CutStore(self.h.store)
        sids = [self.h.submit(f"slowdata+{i}@a.example") for i in range(4)]

        def hang(_: object) -> None:
            store.hang_records = True

        self.h.mailbox.wait_for(1).addCallback(hang)
        self.h.sender(store)
        self.h.net.advance(120, step=0.5)
        self.assertEqual(
            self.delivered(), [f"slowdata+{i}@a.example" for i in range(2)], "a transaction started while a write went unanswered"
        )
        store.hang_records = False
        for d in store.hanging:
            d.callback(None)
        self.h.net.advance(120, step=0.5)
        self.assertEqual(self.delivered(), [f"slowdata+{i}@a.example" for i in range(4)])
        for sid in sids:
            self.assertEqual(self.h.state(sid).status, "sent")

    def test_no_new_session_while_the_database_is_lost(self) -> None:
        """
        issue 15 (sender, bug A): a lease renewal fails with DatabaseUnavailable while the
        envelope's DNS lookup is under way; the lookup then answers. No connection is made
        while the database is gone; once it answers again the envelope is delivered once.
        """
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=0)
        store = CutStore(self.h.store)
        router = SlowLookups(A)
        sid = self.h.submit("x@slow.example")
        self.h.sender(store, router=router)
        self.h.net.run()
        self.assertEqual(len(router.pending), 1)
        store.cut = True
        self.h.net.advance(SETTINGS.lease_time / 3)  # the first renewal: refused
        self.assertGreater(store.refused, 0)
        router.pending[0].callback(None)
        self.h.net.advance(5)
        self.assertEqual(self.h.net.attempts, [], "a session opened while the database was cut off")
        self.assertEqual(len(self.h.mailbox), 0)
        store.cut = False
        self.h.net.advance(15)
        # Released once the database answered, claimed again: its second lookup.
        self.assertEqual(len(router.pending), 2)
        router.pending[1].callback(None)
        self.h.net.run()
        self.assertEqual(self.delivered(), ["x@slow.example"])
        state = self.h.state(sid)
        self.assertEqual((state.status, state.recipients[0].attempts), ("sent", 1))

    def test_no_session_for_a_lease_older_than_the_margin(self) -> None:
        """
        issue 15 (sender, bug A): renewals fail (a disk error, not a lost database: nothing
        else holds deliveries back) and the DNS lookup takes 45 s of a 60 s lease: by the
        sender's own clock the lease may run out before a transaction ends, so no session
        starts; the envelope is released, claimed again under a fresh lease, and delivered once.
        """
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=0)
        store = CutStore(self.h.store)
        store.fail_renewals = True
        router = SlowLookups(A)
        sid = self.h.submit("x@slow.example")
        self.h.sender(store, router=router)
        self.h.net.run()
        self.h.net.advance(SETTINGS.lease_time * (1 - LEASE_MARGIN) + 5)
        self.assertTrue(store.failed_renewals, "renewals were asked for")
        store.fail_renewals = False  # the release and the next claim go through
        with capturedLogs() as events:
            router.pending[0].callback(None)
            self.h.net.run()
        self.assertEqual(self.h.net.attempts, [], "a session started on a lease that may have run out")
        self.assertIn("its lease may have run out", " ".join(formatEvent(e) for e in events))
        # Released and claimed again at once, under a fresh lease: its second lookup.
        self.assertEqual(len(router.pending), 2)
        router.pending[1].callback(None)
        self.h.net.run()
        self.assertEqual(self.h.net.attempts, ["127.0.0.2"])
        self.assertEqual(self.delivered(), ["x@slow.example"])
        self.flushLoggedErrors(StorageError)
        state = self.h.state(sid)
        self.assertEqual((state.status, state.recipients[0].attempts), ("sent", 1))

    def test_two_hosts_renewals_hang_mid_session_no_message_twice(self) -> None:
        """
        issue 15 (sender, bug A), the netns run in small: host 1 holds three envelopes for
        an MX that takes 25 s to accept each message, and its renewals and claims hang
        (its database path drops packets; its results still get through, so that only the
        lease's age is tested). Host 2 polls the same database and takes over whatever
        lease runs out. Host 1 does not start the third transaction at 50 s (its lease,
        taken at 0 s, may end at 60 s): released, it is delivered once, not by both hosts.
        """
        store = CutStore(self.h.store)
        store.hang_renewals = True

        def hang_later_claims() -> None:
            store.hang_claims = True

        store.after_claim = hang_later_claims
        router = FakeRouter({"a.example": A})
        for i in range(3):
            self.h.submit(f"slowdata+{i}@a.example")
        self.h.sender(store, router=router, owner="host-1")
        self.h.net.run()
        self.h.sender(self.other_store(), router=router, owner="host-2")
        self.h.net.advance(200, step=0.5)
        delivered = self.delivered()
        self.assertEqual(delivered, [f"slowdata+{i}@a.example" for i in range(3)], "a message went out twice")

    def test_renewed_leases_never_hold_back_a_long_session(self) -> None:
        """
        issue 15 (sender, bug A), the other side: while renewals succeed (every third of a
        lease, as on SQLite) the lease-age check holds nothing back. Six messages at 25 s
        each, 150 s on one session (2.5 leases): all go over that one session, once.
        """
        for i in range(6):
            self.h.submit(f"slowdata+{i}@a.example")
        with capturedLogs() as events:
            self.h.sender(router=FakeRouter({"a.example": A}))
            self.h.net.advance(200, step=0.5)
        self.assertEqual(self.delivered(), [f"slowdata+{i}@a.example" for i in range(6)])
        self.assertEqual(self.h.net.attempts, ["127.0.0.2"])
        self.assertFalse([e for e in events if "not starting delivery" in e.get("log_format", "")])


class ShutdownTests(SynchronousTestCase):
    """Bug B: what a graceful stop may release."""

    def setUp(self) -> None:
        self.h = Harness(self)
        # Blocked after the dot (slowdata@) or before DATA (slow@, at RCPT) far longer than the grace.
        self.h.net.servers["127.0.0.2"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=1000)
        self.h.net.servers["127.0.0.3"] = smtp_server(self.h.reactor, self.h.mailbox, slow_seconds=1000)
        self.router = FakeRouter({"a.example": A, "b.example": B})

    def claimable(self) -> list[str]:
        other = SQLiteStore.open_sync(self.h.path)
        self.addCleanup(lambda: result(self, other.close()))
        claimed = result(self, other.claim("another-host", self.h.wall(), 60, 10))
        return sorted(f"{e.submission_id}:{e.attempts}" for e in claimed)

    def test_shutdown_aborts_sessions_and_keeps_the_lease_of_a_message_past_its_dot(self) -> None:
        """
        issue 15 (sender, bug B): SIGTERM with one session waiting for the reply to its
        final "." and one waiting for the reply to RCPT TO. At the end of the grace both
        connections are dropped; the envelope blocked before DATA is released (due at once,
        attempts 0), the one past its dot is not (the reply may have been a 250): a log line
        says so, and another host gets it only when its lease runs out.
        """
        after_dot = self.h.submit("slowdata@a.example")
        before_data = self.h.submit("slow@b.example")
        sender = self.h.sender(router=self.router, settings=STOP_SETTINGS)
        self.h.net.advance(2)
        self.assertEqual(sorted(self.h.net.attempts), ["127.0.0.2", "127.0.0.3"])
        pumps = list(self.h.net._pumps)
        self.assertEqual([p.clientIO.disconnecting for p in pumps], [False, False])
        with capturedLogs() as events:
            stopped = sender.stopService()
            self.h.net.advance(STOP_SETTINGS.shutdown_timeout + 1)
            self.successResultOf(stopped)
        self.assertEqual([p.clientIO.disconnecting for p in pumps], [True, True], "a connection was left open")
        self.assertEqual([p.serverIO.disconnected for p in pumps], [True, True])
        self.assertEqual(self.claimable(), [f"{before_data}:0"])
        lines = [formatEvent(e) for e in events]
        (line,) = [line for line in lines if "not releasing" in line]
        self.assertIn("not releasing 1 envelopes", line)
        self.assertIn("as sender-1", line)
        self.assertIn("releasing 1 unfinished envelopes at shutdown", " ".join(lines))
        # The server never accepted it (its connection went first), but nobody here could know.
        self.assertEqual(len(self.h.mailbox), 0)
        self.h.net.advance(SETTINGS.lease_time)
        self.assertIn(f"{after_dot}:0", self.claimable(), "its lease never ran out")

    def test_a_reply_after_the_grace_is_not_read(self) -> None:
        """
        issue 15 (sender, bug B), the netns trace: the 250 to the final "." would arrive
        just after the grace. The connection is gone by then: no "lease lost" result,
        nothing released that could go out twice.
        """
        self.h.net.servers["127.0.0.2"] = smtp_server(
            self.h.reactor, self.h.mailbox, slow_seconds=STOP_SETTINGS.shutdown_timeout + 0.5
        )
        sid = self.h.submit("slowdata@a.example")
        sender = self.h.sender(router=self.router, settings=STOP_SETTINGS)
        self.h.net.advance(0.5, step=0.5)
        with capturedLogs() as events:
            stopped = sender.stopService()
            self.h.net.advance(STOP_SETTINGS.shutdown_timeout + 2, step=0.5)
            self.successResultOf(stopped)
        lines = " ".join(formatEvent(e) for e in events)
        self.assertNotIn("was lost", lines)
        self.assertEqual(self.claimable(), [], "released while its message was past the dot")
        self.assertEqual(self.h.state(sid).status, "queued")


class HookedSession(Session):
    """tests.test_smtp's Session, with send_session's may_start and on_dot_sent."""

    def __init__(
        self,
        transactions: list[Transaction],
        may_start: Callable[[Transaction], bool],
        on_dot_sent: Callable[[Transaction], object] = lambda t: None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.result = Deferred.fromCoroutine(
            send_session(
                self.reactor,
                HOST,
                ADDRESS,
                PORT,
                transactions,
                SMTP_SETTINGS,
                may_start=may_start,
                on_dot_sent=on_dot_sent,
            )
        )
        self.client_transports = []
        self._pump = None


class SessionHookTests(SynchronousTestCase):
    """The two hooks the sender relies on, on the real client against a scripted MX."""

    def test_no_transaction_starts_once_the_caller_holds_it_back(self) -> None:
        """
        issue 15 (sender, bug A): between two transactions of a session (no PIPELINING)
        the caller says no: no MAIL FROM for it or the rest, QUIT; they come back not started.
        """
        allowed = {"t1"}
        session = HookedSession([transaction(k) for k in ("t1", "t2", "t3")], lambda t: t.key in allowed)
        server = FakeMX()
        session.accept(server)
        results = self.successResultOf(session.result)
        self.assertEqual([(r.key, r.started) for r in results], [("t1", True), ("t2", False), ("t3", False)])
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertEqual(len(server.payloads), 1)

    def test_pipelined_commands_already_out_are_dropped_with_the_connection(self) -> None:
        """
        issue 15 (sender, bug A): with PIPELINING the next transaction's commands go out
        behind the final "."; the caller holds it back before the reply to that "." comes:
        the connection is dropped (a QUIT would be read as message data) and its message
        never goes out.
        """
        allowed = {"t1", "t2"}

        def end_of_data(line: bytes) -> bytes:
            allowed.discard("t2")  # the database is lost while the MX takes the first message
            return b"250 2.0.0 Ok: queued"

        session = HookedSession([transaction(k) for k in ("t1", "t2")], lambda t: t.key in allowed)
        server = FakeMX({b".": end_of_data}, pipelining=True)
        pump = session.accept(server)
        results = self.successResultOf(session.result)
        pump.flush()
        self.assertEqual([(r.key, r.started) for r in results], [("t1", True), ("t2", False)])
        self.assertEqual(server.verbs.count(b"MAIL"), 2, "the second group went out behind the dot")
        self.assertEqual(len(server.payloads), 1)
        self.assertNotIn(b"QUIT", server.verbs)
        self.assertTrue(session.client_transports[0].disconnecting)

    def test_on_dot_sent_only_for_messages_that_reach_their_final_dot(self) -> None:
        """
        issue 15 (sender, bug B): on_dot_sent names each transaction as its final "." is
        written, before the reply; a transaction refused at RCPT never gets there.
        """
        dots: list[tuple[object, int]] = []
        server = FakeMX({b"RCPT": [b"250 2.1.5 Ok", b"550 5.1.1 no such user", b"250 2.1.5 Ok"]})
        session = HookedSession(
            [transaction(k) for k in ("t1", "t2", "t3")],
            lambda t: True,
            lambda t: dots.append((t.key, len(server.payloads))),
        )
        session.accept(server)
        self.successResultOf(session.result)
        self.assertEqual(dots, [("t1", 0), ("t3", 1)])
