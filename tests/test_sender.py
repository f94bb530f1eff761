"""The sender's loop on a Clock, against a real SQLite file and a scripted SMTP session."""

from __future__ import annotations

import random
import uuid

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mmgun.mx import PermanentDNSError, TemporaryDNSError
from mmgun.sender import Sender, retry_delay
from mmgun.smtp import Reply, SMTPSettings
from mmgun.store import NewSubmission
from mmgun.store.sqlite import SQLiteStore

from .fakes import SENDER_SETTINGS as SETTINGS, T0, FakeRouter, ScriptedSessions, mx
from .helpers import result, sync_store


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.clock = Clock()
        self.clock.advance(T0)
        self.router = FakeRouter({"a.example": [mx("mx1.a.example"), mx("mx2.a.example", "127.0.0.3")], "b.example": [mx("mx.b.example")]})
        self.smtp = ScriptedSessions()
        self.sender = self.make_sender(self.store)

    def make_sender(self, store: SQLiteStore, owner: str = "sender-1") -> Sender:
        return Sender(store, self.router, self.clock, SMTPSettings(helo="mmgun.test"), SETTINGS, session=self.smtp, rng=random.Random(1), owner=owner)

    def submit(self, *recipients: str, at: float | None = None) -> str:
        sub = NewSubmission(uuid.uuid4().hex, "c1", "me@example.com", recipients, b"Subject: x\r\n\r\nhi\r\n", self.clock.seconds() if at is None else at)
        return result(self, self.store.add_submission(sub))

    def state(self, submission_id: str):
        return result(self, self.store.submission("c1", submission_id))

    def poll(self, sender: Sender | None = None) -> None:
        self.successResultOf((sender or self.sender).poll())

    def test_delivers_and_records_reply(self) -> None:
        sid = self.submit("x@a.example", "y@b.example")
        self.poll()
        state = self.state(sid)
        self.assertEqual(state.status, "sent")
        self.assertEqual([(r.status, r.attempts, r.last_reply) for r in state.recipients], [("sent", 1, "250 2.0.0 Ok")] * 2)
        self.assertEqual(sorted(h for h, _ in self.smtp.sessions), ["mx.b.example", "mx1.a.example"])
        self.assertEqual(self.sender.in_flight, {})

    def test_permanent_and_temporary_per_recipient(self) -> None:
        self.smtp.replies = {"rejected": [Reply(550, "5.1.1 no such user")], "later": [Reply(451, "4.3.0 try again")]}
        sid = self.submit("ok@a.example", "rejected@a.example", "later@a.example")
        self.poll()
        state = self.state(sid)
        self.assertEqual([(r.status, r.last_reply) for r in state.recipients], [("sent", "250 2.0.0 Ok"), ("failed", "550 5.1.1 no such user"), ("deferred", "451 4.3.0 try again")])
        self.assertEqual(state.status, "queued")

    def test_no_such_mailbox_at_rcpt_joins_the_bounce_list(self) -> None:
        """issue 14 (suppression): a 5.1.1 answer to RCPT TO lists the address; the same text refusing the message does not."""
        self.smtp.replies = {"gone": [Reply(550, "5.1.1 no such user")], "full": [Reply(552, "5.2.2 mailbox full")]}
        self.submit("gone@a.example", "full@a.example")
        self.poll()
        self.assertIsNotNone(result(self, self.store.suppression("c1", "bounce", "gone@a.example")))
        self.assertIsNone(result(self, self.store.suppression("c1", "bounce", "full@a.example")))
        self.smtp.at_rcpt = False
        self.smtp.replies = {"spam": [Reply(550, "5.1.1 message refused by the content filter")]}
        self.submit("spam@a.example")
        self.poll()
        self.assertIsNone(result(self, self.store.suppression("c1", "bounce", "spam@a.example")))

    def test_deferred_recipient_retried_alone_on_schedule(self) -> None:
        self.smtp.replies = {"later": [Reply(451, "4.3.0 try again")]}
        sid = self.submit("ok@a.example", "later@a.example")
        self.poll()
        delay = retry_delay(1, SETTINGS, random.Random(1))
        self.clock.advance(delay - 2)
        self.poll()
        self.assertEqual(len(self.smtp.sessions), 1)
        self.clock.advance(2)
        self.poll()
        self.assertEqual(len(self.smtp.sessions), 2)
        self.assertEqual(self.smtp.sessions[1][1][0].recipients, ("later@a.example",))
        state = self.state(sid)
        self.assertEqual(state.status, "sent")
        self.assertEqual([r.attempts for r in state.recipients], [1, 2])

    def test_backoff_doubles_and_caps_with_jitter(self) -> None:
        rng = random.Random(7)
        delays = [retry_delay(n, SETTINGS, rng) for n in range(1, 8)]
        for n, delay in enumerate(delays, start=1):
            base = min(3600.0, 300.0 * 2 ** (n - 1))
            self.assertTrue(base * 0.9 <= delay <= min(3600.0, base * 1.1), (n, delay))
        self.assertLess(delays[0], 331)
        self.assertGreater(delays[-1], 3239)

    def test_connection_failure_moves_to_next_mx(self) -> None:
        self.smtp.down = {"mx1.a.example"}
        sid = self.submit("x@a.example")
        self.poll()
        self.assertEqual([h for h, _ in self.smtp.sessions], ["mx1.a.example", "mx2.a.example"])
        self.assertEqual(self.router.bad, ["mx1.a.example"])
        self.assertEqual(self.state(sid).status, "sent")

    def test_all_mx_down_defers_with_last_reply(self) -> None:
        self.smtp.down = {"mx1.a.example", "mx2.a.example"}
        sid = self.submit("x@a.example")
        self.poll()
        (r,) = self.state(sid).recipients
        self.assertEqual((r.status, r.attempts, r.last_reply), ("deferred", 1, "421 4.4.1 connection refused by mx2.a.example"))

    def test_permanent_dns_error_fails(self) -> None:
        self.router.routes["null.example"] = PermanentDNSError("556 5.1.10 null.example accepts no mail (null MX)")
        sid = self.submit("x@null.example")
        self.poll()
        self.assertEqual(self.state(sid).status, "failed")
        self.assertEqual(self.state(sid).recipients[0].last_reply, "556 5.1.10 null.example accepts no mail (null MX)")
        self.assertEqual(self.smtp.sessions, [])

    def test_temporary_dns_error_defers(self) -> None:
        self.router.routes["flaky.example"] = TemporaryDNSError("451 4.4.3 DNS lookup of flaky.example failed: SERVFAIL")
        sid = self.submit("x@flaky.example")
        self.poll()
        self.assertEqual(self.state(sid).recipients[0].status, "deferred")

    def test_expired_after_queue_lifetime(self) -> None:
        self.smtp.replies = {"later": [Reply(451, "4.3.0 busy")] * 100}
        sid = self.submit("later@a.example")
        for _ in range(60):
            self.poll()
            self.clock.advance(3600 * 1.2)
            if self.state(sid).status != "queued":
                break
        (r,) = self.state(sid).recipients
        self.assertEqual(r.status, "failed")
        self.assertTrue(r.last_reply.startswith("expired"), r.last_reply)
        self.assertIn("451 4.3.0 busy", r.last_reply)
        self.assertLessEqual(r.updated_at, T0 + 86400 + 1)

    def test_same_domain_envelopes_share_one_session(self) -> None:
        for i in range(5):
            self.submit(f"u{i}@a.example")
        self.poll()
        self.assertEqual(len(self.smtp.sessions), 1)
        self.assertEqual(len(self.smtp.sessions[0][1]), 5)

    def test_results_reported_at_session_end_are_recorded_too(self) -> None:
        self.smtp.report_each = False
        sid = self.submit("x@a.example")
        self.poll()
        self.assertEqual(self.state(sid).status, "sent")

    def test_results_come_through_on_result_alone(self) -> None:
        """issue 18 restructuring: the sender records what on_result reports, not what the session returns."""
        sid = self.submit("x@a.example")
        real = self.smtp.__call__

        async def session(*args, **kwargs):
            await real(*args, **kwargs)
            return []

        self.sender._session = session
        self.poll()
        self.assertEqual(self.state(sid).status, "sent")

    def test_each_result_recorded_once(self) -> None:
        """issue 18 restructuring: one report per transaction, one record per envelope (no de-duplication)."""
        self.smtp.replies["y"] = [Reply(451, "4.3.0 busy")]
        for local in ("x", "y", "z"):
            self.submit(f"{local}@a.example")
        recorded: list[int] = []
        record = self.store.record

        async def counting(outcomes, now):
            recorded.extend(o.envelope.id for o in outcomes)
            await record(outcomes, now)

        self.store.record = counting  # type: ignore[method-assign]
        self.poll()
        self.assertEqual(len(self.smtp.sessions), 1)
        self.assertEqual(sorted(recorded), sorted(set(recorded)))
        self.assertEqual(len(recorded), 3)

    def test_each_result_committed_before_the_session_ends(self) -> None:
        first = self.submit("x@a.example")
        self.submit("y@a.example")
        seen: list[str] = []
        real = self.smtp.__call__

        async def session(reactor, host, address, port, transactions, settings, on_result=None, **hooks):
            def spy(result):
                on_result(result)
                seen.append(self.state(first).status)

            return await real(reactor, host, address, port, transactions, settings, on_result=spy, **hooks)

        self.sender._session = session
        self.poll()
        self.assertEqual(seen, ["sent", "sent"])

    def test_domains_sharing_an_mx_share_one_session(self) -> None:
        shared = [mx("mx.shared.example")]
        self.router.routes.update({"c.example": shared, "d.example": list(shared)})
        self.submit("x@c.example", "y@d.example")
        self.submit("z@d.example")
        self.poll()
        self.assertEqual([(h, len(ts)) for h, ts in self.smtp.sessions], [("mx.shared.example", 3)])

    def test_crashed_senders_envelope_redelivered_after_lease(self) -> None:
        self.smtp.hold = Deferred()  # the first sender "dies" mid-delivery: its session never returns
        sid = self.submit("x@a.example")
        self.poll()
        self.smtp.hold = None
        survivor = self.make_sender(SQLiteStore.open_sync(self.path), owner="sender-2")
        self.clock.advance(SETTINGS.lease_time - 1)
        self.poll(survivor)
        self.assertEqual(len(self.smtp.sessions), 1)
        self.clock.advance(1)
        self.poll(survivor)
        self.assertEqual(len(self.smtp.sessions), 2)
        self.assertEqual(self.state(sid).status, "sent")

    def test_lease_renewed_while_delivery_in_progress(self) -> None:
        self.smtp.hold = Deferred()
        self.submit("x@a.example")
        self.sender.startService()
        self.addCleanup(lambda: self.sender.running and self.sender.stopService())
        other = self.make_sender(SQLiteStore.open_sync(self.path), owner="sender-2")
        for _ in range(10):
            self.clock.advance(SETTINGS.lease_time / 3)
            self.poll(other)
        self.assertEqual(len(self.smtp.sessions), 1)

    def test_two_senders_deliver_every_envelope_once(self) -> None:
        for i in range(30):
            self.submit(f"u{i}@a.example", f"v{i}@b.example")
        second = self.make_sender(SQLiteStore.open_sync(self.path), owner="sender-2")
        for sender in (self.sender, second, self.sender, second):
            self.poll(sender)
        delivered = self.smtp.delivered()
        self.assertEqual(len(delivered), 60)
        self.assertEqual(len(set(delivered)), 60)

    def test_shutdown_releases_unfinished_leases(self) -> None:
        self.smtp.hold = Deferred()
        sid = self.submit("x@a.example")
        self.sender.startService()
        stopped = self.sender.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(SETTINGS.shutdown_timeout)
        self.successResultOf(stopped)
        claimed = result(self, self.store.claim("other", self.clock.seconds(), 60, 10))
        self.assertEqual([e.submission_id for e in claimed], [sid])
        self.assertEqual(claimed[0].attempts, 0)

    def test_shutdown_waits_for_delivery_in_flight(self) -> None:
        hold = self.smtp.hold = Deferred()
        sid = self.submit("x@a.example")
        self.sender.startService()
        stopped = self.sender.stopService()
        self.clock.advance(SETTINGS.shutdown_timeout / 2)
        hold.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.state(sid).status, "sent")
