"""
Tests for L{mmgun.smtp}: the client runs against in-memory SMTP servers
(a scripted one, and Twisted's own ESMTP server), connected through a
L{MemoryReactorClock} and L{twisted.test.iosim}, with real TLS in memory for
STARTTLS. Time only moves when a test advances the clock.
"""

from __future__ import annotations

import re

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mmgun.smtp import (
    RecipientResult,
    Reply,
    SessionFailed,
    SMTPSettings,
    TLSMode,
    TransactionResult,
    send_session,
    wire_form,
)

from .fakes import (
    ADDRESS,
    DROP,
    HOST,
    MESSAGE,
    SILENT,
    SMTP_SETTINGS as SETTINGS,
    FakeMX,
    Mailbox,
    Session,
    normalized,
    pki,
    sent,
    transaction,
    twisted_server,
    unstuffed,
)

# -- wire form ----------------------------------------------------------------


class WireFormTests(SynchronousTestCase):
    def test_crlf_kept(self) -> None:
        self.assertEqual(wire_form(b"a\r\nb\r\n"), b"a\r\nb\r\n")

    def test_bare_line_breaks_become_crlf(self) -> None:
        self.assertEqual(wire_form(b"a\nb\rc\r\r\nd"), b"a\r\nb\r\nc\r\n\r\nd\r\n")

    def test_final_line_break_added(self) -> None:
        self.assertEqual(wire_form(b"a"), b"a\r\n")

    def test_empty_message(self) -> None:
        self.assertEqual(wire_form(b""), b"")

    def test_every_dot_line_stuffed(self) -> None:
        self.assertEqual(wire_form(b".\r\n.a\r\nb.\r\n..\r\n"), b"..\r\n..a\r\nb.\r\n...\r\n")

    def test_smuggled_end_of_data_stuffed(self) -> None:
        self.assertEqual(wire_form(b"a\n.\nMAIL FROM:<x>\r\n"), b"a\r\n..\r\nMAIL FROM:<x>\r\n")

    def test_nul_and_long_lines_pass_through(self) -> None:
        line = b"\x00" + b"x" * 10_000
        self.assertEqual(wire_form(line), line + b"\r\n")


# -- sessions -----------------------------------------------------------------


class DeliveryTests(SynchronousTestCase):
    def test_all_accepted(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX()
        session.accept(server)
        self.assertEqual(
            self.successResultOf(session.result),
            [TransactionResult("env1", True, {"b@example.net": sent(), "c@example.net": sent()})],
        )
        self.assertEqual(
            [line for _, line in server.commands],
            [
                b"EHLO relay.test",
                b"MAIL FROM:<a@example.com>",
                b"RCPT TO:<b@example.net>",
                b"RCPT TO:<c@example.net>",
                b"DATA",
                b"QUIT",
            ],
        )
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"])
        self.assertEqual(session.attempts, 1)

    def test_reply_str(self) -> None:
        self.assertEqual(str(Reply(250, "2.0.0 Ok: queued")), "250 2.0.0 Ok: queued")

    def test_null_sender(self) -> None:
        session = Session([transaction(mail_from="")])
        server = FakeMX()
        session.accept(server)
        self.successResultOf(session.result)
        self.assertIn(b"MAIL FROM:<>", [line for _, line in server.commands])

    def test_addresses_sent_verbatim(self) -> None:
        """twisted.mail.smtp.quoteaddr would turn this into <a>."""
        session = Session([transaction("env1", '"a,b"@example.net')])
        server = FakeMX()
        session.accept(server)
        self.successResultOf(session.result)
        self.assertIn(b'RCPT TO:<"a,b"@example.net>', [line for _, line in server.commands])

    def test_duplicate_recipients_sent_once(self) -> None:
        session = Session([transaction("env1", "b@example.net", "b@example.net")])
        server = FakeMX()
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(list(result.recipients), ["b@example.net"])
        self.assertEqual(server.verbs.count(b"RCPT"), 1)

    def test_address_with_line_break_refused(self) -> None:
        session = Session([transaction("env1", "b@example.net>\r\nRSET")])
        self.failureResultOf(session.result, ValueError)
        self.assertEqual(session.attempts, 0)

    def test_one_recipient_of_two_refused(self) -> None:
        session = Session([transaction("env1", "nobody@example.net", "b@example.net")])
        server = FakeMX(
            {b"RCPT": lambda line: b"550 5.1.1 <nobody@example.net>: User unknown" if b"nobody" in line else None}
        )
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {
                "nobody@example.net": RecipientResult("failed", Reply(550, "5.1.1 <nobody@example.net>: User unknown")),
                "b@example.net": sent(),
            },
        )
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"])

    def test_rcpt_4xx_deferred(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX({b"RCPT": [b"451 4.7.1 Greylisted, try later", None]})
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {
                "b@example.net": RecipientResult("deferred", Reply(451, "4.7.1 Greylisted, try later")),
                "c@example.net": sent(),
            },
        )

    def test_multiline_reply_joined(self) -> None:
        session = Session([transaction()])
        server = FakeMX(
            {
                b"RCPT": b"550-5.1.1 The email account that you tried to reach does not exist.\r\n"
                b"550-5.1.1 Please try double-checking\r\n"
                b"550 5.1.1 the recipient's address"
            }
        )
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients["b@example.net"].reply,
            Reply(
                550,
                "5.1.1 The email account that you tried to reach does not exist."
                " Please try double-checking the recipient's address",
            ),
        )

    def test_all_recipients_refused_no_data_then_next_transaction(self) -> None:
        session = Session([transaction("env1", "x@example.net", "y@example.net"), transaction("env2", "b@example.net")])
        server = FakeMX({b"RCPT": [b"550 5.1.1 no", b"450 4.2.0 busy"]})
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(
            first,
            TransactionResult(
                "env1",
                True,
                {
                    "x@example.net": RecipientResult("failed", Reply(550, "5.1.1 no")),
                    "y@example.net": RecipientResult("deferred", Reply(450, "4.2.0 busy")),
                },
            ),
        )
        self.assertEqual(second, TransactionResult("env2", True, {"b@example.net": sent()}))
        self.assertEqual(
            server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"RSET", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
        )

    def test_two_transactions_one_connection(self) -> None:
        session = Session(
            [
                transaction("env1", "b@example.net"),
                transaction("env2", "c@example.net", message=b"Subject: 2\r\n\r\ntwo\r\n"),
            ]
        )
        server = FakeMX({b".": [b"250 2.0.0 Ok: queued as A", b"250 2.0.0 Ok: queued as B"]})
        session.accept(server)
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": sent("250 2.0.0 Ok: queued as A")}),
                TransactionResult("env2", True, {"c@example.net": sent("250 2.0.0 Ok: queued as B")}),
            ],
        )
        # After a 250 to the final ".", the next MAIL FROM follows at once.
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n", b"Subject: 2\r\n\r\ntwo\r\n.\r\n"])
        self.assertEqual(session.attempts, 1)

    def test_second_mail_from_sent_only_after_first_250(self) -> None:
        session = Session([transaction("env1"), transaction("env2")])
        server = FakeMX({b".": [SILENT]})
        session.accept(server)
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA"])
        server.send(b"250 2.0.0 Ok: queued as late")
        session.pump.flush()
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertEqual([r.started for r in self.successResultOf(session.result)], [True, True])

    def test_mail_from_5xx_fails_all(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net"), transaction("env2")])
        server = FakeMX({b"MAIL": [b"553 5.7.1 Sender rejected"]})
        session.accept(server)
        first, second = self.successResultOf(session.result)
        refused = RecipientResult("failed", Reply(553, "5.7.1 Sender rejected"))
        self.assertEqual(first, TransactionResult("env1", True, {"b@example.net": refused, "c@example.net": refused}))
        self.assertEqual(second, TransactionResult("env2", True, {"b@example.net": sent()}))
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"MAIL", b"RCPT", b"DATA", b"QUIT"])

    def test_mail_from_4xx_defers_all(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX({b"MAIL": b"452 4.3.1 Insufficient system storage"})
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            set(result.recipients.values()),
            {RecipientResult("deferred", Reply(452, "4.3.1 Insufficient system storage"))},
        )

    def test_data_554_fails(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX({b"RCPT": [None, b"550 5.1.1 unknown"], b".": b"554 5.7.1 Message rejected as spam"})
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {
                "b@example.net": RecipientResult("failed", Reply(554, "5.7.1 Message rejected as spam")),
                "c@example.net": RecipientResult("failed", Reply(550, "5.1.1 unknown")),
            },
        )

    def test_only_a_rcpt_reply_is_about_the_address(self) -> None:
        """issue 14 (suppression): a refused MAIL FROM (even 5.1.x) is not an answer to any recipient's RCPT TO."""
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX({b"MAIL": [b"550 5.1.0 <me@example.com>: Sender address rejected"]})
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual({r.at_rcpt for r in result.recipients.values()}, {False})
        session = Session([transaction("env1", "nobody@example.net", "b@example.net")])
        session.accept(FakeMX({b"RCPT": lambda line: b"550 5.1.1 User unknown" if b"nobody" in line else None}))
        [result] = self.successResultOf(session.result)
        self.assertEqual({a: r.at_rcpt for a, r in result.recipients.items()}, {"nobody@example.net": True, "b@example.net": False})

    def test_data_451_deferred(self) -> None:
        session = Session([transaction(), transaction("env2")])
        server = FakeMX({b".": [b"451 4.3.0 Temporary failure"]})
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(
            first.recipients, {"b@example.net": RecipientResult("deferred", Reply(451, "4.3.0 Temporary failure"))}
        )
        self.assertEqual(second.recipients, {"b@example.net": sent()})
        self.assertEqual(
            server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
        )

    def test_reply_before_end_of_data(self) -> None:
        """A final reply while the body is still being sent: settled, and the session given up."""
        session = Session([transaction(), transaction("env2")])
        server = FakeMX({b"DATA": b"354 go ahead\r\n552 5.3.4 Message size exceeds fixed limit"})
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(
            first.recipients,
            {"b@example.net": RecipientResult("failed", Reply(552, "5.3.4 Message size exceeds fixed limit"))},
        )
        self.assertEqual(
            second,
            TransactionResult(
                "env2",
                False,
                {
                    "b@example.net": RecipientResult(
                        "deferred", Reply(451, f"4.5.0 {HOST} replied during the message data")
                    )
                },
            ),
        )
        self.assertTrue(session.client_transports[0].disconnected)

    def test_data_command_refused(self) -> None:
        session = Session([transaction()])
        server = FakeMX({b"DATA": b"554 5.5.1 No valid recipients"})
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients, {"b@example.net": RecipientResult("failed", Reply(554, "5.5.1 No valid recipients"))}
        )
        self.assertEqual(server.payloads, [])

    def test_ehlo_refused_helo_fallback(self) -> None:
        session = Session([transaction()])
        server = FakeMX({b"EHLO": b"502 5.5.2 Command not recognized"})
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients, {"b@example.net": sent()})
        self.assertEqual(server.verbs[:3], [b"EHLO", b"HELO", b"MAIL"])

    def test_tcp_no_delay(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX())
        self.assertIs(session.client_transports[0].no_delay, True)

    def test_transport_without_no_delay(self) -> None:
        """StringTransport has no setTcpNoDelay; the client copes."""
        session = Session([transaction()])
        client = session.reactor.tcpClients[0][2].buildProtocol(None)
        assert client is not None
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 mx.example ESMTP\r\n")
        self.assertEqual(transport.value(), b"EHLO relay.test\r\n")

    def test_ipv6_address(self) -> None:
        reactor = MemoryReactorClock()
        Deferred.fromCoroutine(send_session(reactor, HOST, "2001:db8::25", 2525, [transaction()], SETTINGS))
        self.assertEqual(reactor.tcpClients[0][:2], ("2001:db8::25", 2525))

    def test_no_transactions(self) -> None:
        session = Session([])
        self.assertEqual(self.successResultOf(session.result), [])
        self.assertEqual(session.attempts, 0)


class SessionFailureTests(SynchronousTestCase):
    def test_421_greeting(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX(greeting=b"421 4.3.2 mx.example Service shutting down"))
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, "4.3.2 mx.example Service shutting down"))
        self.assertTrue(session.client_transports[0].disconnected)

    def test_554_greeting_quits(self) -> None:
        session = Session([transaction()])
        server = FakeMX(greeting=b"554 5.7.1 You are not welcome")
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(554, "5.7.1 You are not welcome"))
        self.assertEqual(server.verbs, [b"QUIT"])

    def test_connection_refused(self) -> None:
        session = Session([transaction()])
        session.refuse()
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.4.1 connection refused by {HOST} [{ADDRESS}]"))
        self.assertEqual(session.attempts, 1)

    def test_connect_timeout(self) -> None:
        session = Session([transaction()], SMTPSettings(helo="relay.test", connect_timeout=7))
        self.assertEqual(session.reactor.tcpClients[0][3], 7)
        session.advance(6.9)
        self.assertNoResult(session.result)
        session.advance(0.1)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.4.1 connection to {HOST} [{ADDRESS}] timed out"))
        self.assertTrue(session.reactor.connectors[0].stoppedConnecting)

    def test_ehlo_and_helo_refused(self) -> None:
        session = Session([transaction()])
        server = FakeMX({b"EHLO": b"500 5.5.1 what", b"HELO": b"501 5.5.4 bad HELO"})
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(501, "5.5.4 bad HELO"))
        # Twisted's SMTPClient would send HELO again and again.
        self.assertEqual(server.verbs, [b"EHLO", b"HELO", b"QUIT"])

    def test_greeting_timeout(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX(greeting=SILENT))
        session.advance(299)
        self.assertNoResult(session.result)
        session.advance(1)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(
            failure.value.reply, Reply(421, f"4.4.2 timed out after 300s waiting for {HOST} during greeting")
        )
        self.assertTrue(session.client_transports[0].disconnected)

    def test_lost_before_mail_from(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX({b"EHLO": DROP}))
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.4.2 connection lost during EHLO with {HOST}"))

    def test_malformed_reply(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX({b"EHLO": b"hello there"}))
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.5.0 malformed reply from {HOST} during EHLO"))

    def test_endless_multiline_reply(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX({b"EHLO": b"\r\n".join([b"250-x"] * 1000)}))
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.5.0 overlong multi-line reply from {HOST} during EHLO"))


class BrokenSessionTests(SynchronousTestCase):
    """The session dies after a transaction started: results, not SessionFailed."""

    def test_disconnect_during_data(self) -> None:
        session = Session([transaction("env1", "b@example.net", "x@example.net"), transaction("env2")])
        server = FakeMX({b"RCPT": [None, b"550 5.1.1 unknown"], b".": DROP})
        session.accept(server)
        lost = Reply(451, f"4.4.2 connection lost during DATA with {HOST}")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult(
                    "env1",
                    True,
                    {
                        "b@example.net": RecipientResult("deferred", lost),
                        "x@example.net": RecipientResult("failed", Reply(550, "5.1.1 unknown")),
                    },
                ),
                TransactionResult("env2", False, {"b@example.net": RecipientResult("deferred", lost)}),
            ],
        )
        self.assertEqual(session.attempts, 1)  # never reconnects, never re-sends

    def test_disconnect_after_first_transaction(self) -> None:
        session = Session([transaction("env1"), transaction("env2")])
        server = FakeMX({b"MAIL": [None, DROP]})
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(first.recipients, {"b@example.net": sent()})
        self.assertEqual(
            second,
            TransactionResult(
                "env2",
                True,
                {
                    "b@example.net": RecipientResult(
                        "deferred", Reply(451, f"4.4.2 connection lost during MAIL FROM with {HOST}")
                    )
                },
            ),
        )

    def test_421_on_rcpt(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net", "d@example.net"), transaction("env2")])
        server = FakeMX({b"RCPT": [None, b"421 4.4.5 Too many connections, closing"]})
        session.accept(server)
        closing = RecipientResult("deferred", Reply(421, "4.4.5 Too many connections, closing"))
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult(
                    "env1", True, {"b@example.net": closing, "c@example.net": closing, "d@example.net": closing}
                ),
                TransactionResult("env2", False, {"b@example.net": closing}),
            ],
        )
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"RCPT"])
        self.assertTrue(session.client_transports[0].disconnected)

    def test_421_after_data(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX({b".": b"421 4.3.0 shutting down"}))
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients, {"b@example.net": RecipientResult("deferred", Reply(421, "4.3.0 shutting down"))}
        )

    def test_timeout_waiting_for_rcpt_reply(self) -> None:
        session = Session([transaction()], SMTPSettings(helo="relay.test", command_timeout=60))
        session.accept(FakeMX({b"RCPT": SILENT}))
        session.advance(59)
        self.assertNoResult(session.result)
        session.advance(1)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result,
            TransactionResult(
                "env1",
                True,
                {
                    "b@example.net": RecipientResult(
                        "deferred", Reply(451, f"4.4.2 timed out after 60s waiting for {HOST} during RCPT TO")
                    )
                },
            ),
        )
        self.assertTrue(session.client_transports[0].disconnected)

    def test_end_of_data_waits_for_data_timeout(self) -> None:
        session = Session([transaction()], SMTPSettings(helo="relay.test", command_timeout=60, data_timeout=600))
        server = FakeMX({b".": SILENT})
        session.accept(server)
        self.assertEqual(len(server.payloads), 1)
        session.advance(61)
        self.assertNoResult(session.result)
        session.advance(538)
        self.assertNoResult(session.result)
        session.advance(1)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {
                "b@example.net": RecipientResult(
                    "deferred", Reply(451, f"4.4.2 timed out after 600s waiting for {HOST} during DATA")
                )
            },
        )

    def test_command_timeout_after_data(self) -> None:
        """Once the final reply is in, commands get command_timeout again."""
        session = Session(
            [transaction(), transaction("env2")], SMTPSettings(helo="relay.test", command_timeout=60, data_timeout=600)
        )
        session.accept(FakeMX({b"MAIL": [None, SILENT]}))
        session.advance(60)
        first, second = self.successResultOf(session.result)
        self.assertEqual(first.recipients["b@example.net"].status, "sent")
        self.assertEqual(
            second.recipients["b@example.net"].reply,
            Reply(451, f"4.4.2 timed out after 60s waiting for {HOST} during MAIL FROM"),
        )

    def test_cancel(self) -> None:
        session = Session([transaction()])
        session.accept(FakeMX({b"RCPT": SILENT}))
        session.result.cancel()
        self.failureResultOf(session.result)
        session.pump.flush()
        self.assertTrue(session.client_transports[0].disconnected)


# -- on the wire ----------------------------------------------------------------


class WireTests(SynchronousTestCase):
    def deliver(self, message: bytes) -> bytes:
        session = Session([transaction(message=message)])
        server = FakeMX()
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients["b@example.net"].status, "sent")
        [payload] = server.payloads
        return payload

    def test_dot_lines_at_chunk_boundaries(self) -> None:
        """
        FileSender reads 16 KiB chunks; SMTPClient.transformChunk would leave a
        "." at the start of a chunk unstuffed. Dot lines are put at multiples
        of 16384 both in the message and in its wire form.
        """
        chunk = 16384
        for wire_offsets in (False, True):
            message = b""
            for k in range(1, 5):
                target = chunk * k - (k - 1 if wire_offsets else 0)  # one stuffed dot per earlier dot line
                filler = target - len(message)
                message += b"x" * (filler - 2) + b"\r\n" + b".hidden line\r\n"
                self.assertEqual(message.find(b".hidden", target - 2), target)
            payload = self.deliver(message)
            for k in range(1, 5):
                offset = chunk * k if wire_offsets else chunk * k + (k - 1)
                self.assertEqual(payload[offset : offset + 9], b"..hidden ")
            self.assertEqual(payload, wire_form(message) + b".\r\n")
            self.assertEqual(payload.count(b"\r\n.h"), 0)
            self.assertEqual(unstuffed(payload), message)

    def test_smuggling_bodies(self) -> None:
        bodies = [
            b"Subject: lf\n\nbare\nline feeds\n",
            b"Subject: cr\r\rbare\rcarriage returns",
            b"a\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.net>\nDATA\n",
            b"a\r\n.\r\nMAIL FROM:<evil@example.com>\r\n",
            b"a\r.\rb",
            b"a\r\n.\nb\n.\r\nc\r.\r\nd",
            b"a\r\r\n.\n\r\nb",
            b"nul \x00 byte\r\n\x00\r\n.\x00\r\n",
            b"long " + b"y" * 10_000 + b"\r\n." + b"z" * 10_000,
            b".",
            b"\r\n.\r\n",
            b"\n.\n",
            b"",
        ]
        for body in bodies:
            payload = self.deliver(body)
            self.assertEqual((b"\r\n" + payload).count(b"\r\n.\r\n"), 1, body)
            self.assertTrue(payload.endswith(b".\r\n"))
            self.assertIsNone(re.search(rb"\r(?!\n)|(?<!\r)\n", payload), body)
            self.assertEqual(unstuffed(payload), normalized(body), body)


# -- against Twisted's own ESMTP server ---------------------------------------


class TwistedServerTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        message = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\nbare LF\rbare CR\r\n"
        session = Session(
            [
                transaction("env1", "b@example.net", "nobody@example.net", message=message),
                transaction("env2", mail_from=""),
            ]
        )
        mailbox = Mailbox()
        session.accept(twisted_server(mailbox))
        first, second = self.successResultOf(session.result)
        self.assertEqual(first.recipients["b@example.net"].status, "sent")
        self.assertEqual(first.recipients["b@example.net"].reply.code, 250)
        self.assertEqual(first.recipients["nobody@example.net"].status, "failed")
        self.assertEqual(first.recipients["nobody@example.net"].reply.code, 550)
        self.assertEqual(second.recipients["b@example.net"].status, "sent")
        self.assertEqual(mailbox.messages, [("b@example.net", normalized(message)), ("b@example.net", MESSAGE)])

    def test_starttls(self) -> None:
        session = Session([transaction()], SMTPSettings(helo="relay.test", tls=TLSMode.VERIFY, trust_root=pki().trust))
        mailbox = Mailbox()
        server = twisted_server(mailbox, pki().server)
        session.accept(server)
        self.assertEqual(self.successResultOf(session.result)[0].recipients["b@example.net"].status, "sent")
        self.assertTrue(server.startedTLS)
        self.assertEqual(mailbox.messages, [("b@example.net", MESSAGE)])


# -- STARTTLS -----------------------------------------------------------------


def settings(tls: TLSMode, trust_root: object = None) -> SMTPSettings:
    return SMTPSettings(helo="relay.test", tls=tls, trust_root=trust_root)


class TLSTests(SynchronousTestCase):
    def assertSentOverTLS(self, session: Session, server: FakeMX) -> None:
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients, {"b@example.net": sent()})
        self.assertEqual(
            server.commands,
            [
                (False, b"EHLO relay.test"),
                (False, b"STARTTLS"),
                (True, b"EHLO relay.test"),
                (True, b"MAIL FROM:<a@example.com>"),
                (True, b"RCPT TO:<b@example.net>"),
                (True, b"DATA"),
                (True, b"QUIT"),
            ],
        )
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"])

    def test_opportunistic_offered_unverified_certificate(self) -> None:
        """The server's CA is unknown to the client: opportunistic TLS doesn't care."""
        session = Session([transaction()], settings(TLSMode.OPPORTUNISTIC))
        server = FakeMX(tls=pki().server)
        session.accept(server)
        self.assertSentOverTLS(session, server)

    def test_tls_really_used_with_sni(self) -> None:
        session = Session([transaction()], settings(TLSMode.OPPORTUNISTIC))
        server = FakeMX({b".": SILENT}, tls=pki().server)
        session.accept(server)
        client_tls = session.client_transports[0]._tls
        assert client_tls is not None and server.transport._tls is not None
        self.assertTrue(client_tls._handshakeDone)
        self.assertEqual(server.transport._tls._tlsConnection.get_servername(), HOST.encode("ascii"))
        self.assertEqual(len(server.payloads), 1)

    def test_opportunistic_name_mismatch(self) -> None:
        session = Session([transaction()], settings(TLSMode.OPPORTUNISTIC), host="other.example")
        server = FakeMX(tls=pki().server)
        session.accept(server)
        self.assertSentOverTLS(session, server)

    def test_opportunistic_not_offered(self) -> None:
        session = Session([transaction()], settings(TLSMode.OPPORTUNISTIC))
        server = FakeMX()
        session.accept(server)
        self.assertEqual(self.successResultOf(session.result)[0].recipients, {"b@example.net": sent()})
        self.assertNotIn(b"STARTTLS", server.verbs)

    def test_opportunistic_starttls_refused_goes_on_in_clear(self) -> None:
        session = Session([transaction()], settings(TLSMode.OPPORTUNISTIC))
        server = FakeMX({b"STARTTLS": b"454 4.7.0 TLS not available due to local problem"}, tls=pki().server)
        session.accept(server)
        self.assertEqual(self.successResultOf(session.result)[0].recipients, {"b@example.net": sent()})
        self.assertEqual(server.verbs, [b"EHLO", b"STARTTLS", b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertEqual(session.attempts, 1)

    def test_opportunistic_handshake_failure_retried_in_clear(self) -> None:
        session = Session([transaction()], settings(TLSMode.OPPORTUNISTIC))
        first = FakeMX(garble_tls=True)
        session.accept(first)
        self.assertNoResult(session.result)
        self.assertEqual(first.verbs, [b"EHLO", b"STARTTLS"])
        self.assertEqual(session.attempts, 2)
        second = FakeMX(tls=pki().server)
        session.accept(second)
        self.assertEqual(self.successResultOf(session.result)[0].recipients, {"b@example.net": sent()})
        self.assertEqual(second.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertEqual(session.attempts, 2)

    def test_opportunistic_retry_in_clear_only_once(self) -> None:
        session = Session([transaction()], settings(TLSMode.OPPORTUNISTIC))
        session.accept(FakeMX(garble_tls=True))
        session.accept(FakeMX(greeting=b"421 4.3.2 busy"))
        self.assertEqual(self.failureResultOf(session.result, SessionFailed).value.reply, Reply(421, "4.3.2 busy"))
        self.assertEqual(session.attempts, 2)

    def test_plaintext_after_starttls_reply_not_trusted(self) -> None:
        """A reply injected after the 220, in clear, is not read as the post-TLS EHLO reply."""
        session = Session([transaction()], settings(TLSMode.REQUIRE))
        server = FakeMX({b"STARTTLS": b"220 go ahead\r\n250-mx.example\r\n250 8BITMIME"}, tls=pki().server)
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(
            failure.value.reply, Reply(421, f"4.7.5 TLS with {HOST} failed: clear-text data after the STARTTLS reply")
        )
        self.assertNotIn(b"MAIL", server.verbs)

    def test_require_offered_unverified_certificate(self) -> None:
        session = Session([transaction()], settings(TLSMode.REQUIRE))
        server = FakeMX(tls=pki().server)
        session.accept(server)
        self.assertSentOverTLS(session, server)

    def test_require_not_offered(self) -> None:
        session = Session([transaction()], settings(TLSMode.REQUIRE))
        server = FakeMX()
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.7.0 {HOST} does not offer STARTTLS; TLS is required"))
        self.assertEqual(server.verbs, [b"EHLO", b"QUIT"])

    def test_require_starttls_refused(self) -> None:
        session = Session([transaction()], settings(TLSMode.REQUIRE))
        server = FakeMX({b"STARTTLS": b"454 4.7.0 TLS not available"}, tls=pki().server)
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(
            failure.value.reply,
            Reply(421, f"4.7.0 {HOST} refused STARTTLS (454 4.7.0 TLS not available); TLS is required"),
        )
        self.assertEqual(server.verbs, [b"EHLO", b"STARTTLS", b"QUIT"])

    def test_require_ehlo_refused(self) -> None:
        session = Session([transaction()], settings(TLSMode.REQUIRE))
        server = FakeMX({b"EHLO": b"502 5.5.2 no"})
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.7.0 {HOST} refused EHLO (502 5.5.2 no); TLS is required"))
        self.assertEqual(server.verbs, [b"EHLO", b"QUIT"])

    def test_require_handshake_failure_not_retried(self) -> None:
        session = Session([transaction()], settings(TLSMode.REQUIRE))
        session.accept(FakeMX(garble_tls=True))
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply.code, 421)
        self.assertTrue(failure.value.reply.text.startswith(f"4.7.5 TLS with {HOST} failed: "), failure.value.reply)
        self.assertEqual(session.attempts, 1)

    def test_verify_valid_certificate(self) -> None:
        session = Session([transaction()], settings(TLSMode.VERIFY, pki().trust))
        server = FakeMX(tls=pki().server)
        session.accept(server)
        self.assertSentOverTLS(session, server)

    def test_verify_absolute_host_name(self) -> None:
        session = Session([transaction()], settings(TLSMode.VERIFY, pki().trust), host=HOST + ".")
        server = FakeMX(tls=pki().server)
        session.accept(server)
        self.assertSentOverTLS(session, server)

    def test_verify_untrusted_certificate(self) -> None:
        session = Session([transaction()], settings(TLSMode.VERIFY, pki().other_trust))
        server = FakeMX(tls=pki().server)
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertTrue(failure.value.reply.text.startswith(f"4.7.5 TLS with {HOST} failed: "), failure.value.reply)
        self.assertEqual([line for tls, line in server.commands if tls], [])
        self.assertEqual(session.attempts, 1)

    def test_verify_wrong_name(self) -> None:
        session = Session([transaction()], settings(TLSMode.VERIFY, pki().trust), host="other.example")
        server = FakeMX(tls=pki().server)
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply.code, 421)
        self.assertEqual([line for tls, line in server.commands if tls], [])

    def test_verify_not_offered(self) -> None:
        session = Session([transaction()], settings(TLSMode.VERIFY, pki().trust))
        server = FakeMX()
        session.accept(server)
        failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(failure.value.reply, Reply(421, f"4.7.0 {HOST} does not offer STARTTLS; TLS is required"))
        self.assertNotIn(b"MAIL", server.verbs)


# -- logging ------------------------------------------------------------------


class ReportTests(SynchronousTestCase):
    def test_every_result_reported_once_through_on_result(self) -> None:
        """issue 18 restructuring: on_result gets each transaction once, the ones not started too, as returned."""
        reported: list[TransactionResult] = []
        session = Session(
            [transaction("env1"), transaction("env2", "nobody@example.net"), transaction("env3")],
            on_result=reported.append,
            may_start=lambda t: t.key != "env3",
        )
        session.accept(FakeMX({b"RCPT": [None, b"550 5.1.1 unknown"]}))
        results = self.successResultOf(session.result)
        self.assertEqual([(r.key, r.started) for r in reported], [("env1", True), ("env2", True), ("env3", False)])
        self.assertEqual(reported, results)

    def test_nothing_reported_when_the_session_fails(self) -> None:
        """issue 18 restructuring: SessionFailed is the only report when nothing was started."""
        reported: list[TransactionResult] = []
        session = Session([transaction("env1")], on_result=reported.append)
        session.refuse()
        self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(reported, [])


class LoggingTests(SynchronousTestCase):
    def test_one_event_per_session_no_body(self) -> None:
        secret = b"Subject: s\r\n\r\nthe secret body\r\n"
        with capturedLogs() as events:
            session = Session(
                [transaction("env1", message=secret), transaction("env2", "nobody@example.net", message=secret)]
            )
            session.accept(FakeMX({b"RCPT": [None, b"550 5.1.1 unknown"]}))
            self.successResultOf(session.result)
        ours = [event for event in events if event.get("log_namespace") == "mmgun.smtp"]
        self.assertEqual(
            [(e["host"], e["transactions"], e["sent"], e["failed"], e["codes"]) for e in ours], [(HOST, 2, 1, 1, [250, 550])]
        )
        self.assertNotIn("secret", repr(events))

    def test_session_failure_logged(self) -> None:
        with capturedLogs() as events:
            session = Session([transaction()])
            session.refuse()
            self.failureResultOf(session.result, SessionFailed)
        ours = [event for event in events if event.get("log_namespace") == "mmgun.smtp"]
        self.assertEqual([(e["host"], e["code"]) for e in ours], [(HOST, 421)])
