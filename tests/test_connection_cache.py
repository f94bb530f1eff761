"""
Tests for L{mmgun.smtp.SessionCache} (issue 17 part C): SMTP sessions kept open between
deliveries. The client runs against the scripted in-memory MX of L{tests.test_smtp}
over a L{MemoryReactorClock} and L{twisted.test.iosim} (real TLS in memory for
STARTTLS); time only moves when a test advances the clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mmgun.mx import MXHost
from mmgun.sender import Sender, SenderSettings
from mmgun.smtp import QUIT_TIMEOUT, SessionCache, SessionFailed, SMTPSettings, TLSMode, Transaction, TransactionResult
from mmgun.store import NewSubmission

from .fakes import (
    ADDRESS,
    DROP,
    HOST,
    MESSAGE,
    PORT,
    SILENT,
    SMTP_SETTINGS as SETTINGS,
    T0,
    FakeMX,
    FakeRouter,
    MemoryTLSTransport,
    pki,
    sent,
    transaction as make_transaction,
)
from .helpers import result, sync_store

IDLE = 2.0


class DeafToQuit(FakeMX):
    """An MX that neither answers nor acts on QUIT."""

    def lineReceived(self, line: bytes) -> None:
        if line.upper() == b"QUIT":
            self.commands.append((self.tls_active, line))
            return
        super().lineReceived(line)


class Net:
    """A cache on a memory reactor; the test accepts each connection attempt with a server."""

    def __init__(self, **cache: object) -> None:
        self.reactor = MemoryReactorClock()
        self.cache = SessionCache(self.reactor, idle_time=IDLE, **cache)  # type: ignore[arg-type]
        self.pumps: list[iosim.IOPump] = []

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def send(
        self,
        *transactions: Transaction,
        host: str = HOST,
        settings: SMTPSettings = SETTINGS,
        on_result: Callable[[TransactionResult], object] | None = None,
    ) -> Deferred[list[TransactionResult]]:
        result = Deferred.fromCoroutine(
            self.cache.send_session(self.reactor, host, ADDRESS, PORT, list(transactions), settings, on_result=on_result)
        )
        self.flush()
        return result

    def accept(self, server: FakeMX) -> iosim.IOPump:
        address, port, factory, _, _ = self.reactor.tcpClients[len(self.pumps)]
        client = factory.buildProtocol(IPv4Address("TCP", address, port))
        server_io = MemoryTLSTransport(
            server,
            isServer=True,
            hostAddress=IPv4Address("TCP", address, port),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000 + len(self.pumps)),
        )
        client_io = MemoryTLSTransport(
            client,
            isServer=False,
            hostAddress=IPv4Address("TCP", "198.51.100.7", 40000 + len(self.pumps)),
            peerAddress=IPv4Address("TCP", address, port),
        )
        pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=self.reactor)
        self.pumps.append(pump)
        self.flush()
        return pump

    def flush(self) -> None:
        for _ in range(3):
            for pump in self.pumps:
                pump.flush()

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()


def tx(key: str, *recipients: str, message: bytes = MESSAGE) -> Transaction:
    return make_transaction(key, *recipients, message=message)


class ReuseTests(SynchronousTestCase):
    def test_next_session_reuses_the_connection(self) -> None:
        """
        issue 17 item C1: the second delivery to the same MX within the idle time goes over
        the first one's connection: no new TCP connection, no second EHLO, no QUIT between.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.assertEqual(self.successResultOf(first), [TransactionResult("env1", True, {"b@example.net": sent()})])
        self.assertEqual(len(net.cache), 1)
        net.advance(IDLE / 2)
        second = net.send(tx("env2", "c@example.net"))
        self.assertEqual(self.successResultOf(second), [TransactionResult("env2", True, {"c@example.net": sent()})])
        self.assertEqual(net.attempts, 1)
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"])
        self.assertEqual(len(server.payloads), 2)

    def test_tls_not_negotiated_again(self) -> None:
        """
        issue 17 item C1: a reused session stays on the TLS the first one negotiated: its
        MAIL FROM goes encrypted, with no second STARTTLS or EHLO.
        """
        net = Net()
        settings = SMTPSettings(helo="relay.test", tls=TLSMode.REQUIRE)
        first = net.send(tx("env1"), settings=settings)
        server = FakeMX(tls=pki().server)
        net.accept(server)
        self.successResultOf(first)
        second = net.send(tx("env2"), settings=settings)
        self.assertEqual(self.successResultOf(second)[0].recipients, {"b@example.net": sent()})
        self.assertEqual(net.attempts, 1)
        self.assertEqual([v for _, v in server.commands].count(b"STARTTLS"), 1)
        self.assertEqual(server.commands[-3:], [(True, b"MAIL FROM:<a@example.com>"), (True, b"RCPT TO:<b@example.net>"), (True, b"DATA")])

    def test_another_mx_name_is_another_connection(self) -> None:
        """
        issue 17 item C1: a session is reused only for the same MX name, address and port:
        another name on the same address (whose certificate was not the one checked) connects anew.
        """
        net = Net()
        first = net.send(tx("env1"))
        net.accept(FakeMX())
        self.successResultOf(first)
        second = net.send(tx("env2"), host="mx2.example")
        self.assertEqual(net.attempts, 2)
        net.accept(FakeMX())
        self.successResultOf(second)
        self.assertEqual(len(net.cache), 2)

    def test_rset_before_reuse_after_every_recipient_refused(self) -> None:
        """
        issue 17 item C1: a session parked with a mail transaction still open at the server
        (every RCPT refused, so no DATA ended it) sends RSET before the next MAIL FROM.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX({b"RCPT": [b"550 5.1.1 no such user"]})
        net.accept(server)
        self.assertEqual(self.successResultOf(first)[0].recipients["b@example.net"].status, "failed")
        second = net.send(tx("env2"))
        self.assertEqual(self.successResultOf(second)[0].recipients, {"b@example.net": sent()})
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"RSET", b"MAIL", b"RCPT", b"DATA"])

    def test_pipelined_reuse(self) -> None:
        """issue 17 item C1: with PIPELINING, a reused session sends its group in one write, as a fresh one does."""
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX(pipelining=True)
        net.accept(server)
        self.successResultOf(first)
        client_io = net.pumps[0].clientIO
        writes = len(client_io.writes)
        second = net.send(tx("env2", "c@example.net", "d@example.net"))
        self.assertEqual(len(self.successResultOf(second)[0].recipients), 2)
        self.assertEqual(client_io.writes[writes], b"MAIL FROM:<a@example.com>\r\nRCPT TO:<c@example.net>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n")


class IdleTests(SynchronousTestCase):
    def test_idle_session_quit_after_idle_time(self) -> None:
        """
        issue 17 item C2: a parked session is closed with QUIT once idle_time has passed with
        no use, and the next delivery connects anew.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.successResultOf(first)
        net.advance(IDLE - 0.01)
        self.assertNotIn(b"QUIT", server.verbs)
        net.advance(0.02)
        self.assertEqual(server.verbs[-1], b"QUIT")
        self.assertTrue(net.pumps[0].clientIO.disconnected)
        self.assertEqual(len(net.cache), 0)
        second = net.send(tx("env2"))
        self.assertEqual(net.attempts, 2)
        net.accept(FakeMX())
        self.successResultOf(second)

    def test_idle_timer_restarts_on_reuse(self) -> None:
        """issue 17 item C2: each use parks the session for a full idle_time again."""
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.successResultOf(first)
        net.advance(IDLE * 0.75)
        self.successResultOf(net.send(tx("env2")))
        net.advance(IDLE * 0.75)
        self.assertNotIn(b"QUIT", server.verbs)
        net.advance(IDLE * 0.5)
        self.assertEqual(server.verbs[-1], b"QUIT")

    def test_silent_peer_cut_off_after_quit_timeout(self) -> None:
        """issue 17 item C2: a peer that never answers the idle QUIT is cut off after QUIT_TIMEOUT, not kept for ever."""
        net = Net()
        first = net.send(tx("env1"))
        net.accept(DeafToQuit())
        self.successResultOf(first)
        net.advance(IDLE)
        self.assertFalse(net.pumps[0].clientIO.disconnected)
        net.advance(QUIT_TIMEOUT)
        self.assertTrue(net.pumps[0].clientIO.disconnected)

    def test_old_session_not_parked(self) -> None:
        """issue 17 item C2: a session open max_age seconds is ended with QUIT rather than parked again."""
        net = Net(max_age=3.5)
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.successResultOf(first)
        for i in range(2, 5):
            net.advance(1.0)
            self.successResultOf(net.send(tx(f"env{i}")))
            self.assertNotIn(b"QUIT", server.verbs)
        net.advance(1.0)  # 4 s since the connection was made: used once more, then closed
        self.successResultOf(net.send(tx("env5")))
        self.assertEqual(server.verbs[-1], b"QUIT")
        self.assertEqual(len(net.cache), 0)
        self.assertEqual(net.attempts, 1)


class PeerClosedTests(SynchronousTestCase):
    def test_session_closed_by_peer_while_idle_never_reused(self) -> None:
        """
        issue 17 item C3: the MX closes a parked session: it leaves the cache at once, and the
        next delivery opens a new connection rather than writing into the dead one.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.successResultOf(first)
        server.transport.loseConnection()
        net.flush()
        self.assertEqual(len(net.cache), 0)
        second = net.send(tx("env2"))
        self.assertEqual(net.attempts, 2)
        other = FakeMX()
        net.accept(other)
        self.assertEqual(self.successResultOf(second)[0].recipients, {"b@example.net": sent()})
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA"])
        self.assertEqual(len(other.payloads), 1)

    def test_421_while_idle_drops_the_session(self) -> None:
        """
        issue 17 item C3: a 421 (or anything else) the MX sends on a parked session makes it
        unusable: out of the cache, the connection closed, the next delivery on a new one.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.successResultOf(first)
        server.send(b"421 4.4.2 mx.example Error: timeout exceeded")
        net.flush()
        self.assertEqual(len(net.cache), 0)
        self.assertTrue(net.pumps[0].clientIO.disconnected)
        second = net.send(tx("env2"))
        self.assertEqual(net.attempts, 2)
        net.accept(FakeMX())
        self.successResultOf(second)

    def test_dead_on_reuse_goes_over_a_new_connection(self) -> None:
        """
        issue 17 item C3: the MX closes the parked session just as it is reused (the close
        crosses our MAIL FROM): nothing of the message went out, so it goes at once over a new
        connection, reported once, as sent; nothing is lost or deferred.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX({b"MAIL": [None, DROP]})
        net.accept(server)
        self.successResultOf(first)
        results: list[TransactionResult] = []
        second = net.send(tx("env2"), on_result=results.append)
        self.assertEqual(net.attempts, 2)
        other = FakeMX()
        net.accept(other)
        self.assertEqual(self.successResultOf(second), [TransactionResult("env2", True, {"b@example.net": sent()})])
        self.assertEqual(results, [TransactionResult("env2", True, {"b@example.net": sent()})])
        self.assertEqual(len(server.payloads), 1)
        self.assertEqual(len(other.payloads), 1)

    def test_dead_on_reuse_reports_a_refused_8bit_message_once(self) -> None:
        """
        issue 18 restructuring: an 8-bit message the parked session refused (no 8BITMIME)
        before its connection turned out dead is reported once, and not run again over the
        new connection; the transaction behind it goes over the new one.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX({b"MAIL": [None, DROP]}, eight_bit_mime=False)
        net.accept(server)
        self.successResultOf(first)
        results: list[TransactionResult] = []
        eight_bit = b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n\xc3\xa9\r\n"  # 8-bit body, ASCII header (no SMTPUTF8 needed)
        second = net.send(tx("env8", message=eight_bit), tx("env2"), on_result=results.append)
        other = FakeMX(eight_bit_mime=False)
        net.accept(other)
        self.assertEqual([(r.key, r.recipients["b@example.net"].reply.code) for r in results], [("env8", 554), ("env2", 250)])
        self.assertEqual(self.successResultOf(second), results)
        self.assertEqual([verb for _, verb in other.commands if verb.startswith(b"MAIL")], [b"MAIL FROM:<a@example.com>"])

    def test_loss_after_a_reply_is_not_retried(self) -> None:
        """
        issue 17 item C3: once the reused session got a reply (here the 354, and the message
        went out), a lost connection is what it is for a fresh session: the transaction is
        started and deferred, and no second connection re-sends it (the MX may have it).
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX({b".": [None, DROP]})
        net.accept(server)
        self.successResultOf(first)
        [result] = self.successResultOf(net.send(tx("env2")))
        self.assertTrue(result.started)
        self.assertEqual(result.recipients["b@example.net"].status, "deferred")
        self.assertEqual(net.attempts, 1)
        self.assertEqual(len(server.payloads), 2)

    def test_every_parked_session_dead_then_fresh(self) -> None:
        """issue 17 item C3: several parked sessions all closed by the MX unseen: each is tried at most once, then a new connection."""
        net = Net()
        sessions = [net.send(tx(f"env{i}")) for i in range(2)]
        servers = [FakeMX({b"MAIL": [None, DROP]}) for _ in range(2)]
        for server in servers:
            net.accept(server)
        for d in sessions:
            self.successResultOf(d)
        self.assertEqual(len(net.cache), 2)
        third = net.send(tx("env3"))
        self.assertEqual(net.attempts, 3)
        net.accept(FakeMX())
        self.successResultOf(third)
        self.assertEqual(len(net.cache), 1)


class BoundsTests(SynchronousTestCase):
    def test_per_destination_bound(self) -> None:
        """
        issue 17 item C4: three sessions to one MX end together with per_destination 2: two are
        parked, the third ends with QUIT.
        """
        net = Net(per_destination=2)
        calls = [net.send(tx(f"env{i}")) for i in range(3)]
        servers = [FakeMX() for _ in range(3)]
        for server in servers:
            net.accept(server)
        for d in calls:
            self.successResultOf(d)
        self.assertEqual(len(net.cache), 2)
        self.assertEqual([s.verbs[-1] == b"QUIT" for s in servers], [False, False, True])

    def test_total_bound_closes_the_longest_idle(self) -> None:
        """
        issue 17 item C4: with room for one idle session in all, parking one for another MX
        closes (QUIT) the one idle longest; the cache never holds more than its size.
        """
        net = Net(size=1)
        first = net.send(tx("env1"))
        server_a = FakeMX()
        net.accept(server_a)
        self.successResultOf(first)
        net.advance(0.5)
        second = net.send(tx("env2"), host="mx2.example")
        server_b = FakeMX()
        net.accept(server_b)
        self.successResultOf(second)
        self.assertEqual(len(net.cache), 1)
        self.assertEqual(server_a.verbs[-1], b"QUIT")
        self.assertNotIn(b"QUIT", server_b.verbs)

    def test_size_zero_keeps_nothing(self) -> None:
        """issue 17 item C4: a cache of size 0 parks nothing: every session ends with QUIT."""
        net = Net(size=0)
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.successResultOf(first)
        self.assertEqual(server.verbs[-1], b"QUIT")
        self.assertEqual(len(net.cache), 0)


class CloseTests(SynchronousTestCase):
    def test_close_quits_idle_sessions_and_waits(self) -> None:
        """
        issue 17 item C2: close() sends QUIT on every parked session and fires once their
        connections are closed; a session that ends afterwards is not parked.
        """
        net = Net()
        busy = net.send(tx("env2"))
        idle = net.send(tx("env1"))
        idle_server = FakeMX()
        busy_server = FakeMX({b".": SILENT})
        net.accept(busy_server)
        net.accept(idle_server)
        self.successResultOf(idle)
        closed = net.cache.close()
        self.assertNoResult(closed)
        net.flush()
        self.assertEqual(idle_server.verbs[-1], b"QUIT")
        self.successResultOf(closed)
        busy_server.send(b"250 2.0.0 Ok: late")
        net.flush()
        self.successResultOf(busy)
        self.assertEqual(busy_server.verbs[-1], b"QUIT")
        self.assertEqual(len(net.cache), 0)

    def test_held_back_on_reuse_quits_without_a_transaction(self) -> None:
        """
        issue 17 item C3: when the caller holds the next transaction back (may_start False: its
        database is gone), a reused session sends no MAIL FROM: SessionFailed, no new
        connection tried, and the session ends with QUIT rather than going back to the cache.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX()
        net.accept(server)
        self.successResultOf(first)
        held = Deferred.fromCoroutine(
            net.cache.send_session(net.reactor, HOST, ADDRESS, PORT, [tx("env2")], SETTINGS, may_start=lambda t: False)
        )
        net.flush()
        self.failureResultOf(held, SessionFailed)
        self.assertEqual(net.attempts, 1)
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertEqual(len(net.cache), 0)

    def test_cancel_during_reuse_aborts(self) -> None:
        """
        issue 17 item C3: cancelling a session that runs over a reused connection (the
        sender's abort at the end of its shutdown grace) drops that connection; it never
        returns to the cache.
        """
        net = Net()
        first = net.send(tx("env1"))
        server = FakeMX({b".": [None, SILENT]})
        net.accept(server)
        self.successResultOf(first)
        second = net.send(tx("env2"))
        self.assertEqual(len(server.payloads), 2)
        second.cancel()
        net.flush()
        self.failureResultOf(second)
        self.assertTrue(net.pumps[0].clientIO.disconnected)
        self.assertNotIn(b"QUIT", server.verbs)
        self.assertEqual(len(net.cache), 0)

    def test_failed_session_not_parked(self) -> None:
        """issue 17 item C3: a session that fails (its greeting 421) is not parked."""
        net = Net()
        failing = net.send(tx("env1"))
        net.accept(FakeMX(greeting=b"421 4.3.2 busy"))
        self.failureResultOf(failing, SessionFailed)
        self.assertEqual(len(net.cache), 0)


class SenderCacheTests(SynchronousTestCase):
    """The sender's own cache (SenderSettings.cache_time), on a memory reactor and a real SQLite file."""

    def setUp(self) -> None:
        self.store, _ = sync_store(self)
        self.net = Net()
        self.net.reactor.advance(T0)
        router = FakeRouter({"a.example": [MXHost(HOST, ADDRESS, PORT)]})
        self.sender = Sender(
            self.store, router, self.net.reactor, SETTINGS, SenderSettings(poll_interval=1.0, cache_time=IDLE), owner="s"
        )
        self.sender.startService()
        self.net.flush()

    def submit(self) -> str:
        sub = NewSubmission(uuid.uuid4().hex, "c1", "me@example.com", ("x@a.example",), MESSAGE, self.net.reactor.seconds())
        return str(result(self, self.store.add_submission(sub)))

    def status(self, submission_id: str) -> str:
        return str(result(self, self.store.submission("c1", submission_id)).status)

    def test_sender_reuses_and_quits_at_stop(self) -> None:
        """
        issue 17 item C5: the sender's next claim to the same MX goes over the session its
        last batch left open (one connection for both); stopping it closes the idle
        session with QUIT and waits for that.
        """
        first = self.submit()
        self.net.advance(1.0)
        server = FakeMX()
        self.net.accept(server)
        self.assertEqual(self.status(first), "sent")
        second = self.submit()
        self.net.advance(1.0)
        self.assertEqual(self.status(second), "sent")
        self.assertEqual(self.net.attempts, 1)
        self.assertEqual(len(server.payloads), 2)
        self.assertNotIn(b"QUIT", server.verbs)
        stopped = self.sender.stopService()
        self.net.flush()
        self.successResultOf(stopped)
        self.assertEqual(server.verbs[-1], b"QUIT")
        self.assertTrue(self.net.pumps[0].clientIO.disconnected)

    def test_sender_without_cache_quits_each_session(self) -> None:
        """issue 17 item C5: cache_time 0 (--smtp-cache-time 0) turns the cache off: every session ends with QUIT."""
        self.successResultOf(self.sender.stopService())
        router = FakeRouter({"a.example": [MXHost(HOST, ADDRESS, PORT)]})
        sender = Sender(self.store, router, self.net.reactor, SETTINGS, SenderSettings(poll_interval=1.0, cache_time=0), owner="t")
        sender.startService()
        self.addCleanup(sender.stopService)
        self.submit()
        self.net.advance(1.0)
        server = FakeMX()
        self.net.accept(server)
        self.assertEqual(server.verbs[-1], b"QUIT")
