"""
Shared test fakes: scripted MX servers on an in-memory network (with real STARTTLS), a
Twisted ESMTP server with a mailbox, the fake router and scripted SMTP sessions for the
sender, and the sender harness on a memory reactor. Test modules import them from here,
not from each other.
"""

from __future__ import annotations

import datetime
import functools
import random
import uuid
from collections.abc import Callable
from typing import Any

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
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import ESMTP, SMTPBadRcpt, User
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides, implementer

from mmgun.mx import MXHost
from mmgun.sender import Sender, SenderSettings
from mmgun.smtp import (
    RecipientResult,
    Reply,
    SessionFailed,
    SMTPSettings,
    Transaction,
    TransactionResult,
    send_session,
)
from mmgun.store import NewSubmission
from mmgun.testing.smtpserver import Mailbox as StubMailbox, smtp_server_factory

from .helpers import result, sync_store

HOST = "mx.example"


ADDRESS = "192.0.2.25"


PORT = 25


SMTP_SETTINGS = SMTPSettings(helo="relay.test")


MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def transaction(
    key: object = "env1", *recipients: str, mail_from: str = "a@example.com", message: bytes = MESSAGE
) -> Transaction:
    return Transaction(key=key, mail_from=mail_from, recipients=recipients or ("b@example.net",), message=message)


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
            extensions = [
                b"mx.example",
                *([b"PIPELINING"] if self.pipelining else []),
                *([b"8BITMIME"] if self.eight_bit_mime else []),
            ] + ([b"STARTTLS"] if offer and not self.tls_active else [])
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
        settings: SMTPSettings = SMTP_SETTINGS,
        host: str = HOST,
        on_result: Callable[[TransactionResult], object] | None = None,
        may_start: Callable[[Transaction], bool] | None = None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.result = Deferred.fromCoroutine(
            send_session(
                self.reactor, host, ADDRESS, PORT, transactions, settings, on_result=on_result, may_start=may_start
            )
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


EHLO_PIPELINING = b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


EHLO_PLAIN = b"250-mx.example\r\n250 8BITMIME\r\n"


def group(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


class WriteLog(StringTransport):
    """A L{StringTransport} that keeps each C{write} apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def failed(reply: str) -> RecipientResult:
    return RecipientResult("failed", parse_reply(reply))


def deferred(reply: str) -> RecipientResult:
    return RecipientResult("deferred", parse_reply(reply))


class PipeliningESMTP(ESMTP):
    """Twisted's ESMTP server, saying that it reads pipelined commands (it does)."""

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        return {**super().extensions(), b"PIPELINING": None}


T0 = 1_800_000_000.0


SENDER_SETTINGS = SenderSettings(
    poll_interval=1.0, retry_min=300.0, retry_max=3600.0, queue_lifetime=86400.0, lease_time=60.0
)


class FakeRouter:
    def __init__(self, hosts: dict[str, Any]) -> None:
        self.routes = hosts
        self.bad: list[str] = []
        self.good: list[str] = []

    async def hosts(self, domain: str) -> list[MXHost]:
        route = self.routes[domain]
        if isinstance(route, Exception):
            raise route
        return route

    def mark_bad(self, host: MXHost) -> None:
        self.bad.append(host.name)

    def mark_good(self, host: MXHost) -> None:
        self.good.append(host.name)


class ScriptedSessions:
    """
    Stands in for send_session: answers each recipient by a script keyed on its local
    part, and records every session. Keeps send_session's contract: every transaction's
    result goes once to on_result (a started one's at once, or with ``report_each`` False
    all at the end of the session; the ones not started at the end), and is returned too.
    """

    def __init__(self) -> None:
        self.sessions: list[tuple[str, list]] = []
        self.down: set[str] = set()
        self.replies: dict[str, list[Reply]] = {}
        self.hold: Deferred | None = None
        self.report_each = True
        #: Whether a refusal answers the recipient's RCPT TO (False: MAIL FROM's or the message's).
        self.at_rcpt = True

    async def __call__(
        self, reactor, host, address, port, transactions, settings, on_result=None, may_start=None, on_dot_sent=None
    ):
        self.sessions.append((host, list(transactions)))
        if host in self.down:
            raise SessionFailed(Reply(421, f"4.4.1 connection refused by {host}"))
        if self.hold is not None:
            await self.hold
        results = []
        reported = 0
        for index, t in enumerate(transactions):
            if may_start is not None and not may_start(t):
                # As send_session does: this transaction and the rest are not started.
                held = Reply(451, "4.3.0 transaction held back by mmgun; nothing sent")
                results += [
                    TransactionResult(u.key, False, dict.fromkeys(u.recipients, RecipientResult("deferred", held)))
                    for u in transactions[index:]
                ]
                break
            if on_dot_sent is not None:
                on_dot_sent(t)
            recipients = {}
            for rcpt in t.recipients:
                script = self.replies.get(rcpt.split("@")[0])
                reply = script.pop(0) if script else Reply(250, "2.0.0 Ok")
                outcome = {2: "sent", 5: "failed"}.get(reply.code // 100, "deferred")
                recipients[rcpt] = RecipientResult(outcome, reply, at_rcpt=self.at_rcpt and outcome != "sent")
            results.append(TransactionResult(t.key, True, recipients))
            if on_result is not None and self.report_each:
                on_result(results[-1])
                reported += 1
        if on_result is not None:
            for result in results[reported:]:
                on_result(result)
        return results

    def delivered(self) -> list[tuple[object, str]]:
        return [(t.key, r) for _, ts in self.sessions for t in ts for r in t.recipients]


def mx(name: str, address: str = "127.0.0.2") -> MXHost:
    return MXHost(name, address, 25)


HARNESS_SETTINGS = SenderSettings(poll_interval=1.0, retry_min=300.0, retry_max=3600.0, lease_time=60.0)


HARNESS_SMTP = SMTPSettings(helo="mmgun.test", command_timeout=8.0, connect_timeout=8.0)


class MemoryNet:
    """
    Completes the connections a MemoryReactorClock was asked to make: to an in-memory
    server (``servers[address]()``), or refused (``None``). :meth:`run` moves bytes until
    nothing moves.
    """

    def __init__(self, reactor: MemoryReactorClock, default: Callable[[], Protocol] | None = None) -> None:
        self.reactor = reactor
        self.default = default
        self.servers: dict[str, Callable[[], Protocol] | None] = {}
        #: The address of every connection attempt, in order.
        self.attempts: list[str] = []
        self._pumps: list[iosim.IOPump] = []

    def run(self) -> None:
        for _ in range(1000):
            moved = False
            while len(self.attempts) < len(self.reactor.tcpClients):
                index = len(self.attempts)
                address, port, factory, _, _ = self.reactor.tcpClients[index]
                self.attempts.append(address)
                moved = True
                make = self.servers.get(address, self.default)
                if make is None:
                    factory.clientConnectionFailed(self.reactor.connectors[index], Failure(ConnectionRefusedError()))
                    continue
                server = make()
                here, there = IPv4Address("TCP", "198.51.100.7", 40000), IPv4Address("TCP", address, port)
                client = factory.buildProtocol(there)
                self._pumps.append(
                    iosim.connect(
                        server,
                        iosim.FakeTransport(server, isServer=True, hostAddress=there, peerAddress=here),
                        client,
                        iosim.FakeTransport(client, isServer=False, hostAddress=here, peerAddress=there),
                        greet=False,
                        clock=self.reactor,
                    )
                )
            for pump in self._pumps:
                moved = pump.flush() or moved
            if not moved:
                return
        raise AssertionError("the memory network never settled")

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let ``seconds`` pass on the reactor's clock, ``step`` at a time, moving bytes after each."""
        self.run()
        while seconds > 1e-9:
            self.reactor.advance(min(step, seconds))
            seconds -= min(step, seconds)
            self.run()


def smtp_server(
    reactor: MemoryReactorClock, mailbox: StubMailbox, slow_seconds: float = 30.0
) -> Callable[[], Protocol]:
    factory = smtp_server_factory(reactor, mailbox, tls=False, slow_seconds=slow_seconds, timeout=None)
    return lambda: factory.buildProtocol(None)


def submission(recipients: tuple[str, ...], at: float, message: bytes = b"Subject: x\r\n\r\nhi\r\n") -> NewSubmission:
    return NewSubmission(uuid.uuid4().hex, "c1", "me@example.com", recipients, message, at)


class Harness:
    """A real store, a MemoryReactorClock with a memory network, a steppable wall clock."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.store, self.path = sync_store(case)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        #: The wall clock: the reactor's (monotonic) time plus whatever steps the test makes.
        self.step = 0.0
        self.net = MemoryNet(self.reactor)
        self.mailbox = StubMailbox()

    def wall(self) -> float:
        return self.reactor.seconds() + self.step

    def sender(
        self,
        store: Any = None,
        owner: str = "sender-1",
        settings: SenderSettings = HARNESS_SETTINGS,
        router: Any = None,
        session: Any = send_session,
    ) -> Sender:
        """A started sender (stopped by the test's cleanup)."""
        sender = Sender(
            store if store is not None else self.store,
            router if router is not None else FakeRouter({"a.example": [MXHost("mx.a.example", "127.0.0.2", 25)]}),
            self.reactor,
            HARNESS_SMTP,
            settings,
            session=session,
            rng=random.Random(1),
            owner=owner,
            wall=self.wall,
        )
        sender.startService()

        def stop() -> None:
            if sender.running:
                d = sender.stopService()
                self.net.advance(settings.shutdown_timeout + 1)
                self.case.successResultOf(d)

        self.case.addCleanup(stop)
        return sender

    def submit(self, *recipients: str, message: bytes = b"Subject: x\r\n\r\nhi\r\n") -> str:
        return result(self.case, self.store.add_submission(submission(recipients, self.wall(), message)))

    def state(self, submission_id: str) -> Any:
        return result(self.case, self.store.submission("c1", submission_id))
