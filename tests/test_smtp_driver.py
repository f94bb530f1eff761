"""
The sans-I/O transaction driver (mmgun.smtp.driver), fed plain lists of replies: no
transport, no reactor. Most scenarios run twice, with and without PIPELINING, and must
end in the same results; only the grouping of the writes differs.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from mmgun.smtp import RecipientResult, Reply, Status, Transaction, TransactionResult
from mmgun.smtp.driver import Action, Done, Driver, GiveUp, SendBody, Write
from mmgun.smtp.wire import Extensions

HOST = "mx.example"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"
# 8-bit in the body only: a UTF-8 header field (RFC 6532) needs SMTPUTF8 too (issue 18).
EIGHT_BIT = "Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nCaf\u00e9.\r\n".encode()
OK = "250 2.0.0 Ok"


def tx(key: str, *recipients: str, message: bytes = MESSAGE) -> Transaction:
    return Transaction(key, "a@example.com", recipients or ("b@example.net",), message)


def mail(key: str = "a@example.com") -> bytes:
    return b"MAIL FROM:<" + key.encode() + b">\r\n"


def rcpt(address: str = "b@example.net") -> bytes:
    return b"RCPT TO:<" + address.encode() + b">\r\n"


GROUP = mail() + rcpt() + b"DATA\r\n"
BODY = MESSAGE + b".\r\n"


class Run:
    """A driver and what it did: each write (the body of a 354 written as the session would), its end."""

    def __init__(
        self,
        transactions: list[Transaction],
        *,
        pipelining: bool,
        eight_bit_mime: bool = True,
        may_start: Callable[[Transaction], bool] | None = None,
        rset: bool = False,
    ) -> None:
        self.reported: list[TransactionResult] = []
        self.driver = Driver(
            HOST,
            transactions,
            Extensions(pipelining=pipelining, eight_bit_mime=eight_bit_mime),
            may_start=may_start,
            on_result=self.reported.append,
        )
        self.writes: list[bytes] = []
        self.end: Done | GiveUp | None = None
        #: When set, a 354 is not answered with the body (the test sends it with body()).
        self.hold_body = False
        self._do(self.driver.start(rset=rset))

    def _do(self, action: Action) -> None:
        assert self.end is None, f"an action after the end: {action}"
        if isinstance(action, Write):
            self.writes.append(action.data)
        elif isinstance(action, SendBody):
            if not self.hold_body:
                self.body(action.transaction)
        elif action is not None:
            self.end = action

    def body(self, transaction: Transaction) -> None:
        # As the session does with PIPELINING (one write: body, ".", next group) or without (".").
        self.writes.append(transaction.payload() + self.driver.end_of_body(then_next=True))

    def feed(self, *replies: str) -> None:
        for reply in replies:
            code, _, text = reply.partition(" ")
            self._do(self.driver.reply(int(code), text))

    def statuses(self) -> list[dict[str, tuple[Status, int]]]:
        return [{a: (r.status, r.reply.code) for a, r in result.recipients.items()} for result in self.driver.results]


BOTH = (False, True)


class DeliveryTests(SynchronousTestCase):
    def test_two_messages_without_pipelining_one_command_a_write(self) -> None:
        """issue 18 restructuring: without PIPELINING each command waits for the previous reply."""
        run = Run([tx("env1"), tx("env2")], pipelining=False)
        self.assertEqual(run.writes, [mail()])
        run.feed(OK)
        self.assertEqual(run.writes[-1], rcpt())
        run.feed(OK)
        self.assertEqual(run.writes[-1], b"DATA\r\n")
        run.feed("354 go", OK, OK, OK, "354 go", OK)
        self.assertEqual(run.writes, [mail(), rcpt(), b"DATA\r\n", BODY, mail(), rcpt(), b"DATA\r\n", BODY])
        self.assertEqual(run.end, Done(rset_due=False))
        self.assertEqual(run.statuses(), [{"b@example.net": (Status.SENT, 250)}] * 2)

    def test_two_messages_with_pipelining_grouped(self) -> None:
        """issue 18 restructuring: PIPELINING writes the queued commands at once, the next group behind the "."."""
        run = Run([tx("env1"), tx("env2")], pipelining=True)
        self.assertEqual(run.writes, [GROUP])
        run.feed(OK, OK, "354 go")
        self.assertEqual(run.writes, [GROUP, BODY + GROUP])
        run.feed(OK, OK, OK, "354 go", OK)
        self.assertEqual(run.writes, [GROUP, BODY + GROUP, BODY])
        self.assertEqual(run.end, Done(rset_due=False))
        self.assertEqual(run.statuses(), [{"b@example.net": (Status.SENT, 250)}] * 2)

    def test_each_result_reported_once_in_order(self) -> None:
        """issue 18 restructuring: every started transaction's result goes once to on_result, as it is known."""
        for pipelining in BOTH:
            run = Run([tx("env1"), tx("env2", "nobody@example.net")], pipelining=pipelining)
            run.feed(OK, OK, "354 go")
            self.assertEqual([r.key for r in run.reported], [])
            run.feed(OK)
            self.assertEqual([r.key for r in run.reported], ["env1"])
            run.feed(OK, "550 5.1.1 no such user")
            if pipelining:
                run.feed("503 5.5.1 no valid recipients")  # to its DATA
            self.assertEqual(run.end, Done(rset_due=True))
            self.assertEqual(run.reported, run.driver.results)
            self.assertEqual([r.key for r in run.reported], ["env1", "env2"])

    def test_refused_mail_from(self) -> None:
        """issue 18 restructuring: a refused MAIL FROM fails every recipient (not at RCPT); no RSET after."""
        for pipelining in BOTH:
            run = Run([tx("env1", "b@example.net", "c@example.net"), tx("env2")], pipelining=pipelining)
            run.feed("550 5.7.1 sender refused")
            if pipelining:
                # The RCPTs and DATA sent with it get their 503s: read, ignored.
                self.assertEqual(len(run.writes), 1)
                run.feed("503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL")
            self.assertEqual(run.writes[-1], GROUP if pipelining else mail())
            refused = run.driver.results[0].recipients
            self.assertEqual(set(refused.values()), {RecipientResult("failed", Reply(550, "5.7.1 sender refused"))})
            self.assertFalse(any(r.at_rcpt for r in refused.values()))
            self.assertNotIn(b"RSET", b"".join(run.writes))

    def test_every_recipient_refused_then_rset(self) -> None:
        """issue 18 restructuring: no recipient accepted: no message; RSET before the next transaction."""
        for pipelining, data_reply in ((False, None), (True, "554 5.5.1 no valid recipients"), (True, "354 go")):
            run = Run([tx("env1", "nobody@example.net"), tx("env2")], pipelining=pipelining)
            run.feed(OK, "550 5.1.1 no such user")
            self.assertEqual(run.driver.results[0].recipients["nobody@example.net"].status, Status.FAILED)
            self.assertTrue(run.driver.results[0].recipients["nobody@example.net"].at_rcpt)
            if not pipelining:
                self.assertEqual(run.writes[-1], b"RSET\r\n")  # no DATA was written
                run.feed(OK)
                self.assertEqual(run.writes[-1], mail())
                continue
            assert data_reply is not None
            run.feed(data_reply)
            if data_reply.startswith("354"):
                # RFC 2920 3.1: a single "." after a 354 with no recipient accepted.
                self.assertEqual(run.writes[-1], b".\r\n")
                run.feed("554 5.5.1 no valid recipients")
            self.assertEqual(run.writes[-1], b"RSET\r\n" + GROUP)
            self.assertNotIn(MESSAGE, b"".join(run.writes))

    def test_one_recipient_of_two_refused(self) -> None:
        """issue 18 restructuring: the refused one keeps its RCPT reply; the other gets the reply to "."."""
        for pipelining in BOTH:
            run = Run([tx("env1", "nobody@example.net", "b@example.net")], pipelining=pipelining)
            run.feed(OK, "550 5.1.1 no such user", OK, "354 go", "250 2.0.0 queued")
            self.assertEqual(
                run.statuses(), [{"nobody@example.net": (Status.FAILED, 550), "b@example.net": (Status.SENT, 250)}]
            )

    def test_data_refused_and_data_answered_250(self) -> None:
        """issue 18 restructuring: DATA refused fails the accepted recipients; a 250 to DATA is not a 354."""
        for pipelining in BOTH:
            for reply, expected in (
                ("554 5.3.4 no", RecipientResult("failed", Reply(554, "5.3.4 no"))),
                (
                    "250 2.0.0 what",
                    RecipientResult("deferred", Reply(451, f"4.5.0 {HOST} answered DATA with 250 2.0.0 what")),
                ),
            ):
                run = Run([tx("env1"), tx("env2")], pipelining=pipelining)
                run.feed(OK, OK, reply)
                self.assertEqual(run.driver.results[0].recipients["b@example.net"], expected)
                self.assertTrue(run.writes[-1].startswith(b"RSET\r\n"))

    def test_reply_to_dot_temporary_failure(self) -> None:
        """issue 18 restructuring: a 4xx to "." defers, and the next transaction starts after RSET."""
        run = Run([tx("env1"), tx("env2")], pipelining=False)
        run.feed(OK, OK, "354 go", "451 4.3.0 try later")
        self.assertEqual(run.statuses(), [{"b@example.net": (Status.DEFERRED, 451)}])
        self.assertEqual(run.writes[-1], b"RSET\r\n")

    def test_reply_before_the_end_of_the_body(self) -> None:
        """issue 18 restructuring: a reply between the 354 and the end of the message ends the session."""
        for pipelining in BOTH:
            run = Run([tx("env1")], pipelining=pipelining)
            run.hold_body = True
            run.feed(OK, OK, "354 go", "250 2.0.0 queued")
            self.assertIsInstance(run.end, GiveUp)
            assert isinstance(run.end, GiveUp)
            self.assertEqual(run.end.then, "abort")
            result = run.driver.results[0].recipients["b@example.net"]
            self.assertEqual(result.status, Status.DEFERRED)
            self.assertIn("before the end of the message data", result.reply.text)


class EightBitTests(SynchronousTestCase):
    def test_eight_bit_refused_without_8bitmime_before_any_command(self) -> None:
        """issue 18 restructuring: 8-bit without 8BITMIME fails 554 5.6.3 with nothing written; the next goes."""
        for pipelining in BOTH:
            run = Run([tx("env8", message=EIGHT_BIT), tx("env1")], pipelining=pipelining, eight_bit_mime=False)
            self.assertEqual(run.writes, [GROUP if pipelining else mail()])
            self.assertEqual(run.driver.results[0].recipients["b@example.net"].reply.code, 554)
            self.assertIn("5.6.3", run.driver.results[0].recipients["b@example.net"].reply.text)
            self.assertEqual([r.key for r in run.reported], ["env8"])

    def test_eight_bit_with_8bitmime_says_body(self) -> None:
        """issue 18 restructuring: MAIL FROM carries BODY=8BITMIME for an 8-bit message only."""
        run = Run([tx("env8", message=EIGHT_BIT)], pipelining=False)
        self.assertEqual(run.writes, [b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\n"])


class HoldBackTests(SynchronousTestCase):
    def test_may_start_false_before_the_first(self) -> None:
        """issue 18 restructuring: a transaction held back: nothing written, the session QUITs."""
        for pipelining in BOTH:
            run = Run([tx("env1"), tx("env2")], pipelining=pipelining, may_start=lambda t: False)
            self.assertEqual(run.writes, [])
            self.assertIsInstance(run.end, GiveUp)
            assert isinstance(run.end, GiveUp)
            self.assertEqual((run.end.then, run.end.reason.code), ("quit", 421))
            self.assertTrue(run.driver.held)
            unstarted = run.driver.abandon(run.end.reason)
            self.assertEqual([(r.key, r.started) for r in unstarted], [("env1", False), ("env2", False)])
            self.assertEqual(run.reported, [])

    def test_group_behind_the_dot_then_held_back_aborts(self) -> None:
        """issue 18 restructuring: its commands already went out behind the ".": drop the connection, no QUIT."""
        allowed = {"env1", "env2"}
        run = Run([tx("env1"), tx("env2")], pipelining=True, may_start=lambda t: t.key in allowed)
        run.feed(OK, OK, "354 go")
        self.assertEqual(run.writes[-1], BODY + GROUP)
        allowed.discard("env2")
        run.feed(OK)
        assert isinstance(run.end, GiveUp)
        self.assertEqual((run.end.then, run.end.reason.code), ("abort", 451))
        self.assertEqual([(r.key, r.started) for r in run.driver.abandon(run.end.reason)], [("env2", False)])

    def test_held_back_at_the_dot_nothing_goes_behind_it(self) -> None:
        """issue 18 restructuring: asked before writing the next group behind the ".": nothing behind it, then QUIT."""
        run = Run([tx("env1"), tx("env2")], pipelining=True, may_start=lambda t: t.key == "env1")
        run.feed(OK, OK, "354 go")
        self.assertEqual(run.writes[-1], BODY)
        run.feed(OK)
        assert isinstance(run.end, GiveUp)
        self.assertEqual(run.end.then, "quit")
        self.assertEqual(run.statuses(), [{"b@example.net": (Status.SENT, 250)}])


class AbandonTests(SynchronousTestCase):
    def test_lost_mid_transaction(self) -> None:
        """issue 18 restructuring: the one under way is deferred and reported; the rest are not started."""
        for pipelining in BOTH:
            run = Run([tx("env1"), tx("env2"), tx("env3")], pipelining=pipelining)
            run.feed(OK, OK, "354 go", OK, OK)
            lost = Reply(451, "4.4.2 connection lost")
            unstarted = run.driver.abandon(lost)
            self.assertEqual([(r.key, r.started) for r in run.reported], [("env1", True), ("env2", True)])
            self.assertEqual(run.reported[1].recipients["b@example.net"], RecipientResult("deferred", lost))
            self.assertEqual([(r.key, r.started) for r in unstarted], [("env3", False)])

    def test_group_behind_the_dot_is_not_started_before_the_reply_to_dot(self) -> None:
        """issue 18 restructuring: MAIL FROM behind an unanswered "." has not started its transaction."""
        run = Run([tx("env1"), tx("env2")], pipelining=True)
        run.feed(OK, OK, "354 go")
        self.assertEqual(run.driver.waiting_for, "DATA")
        unstarted = run.driver.abandon(Reply(451, "4.4.2 lost"))
        self.assertEqual([(r.key, r.started) for r in run.reported + unstarted], [("env1", True), ("env2", False)])

    def test_stale_reuse_starts_nothing(self) -> None:
        """issue 18 restructuring: abandoned as stale, the transaction under way is not started either."""
        run = Run([tx("env1"), tx("env2")], pipelining=True)
        unstarted = run.driver.abandon(Reply(421, "4.4.2 lost"), stale=True)
        self.assertEqual([(r.key, r.started) for r in unstarted], [("env1", False), ("env2", False)])
        self.assertEqual(run.reported, [])


class MiscTests(SynchronousTestCase):
    def test_waiting_for_names_the_command(self) -> None:
        """issue 18 restructuring: what a timeout or a lost connection says it was waiting for."""
        for pipelining in BOTH:
            run = Run([tx("env1")], pipelining=pipelining)
            seen = [run.driver.waiting_for]
            for reply in (OK, OK):
                run.feed(reply)
                seen.append(run.driver.waiting_for)
            self.assertEqual(seen, ["MAIL FROM", "RCPT TO", "DATA"])

    def test_rset_refused(self) -> None:
        """issue 18 restructuring: a refused RSET ends the session: close when commands are out, else QUIT."""
        for pipelining, then in ((False, "quit"), (True, "close")):
            run = Run([tx("env1", "nobody@example.net"), tx("env2")], pipelining=pipelining)
            run.feed(OK, "550 5.1.1 no such user")
            if pipelining:
                run.feed("554 5.5.1 no valid recipients")
            run.feed("500 5.5.2 what")
            assert isinstance(run.end, GiveUp)
            self.assertEqual(run.end.then, then)
            self.assertIn("refused RSET", run.end.reason.text)

    def test_start_with_a_transaction_open(self) -> None:
        """issue 18 restructuring: a reused session whose last transaction was left open starts with RSET."""
        self.assertEqual(Run([tx("env1")], pipelining=True, rset=True).writes, [b"RSET\r\n" + GROUP])
        self.assertEqual(Run([tx("env1")], pipelining=False, rset=True).writes, [b"RSET\r\n"])

    def test_all_done_with_a_transaction_open_says_so(self) -> None:
        """issue 18 restructuring: Done says when the server still has a transaction open (RSET due)."""
        run = Run([tx("env1", "nobody@example.net")], pipelining=False)
        run.feed(OK, "550 5.1.1 no such user")
        self.assertEqual(run.end, Done(rset_due=True))

    def test_unexpected_reply(self) -> None:
        """issue 18 restructuring: a reply when none is due is a protocol error."""
        run = Run([tx("env1")], pipelining=False)
        run.feed(OK, OK, "354 go", OK)
        self.assertEqual(run.end, Done(rset_due=False))
        driver = Driver(HOST, [tx("env1")], Extensions())
        action = driver.reply(250, "unasked")
        assert isinstance(action, GiveUp)
        self.assertEqual((action.then, action.reason.code), ("abort", 421))
