"""
Tests for L{mmgun.smtp}: the client runs against in-memory SMTP servers
(a scripted one, and Twisted's own ESMTP server), connected through a
L{MemoryReactorClock} and L{twisted.test.iosim}, with real TLS in memory for
STARTTLS. Time only moves when a test advances the clock.
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Callable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import ESMTP, SMTPBadRcpt, User
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides, implementer

from mmgun.smtp import (
    RecipientResult,
    Reply,
    SessionFailed,
    SMTPSettings,
    TLSMode,
    Transaction,
    TransactionResult,
    send_session,
    wire_form,
)

HOST = "mx.example"
ADDRESS = "192.0.2.25"
PORT = 25
SETTINGS = SMTPSettings(helo="relay.test")

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def transaction(
    key: object = "env1", *recipients: str, mail_from: str = "a@example.com", message: bytes = MESSAGE
) -> Transaction:
    return Transaction(key=key, mail_from=mail_from, recipients=recipients or ("b@example.net",), message=message)


# -- in-memory network with real STARTTLS --------------------------------------


class _RawWriter:
    """What the TLS layer writes to: the transport, bypassing TLS."""

    def __init__(self, transport: MemoryTLSTransport) -> None:
        self._transport = transport

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        iosim.FakeTransport.write(self._transport, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._transport)

    def abortConnection(self) -> None:
        iosim.FakeTransport.abortConnection(self._transport)


class MemoryTLSTransport(iosim.FakeTransport):
    """
    L{iosim.FakeTransport} whose C{startTLS} is real TLS (OpenSSL over
    memory), done the way L{twisted.internet._newtls} does it for TCP.
    """

    _tls: TLSMemoryBIOProtocol | None = None
    no_delay: bool | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []  # what the protocol wrote, one entry a call, before TLS

    def startTLS(
        self,
        contextFactory: IOpenSSLContextFactory | IOpenSSLClientConnectionCreator | IOpenSSLServerConnectionCreator,
        beNormal: bool = True,
    ) -> None:
        # No wrapped factory, as twisted.internet._newtls passes none: the protocol is given below.
        factory = TLSMemoryBIOFactory(contextFactory, not self.isServer, None)  # type: ignore[arg-type]
        tls = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.protocol = tls
        self._tls = tls
        alsoProvides(self, ISSLTransport)
        tls.makeConnection(_RawWriter(self))

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self._tls is not None:
            self._tls.write(data)
        else:
            super().write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


DROP = "drop"  # close the connection instead of replying
SILENT = "silent"  # never reply
_Script = bytes | str | list | Callable[[bytes], object] | None


class FakeMX(LineReceiver):
    """
    A scripted SMTP server. C{replies} maps a verb (C{b"MAIL"}, C{b"RCPT"},
    C{b"."} for the end of data...) to a reply, a list of replies used in
    turn, or a callable of the command line; L{DROP} and L{SILENT} are
    replies too. C{commands} records (over TLS?, line); C{payloads} the raw
    DATA payloads, terminator included.

    Only with C{pipelining} does EHLO list PIPELINING; unless C{eight_bit_mime}
    is false, it lists 8BITMIME. Without a script, RCPT
    outside a transaction (no MAIL accepted) gets 503 and DATA without an
    accepted RCPT 554, as from a real server reading pipelined commands.
    """

    MAX_LENGTH = 1 << 24
    transport: MemoryTLSTransport  # Session.accept connects it over one

    def __init__(
        self,
        replies: dict[bytes, _Script] | None = None,
        *,
        greeting: bytes | str = b"220 mx.example ESMTP fake",
        tls: ServerTLS | None = None,
        garble_tls: bool = False,
        pipelining: bool = False,
        eight_bit_mime: bool = True,
    ) -> None:
        self.replies = {verb: list(r) if isinstance(r, list) else r for verb, r in (replies or {}).items()}
        self.greeting = greeting
        self.tls_options = tls
        self.garble_tls = garble_tls
        self.tls_active = False
        self.commands: list[tuple[bool, bytes]] = []
        self.payloads: list[bytes] = []
        self._payload: list[bytes] | None = None
        self._garbling = False
        self.pipelining = pipelining
        self.eight_bit_mime = eight_bit_mime
        self._in_transaction = False
        self._accepted_rcpts = 0

    @property
    def verbs(self) -> list[bytes]:
        return [line.split(b" ")[0].split(b":")[0].upper() for _, line in self.commands]

    def connectionMade(self) -> None:
        self.send(self.greeting)

    def send(self, reply: object) -> None:
        if reply == DROP:
            self.transport.loseConnection()
        elif reply != SILENT:
            assert isinstance(reply, bytes)
            self.transport.write(reply + b"\r\n")

    def reply_for(self, verb: bytes, line: bytes, default: bytes) -> object:
        script = self.replies.get(verb)
        reply: object
        if callable(script):
            reply = script(line)
        elif isinstance(script, list):
            reply = script.pop(0) if script else None
        else:
            reply = script
        return default if reply is None else reply

    def dataReceived(self, data: bytes) -> None:
        if self._garbling:
            self.transport.write(b"this is not TLS\r\n")
        else:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._payload is not None:
            self._payload.append(line)
            if line == b".":
                self.payloads.append(b"\r\n".join(self._payload) + b"\r\n")
                self._payload = None
                self._end_transaction()
                self.send(self.reply_for(b".", line, b"250 2.0.0 Ok: queued as 1234"))
            return
        self.commands.append((self.tls_active, line))
        verb = line.split(b" ")[0].split(b":")[0].upper()
        if verb == b"EHLO":
            offer = self.tls_options is not None or self.garble_tls
            extensions = [b"mx.example", *([b"PIPELINING"] if self.pipelining else []), *([b"8BITMIME"] if self.eight_bit_mime else [])] + (
                [b"STARTTLS"] if offer and not self.tls_active else []
            )
            default = b"".join(b"250-" + e + b"\r\n" for e in extensions[:-1]) + b"250 " + extensions[-1]
            self.send(self.reply_for(verb, line, default))
        elif verb == b"STARTTLS":
            reply = self.reply_for(verb, line, b"220 2.0.0 Ready to start TLS")
            self.send(reply)
            if reply == b"220 2.0.0 Ready to start TLS":
                if self.garble_tls:
                    self._garbling = True
                else:
                    assert self.tls_options is not None
                    self.transport.startTLS(self.tls_options)
                    self.tls_active = True
        elif verb == b"DATA":
            default = b"354 End data with <CR><LF>.<CR><LF>"
            if not self._accepted_rcpts:
                default = b"554 5.5.1 Error: no valid recipients"
            reply = self.reply_for(verb, line, default)
            self.send(reply)
            if isinstance(reply, bytes) and reply.startswith(b"354"):
                self._payload = []
        elif verb == b"QUIT":
            self.send(self.reply_for(verb, line, b"221 2.0.0 Bye"))
            self.transport.loseConnection()
        else:
            defaults = {
                b"HELO": b"250 mx.example",
                b"MAIL": b"250 2.1.0 Ok",
                b"RCPT": b"250 2.1.5 Ok",
                b"RSET": b"250 2.0.0 Ok",
            }
            if verb == b"RCPT" and not self._in_transaction:
                defaults[verb] = b"503 5.5.1 Error: need MAIL command"
            reply = self.reply_for(verb, line, defaults.get(verb, b"502 5.5.2 Error: command not recognized"))
            self.send(reply)
            if verb == b"MAIL" and _positive(reply):
                self._in_transaction = True
            elif verb == b"RCPT" and _positive(reply):
                self._accepted_rcpts += 1
            elif verb == b"RSET":
                self._end_transaction()

    def _end_transaction(self) -> None:
        self._in_transaction = False
        self._accepted_rcpts = 0


def _positive(reply: object) -> bool:
    return isinstance(reply, bytes) and reply[:1] == b"2"


class Session:
    """
    L{send_session} running on a L{MemoryReactorClock}; the test completes
    (or fails) each connection attempt with L{accept} (or L{refuse}).
    """

    def __init__(
        self,
        transactions: list[Transaction],
        settings: SMTPSettings = SETTINGS,
        host: str = HOST,
        on_result: Callable[[TransactionResult], object] | None = None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.result = Deferred.fromCoroutine(
            send_session(self.reactor, host, ADDRESS, PORT, transactions, settings, on_result=on_result)
        )
        self.client_transports: list[MemoryTLSTransport] = []
        self._pump: iosim.IOPump | None = None

    @property
    def pump(self) -> iosim.IOPump:
        """The pump of the last connection accepted."""
        assert self._pump is not None, "no connection accepted yet"
        return self._pump

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def accept(self, server: Protocol) -> iosim.IOPump:
        address, port, factory, timeout, _ = self.reactor.tcpClients[len(self.client_transports)]
        client = factory.buildProtocol(IPv4Address("TCP", address, port))
        server_io = MemoryTLSTransport(
            server,
            isServer=True,
            hostAddress=IPv4Address("TCP", address, port),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        client_io = MemoryTLSTransport(
            client,
            isServer=False,
            hostAddress=IPv4Address("TCP", "198.51.100.7", 40000),
            peerAddress=IPv4Address("TCP", address, port),
        )
        self.client_transports.append(client_io)
        self._pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=self.reactor)
        self._pump.flush()
        return self._pump

    def refuse(self) -> None:
        index = len(self.client_transports)
        # Keeps the indexes of client_transports those of tcpClients; nothing reads a refused one.
        self.client_transports.append(None)  # type: ignore[arg-type]
        self.reactor.tcpClients[index][2].clientConnectionFailed(
            self.reactor.connectors[index], Failure(ConnectionRefusedError())
        )

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        if self._pump is not None:
            self._pump.flush()


def sent(reply: str = "250 2.0.0 Ok: queued as 1234") -> RecipientResult:
    return RecipientResult("sent", parse_reply(reply))


def parse_reply(text: str) -> Reply:
    code, _, rest = text.partition(" ")
    return Reply(int(code), rest)


# -- certificates -------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server TLS from cryptography objects (CertificateOptions takes pyOpenSSL ones, now deprecated)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.use_privatekey(key)
        self._context.use_certificate(certificate)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@attrs.frozen
class PKI:
    server: ServerTLS  # a certificate for mx.example, issued by the CA
    trust: object  # IOpenSSLTrustRoot: the CA
    other_trust: object  # an unrelated CA


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365 * 100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@functools.cache
def pki() -> PKI:
    ca_key, ca_cert = _ca("mmgun test CA")
    _, other_cert = _ca("unrelated CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365 * 100))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return PKI(
        server=ServerTLS(key, cert),
        trust=trustRootFromCertificates([Certificate.loadPEM(ca_cert.public_bytes(serialization.Encoding.PEM))]),
        other_trust=trustRootFromCertificates(
            [Certificate.loadPEM(other_cert.public_bytes(serialization.Encoding.PEM))]
        ),
    )


# -- wire form ----------------------------------------------------------------


def normalized(message: bytes) -> bytes:
    """CRLF everywhere, ending with CRLF: written differently from wire_form on purpose."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text.replace(b"\n", b"\r\n")


def unstuffed(payload: bytes) -> bytes:
    """A DATA payload, terminator included, back to the message (RFC 5321 4.5.2)."""
    assert payload.endswith(b".\r\n")
    lines = payload[: -len(b".\r\n")].split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[:-1])


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
        self.assertEqual(first.recipients["b@example.net"].outcome, "sent")
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
        self.assertEqual(result.recipients["b@example.net"].outcome, "sent")
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


@implementer(IMessageSMTP)
class _Message:
    def __init__(self, mailbox: Mailbox, recipient: str) -> None:
        self._mailbox = mailbox
        self._recipient = recipient
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        self._mailbox.messages.append((self._recipient, b"".join(line + b"\r\n" for line in self._lines)))
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None

    def validateFrom(self, helo: object, origin: object) -> object:
        return origin

    def validateTo(self, user: User) -> Callable[[], IMessageSMTP]:
        if user.dest.local == b"nobody":
            raise SMTPBadRcpt(user)
        return lambda: _Message(self, str(user.dest))


def twisted_server(mailbox: Mailbox, tls: ServerTLS | None = None, kind: type[ESMTP] = ESMTP) -> ESMTP:
    server = kind(contextFactory=tls)
    # twisted.mail's SMTP declares "delivery = None" and "timeout = 600" in its class body.
    server.delivery = mailbox  # type: ignore[assignment]
    server.host = HOST
    server.timeout = None  # type: ignore[assignment]  # its timer would use the global reactor
    server.noisy = False
    return server


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
        self.assertEqual(first.recipients["b@example.net"].outcome, "sent")
        self.assertEqual(first.recipients["b@example.net"].reply.code, 250)
        self.assertEqual(first.recipients["nobody@example.net"].outcome, "failed")
        self.assertEqual(first.recipients["nobody@example.net"].reply.code, 550)
        self.assertEqual(second.recipients["b@example.net"].outcome, "sent")
        self.assertEqual(mailbox.messages, [("b@example.net", normalized(message)), ("b@example.net", MESSAGE)])

    def test_starttls(self) -> None:
        session = Session([transaction()], SMTPSettings(helo="relay.test", tls=TLSMode.VERIFY, trust_root=pki().trust))
        mailbox = Mailbox()
        server = twisted_server(mailbox, pki().server)
        session.accept(server)
        self.assertEqual(self.successResultOf(session.result)[0].recipients["b@example.net"].outcome, "sent")
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
