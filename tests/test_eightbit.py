"""
8-bit message bodies over SMTP (RFC 6152): the client sends ``BODY=8BITMIME`` with a
message that has a byte of 0x80 or more when the server offers 8BITMIME, and does not
send such a message at all when it does not. Against the scripted in-memory servers of
L{tests.test_smtp} (with and without PIPELINING) and Twisted's own ESMTP server; the
sender's part (the flag made once per message) against a scripted session.
"""

from __future__ import annotations

import random
import uuid

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mmgun.sender import Sender
from mmgun.smtp import RecipientResult, Reply, SMTPSettings, Transaction, TransactionResult, wire_form
from mmgun.store import NewSubmission

from .fakes import (
    MESSAGE,
    SENDER_SETTINGS,
    T0,
    FakeMX,
    FakeRouter,
    Mailbox,
    PipeliningESMTP,
    ScriptedSessions,
    Session,
    WriteLog,
    group,
    mx,
    pki,
    sent,
    transaction,
    twisted_server,
)
from .helpers import result, sync_store

#: UTF-8 text and a lone 0xFF byte in the body, a CR LF "." line to be stuffed.
# 8-bit in the body only: a UTF-8 header field (RFC 6532) needs SMTPUTF8 too (issue 18; tests/test_smtputf8.py).
EIGHT_BIT = (
    "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nna\u00efve \u2014 ok\r\n".encode()
    + b"\xff\xfe raw\r\n.\r\nend\r\n"
)
REFUSED = RecipientResult(
    "failed", Reply(554, "5.6.3 message has 8-bit content and mx.example does not offer 8BITMIME")
)


class EightBitESMTP(PipeliningESMTP):
    """Twisted's ESMTP server, saying that it takes 8-bit bodies (it does: DATA lines are bytes)."""

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        return {**super().extensions(), b"8BITMIME": None}


def eight_bit(key: str = "env8", *recipients: str) -> Transaction:
    return transaction(key, *recipients, message=EIGHT_BIT)


def lines(server: FakeMX) -> list[bytes]:
    return [line for _, line in server.commands]


class TransactionFlagTests(SynchronousTestCase):
    def test_flag_made_from_the_message_when_not_given(self) -> None:
        """issue 12 review H3: a Transaction knows whether its message is 8-bit; a given flag is kept as given."""
        self.assertTrue(eight_bit().eight_bit)
        self.assertFalse(transaction().eight_bit)
        self.assertFalse(Transaction("k", "a@example.com", ("b@example.net",), EIGHT_BIT, eight_bit=False).eight_bit)


class OfferedTests(SynchronousTestCase):
    """The server offers 8BITMIME."""

    def test_eight_bit_message_sent_with_body_8bitmime(self) -> None:
        """issue 12 review H3: an 8-bit message goes out with MAIL FROM ... BODY=8BITMIME, its bytes unchanged."""
        session = Session([eight_bit("env8", "b@example.net", "c@example.net")])
        server = FakeMX()
        session.accept(server)
        self.assertEqual(
            self.successResultOf(session.result),
            [TransactionResult("env8", True, {"b@example.net": sent(), "c@example.net": sent()})],
        )
        self.assertEqual(
            lines(server),
            [
                b"EHLO relay.test",
                b"MAIL FROM:<a@example.com> BODY=8BITMIME",
                b"RCPT TO:<b@example.net>",
                b"RCPT TO:<c@example.net>",
                b"DATA",
                b"QUIT",
            ],
        )
        self.assertEqual(server.payloads, [wire_form(EIGHT_BIT) + b".\r\n"])

    def test_seven_bit_message_has_no_body_parameter(self) -> None:
        """issue 12 review H3: a 7-bit message's MAIL FROM is the seed's, with no BODY parameter, 8BITMIME offered or not."""
        for offered in (True, False):
            session = Session([transaction()])
            server = FakeMX(eight_bit_mime=offered)
            session.accept(server)
            [result] = self.successResultOf(session.result)
            self.assertEqual(result.recipients, {"b@example.net": sent()})
            self.assertEqual(lines(server)[1], b"MAIL FROM:<a@example.com>")
            self.assertEqual(server.payloads, [MESSAGE + b".\r\n"])

    def test_pipelined_groups_carry_body_8bitmime_only_for_the_8bit_message(self) -> None:
        """issue 12 review H3: with PIPELINING, the group of an 8-bit message (also one sent behind the previous ".") says BODY=8BITMIME; a 7-bit one's does not."""
        session = Session(
            [transaction("env1"), eight_bit("env8", "c@example.net"), transaction("env3", "d@example.net")]
        )
        session.accept(FakeMX(pipelining=True))
        self.assertEqual(
            [r.recipients for r in self.successResultOf(session.result)],
            [{"b@example.net": sent()}, {"c@example.net": sent()}, {"d@example.net": sent()}],
        )
        body = wire_form(MESSAGE) + b".\r\n"
        self.assertEqual(
            session.client_transports[0].writes[1:],
            [
                group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"),
                body + group(b"MAIL FROM:<a@example.com> BODY=8BITMIME", b"RCPT TO:<c@example.net>", b"DATA"),
                wire_form(EIGHT_BIT)
                + b".\r\n"
                + group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<d@example.net>", b"DATA"),
                body,
                b"QUIT\r\n",
            ],
        )

    def test_round_trip_through_twisted_server(self) -> None:
        """
        issue 12 review H3: Twisted's ESMTP server offering 8BITMIME (and pipelining) takes
        the BODY parameter and gets every byte; as it comes (no 8BITMIME) the message is refused.
        """
        for kind, outcome, delivered in (
            (EightBitESMTP, "sent", [EIGHT_BIT, MESSAGE]),
            (PipeliningESMTP, "failed", [MESSAGE]),
        ):
            session = Session([eight_bit("env8"), transaction("env1")])
            mailbox = Mailbox()
            session.accept(twisted_server(mailbox, kind=kind))
            self.assertEqual(
                [r.recipients["b@example.net"].status for r in self.successResultOf(session.result)], [outcome, "sent"]
            )
            # Twisted's server unstuffs the "." line: the message arrives as it was.
            self.assertEqual(mailbox.messages, [("b@example.net", m) for m in delivered])


class NotOfferedTests(SynchronousTestCase):
    """The server does not offer 8BITMIME (or was greeted with HELO)."""

    def test_eight_bit_message_not_sent_and_failed_permanently(self) -> None:
        """issue 12 review H3: no 8BITMIME offered: the 8-bit message's recipients fail (554 5.6.3), no MAIL FROM, nothing sent."""
        reported: list[TransactionResult] = []
        session = Session([eight_bit("env8", "b@example.net", "c@example.net")], on_result=reported.append)
        server = FakeMX(eight_bit_mime=False)
        session.accept(server)
        expected = [TransactionResult("env8", True, {"b@example.net": REFUSED, "c@example.net": REFUSED})]
        self.assertEqual(self.successResultOf(session.result), expected)
        self.assertEqual(reported, expected)
        self.assertEqual(server.verbs, [b"EHLO", b"QUIT"])
        self.assertEqual(server.payloads, [])

    def test_other_messages_of_the_session_still_sent(self) -> None:
        """issue 12 review H3: without PIPELINING, the 7-bit messages before and after the refused 8-bit one go out as before."""
        session = Session(
            [transaction("env1"), eight_bit("env8", "c@example.net"), transaction("env3", "d@example.net")]
        )
        server = FakeMX(eight_bit_mime=False)
        session.accept(server)
        self.assertEqual(
            [r.recipients for r in self.successResultOf(session.result)],
            [{"b@example.net": sent()}, {"c@example.net": REFUSED}, {"d@example.net": sent()}],
        )
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT"])
        self.assertNotIn(b"RCPT TO:<c@example.net>", lines(server))
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"] * 2)

    def test_pipelined_group_of_the_8bit_message_never_written(self) -> None:
        """issue 12 review H3: with PIPELINING, the 8-bit message's group is not sent behind the previous "." (nor later); the next 7-bit one's is."""
        session = Session(
            [transaction("env1"), eight_bit("env8", "c@example.net"), transaction("env3", "d@example.net")]
        )
        server = FakeMX(pipelining=True, eight_bit_mime=False)
        session.accept(server)
        self.assertEqual(
            [r.recipients for r in self.successResultOf(session.result)],
            [{"b@example.net": sent()}, {"c@example.net": REFUSED}, {"d@example.net": sent()}],
        )
        body = wire_form(MESSAGE) + b".\r\n"
        self.assertEqual(
            session.client_transports[0].writes[1:],
            [
                group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"),
                body,
                group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<d@example.net>", b"DATA"),
                body,
                b"QUIT\r\n",
            ],
        )

    def test_pipelined_after_a_refused_message_rset_leads_the_next_sendable_group(self) -> None:
        """issue 12 review H3: a refused 7-bit message, then an 8-bit one skipped: RSET leads the group of the 7-bit one after it."""
        session = Session(
            [transaction("env1"), eight_bit("env8", "c@example.net"), transaction("env3", "d@example.net")]
        )
        session.accept(FakeMX({b".": [b"554 5.7.1 no"]}, pipelining=True, eight_bit_mime=False))
        self.assertEqual(
            [r.recipients for r in self.successResultOf(session.result)],
            [
                {"b@example.net": RecipientResult("failed", Reply(554, "5.7.1 no"))},
                {"c@example.net": REFUSED},
                {"d@example.net": sent()},
            ],
        )
        body = wire_form(MESSAGE) + b".\r\n"
        self.assertEqual(
            session.client_transports[0].writes[1:],
            [
                group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"),
                body,
                group(b"RSET", b"MAIL FROM:<a@example.com>", b"RCPT TO:<d@example.net>", b"DATA"),
                body,
                b"QUIT\r\n",
            ],
        )

    def test_helo_fallback_refuses_8bit(self) -> None:
        """issue 12 review H3: EHLO refused, HELO accepted: no extensions, so an 8-bit message is not sent."""
        session = Session([eight_bit()])
        server = FakeMX({b"EHLO": b"502 5.5.2 Command not recognized"})
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients, {"b@example.net": REFUSED})
        self.assertEqual(server.verbs, [b"EHLO", b"HELO", b"QUIT"])

    def test_clear_text_offer_forgotten_after_starttls(self) -> None:
        """issue 12 review H3 (RFC 3207 4.2): 8BITMIME offered before STARTTLS but not after: the 8-bit message is not sent."""
        offer = b"250-mx.example\r\n250-8BITMIME\r\n250 STARTTLS"
        session = Session([eight_bit()])
        server = FakeMX({b"EHLO": [offer, b"250 mx.example"]}, tls=pki().server)
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients, {"b@example.net": REFUSED})
        self.assertEqual(server.verbs, [b"EHLO", b"STARTTLS", b"EHLO", b"QUIT"])
        self.assertEqual(server.payloads, [])

    def test_non_pipelined_writes(self) -> None:
        """issue 12 review H3: without PIPELINING, the first command after EHLO for an 8-bit message and no 8BITMIME is QUIT."""
        session = Session([eight_bit()])
        client = session.reactor.tcpClients[0][2].buildProtocol(None)
        assert client is not None
        transport = WriteLog()
        client.makeConnection(transport)
        client.dataReceived(b"220 mx.example ESMTP\r\n250 mx.example\r\n")
        self.assertEqual(transport.writes, [b"EHLO relay.test\r\n", b"QUIT\r\n"])


class SenderFlagTests(SynchronousTestCase):
    def test_sender_gives_the_flag_with_the_wire_form(self) -> None:
        """issue 12 review H3: the sender hands each transaction its message's 8-bit flag beside the shared wire form (made once per message)."""
        store, _ = sync_store(self)
        clock = Clock()
        clock.advance(T0)
        router = FakeRouter({"a.example": [mx("mx.a.example")], "b.example": [mx("mx.b.example", "127.0.0.3")]})
        smtp = ScriptedSessions()
        sender = Sender(
            store,
            router,
            clock,
            SMTPSettings(helo="mmgun.test"),
            SENDER_SETTINGS,
            session=smtp,
            rng=random.Random(1),
            owner="s",
        )
        for message in (EIGHT_BIT, MESSAGE):
            sub = NewSubmission(
                uuid.uuid4().hex, "c1", "me@example.com", ("x@a.example", "y@b.example"), message, clock.seconds()
            )
            result(self, store.add_submission(sub))
        self.successResultOf(sender.poll())
        transactions = [t for _, ts in smtp.sessions for t in ts]
        self.assertEqual(
            sorted((t.message == EIGHT_BIT, t.eight_bit) for t in transactions),
            [(False, False)] * 2 + [(True, True)] * 2,
        )
        eight = [t for t in transactions if t.eight_bit]
        self.assertIs(eight[0].wire, eight[1].wire)
