"""
Tests for RFC 2920 PIPELINING in L{mmgun.smtp}: what goes out in one write
when the server's EHLO reply lists PIPELINING (and what doesn't when it
doesn't), and how the replies to a pipelined group are read back into
per-recipient results. The scripted server and the in-memory network are
those of L{tests.test_smtp}; one test also talks to L{mmgun.testing}'s ESMTP
server over real loopback sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IConnector, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory, connectionDone
from twisted.mail.interfaces import IMessageSMTP
from twisted.mail.smtp import SMTPServerError, User
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mmgun.smtp import (
    SMTPSettings,
    TLSMode,
    Transaction,
    TransactionResult,
    send_session,
    wire_form,
)
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox as StubMailbox, _StubESMTP, smtp_server_factory

from .fakes import (
    DROP,
    EHLO_PIPELINING,
    EHLO_PLAIN,
    HOST,
    MESSAGE,
    SILENT,
    FakeMX,
    Mailbox,
    PipeliningESMTP,
    Session,
    WriteLog,
    deferred,
    failed,
    group,
    normalized,
    pki,
    sent,
    transaction,
    twisted_server,
)

HOLD = "hold"  # no reply until InOrderMX.release(); the commands behind it wait too


class InOrderMX(FakeMX):
    """
    A L{FakeMX} that can hold a reply back (L{HOLD}) and, as a pipelining
    server must (RFC 2920 3.1), the replies to every command read behind it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[bytes] | None = None

    def send(self, reply: object) -> None:
        if reply == HOLD:
            self._held = []
        else:
            super().send(reply)

    def lineReceived(self, line: bytes) -> None:
        if self._held is not None:
            self._held.append(line)
        else:
            super().lineReceived(line)

    @property
    def holding(self) -> int | None:
        """How many lines wait behind the held reply; C{None} when none is held."""
        return None if self._held is None else len(self._held)

    def release(self, reply: object) -> None:
        held, self._held = self._held, None
        assert held is not None
        self.send(reply)
        for line in held:
            self.lineReceived(line)






class WritesTests(SynchronousTestCase):
    """What the client writes, and when, with and without PIPELINING."""

    def connect(self, transactions: list[Transaction]) -> tuple[Session, WriteLog]:
        session = Session(transactions)
        client = session.reactor.tcpClients[0][2].buildProtocol(None)
        assert client is not None
        transport = WriteLog()
        client.makeConnection(transport)
        client.dataReceived(b"220 mx.example ESMTP\r\n")
        self.assertEqual(transport.writes, [b"EHLO relay.test\r\n"])
        transport.writes.clear()
        self.client = client
        return session, transport

    def test_group_in_one_write_when_pipelining_advertised(self) -> None:
        session, transport = self.connect([transaction("env1", "b@example.net", "c@example.net")])
        self.client.dataReceived(EHLO_PIPELINING)
        self.assertEqual(
            transport.writes,
            [group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"RCPT TO:<c@example.net>", b"DATA")],
        )
        # Replies to part of the group: nothing more to send yet.
        self.client.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
        self.assertEqual(len(transport.writes), 1)
        self.client.dataReceived(b"250 2.1.5 Ok\r\n354 go ahead\r\n")
        self.assertEqual(len(transport.writes), 1)  # the body waits for the reactor's next turn
        session.reactor.advance(0)
        self.assertEqual(transport.writes[1:], [wire_form(MESSAGE) + b".\r\n"])
        self.client.dataReceived(b"250 2.0.0 Ok: queued as 1234\r\n")
        self.assertEqual(transport.writes[2:], [b"QUIT\r\n"])
        self.assertEqual(
            self.successResultOf(session.result),
            [TransactionResult("env1", True, {"b@example.net": sent(), "c@example.net": sent()})],
        )

    def premature(self, after_354: bytes) -> tuple[Session, WriteLog]:
        """A 354, then ``after_354`` in a later read of the same reactor turn (as over TLS)."""
        session, transport = self.connect([transaction("env1", "b@example.net")])
        self.client.dataReceived(EHLO_PIPELINING)
        self.client.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        self.client.dataReceived(after_354)
        session.reactor.advance(0)
        self.assertEqual(len(transport.writes), 1, "the body must not be sent")
        self.assertTrue(transport.disconnecting)
        self.client.connectionLost(Failure(ConnectionDone()))
        return session, transport

    def test_reply_in_a_later_read_not_taken_for_end_of_data(self) -> None:
        session, _ = self.premature(b"250 2.0.0 premature\r\n")
        (result,) = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {"b@example.net": deferred(f"451 4.5.0 {HOST} replied 250 2.0.0 premature before the end of the message data")},
        )

    def test_part_of_a_reply_after_354_not_taken_for_end_of_data(self) -> None:
        session, _ = self.premature(b"250")
        (result,) = self.successResultOf(session.result)
        self.assertEqual(result.recipients, {"b@example.net": deferred(f"451 4.5.0 {HOST} replied during the message data")})

    def test_premature_reply_for_message_whose_group_went_out_behind_a_dot(self) -> None:
        session, transport = self.connect([transaction("env1"), transaction("env2", "c@example.net")])
        self.client.dataReceived(EHLO_PIPELINING)
        self.client.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        session.reactor.advance(0)
        self.assertEqual(len(transport.writes), 2)
        # The reply to env1's ".", then env2's group's replies, then one sent before env2's body.
        self.client.dataReceived(b"250 2.0.0 Ok: queued as 1\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        self.client.dataReceived(b"250 2.0.0 premature\r\n")
        session.reactor.advance(0)
        self.assertEqual(len(transport.writes), 2, "env2's body must not be sent")
        self.assertTrue(transport.disconnecting)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": sent("250 2.0.0 Ok: queued as 1")}),
                TransactionResult(
                    "env2",
                    True,
                    {
                        "c@example.net": deferred(
                            f"451 4.5.0 {HOST} replied 250 2.0.0 premature before the end of the message data"
                        )
                    },
                ),
            ],
        )

    def test_one_command_a_write_without_pipelining(self) -> None:
        session, transport = self.connect([transaction("env1", "b@example.net", "c@example.net")])
        self.client.dataReceived(EHLO_PLAIN)
        self.assertEqual(transport.writes, [b"MAIL FROM:<a@example.com>\r\n"])
        self.client.dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertEqual(transport.writes[1:], [b"RCPT TO:<b@example.net>\r\n"])
        self.client.dataReceived(b"250 2.1.5 Ok\r\n")
        self.assertEqual(transport.writes[2:], [b"RCPT TO:<c@example.net>\r\n"])
        self.client.dataReceived(b"250 2.1.5 Ok\r\n")
        self.assertEqual(transport.writes[3:], [b"DATA\r\n"])
        self.client.dataReceived(b"354 go ahead\r\n")
        # The body is streamed by a FileSender, then the final "." on its own.
        self.assertIsNotNone(transport.producer)
        while transport.producer is not None:
            transport.producer.resumeProducing()
        self.assertEqual(transport.writes[4:], [wire_form(MESSAGE), b".\r\n"])
        self.client.dataReceived(b"250 2.0.0 Ok: queued as 1234\r\n")
        self.assertEqual(transport.writes[6:], [b"QUIT\r\n"])
        self.assertEqual(
            self.successResultOf(session.result),
            [TransactionResult("env1", True, {"b@example.net": sent(), "c@example.net": sent()})],
        )

    def test_pipelining_keyword_case_insensitive(self) -> None:
        _, transport = self.connect([transaction()])
        self.client.dataReceived(b"250-mx.example\r\n250 pipelining\r\n")
        self.assertEqual(transport.writes, [group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA")])

    def test_writes_per_transaction_over_iosim(self) -> None:
        """
        One write a message: the body, its final "." and the next
        transaction's group (RFC 2920 3.1: message content may lead a group);
        the last message has no group behind it.
        """
        message2 = b"Subject: 2\r\n\r\n.two\r\n"
        session = Session(
            [
                transaction("env1"),
                transaction("env2", "c@example.net", "d@example.net", "c@example.net", mail_from="", message=message2),
                transaction("env3", "e@example.net"),
            ]
        )
        server = FakeMX(pipelining=True)
        session.accept(server)
        self.assertEqual(
            [r.recipients for r in self.successResultOf(session.result)],
            [{"b@example.net": sent()}, {"c@example.net": sent(), "d@example.net": sent()}, {"e@example.net": sent()}],
        )
        self.assertEqual(
            session.client_transports[0].writes,
            [
                b"EHLO relay.test\r\n",
                group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"),
                wire_form(MESSAGE)
                + b".\r\n"
                + group(b"MAIL FROM:<>", b"RCPT TO:<c@example.net>", b"RCPT TO:<d@example.net>", b"DATA"),
                wire_form(message2)
                + b".\r\n"
                + group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<e@example.net>", b"DATA"),
                wire_form(MESSAGE) + b".\r\n",
                b"QUIT\r\n",
            ],
        )
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n", b"Subject: 2\r\n\r\n..two\r\n.\r\n", MESSAGE + b".\r\n"])
        self.assertNotIn(b"RSET", server.verbs)

    def test_next_group_behind_final_dot(self) -> None:
        """Write by write: after the reply to ".", nothing is written until the next 354."""
        session, transport = self.connect([transaction("env1"), transaction("env2", "c@example.net")])
        self.client.dataReceived(EHLO_PIPELINING)
        self.client.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        session.reactor.advance(0)
        mail2 = group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<c@example.net>", b"DATA")
        self.assertEqual(transport.writes[1:], [wire_form(MESSAGE) + b".\r\n" + mail2])
        self.client.dataReceived(b"250 2.0.0 Ok: queued as 1\r\n")
        self.client.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
        self.assertEqual(len(transport.writes), 2)
        self.client.dataReceived(b"354 go ahead\r\n")
        session.reactor.advance(0)
        self.assertEqual(transport.writes[2:], [wire_form(MESSAGE) + b".\r\n"])
        self.client.dataReceived(b"250 2.0.0 Ok: queued as 2\r\n")
        self.assertEqual(transport.writes[3:], [b"QUIT\r\n"])
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": sent("250 2.0.0 Ok: queued as 1")}),
                TransactionResult("env2", True, {"c@example.net": sent("250 2.0.0 Ok: queued as 2")}),
            ],
        )

    def test_no_group_behind_final_dot_without_pipelining(self) -> None:
        session = Session([transaction("env1"), transaction("env2")])
        server = FakeMX({b".": [b"451 4.3.0 Temporary failure"]})
        session.accept(server)
        self.assertEqual(len(self.successResultOf(session.result)), 2)
        mail = [b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n"]
        body = [wire_form(MESSAGE), b".\r\n"]
        self.assertEqual(
            session.client_transports[0].writes[1:], [*mail, *body, b"RSET\r\n", *mail, *body, b"QUIT\r\n"]
        )

    def test_large_body_still_streamed(self) -> None:
        message = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100  # over 1 MiB
        session = Session([transaction(message=message)])
        server = FakeMX(pipelining=True)
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients, {"b@example.net": sent()})
        writes = session.client_transports[0].writes
        self.assertEqual(writes[1], group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"))
        self.assertEqual(writes[-2:], [b".\r\n", b"QUIT\r\n"])
        self.assertEqual(b"".join(writes[2:-2]), wire_form(message))
        self.assertEqual(server.payloads, [message + b".\r\n"])

    def test_large_body_between_small_ones(self) -> None:
        """
        A streamed body's "." goes out alone, the next group after its reply;
        a small body before a large one still carries the large one's group.
        """
        large = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100  # over 1 MiB
        session = Session(
            [transaction("env1"), transaction("env2", "c@example.net", message=large), transaction("env3")]
        )
        server = FakeMX(pipelining=True)
        session.accept(server)
        self.assertEqual(
            [r.recipients for r in self.successResultOf(session.result)],
            [{"b@example.net": sent()}, {"c@example.net": sent()}, {"b@example.net": sent()}],
        )
        writes = session.client_transports[0].writes
        mail1 = group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA")
        mail2 = group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<c@example.net>", b"DATA")
        self.assertEqual(writes[1:3], [mail1, wire_form(MESSAGE) + b".\r\n" + mail2])
        self.assertEqual(writes[-4:], [b".\r\n", mail1, wire_form(MESSAGE) + b".\r\n", b"QUIT\r\n"])
        self.assertEqual(b"".join(writes[3:-4]), wire_form(large))
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n", large + b".\r\n", MESSAGE + b".\r\n"])
        self.assertNotIn(b"RSET", server.verbs)

    def test_large_body_refused_then_rset(self) -> None:
        """After a streamed body nothing went out behind its ".": a refusal still gets RSET first."""
        large = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100
        session = Session([transaction("env1", message=large), transaction("env2")])
        server = FakeMX({b".": [b"552 5.3.4 Message too big"]}, pipelining=True)
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(first.recipients, {"b@example.net": failed("552 5.3.4 Message too big")})
        self.assertEqual(second.recipients, {"b@example.net": sent()})
        mail = group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA")
        self.assertEqual(
            session.client_transports[0].writes[-4:],
            [b".\r\n", b"RSET\r\n" + mail, wire_form(MESSAGE) + b".\r\n", b"QUIT\r\n"],
        )

    def test_pipelining_read_from_ehlo_after_starttls(self) -> None:
        """RFC 3207 4.2: only the EHLO reply after the handshake counts."""
        settings = SMTPSettings(helo="relay.test", tls=TLSMode.REQUIRE)
        tls_ehlo = b"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS"
        for before, after, pipelined in [
            (tls_ehlo, b"250-mx.example\r\n250 8BITMIME", False),
            (b"250-mx.example\r\n250 STARTTLS", b"250-mx.example\r\n250 PIPELINING", True),
        ]:
            session = Session([transaction()], settings)
            server = FakeMX({b"EHLO": [before, after]}, tls=pki().server)
            session.accept(server)
            [result] = self.successResultOf(session.result)
            self.assertEqual(result.recipients, {"b@example.net": sent()})
            self.assertEqual(
                [line for over_tls, line in server.commands if over_tls][:2],
                [b"EHLO relay.test", b"MAIL FROM:<a@example.com>"],
            )
            writes = session.client_transports[0].writes
            mail = group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA")
            self.assertEqual(mail in writes, pipelined)
            self.assertEqual(b"MAIL FROM:<a@example.com>\r\n" in writes, not pipelined)


class RepliesTests(SynchronousTestCase):
    """Replies to pipelined commands, read back in order, give the same results as without."""

    def test_mixed_rcpt_replies(self) -> None:
        session = Session([transaction("env1", "x@example.net", "y@example.net", "b@example.net")])
        server = FakeMX({b"RCPT": [b"550 5.1.1 unknown", b"451 4.7.1 Greylisted", None]}, pipelining=True)
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {
                "x@example.net": failed("550 5.1.1 unknown"),
                "y@example.net": deferred("451 4.7.1 Greylisted"),
                "b@example.net": sent(),
            },
        )
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"])
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA", b"QUIT"])

    def test_all_recipients_refused_data_refused_no_body(self) -> None:
        """
        RFC 2920 3.1: the DATA went out anyway; the server refuses it (554 from
        this one) and the client reads that reply and sends no body, then RSET
        opens the next transaction's group.
        """
        session = Session([transaction("env1", "x@example.net", "y@example.net"), transaction("env2")])
        server = FakeMX({b"RCPT": [b"550 5.1.1 no", b"450 4.2.0 busy"]}, pipelining=True)
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(
            first,
            TransactionResult(
                "env1", True, {"x@example.net": failed("550 5.1.1 no"), "y@example.net": deferred("450 4.2.0 busy")}
            ),
        )
        self.assertEqual(second, TransactionResult("env2", True, {"b@example.net": sent()}))
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"])
        writes = session.client_transports[0].writes
        self.assertEqual(
            writes[1:4],
            [
                group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<x@example.net>", b"RCPT TO:<y@example.net>", b"DATA"),
                group(b"RSET", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"),
                wire_form(MESSAGE) + b".\r\n",
            ],
        )

    def test_all_recipients_refused_data_503(self) -> None:
        session = Session([transaction("env1", "x@example.net")])
        server = FakeMX(
            {b"RCPT": b"550 5.1.1 no", b"DATA": b"503 5.5.1 Error: need RCPT command"}, pipelining=True
        )
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients, {"x@example.net": failed("550 5.1.1 no")})
        self.assertEqual(server.payloads, [])
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"])

    def test_all_recipients_refused_data_accepted_anyway(self) -> None:
        """RFC 2920 3.1: a 354 to that DATA gets a single dot, never the body."""
        session = Session([transaction("env1", "x@example.net"), transaction("env2")])
        server = FakeMX(
            {b"RCPT": [b"550 5.1.1 no"], b"DATA": [b"354 go ahead"], b".": [b"554 5.5.1 no recipients"]},
            pipelining=True,
        )
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(first.recipients, {"x@example.net": failed("550 5.1.1 no")})
        self.assertEqual(second.recipients, {"b@example.net": sent()})
        self.assertEqual(server.payloads, [b".\r\n", MESSAGE + b".\r\n"])
        self.assertEqual(session.client_transports[0].writes[2], b".\r\n")
        self.assertEqual(
            server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
        )

    def test_mail_refused(self) -> None:
        """The RCPTs and DATA behind a refused MAIL get 503/554s, which are read and ignored."""
        session = Session([transaction("env1", "b@example.net", "c@example.net"), transaction("env2")])
        server = FakeMX({b"MAIL": [b"553 5.7.1 Sender rejected"]}, pipelining=True)
        session.accept(server)
        first, second = self.successResultOf(session.result)
        refused = failed("553 5.7.1 Sender rejected")
        self.assertEqual(first, TransactionResult("env1", True, {"b@example.net": refused, "c@example.net": refused}))
        self.assertEqual(second, TransactionResult("env2", True, {"b@example.net": sent()}))
        # No transaction is open after a refused MAIL: no RSET.
        self.assertEqual(
            server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
        )
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"])

    def test_mail_refused_temporarily(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX({b"MAIL": b"452 4.3.1 Insufficient system storage"}, pipelining=True)
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(set(result.recipients.values()), {deferred("452 4.3.1 Insufficient system storage")})
        self.assertEqual(server.payloads, [])

    def test_end_of_data_refused_next_group_already_sent(self) -> None:
        """
        The next group went out behind the "." whatever its reply: after a
        refused end of data (5xx or 4xx) the next transaction goes on, no RSET
        (RFC 5321 4.1.1.4: the "." ends the transaction).
        """
        session = Session([transaction("env1"), transaction("env2"), transaction("env3"), transaction("env4")])
        server = FakeMX(
            {
                b".": [
                    b"554 5.7.1 Message rejected as spam",
                    b"451 4.3.0 Temporary failure",
                    b"250 2.0.0 Ok: queued as C",
                    b"552 5.3.4 too big",
                ]
            },
            pipelining=True,
        )
        session.accept(server)
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": failed("554 5.7.1 Message rejected as spam")}),
                TransactionResult("env2", True, {"b@example.net": deferred("451 4.3.0 Temporary failure")}),
                TransactionResult("env3", True, {"b@example.net": sent("250 2.0.0 Ok: queued as C")}),
                TransactionResult("env4", True, {"b@example.net": failed("552 5.3.4 too big")}),
            ],
        )
        mail = group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA")
        body = wire_form(MESSAGE) + b".\r\n"
        self.assertEqual(
            session.client_transports[0].writes[1:], [mail, body + mail, body + mail, body + mail, body, b"QUIT\r\n"]
        )
        self.assertEqual(server.payloads, [MESSAGE + b".\r\n"] * 4)
        self.assertNotIn(b"RSET", server.verbs)

    def test_rset_refused(self) -> None:
        """The next transaction's MAIL already went out behind the RSET: it ends deferred, no QUIT."""
        session = Session([transaction("env1"), transaction("env2")])
        server = FakeMX(
            {b"DATA": [b"451 4.3.0 Temporary failure"], b"RSET": b"502 5.5.2 no RSET here"}, pipelining=True
        )
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(first.recipients, {"b@example.net": deferred("451 4.3.0 Temporary failure")})
        mail = group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA")
        self.assertEqual(session.client_transports[0].writes[1:], [mail, b"RSET\r\n" + mail])
        self.assertEqual(
            second,
            TransactionResult(
                "env2",
                True,
                {"b@example.net": deferred(f"451 4.5.0 {HOST} refused RSET (502 5.5.2 no RSET here)")},
            ),
        )
        self.assertNotIn(b"QUIT", server.verbs)
        self.assertTrue(session.client_transports[0].disconnected)

    def test_results_reported_as_final_replies_arrive(self) -> None:
        reported: list[TransactionResult] = []
        session = Session(
            [transaction("env1", "x@example.net"), transaction("env2"), transaction("env3")],
            on_result=reported.append,
        )
        server = InOrderMX({b"RCPT": [b"550 5.1.1 no"], b".": [HOLD]}, pipelining=True)
        session.accept(server)
        # env1 was settled by its RCPT reply; env2 waits for the reply to its ".".
        self.assertEqual([r.key for r in reported], ["env1"])
        self.assertEqual(server.holding, 3)  # env3's MAIL, RCPT, DATA
        self.assertNoResult(session.result)
        server.release(b"250 2.0.0 Ok: queued as late")
        session.pump.flush()
        self.assertEqual([r.key for r in reported], ["env1", "env2", "env3"])
        self.assertEqual(self.successResultOf(session.result), reported)

    def test_data_refused_with_recipients(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX({b"DATA": b"554 5.5.1 No valid recipients"}, pipelining=True)
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(set(result.recipients.values()), {failed("554 5.5.1 No valid recipients")})
        self.assertEqual(server.payloads, [])

    def test_reply_with_354_not_taken_for_end_of_data(self) -> None:
        """A reply that came with the 354 was sent before the body was read: no body, session given up."""
        session = Session([transaction(), transaction("env2")])
        server = FakeMX({b"DATA": b"354 go ahead\r\n552 5.3.4 Message size exceeds fixed limit"}, pipelining=True)
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(first.recipients, {"b@example.net": failed("552 5.3.4 Message size exceeds fixed limit")})
        self.assertEqual(
            second,
            TransactionResult(
                "env2", False, {"b@example.net": deferred(f"451 4.5.0 {HOST} replied during the message data")}
            ),
        )
        self.assertEqual(server.payloads, [])
        # Neither the body nor, behind it, env2's group.
        self.assertEqual(
            session.client_transports[0].writes[1:],
            [group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA")],
        )
        self.assertTrue(session.client_transports[0].disconnected)


class BrokenPipelineTests(SynchronousTestCase):
    """The session dies with pipelined commands unanswered."""

    def test_connection_lost_mid_rcpt_replies(self) -> None:
        session = Session(
            [
                transaction("env1", "b@example.net", "x@example.net", "c@example.net", "d@example.net"),
                transaction("env2"),
            ]
        )
        server = FakeMX({b"RCPT": [None, b"550 5.1.1 unknown", DROP]}, pipelining=True)
        session.accept(server)
        lost = deferred(f"451 4.4.2 connection lost during RCPT TO with {HOST}")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult(
                    "env1",
                    True,
                    {
                        "b@example.net": lost,  # accepted, but no message went out
                        "x@example.net": failed("550 5.1.1 unknown"),
                        "c@example.net": lost,
                        "d@example.net": lost,
                    },
                ),
                TransactionResult("env2", False, {"b@example.net": lost}),
            ],
        )
        self.assertEqual(server.payloads, [])
        self.assertEqual(session.attempts, 1)

    def test_connection_lost_before_data_reply(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net")])
        server = FakeMX({b"DATA": DROP}, pipelining=True)
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            set(result.recipients.values()), {deferred(f"451 4.4.2 connection lost during DATA with {HOST}")}
        )

    def test_connection_lost_after_body(self) -> None:
        session = Session([transaction("env1", "b@example.net", "x@example.net"), transaction("env2")])
        server = FakeMX({b"RCPT": [None, b"550 5.1.1 unknown"], b".": DROP}, pipelining=True)
        session.accept(server)
        lost = deferred(f"451 4.4.2 connection lost during DATA with {HOST}")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult(
                    "env1", True, {"b@example.net": lost, "x@example.net": failed("550 5.1.1 unknown")}
                ),
                TransactionResult("env2", False, {"b@example.net": lost}),
            ],
        )
        self.assertEqual(len(server.payloads), 1)

    def test_connection_lost_with_next_group_sent(self) -> None:
        """
        Lost before the reply to ".": the message may or may not have been
        accepted (deferred, started); the next transaction's commands went
        out but none of its message did, so it counts as not started (the
        sender tries the next host at once, as when its MAIL had not gone out).
        """
        session = Session([transaction("env1"), transaction("env2", "c@example.net"), transaction("env3")])
        server = InOrderMX({b".": [HOLD]}, pipelining=True)
        session.accept(server)
        writes = session.client_transports[0].writes
        self.assertEqual(
            writes[-1],
            wire_form(MESSAGE) + b".\r\n" + group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<c@example.net>", b"DATA"),
        )
        self.assertEqual(server.holding, 3)
        server.transport.loseConnection()
        session.pump.flush()
        lost = deferred(f"451 4.4.2 connection lost during DATA with {HOST}")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": lost}),
                TransactionResult("env2", False, {"c@example.net": lost}),
                TransactionResult("env3", False, {"b@example.net": lost}),
            ],
        )
        self.assertEqual(len(server.payloads), 1)
        self.assertEqual(session.attempts, 1)

    def test_connection_lost_reading_next_group_replies(self) -> None:
        """Once the reply to "." is in, the next transaction is under way: started, as before."""
        session = Session([transaction("env1"), transaction("env2", "c@example.net", "d@example.net")])
        server = FakeMX({b"RCPT": [None, None, DROP]}, pipelining=True)
        session.accept(server)
        lost = deferred(f"451 4.4.2 connection lost during RCPT TO with {HOST}")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": sent()}),
                TransactionResult("env2", True, {"c@example.net": lost, "d@example.net": lost}),
            ],
        )

    def test_421_to_end_of_data_with_next_group_sent(self) -> None:
        session = Session([transaction("env1"), transaction("env2")])
        server = FakeMX({b".": b"421 4.3.2 Shutting down"}, pipelining=True)
        session.accept(server)
        closing = deferred("421 4.3.2 Shutting down")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": closing}),
                TransactionResult("env2", False, {"b@example.net": closing}),
            ],
        )
        # env2's commands were read, and its DATA answered, but no body went out; no QUIT behind them.
        self.assertEqual(server.verbs, [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA"])
        self.assertEqual(len(server.payloads), 1)
        self.assertTrue(session.client_transports[0].disconnected)

    def test_connection_lost_while_reading_replies_behind_refused_mail(self) -> None:
        """env1 is settled by its MAIL reply; only env2, never started, is left."""
        session = Session([transaction("env1", "b@example.net", "c@example.net"), transaction("env2")])
        server = FakeMX({b"MAIL": b"553 5.7.1 Sender rejected", b"RCPT": [None, DROP]}, pipelining=True)
        session.accept(server)
        first, second = self.successResultOf(session.result)
        self.assertEqual(set(first.recipients.values()), {failed("553 5.7.1 Sender rejected")})
        self.assertEqual(
            second,
            TransactionResult(
                "env2", False, {"b@example.net": deferred(f"451 4.4.2 connection lost during RCPT TO with {HOST}")}
            ),
        )

    def test_421_mid_group(self) -> None:
        session = Session([transaction("env1", "b@example.net", "c@example.net", "d@example.net"), transaction("env2")])
        server = FakeMX({b"RCPT": [None, b"421 4.4.5 Too many connections, closing"]}, pipelining=True)
        session.accept(server)
        closing = deferred("421 4.4.5 Too many connections, closing")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult(
                    "env1", True, {"b@example.net": closing, "c@example.net": closing, "d@example.net": closing}
                ),
                TransactionResult("env2", False, {"b@example.net": closing}),
            ],
        )
        self.assertEqual(server.payloads, [])
        self.assertTrue(session.client_transports[0].disconnected)

    def test_timeout_waiting_for_data_reply(self) -> None:
        session = Session([transaction()], SMTPSettings(helo="relay.test", command_timeout=60))
        server = FakeMX({b"DATA": SILENT}, pipelining=True)
        session.accept(server)
        session.advance(59)
        self.assertNoResult(session.result)
        session.advance(1)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {"b@example.net": deferred(f"451 4.4.2 timed out after 60s waiting for {HOST} during DATA")},
        )
        self.assertTrue(session.client_transports[0].disconnected)

    def test_data_timeout_with_next_group_sent(self) -> None:
        """The reply to "." gets the data timeout, even with the next group behind it."""
        session = Session(
            [transaction("env1"), transaction("env2")],
            SMTPSettings(helo="relay.test", command_timeout=60, data_timeout=600),
        )
        server = InOrderMX({b".": HOLD}, pipelining=True)
        session.accept(server)
        self.assertEqual(server.holding, 3)
        session.advance(599)
        self.assertNoResult(session.result)
        session.advance(1)
        timed_out = deferred(f"451 4.4.2 timed out after 600s waiting for {HOST} during DATA")
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": timed_out}),
                TransactionResult("env2", False, {"b@example.net": timed_out}),
            ],
        )
        self.assertTrue(session.client_transports[0].disconnected)

    def test_command_timeout_for_next_group_replies(self) -> None:
        """After the reply to ".", the replies to the group sent behind it get the command timeout."""
        session = Session(
            [transaction("env1"), transaction("env2")],
            SMTPSettings(helo="relay.test", command_timeout=60, data_timeout=600),
        )
        server = InOrderMX({b"MAIL": [None, HOLD]}, pipelining=True)
        session.accept(server)
        self.assertEqual(server.holding, 2)  # env2's RCPT, DATA
        session.advance(59)
        self.assertNoResult(session.result)
        session.advance(1)
        self.assertEqual(
            self.successResultOf(session.result),
            [
                TransactionResult("env1", True, {"b@example.net": sent()}),
                TransactionResult(
                    "env2",
                    True,
                    {"b@example.net": deferred(f"451 4.4.2 timed out after 60s waiting for {HOST} during MAIL FROM")},
                ),
            ],
        )

    def test_end_of_data_waits_for_data_timeout(self) -> None:
        session = Session([transaction()], SMTPSettings(helo="relay.test", command_timeout=60, data_timeout=600))
        server = FakeMX({b".": SILENT}, pipelining=True)
        session.accept(server)
        self.assertEqual(len(server.payloads), 1)
        session.advance(599)
        self.assertNoResult(session.result)
        session.advance(1)
        [result] = self.successResultOf(session.result)
        self.assertEqual(
            result.recipients,
            {"b@example.net": deferred(f"451 4.4.2 timed out after 600s waiting for {HOST} during DATA")},
        )




@implementer(IMessageSMTP)
class _TooBig:
    def lineReceived(self, line: bytes) -> None:
        raise SMTPServerError(552, b"5.3.4 Message too big")

    def eomReceived(self) -> Deferred[None]:
        raise AssertionError("not called after a refused line")

    def connectionLost(self) -> None:
        pass


class RefusingMailbox(Mailbox):
    """Refuses (552, from the end of data) the first C{count} messages to C{refused}."""

    def __init__(self, refused: bytes, count: int) -> None:
        super().__init__()
        self._refused = refused
        self._count = count

    def validateTo(self, user: User) -> Callable[[], IMessageSMTP]:
        make = super().validateTo(user)
        if self._count and str(user.dest).encode("ascii") == self._refused:
            self._count -= 1
            return _TooBig
        return make


class TwistedServerTests(SynchronousTestCase):
    def test_round_trip_pipelined(self) -> None:
        message = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\nbare LF\rbare CR\r\n"
        session = Session(
            [
                transaction("env1", "b@example.net", "nobody@example.net", message=message),
                transaction("env2", "nobody@example.net"),
                transaction("env3", mail_from=""),
            ]
        )
        mailbox = Mailbox()
        session.accept(twisted_server(mailbox, kind=PipeliningESMTP))
        first, second, third = self.successResultOf(session.result)
        self.assertEqual(first.recipients["b@example.net"].status, "sent")
        self.assertEqual(first.recipients["nobody@example.net"].status, "failed")
        self.assertEqual(first.recipients["nobody@example.net"].reply.code, 550)
        self.assertEqual(second.recipients["nobody@example.net"].status, "failed")
        self.assertEqual(third.recipients["b@example.net"].status, "sent")
        self.assertEqual(mailbox.messages, [("b@example.net", normalized(message)), ("b@example.net", MESSAGE)])
        writes = session.client_transports[0].writes
        self.assertEqual(
            writes[1:],
            [
                group(
                    b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"RCPT TO:<nobody@example.net>", b"DATA"
                ),
                wire_form(message)
                + b".\r\n"
                + group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<nobody@example.net>", b"DATA"),
                # env2 had no recipient: its DATA was refused, and RSET leads env3's group.
                group(b"RSET", b"MAIL FROM:<>", b"RCPT TO:<b@example.net>", b"DATA"),
                wire_form(MESSAGE) + b".\r\n",
                b"QUIT\r\n",
            ],
        )

    def test_round_trip_end_of_data_refused(self) -> None:
        """Twisted's server refusing a message, then reading the next group sent behind its "."."""
        session = Session([transaction("env1"), transaction("env2", "c@example.net"), transaction("env3")])
        mailbox = RefusingMailbox(b"b@example.net", 1)
        session.accept(twisted_server(mailbox, kind=PipeliningESMTP))
        self.assertEqual(
            [r.recipients for r in self.successResultOf(session.result)],
            [
                {"b@example.net": failed("552 5.3.4 Message too big")},
                {"c@example.net": sent("250 Delivery in progress")},
                {"b@example.net": sent("250 Delivery in progress")},
            ],
        )
        self.assertEqual(mailbox.messages, [("c@example.net", MESSAGE), ("b@example.net", MESSAGE)])
        body = wire_form(MESSAGE) + b".\r\n"
        self.assertEqual(
            session.client_transports[0].writes[1:],
            [
                group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"),
                body + group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<c@example.net>", b"DATA"),
                body + group(b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.net>", b"DATA"),
                body,
                b"QUIT\r\n",
            ],
        )


def _lost(protocol: Protocol) -> Deferred[None]:
    """A L{Deferred} that fires once C{protocol}'s connection is lost."""
    lost: Deferred[None] = Deferred()
    connection_lost = protocol.connectionLost

    def notify(reason: Failure = connectionDone) -> None:
        connection_lost(reason)
        lost.callback(None)

    protocol.connectionLost = notify  # type: ignore[method-assign]  # instruments this one instance
    return lost


class _Connections:
    """
    Wraps a factory so that the test can wait for its connections to close:
    L{send_session} returns as soon as the results are known, with QUIT
    still on its way.
    """

    def __init__(self) -> None:
        self.lost: list[Deferred[None]] = []

    def watch(self, factory: ServerFactory[Any] | ClientFactory[Any]) -> None:
        build = factory.buildProtocol

        def buildProtocol(addr: IAddress | None) -> Protocol | None:
            protocol = build(addr)
            if protocol is not None:
                self.lost.append(_lost(protocol))
            return protocol

        factory.buildProtocol = buildProtocol  # type: ignore[method-assign]  # instruments this one instance


@implementer(IReactorTCP, IReactorTime)
class _WatchingReactor:
    """The real reactor, with the client side's connections watched too."""

    def __init__(self, reactor: IReactorTCP, connections: _Connections) -> None:
        self._reactor = reactor
        self._connections = connections

    def __getattr__(self, name: str) -> object:
        return getattr(self._reactor, name)

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory[Any],
        timeout: float = 30.0,
        bindAddress: tuple[str, int] | None = None,
    ) -> IConnector:
        self._connections.watch(factory)
        return self._reactor.connectTCP(host, port, factory, timeout, bindAddress)


class LoopbackTests(TestCase):
    """L{mmgun.testing}'s ESMTP server (PIPELINING, STARTTLS, scripted faults) on a real loopback port."""

    def test_pipelined_session_with_starttls(self) -> Deferred[None]:
        from twisted.internet import reactor

        mailbox = StubMailbox()
        connections = _Connections()
        factory = smtp_server_factory(reactor, mailbox, tls=True)
        connections.watch(factory)
        commands: list[bytes] = []
        build = factory.buildProtocol

        def buildProtocol(addr: IAddress | None) -> _StubESMTP:
            protocol = build(addr)
            state_command = protocol.state_COMMAND

            def record(line: bytes) -> None:
                commands.append(line.split(b":")[0].split(b" ")[0])
                state_command(line)

            protocol.state_COMMAND = record  # type: ignore[method-assign]  # instruments this one instance
            return protocol

        factory.buildProtocol = buildProtocol  # type: ignore[method-assign]  # instruments this one instance
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        transactions = [
            Transaction("t1", "me@example.com", ("ok@a.example", "reject@a.example", "tempfail-1@a.example"), MESSAGE),
            Transaction("t2", "me@example.com", ("reject@b.example",), MESSAGE),
            Transaction("t3", "me@example.com", ("datareject@a.example",), MESSAGE),
            Transaction("t4", "", ("ok@b.example", "tempfail-1@a.example"), b"Subject: 4\r\n\r\n.\r\nfour\r\n"),
        ]
        reported: list[object] = []

        async def run() -> None:
            results = await send_session(
                _WatchingReactor(reactor, connections),
                "smtpstub.test",
                "127.0.0.1",
                port_number(port),
                transactions,
                SMTPSettings(helo="relay.test", tls=TLSMode.REQUIRE, command_timeout=10, data_timeout=10),
                on_result=lambda result: reported.append(result.key),
            )
            outcomes = [{a: (r.status, r.reply.code) for a, r in result.recipients.items()} for result in results]
            self.assertEqual(
                outcomes,
                [
                    {
                        "ok@a.example": ("sent", 250),
                        "reject@a.example": ("failed", 550),
                        "tempfail-1@a.example": ("deferred", 451),
                    },
                    {"reject@b.example": ("failed", 550)},
                    {"datareject@a.example": ("failed", 554)},
                    {"ok@b.example": ("sent", 250), "tempfail-1@a.example": ("sent", 250)},
                ],
            )
            self.assertEqual(reported, ["t1", "t2", "t3", "t4"])
            self.assertEqual(
                [(m.mail_from, m.recipients, m.tls) for m in mailbox.messages],
                [
                    ("me@example.com", ("ok@a.example",), True),
                    ("", ("ok@b.example", "tempfail-1@a.example"), True),
                ],
            )
            self.assertEqual(mailbox.messages[0].data, MESSAGE)
            self.assertEqual(mailbox.messages[1].raw, b"Subject: 4\r\n\r\n..\r\nfour\r\n.\r\n")
            self.assertEqual(len(connections.lost), 2)  # one connection, seen from both ends
            await DeferredList(connections.lost)
            # t2's group went out behind t1's "."; t2 had no recipient, so RSET leads t3's;
            # t4's went out behind t3's refused ".", without RSET.
            self.assertEqual(
                commands,
                [b"EHLO", b"STARTTLS", b"EHLO"]
                + [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]
                + [b"MAIL", b"RCPT", b"DATA"]
                + [b"RSET", b"MAIL", b"RCPT", b"DATA"]
                + [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
                + [b"QUIT"],
            )

        return Deferred.fromCoroutine(run())

