"""
Destination back-off (issue 18, :mod:`mmgun.backoff`): the reply classifier, the adaptive
per-MX limit and the domain pauses on their own; the sender using them on a Clock against a
real SQLite file; ``mmgun stats``; and the sender against a real twisted.mail SMTP server on
127.0.0.1 that starts answering 421.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun.admin import main as admin_main
from mmgun.backoff import MX_MEMORY, PAUSE_CAP, Backoff, ConcurrencyLimit, Signal, classify
from mmgun.metrics import Metrics
from mmgun.mx import MXHost
from mmgun.sender import Sender, SenderSettings
from mmgun.smtp import RecipientResult, Reply, SessionFailed, SMTPSettings, Status, TransactionResult, parse_reply
from mmgun.store import Backoff as BackoffEntry, NewSubmission
from mmgun.store.sqlite import SQLiteStore
from mmgun.testing.smtpserver import Mailbox, smtp_server_factory

from .helpers import result, sync_store

T0 = 1_800_000_000.0
ADDRESS = "127.0.0.2"
RATE_LIMITED = Reply(421, "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail; rate limited")

#: (code, text, signal): what each reply the peer sent says. Enhanced status code first, text second.
CLASSIFIED: list[tuple[int, str, Signal]] = [
    (250, "2.0.0 Ok: queued as 1234", Signal.DELIVERED),
    # Gmail
    (421, "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail", Signal.RATE_LIMITED),
    (450, "4.7.28 Gmail has detected an unusual rate of unsolicited mail", Signal.RATE_LIMITED),
    (421, "4.7.0 Try again later, closing connection. (EHLO) gsmtp", Signal.RATE_LIMITED),
    # One mailbox's rate (4.2.1), not the domain's, whatever the text says
    (450, "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages", Signal.NEUTRAL),
    # Yahoo
    (421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints", Signal.RATE_LIMITED),
    # Outlook / Microsoft 365
    (451, "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation", Signal.RATE_LIMITED),
    (451, "4.7.500 Server busy. Please try again later from [192.0.2.1]", Signal.RATE_LIMITED),
    # Postfix policy daemons and the like
    (450, "4.7.1 Sending rate exceeded, slow down", Signal.RATE_LIMITED),
    (451, "4.7.1 Please try again later", Signal.RATE_LIMITED),
    (421, "Too many concurrent SMTP connections from this IP address; please try again later", Signal.RATE_LIMITED),
    (452, "Too many messages from you, throttled", Signal.RATE_LIMITED),
    # Not a rate limit: greylisting, too many recipients in one message
    (450, "4.7.1 <a@b.example>: Recipient address rejected: Greylisted, please try again later", Signal.NEUTRAL),
    (452, "4.5.3 Too many recipients", Signal.NEUTRAL),
    # Overloaded: a 421; a connection or system overload code (4.4.x, 4.3.2) decides before any text
    (421, "4.3.2 Service not available, closing transmission channel", Signal.OVERLOADED),
    (421, "mx.example Service temporarily unavailable", Signal.OVERLOADED),
    (421, "4.4.5 mx.first-rate.example too busy, try again later", Signal.OVERLOADED),
    (451, "4.4.2 mx.throttle-free.example: connection timed out", Signal.OVERLOADED),
    # Says nothing about load
    (451, "4.3.0 try again later", Signal.NEUTRAL),
    (550, "5.7.1 rate limit exceeded", Signal.NEUTRAL),
    (550, "5.1.1 no such user", Signal.NEUTRAL),
]

#: (code, text, signal): replies mmgun made up itself (Reply.received False): judged by their
#: codes alone, never by the host and domain names in their text.
SYNTHESIZED: list[tuple[int, str, Signal]] = [
    (421, "4.4.1 connection refused by mx.example [192.0.2.1]", Signal.OVERLOADED),
    (421, "4.4.1 connection refused by mx.first-rate.example [192.0.2.1]", Signal.OVERLOADED),
    (421, "4.4.1 connection to mx.rate.example [192.0.2.1] timed out", Signal.OVERLOADED),
    (451, "4.4.2 timed out after 300s waiting for mx.rate.example during DATA", Signal.OVERLOADED),
    (421, "4.4.2 connection lost during the greeting with smtp.throttle-free.example", Signal.OVERLOADED),
    (451, "4.4.2 connection lost during DATA with smtp.throttle-free.example", Signal.OVERLOADED),
    (421, "4.4.1 cannot connect to mx.tss04.example [192.0.2.1]: too many connections", Signal.OVERLOADED),
    # TLS and MTA-STS policy failures: not the MX's load, whatever the names in them
    (421, "4.7.0 mx.example does not offer STARTTLS; TLS is required", Signal.NEUTRAL),
    (421, "4.7.5 TLS with mx.example failed: certificate verify failed", Signal.NEUTRAL),
    (421, "4.7.0 mx.ratelimit.example refused STARTTLS (454 4.7.0 try again later); TLS is required", Signal.NEUTRAL),
    (
        421,
        "4.7.5 MTA-STS policy of first-rate.com requires TLS with a certificate valid for mx.first-rate.com: "
        "421 4.7.0 mx.first-rate.com does not offer STARTTLS; TLS is required",
        Signal.NEUTRAL,
    ),
    # A protocol error mmgun noticed mid-transaction, naming a "throttle" host: nothing about load
    (451, "4.5.0 mx.throttle.example answered DATA with 250 2.0.0 Ok", Signal.NEUTRAL),
    (451, "4.3.0 no result; will retry", Signal.NEUTRAL),
]


class ClassifierTests(SynchronousTestCase):
    def test_table(self) -> None:
        """issue 18 destination back-off: each known reply is classified as the table says (code first, then text)."""
        wrong = [
            (code, text, got, want)
            for code, text, want in CLASSIFIED
            if (got := classify(code, text, received=True)) is not want
        ]
        self.assertEqual(wrong, [])

    def test_synthesized_replies_are_judged_by_code_only(self) -> None:
        """
        issue 18 review BF item 1: mmgun's own replies naming mx.first-rate.example,
        mx.rate.example, smtp.throttle-free.example or an MTA-STS domain first-rate.com are
        never rate limits: a refused, timed-out or lost connection is an overload (4.4.x), a
        TLS or policy failure nothing.
        """
        wrong = [
            (code, text, got, want)
            for code, text, want in SYNTHESIZED
            if (got := classify(code, text, received=False)) is not want
        ]
        self.assertEqual(wrong, [])

    def test_received_flag_comes_from_the_wire(self) -> None:
        """issue 18 review BF item 1: only a reply parsed from the peer's bytes counts as received; one made here does not."""
        self.assertTrue(parse_reply(421, b"4.7.28 rate limited").received)
        self.assertFalse(Reply(421, "4.4.1 connection refused by mx.rate.example [192.0.2.1]").received)
        self.assertFalse(Reply.parse("451 4.4.3 lookup failed").received)
        self.assertEqual(parse_reply(421, b"4.7.28 x"), Reply(421, "4.7.28 x"), "the flag changed equality")


class ConcurrencyLimitTests(SynchronousTestCase):
    def test_starts_at_maximum_and_new_sessions_wait(self) -> None:
        """issue 18 destination back-off: no slow start — the maximum at once; the next waits for a release."""
        limit = ConcurrencyLimit(3, "mx [a]")
        slots = [limit.acquire() for _ in range(4)]
        self.assertEqual([d.called for d in slots], [True, True, True, False])
        limit.release()
        self.assertTrue(slots[3].called)

    def test_lowered_limit_cuts_no_running_session(self) -> None:
        """issue 18 destination back-off: lowered to 1 while 3 run, none is cut and no new one starts until all but none end."""
        limit = ConcurrencyLimit(3, "mx [a]")
        for _ in range(3):
            limit.acquire()
        waiting = limit.acquire()
        for _ in range(3):
            limit.lower("421 4.3.2 busy", T0)
        self.assertEqual((limit.limit, limit.active), (1, 3))
        limit.release()
        limit.release()
        self.assertFalse(waiting.called)
        limit.release()
        self.assertTrue(waiting.called)
        self.assertFalse(limit.lower("421 again", T0), "lowered below 1")

    def test_successes_raise_it_one_per_limit_up_to_maximum(self) -> None:
        """issue 18 destination back-off: +1 per `limit` successful transactions (Postfix's 1/concurrency), never above the maximum."""
        limit = ConcurrencyLimit(4, "mx [a]")
        for _ in range(3):
            limit.lower("421", T0)
        seen = []
        for _ in range(10):
            limit.succeeded(T0)
            seen.append(limit.limit)
        self.assertEqual(seen, [2, 2, 3, 3, 3, 4, 4, 4, 4, 4])

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """issue 18 destination back-off: a wait that is cancelled (a session aborted at shutdown) takes no slot."""
        limit = ConcurrencyLimit(1, "mx [a]")
        limit.acquire()
        waiting = limit.acquire()
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        limit.release()
        self.assertTrue(limit.idle)


class BackoffTests(SynchronousTestCase):
    def test_pause_grows_on_repeat_capped_and_resets_on_delivery(self) -> None:
        """issue 18 destination back-off: 60 s, then doubling each time it is rate-limited again, capped; a delivery resets it."""
        backoff = Backoff(10, 60.0, "host-a")
        now, lengths = T0, []
        for _ in range(7):
            until = backoff.domain_feedback("gmail.com", Signal.RATE_LIMITED, str(RATE_LIMITED), now)
            assert until is not None
            lengths.append(until - now)
            now = until
        self.assertEqual(lengths, [60.0, 120.0, 240.0, 480.0, 960.0, 60.0 * PAUSE_CAP, 60.0 * PAUSE_CAP])
        backoff.domain_feedback("gmail.com", Signal.DELIVERED, "250 ok", now)
        until = backoff.domain_feedback("gmail.com", Signal.RATE_LIMITED, str(RATE_LIMITED), now)
        self.assertEqual(until, now + 60.0)
        backoff.domain_feedback("gmail.com", Signal.RATE_LIMITED, str(RATE_LIMITED), now + 60.0)  # 120 s
        quiet = now + 180.0 + 60.0 * PAUSE_CAP
        self.assertEqual(backoff.domain_feedback("gmail.com", Signal.RATE_LIMITED, "again", quiet), quiet + 60.0, "not reset by a long quiet")

    def test_replies_during_a_pause_neither_extend_nor_grow_it(self) -> None:
        """issue 18 destination back-off: sessions already under way reporting the same limit do not stack pauses."""
        backoff = Backoff(10, 60.0, "host-a")
        backoff.domain_feedback("gmail.com", Signal.RATE_LIMITED, "first", T0)
        backoff.changes()
        self.assertIsNone(backoff.domain_feedback("gmail.com", Signal.RATE_LIMITED, "second", T0 + 5))
        self.assertEqual(backoff.paused("gmail.com", T0 + 59), (T0 + 60, "first"))
        self.assertIsNone(backoff.paused("gmail.com", T0 + 60))
        self.assertEqual(backoff.changes(), [], "written again without a change")

    def test_other_senders_pause_is_honoured(self) -> None:
        """issue 18 destination back-off: a pause read from the store (another sender's) holds this sender's mail too."""
        backoff = Backoff(10, 60.0, "host-a")
        backoff.others([BackoffEntry("domain", "yahoo.com", "host-b", T0 + 30, "421 4.7.0 [TSS04]")])
        self.assertEqual(backoff.paused("yahoo.com", T0), (T0 + 30, "421 4.7.0 [TSS04]"))
        self.assertIsNone(backoff.paused("gmail.com", T0))

    def test_lowered_mx_written_on_change_and_forgotten_when_idle(self) -> None:
        """issue 18 destination back-off: each change of an MX's limit is one store entry; idle for MX_MEMORY, it starts at the maximum again."""
        backoff = Backoff(3, 60.0, "host-a")
        limit = backoff.limit("192.0.2.1", "mx.example [192.0.2.1]", T0)
        limit.acquire()
        backoff.session_feedback("192.0.2.1", Signal.OVERLOADED, "421 4.3.2 busy", T0)
        backoff.session_feedback("192.0.2.1", Signal.OVERLOADED, "421 4.3.2 busy", T0)
        self.assertEqual(backoff.concurrency("192.0.2.1"), 1)
        self.assertEqual(
            backoff.changes(),
            [BackoffEntry("mx", "mx.example [192.0.2.1]", "host-a", T0 + MX_MEMORY, "421 4.3.2 busy", concurrency=1, updated_at=T0)],
        )
        limit.release()
        self.assertEqual(backoff.limit("192.0.2.1", "mx.example [192.0.2.1]", T0 + MX_MEMORY - 1).limit, 1)
        self.assertEqual(backoff.limit("192.0.2.1", "mx.example [192.0.2.1]", T0 + MX_MEMORY).limit, 3)


    def test_processes_sharing_a_sender_id_honour_each_others_pauses(self) -> None:
        """
        issue 18 review BF item 3: two processes started with the same --sender-id write their
        pauses under the same name; each honours the other's, read from the store.
        """
        first, second = Backoff(10, 60.0, "host-a"), Backoff(10, 60.0, "host-a")
        first.domain_feedback("gmail.com", Signal.RATE_LIMITED, str(RATE_LIMITED), T0)
        second.others(first.changes())
        self.assertEqual(second.paused("gmail.com", T0 + 1), (T0 + 60.0, str(RATE_LIMITED)))

    def test_sweep_forgets_idle_addresses_and_old_pauses(self) -> None:
        """
        issue 18 review BF item 5: mail to 1,000 distinct MX addresses (each lowered once) and
        1,000 paused domains leaves nothing remembered once the limits have been idle for
        MX_MEMORY and the pauses are over for as long as their growth counts; what is still
        in use or still lowered recently is kept.
        """
        backoff = Backoff(3, 60.0, "host-a")
        for i in range(1000):
            address = f"192.0.{i // 256}.{i % 256}"
            limit = backoff.limit(address, f"mx{i}.example [{address}]", T0)
            limit.acquire()
            backoff.session_feedback(address, Signal.OVERLOADED, "421 4.3.2 busy", T0)
            limit.release()
            backoff.done_with(address)
            backoff.domain_feedback(f"d{i}.example", Signal.RATE_LIMITED, str(RATE_LIMITED), T0)
        busy = backoff.limit("198.51.100.1", "busy.example [198.51.100.1]", T0)
        busy.acquire()
        self.assertEqual(backoff.size, 2001)
        backoff.sweep(T0 + MX_MEMORY - 1)
        self.assertEqual(backoff.size, 2001, "lowered limits forgotten before MX_MEMORY, or pauses whose growth still counts")
        backoff.sweep(T0 + MX_MEMORY)
        self.assertEqual(backoff.size, 1001, "idle lowered limits still remembered after MX_MEMORY")
        backoff.sweep(T0 + 60.0 + 60.0 * PAUSE_CAP)
        self.assertEqual(backoff.size, 1, "old pauses still remembered, or the busy address forgotten")
        self.assertEqual(backoff.concurrency("198.51.100.1"), 3)
        busy.release()
        backoff.sweep(T0 + 60.0 + 60.0 * PAUSE_CAP)
        self.assertEqual(backoff.size, 0)


# -- the sender on a Clock -----------------------------------------------------------------


class Router:
    """Every domain's mail goes to one MX."""

    def __init__(self, address: str = ADDRESS, port: int = 25) -> None:
        self.host = MXHost("mx.a.example", address, port)

    async def hosts(self, domain: str) -> list[MXHost]:
        return [self.host]

    def mark_bad(self, host: MXHost) -> None:
        pass

    def mark_good(self, host: MXHost) -> None:
        pass


class DomainRouter(Router):
    """Each domain's mail to its own MX address (127.0.0.10, .11, … in the order first asked)."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: dict[str, str] = {}

    async def hosts(self, domain: str) -> list[MXHost]:
        address = self.addresses.setdefault(domain, f"127.0.0.{10 + len(self.addresses)}")
        return [MXHost(f"mx.{domain}", address, 25)]


class Held:
    """
    A session function whose sessions wait until the test answers them (``answer``), each
    with one transaction's reply or a SessionFailed (a 421 greeting); ``running`` counts the
    sessions under way, per MX address.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Deferred[Reply]]] = []
        self.running: dict[str, int] = {}

    async def __call__(
        self,
        reactor: Any,
        host: str,
        address: str,
        port: int,
        transactions: list[Any],
        settings: Any,
        *,
        on_result: Callable[[TransactionResult], None],
        may_start: Callable[[Any], bool] | None = None,
        on_dot_sent: Any = None,
    ) -> list[TransactionResult]:
        (t,) = transactions
        answer: Deferred[Reply] = Deferred()
        self.calls.append((address, t.key, answer))
        self.running[address] = self.running.get(address, 0) + 1
        try:
            reply = await answer
        finally:
            self.running[address] -= 1
        if reply.code == 421:
            raise SessionFailed(reply)
        status = Status.SENT if reply.code < 300 else Status.for_code(reply.code)
        result = TransactionResult(t.key, True, dict.fromkeys(t.recipients, RecipientResult(status, reply)))
        on_result(result)
        return [result]

    def answer(self, index: int, reply: Reply) -> None:
        self.calls[index][2].callback(reply)


class CountingStore:
    """The store, counting how often each envelope is claimed."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.claims: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        claimed = await self._store.claim(*args, **kwargs)
        for envelope in claimed:
            self.claims[envelope.id] = self.claims.get(envelope.id, 0) + 1
        return claimed


class Script:
    """
    A session function answering from a script: ``greeting`` (a reply) fails every session
    as a 421 greeting would; otherwise each transaction takes the next of ``replies`` (250
    when none is left), and a 421 ends the session: the transactions after it are not started.
    """

    def __init__(self) -> None:
        self.greeting: Reply | None = None
        self.replies: list[Reply] = []
        self.sessions: list[list[object]] = []

    async def __call__(
        self,
        reactor: Any,
        host: str,
        address: str,
        port: int,
        transactions: list[Any],
        settings: Any,
        *,
        on_result: Callable[[TransactionResult], None],
        may_start: Callable[[Any], bool] | None = None,
        on_dot_sent: Any = None,
    ) -> list[TransactionResult]:
        self.sessions.append([t.key for t in transactions])
        if self.greeting is not None:
            raise SessionFailed(self.greeting)
        ended: Reply | None = None
        results = []
        for t in transactions:
            if ended is not None or (may_start is not None and not may_start(t)):
                reply = ended or Reply(451, "4.3.0 transaction held back by mmgun; nothing sent")
                results.append(TransactionResult(t.key, False, dict.fromkeys(t.recipients, RecipientResult(Status.DEFERRED, reply))))
            else:
                reply = self.replies.pop(0) if self.replies else Reply(250, "2.0.0 Ok")
                status = Status.SENT if reply.code < 300 else Status.for_code(reply.code)
                results.append(TransactionResult(t.key, True, dict.fromkeys(t.recipients, RecipientResult(status, reply))))
                if reply.code == 421:
                    ended = reply
            on_result(results[-1])
        return results


class SenderBackoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.clock = Clock()
        self.clock.advance(T0)
        self.smtp = Script()
        self.metrics = Metrics()
        self.sender = self.make_sender("host-a", per_session=100)

    def make_sender(self, owner: str, *, router: Any = None, session: Any = None, store: Any = None, **settings: Any) -> Sender:
        values: dict[str, Any] = {"max_per_destination": 4, "destination_pause": 60.0, "retry_min": 300.0, **settings}
        return Sender(
            store or self.store, router or Router(), self.clock, SMTPSettings(helo="mmgun.test"), SenderSettings(**values),
            session=session or self.smtp, rng=random.Random(1), owner=owner, metrics=self.metrics,
        )

    def submit(self, recipient: str = "x@a.example") -> str:
        sub = NewSubmission(uuid.uuid4().hex, "c1", "me@example.com", (recipient,), b"Subject: x\r\n\r\nhi\r\n", self.clock.seconds())
        return str(result(self, self.store.add_submission(sub)))

    def poll(self, sender: Sender | None = None) -> None:
        self.successResultOf((sender or self.sender).poll())

    def recipient(self, submission_id: str) -> Any:
        return result(self, self.store.submission("c1", submission_id)).recipients[0]

    def queued(self, submission_id: str) -> Any:
        (entry,) = [e for e in result(self, self.store.queue_entries(self.clock.seconds())) if e.submission_id == submission_id]
        return entry

    def test_rate_limit_pauses_the_domain_without_attempts(self) -> None:
        """
        issue 18 destination back-off: "421 4.7.28 … rate limited" to one transaction pauses
        a.example: the session's later transaction and mail claimed afterwards are not sent —
        put back due at the pause's end with no attempt counted — the pause is in the store;
        once it ends the mail goes.
        """
        self.smtp.replies = [Reply(250, "2.0.0 Ok"), RATE_LIMITED]
        first, limited, unstarted = self.submit(), self.submit(), self.submit()
        self.poll()
        self.assertEqual(self.recipient(first).status, "sent")
        self.assertEqual((self.recipient(limited).status, self.recipient(limited).attempts), ("deferred", 1))
        self.poll()  # the unstarted one was released; claimed again, it waits for the pause
        later = self.submit()
        self.poll()
        self.assertEqual(len(self.smtp.sessions), 1, "a session was opened to a paused domain")
        for sid in (unstarted, later):
            entry = self.queued(sid)
            self.assertEqual((entry.attempts, entry.next_attempt, entry.leased), (0, T0 + 60.0, False))
            self.assertEqual(self.recipient(sid).last_reply, None)
        (stored,) = [b for b in result(self, self.store.backoffs(T0)) if b.kind == "domain"]
        self.assertEqual((stored.name, stored.until, stored.reply, stored.sender), ("a.example", T0 + 60.0, str(RATE_LIMITED), "host-a"))
        self.clock.advance(59.0)
        self.poll()
        self.assertEqual(len(self.smtp.sessions), 1)
        self.clock.advance(1.0)
        self.poll()
        self.assertEqual(len(self.smtp.sessions), 2)
        self.assertEqual([(self.recipient(s).status, self.recipient(s).attempts) for s in (unstarted, later)], [("sent", 1)] * 2)
        self.assertEqual(self.metrics.registry.get_sample_value("mmgun_destination_backoffs_total", {"kind": "domain"}), 1.0)

    def test_other_sender_honours_a_stored_pause(self) -> None:
        """issue 18 destination back-off: a second sender on the same database holds a.example's mail while the first's pause lasts."""
        self.smtp.greeting = RATE_LIMITED
        self.submit()
        self.poll()
        other = self.make_sender("host-b")
        self.smtp.greeting = None
        waiting = self.submit()
        self.poll(other)
        self.assertEqual(len(self.smtp.sessions), 1)
        self.assertEqual((self.queued(waiting).attempts, self.queued(waiting).next_attempt), (0, T0 + 60.0))

    def test_421_lowers_mx_concurrency_and_successes_raise_it(self) -> None:
        """
        issue 18 destination back-off: each 421 greeting lowers the MX's limit by one down to 1
        (stored for mmgun stats); successful transactions raise it again to the maximum,
        when the stored entry ends.
        """
        sender = self.make_sender("host-c", per_session=1)
        self.smtp.greeting = Reply(421, "4.3.2 Service not available")
        for _ in range(5):
            self.submit()
        self.poll(sender)
        self.assertEqual(len(self.smtp.sessions), 5)
        self.assertEqual(sender.backoff.concurrency(ADDRESS), 1)
        (stored,) = result(self, self.store.backoffs(T0))
        self.assertEqual((stored.kind, stored.name, stored.concurrency, stored.sender), ("mx", f"mx.a.example [{ADDRESS}]", 1, "host-c"))
        self.smtp.greeting = None
        self.clock.advance(400.0)
        self.poll(sender)  # the five deferred ones: 1 → 2 → 3 (after 1 + 2 successes), and 2 more
        self.assertEqual(sender.backoff.concurrency(ADDRESS), 3)
        self.assertEqual([b.concurrency for b in result(self, self.store.backoffs(self.clock.seconds()))], [3])
        for _ in range(3):
            self.submit()
        self.poll(sender)
        self.assertEqual(sender.backoff.concurrency(ADDRESS), 4)
        self.assertEqual(result(self, self.store.backoffs(self.clock.seconds())), [], "an MX back at its maximum is still shown")

    def test_tls_failure_lowers_nothing(self) -> None:
        """issue 18 destination back-off: a TLS policy failure (mmgun's own 421 4.7.x) says nothing about the MX's load."""
        self.smtp.greeting = Reply(421, "4.7.0 mx.a.example does not offer STARTTLS; TLS is required")
        self.submit()
        self.poll()
        self.assertEqual(self.sender.backoff.concurrency(ADDRESS), 4)
        self.assertEqual(result(self, self.store.backoffs(T0)), [])


    def test_own_replies_naming_a_rate_host_pause_nothing(self) -> None:
        """
        issue 18 review BF item 1: mmgun's own "421 4.4.1 connection refused by
        mx.first-rate.example" lowers the MX's concurrency (an overload) but pauses no domain;
        the same words in a reply the peer really sent ("too many connections … try later") do.
        Its MTA-STS failure naming first-rate.com changes nothing at all.
        """
        self.smtp.greeting = Reply(
            421,
            "4.7.5 MTA-STS policy of first-rate.com requires TLS with a certificate valid for mx.first-rate.com: "
            "421 4.7.0 mx.first-rate.com does not offer STARTTLS; TLS is required",
        )
        self.submit()
        self.poll()
        self.assertEqual((self.sender.backoff.concurrency(ADDRESS), result(self, self.store.backoffs(T0))), (4, []))
        self.smtp.greeting = Reply(421, "4.4.1 connection refused by mx.first-rate.example [127.0.0.2]")
        self.submit()
        self.poll()
        self.assertEqual(self.sender.backoff.concurrency(ADDRESS), 3)
        self.assertEqual([b.kind for b in result(self, self.store.backoffs(T0))], ["mx"])
        self.assertIsNone(self.sender.backoff.paused("a.example", T0))
        self.smtp.greeting = Reply(421, "Too many connections from 192.0.2.1 at mx.first-rate.example, try later", received=True)
        self.submit()
        self.poll()
        self.assertEqual([b.kind for b in result(self, self.store.backoffs(T0))], ["domain", "mx"])

    def test_held_back_for_a_pause_due_at_its_end_not_claimed_again(self) -> None:
        """
        issue 18 review BF item 6: the transaction a session did not start after "421 4.7.28 …
        rate limited" is released due at the pause's end — not due now, claimed again at once
        and put back a second time.
        """
        store = CountingStore(self.store)
        sender = self.make_sender("host-d", store=store)
        self.smtp.replies = [RATE_LIMITED]
        limited, unstarted = self.submit(), self.submit()
        self.poll(sender)
        entry = self.queued(unstarted)
        self.assertEqual((entry.attempts, entry.next_attempt, entry.leased), (0, T0 + 60.0, False))
        self.assertEqual(sorted(store.claims.values()), [1, 1], "an envelope was claimed again during the pause")
        self.assertEqual(self.recipient(limited).attempts, 1)

    def test_feedback_failure_never_loses_a_sent_result(self) -> None:
        """issue 18 review BF item 7: a bug in the back-off feedback is logged; the 250 it came with is still recorded as sent."""

        def broken(*args: object) -> None:
            raise RuntimeError("feedback bug")

        self.sender.backoff.session_feedback = broken  # type: ignore[method-assign,assignment]
        sid = self.submit()
        self.poll()
        self.assertEqual((self.recipient(sid).status, self.recipient(sid).attempts), ("sent", 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_sessions_waiting_on_the_mx_never_exceed_the_lowered_limit(self) -> None:
        """
        issue 18 review BF item 8: sessions that stay open (answered later, one message each)
        to one MX: 4 at once at the start; each 421 greeting lowers the limit and no new
        session starts while as many run; at no time do more run than the limit.
        """
        held = Held()
        sender = self.make_sender("host-e", session=held, per_session=1)
        for _ in range(8):
            self.submit()
        self.poll(sender)
        self.assertEqual((len(held.calls), held.running[ADDRESS]), (4, 4))
        seen = []
        for index in range(3):
            held.answer(index, Reply(421, "4.3.2 Service not available", received=True))
            seen.append((sender.backoff.concurrency(ADDRESS), held.running[ADDRESS], len(held.calls)))
        self.assertEqual(seen, [(3, 3, 4), (2, 2, 4), (1, 1, 4)])
        held.answer(3, Reply(250, "2.0.0 Ok", received=True))  # 1 success at limit 1: back to 2
        self.assertEqual((sender.backoff.concurrency(ADDRESS), held.running[ADDRESS], len(held.calls)), (2, 2, 6))
        while any(not d.called for _, _, d in held.calls):
            index = next(i for i, (_, _, d) in enumerate(held.calls) if not d.called)
            held.answer(index, Reply(250, "2.0.0 Ok", received=True))
            self.assertLessEqual(held.running[ADDRESS], sender.backoff.concurrency(ADDRESS))
        self.assertEqual(len(held.calls), 8)

    def test_slow_mx_does_not_starve_other_domains(self) -> None:
        """
        issue 18 review BF item 2: --max-in-flight 10, slow.example's MX at 1 session that
        never answers and 10 messages for it claimed first: beyond one round of sessions at its
        limit (here 1 envelope) waiting for that MX the rest go back to the queue (unattempted,
        due in retry-min/10), so the
        mail for other.example queued after them is claimed and delivered while the slow
        session still hangs.
        """
        held = Held()
        router = DomainRouter()
        sender = self.make_sender("host-f", router=router, session=held, per_session=1, max_per_destination=2, max_in_flight=10)
        # First its MX says it is overloaded: its limit goes from 2 to 1 (a healthy MX's waiting mail is never capped).
        first = self.submit("x@slow.example")
        self.poll(sender)
        slow_address = router.addresses["slow.example"]
        held.answer(0, Reply(421, "4.3.2 Service not available", received=True))
        self.assertEqual(sender.backoff.concurrency(slow_address), 1)
        self.assertEqual(self.queued(first).attempts, 1)
        self.clock.advance(1)
        slow = [self.submit("x@slow.example") for _ in range(10)]
        other = [self.submit("y@other.example") for _ in range(2)]
        self.poll(sender)
        self.assertEqual(held.running[slow_address], 1)
        for _ in range(2):
            for index, (address, _, answer) in enumerate(held.calls):
                if address != slow_address and not answer.called:
                    held.answer(index, Reply(250, "2.0.0 Ok", received=True))
        self.assertEqual([self.recipient(s).status for s in other], ["sent", "sent"])
        self.assertEqual(held.running[slow_address], 1, "the slow session ended")
        queued = [self.queued(s) for s in slow]
        waiting = [q for q in queued if q.leased]
        put_back = [(q.attempts, q.next_attempt) for q in queued if not q.leased]
        self.assertEqual(len(waiting), 2, "one in the session and one waiting for it")
        self.assertEqual(put_back, [(0, T0 + 1 + 30.0)] * 8)
        for _ in range(2):
            held.answer(next(i for i, c in enumerate(held.calls) if c[0] == slow_address and not c[2].called), Reply(250, "2.0.0 Ok", received=True))


    def test_a_healthy_mx_keeps_its_whole_backlog_waiting(self) -> None:
        """
        issue 18 (bench finding): with its limit at the maximum, one MX's claimed backlog waits for
        its sessions as before — none is put back for retry-min/10 (a 100,000-envelope backlog to
        one destination had its last 10% drained at a quarter of the rate).
        """
        held = Held()
        router = DomainRouter()
        sender = self.make_sender("host-h", router=router, session=held, per_session=1, max_per_destination=2, max_in_flight=10)
        backlog = [self.submit("x@busy.example") for _ in range(10)]
        self.poll(sender)
        address = router.addresses["busy.example"]
        self.assertEqual(held.running[address], 2)
        self.assertEqual([self.queued(s).leased for s in backlog], [True] * 10, "all claimed, none put back")
        for _ in range(10):
            held.answer(next(i for i, c in enumerate(held.calls) if not c[2].called), Reply(250, "2.0.0 Ok", received=True))
        self.assertEqual([self.recipient(s).status for s in backlog], ["sent"] * 10)

    def test_sender_forgets_lowered_addresses_once_idle(self) -> None:
        """
        issue 18 review BF item 5: 30 domains, each on its own MX address answering "421 4.3.2"
        (30 lowered limits remembered); MX_MEMORY later, with that mail not yet due again, the
        next routing (to another domain) sweeps them all away.
        """
        router = DomainRouter()
        sender = self.make_sender("host-g", router=router, retry_min=3600.0)
        self.smtp.greeting = Reply(421, "4.3.2 Service not available", received=True)
        for i in range(30):
            self.submit(f"x@d{i}.example")
        self.poll(sender)
        self.assertEqual(sender.backoff.size, 30)
        self.smtp.greeting = None
        self.clock.advance(MX_MEMORY)
        self.submit("x@new.example")
        self.poll(sender)
        self.assertEqual(sender.backoff.size, 0)


class StatsTests(SynchronousTestCase):
    def test_stats_shows_destinations_backed_off(self) -> None:
        """issue 18 destination back-off: mmgun stats (and --json) lists paused domains and lowered MX hosts."""
        store, path = sync_store(self)
        entries = [
            BackoffEntry("domain", "gmail.com", "host-a", T0 + 60, str(RATE_LIMITED), updated_at=T0),
            BackoffEntry("mx", "mx.b.example [192.0.2.7]", "host-a", T0 + 600, "421 4.3.2 busy", concurrency=2, updated_at=T0),
            BackoffEntry("domain", "ended.example", "host-b", T0 - 1, "451 4.7.1 rate", updated_at=T0 - 61),
        ]
        result(self, store.save_backoffs(entries, T0 - 100))

        def stats(*args: str) -> str:
            out, err = io.StringIO(), io.StringIO()
            code = admin_main(["stats", "--database", path, *args], now=lambda: T0, environ={}, stdout=out, stderr=err)
            self.assertEqual((code, err.getvalue()), (0, ""))
            return out.getvalue()

        text = stats()
        self.assertIn(
            "destinations backed off:\n"
            "  kind    destination               until                 sessions  by      reply\n"
            "  domain  gmail.com                 2027-01-15T08:01:00Z  -         host-a  421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail; rate limited\n"
            "  mx      mx.b.example [192.0.2.7]  2027-01-15T08:10:00Z  2         host-a  421 4.3.2 busy\n",
            text,
        )
        document = json.loads(stats("--json"))
        self.assertEqual(
            [(b["kind"], b["name"], b["concurrency"], b["until"]) for b in document["backed_off"]],
            [("domain", "gmail.com", None, "2027-01-15T08:01:00.000Z"), ("mx", "mx.b.example [192.0.2.7]", 2, "2027-01-15T08:10:00.000Z")],
        )


# -- against a real SMTP server on 127.0.0.1 -------------------------------------------------


class _Refuser(Protocol):
    """What a busy MX does: one reply line at connect, then it hangs up."""

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.line + b"\r\n")
        self.transport.loseConnection()


class _Counted(ProtocolWrapper):
    """A connection to ScriptedMX, noting when it starts its transaction (MAIL FROM) and when it ends (QUIT)."""

    factory: ScriptedMX
    mailing = False
    quitting = False

    def dataReceived(self, data: bytes) -> None:
        upper = data.upper()
        if b"MAIL FROM" in upper and not self.mailing:
            self.mailing = True
            self.factory.seen.append(sum(1 for p in self.factory.protocols if p.mailing and not p.quitting))
        if b"QUIT" in upper:
            self.quitting = True
        super().dataReceived(data)


class ScriptedMX(WrappingFactory):
    """
    The twisted.mail stub server (mmgun.testing.smtpserver), counting the sessions in a
    transaction at once: at each MAIL FROM, how many connections are between their MAIL FROM
    and their QUIT (``seen``; ``peak``, the most). A count at connect time would include
    sessions the sender has finished whose QUIT the server has not read yet. While
    ``refuse_with`` is set, each new connection gets that line and is closed.
    """

    protocol = _Counted
    protocols: dict[_Counted, int]

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.refuse_with: bytes | None = None
        self.connections = 0
        self.seen: list[int] = []

    @property
    def peak(self) -> int:
        return max(self.seen, default=0)

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        if self.refuse_with is not None:
            return _Counted(cast(Any, self), _Refuser(self.refuse_with))
        return super().buildProtocol(addr)


class LoopbackTests(TestCase):
    """A real twisted.mail ESMTP server on 127.0.0.1 and the real SMTP client; a deadline on every wait."""

    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.mailbox = Mailbox()
        self.mx = ScriptedMX(smtp_server_factory(reactor, self.mailbox, tls=False, timeout=None))
        self.port = reactor.listenTCP(0, cast(Any, self.mx), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.store = SQLiteStore.open_sync(self.mktemp() + ".sqlite3")
        self.addCleanup(self.store.close)

    def make_sender(self, reactor: Any, wall: Callable[[], float] | None = None) -> Sender:
        settings = SenderSettings(
            max_per_destination=4, per_session=1, cache_time=0, retry_min=300.0, destination_pause=60.0, poll_interval=0.01
        )
        return Sender(
            self.store, Router("127.0.0.1", cast(Any, self.port.getHost()).port), reactor, SMTPSettings(helo="mmgun.test", command_timeout=10.0),
            settings, rng=random.Random(1), owner="loopback", wall=wall,
        )

    def submit(self, at: float) -> str:
        sub = NewSubmission(uuid.uuid4().hex, "c1", "me@example.com", ("x@a.example",), b"Subject: x\r\n\r\nhi\r\n", at)
        return str(self.successResultOf(Deferred.fromCoroutine(self.store.add_submission(sub))))

    async def until(self, what: str, check: Callable[[], bool], seconds: float = 20.0) -> None:
        deadline = self.reactor.seconds() + seconds
        while not check():
            if self.reactor.seconds() > deadline:
                self.fail(f"not within {seconds:g} s: {what}")
            await deferLater(self.reactor, 0.01, lambda: None)

    async def closed(self) -> None:
        """Every session has ended (QUIT answered, sockets closed): nothing left for the reactor."""
        await self.until("every connection closed", lambda: not self.mx.protocols)
        await deferLater(self.reactor, 0.05, lambda: None)

    def statuses(self, sids: list[str]) -> list[str]:
        states = [self.successResultOf(Deferred.fromCoroutine(self.store.submission("c1", s))) for s in sids]
        return [state.recipients[0].status if state is not None else "missing" for state in states]

    async def test_server_answering_421_sees_fewer_sessions(self) -> None:
        """
        issue 18 destination back-off: 4 sessions at once to the MX while it accepts; once it
        answers 421 to every connection the sender's limit falls to 1, and when it accepts again
        the server sees the sessions come back one at a time, then 2, never the 4 of before.
        """
        sender = self.make_sender(self.reactor)
        sids = [self.submit(self.reactor.seconds()) for _ in range(8)]
        await sender.poll()
        await self.until("8 messages delivered", lambda: len(self.mailbox) == 8 and self.statuses(sids) == ["sent"] * 8)
        self.assertEqual(self.mx.peak, 4)
        self.mx.refuse_with = b"421 4.3.2 mx.test Service not available, closing transmission channel"
        refused = [self.submit(self.reactor.seconds()) for _ in range(6)]
        await sender.poll()
        await self.until("6 refused and deferred", lambda: self.statuses(refused) == ["deferred"] * 6)
        self.assertEqual(sender.backoff.concurrency("127.0.0.1"), 1)
        self.mx.refuse_with = None
        self.mx.seen.clear()
        sids = [self.submit(self.reactor.seconds()) for _ in range(8)]
        await sender.poll()
        await self.until("8 more delivered", lambda: len(self.mailbox) == 16 and self.statuses(sids) == ["sent"] * 8)
        self.assertEqual(self.mx.seen[0], 1, "the first session after the 421s was not alone")
        self.assertLessEqual(self.mx.peak, 3)
        self.assertEqual(sender.backoff.concurrency("127.0.0.1"), 4)
        await self.closed()

    async def test_rate_limited_domain_gets_no_connection_until_the_pause_ends(self) -> None:
        """
        issue 18 destination back-off: the MX greets "421 4.7.28 … rate limited": a.example is
        paused 60 s of the test's Clock (the sender's wall clock: what pauses and due times are
        judged by); mail claimed meanwhile makes no connection and waits, unattempted, due at
        the pause's end; then it goes.
        """
        wall = Clock()
        wall.advance(T0)
        sender = self.make_sender(self.reactor, wall=wall.seconds)
        self.mx.refuse_with = b"421 4.7.28 [127.0.0.1] Our system has detected an unusual rate of unsolicited mail; rate limited"
        limited = self.submit(T0)
        await sender.poll()
        await self.until("the rate-limited one deferred", lambda: self.statuses([limited]) == ["deferred"])
        self.assertEqual(self.mx.connections, 1)
        self.mx.refuse_with = None
        waiting = [self.submit(T0) for _ in range(2)]
        await sender.poll()
        wall.advance(59.0)
        waiting.append(self.submit(T0 + 59.0))
        # A step of the wall clock holds claims for two polls (mmgun.sender): poll until claimed.
        await self.until("the last one claimed and put back", lambda: self.polled(sender) and self.entry(waiting[-1]).next_attempt == T0 + 60.0)
        self.assertEqual([(self.entry(s).attempts, self.entry(s).next_attempt) for s in waiting], [(0, T0 + 60.0)] * 3)
        self.assertEqual(self.mx.connections, 1, "connected to a paused domain's MX")
        wall.advance(1.0)
        await self.until("the waiting ones delivered", lambda: self.polled(sender) and self.statuses(waiting) == ["sent"] * 3)
        self.assertEqual((len(self.mailbox), self.mx.connections), (3, 4))
        await self.closed()

    def polled(self, sender: Sender) -> bool:
        sender.poll()
        return True

    def entry(self, submission_id: str) -> Any:
        entries = self.successResultOf(Deferred.fromCoroutine(self.store.queue_entries(T0)))
        (found,) = [e for e in entries if e.submission_id == submission_id]
        return found
