"""
A scriptable ESMTP server that records what it accepts.

mmgun's integration tests (in-process, usually on a L{twisted.internet.task.Clock}
or a real loopback port) and the end-to-end scripts (``e2e-tests/smtpstub.py``,
one process per fake MX) deliver to this server and then look at what arrived.

Recipient local parts script faults (case-insensitive; anything after a ``+``
is a tag that is ignored when choosing the fault, but keeps counters apart):

=====================  ======================================================
``tempfail-N@...``     ``451 4.3.0 try again later`` to RCPT the first N times
                       this server sees that exact address (counted across
                       connections), then ``250``.
``reject@...``         ``550 5.1.1 no such user`` to RCPT.
``slow@...``           the reply to RCPT is delayed by ``slow_seconds``.
``slowdata@...``       the reply to the end of DATA is delayed by
                       ``slow_seconds``.
``drop@...``           the first transaction to reach the end of DATA with this
                       address gets its connection closed instead of a reply
                       (nothing is recorded); later ones are accepted.
``datareject@...``     ``554 5.7.1 message content rejected`` after DATA.
anything else          ``250``.
=====================  ======================================================

Delays use the injected reactor's C{callLater}, so with a
L{twisted.internet.task.Clock} they are deterministic; pending delays are
cancelled when their connection is lost.

A maildir here is a plain folder: each accepted message becomes one file
``<unix-nanos>-<counter>.eml`` holding ``X-Envelope-From: <sender>`` and one
``X-Envelope-To: <recipient>`` line per recipient, then the message exactly as
received (CRLF line ends).  Files are written under ``.tmp/`` inside the
folder and then linked into place, so a reader globbing ``*.eml`` never sees a
partial message.
"""

from __future__ import annotations

import datetime
import itertools
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageSMTP
from twisted.mail.smtp import COMMAND, DATA, ESMTP, Address, SMTPServerError, User
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "Mailbox",
    "Maildir",
    "Received",
    "self_signed_context",
    "smtp_server_factory",
]

_log = Logger()

_T = TypeVar("_T")

_TEMPFAIL = re.compile(r"tempfail-(\d+)")


class _Later(Protocol):
    def __call__(self, seconds: float, value: _T) -> Deferred[_T]: ...


@dataclass(frozen=True)
class Received:
    """
    One message the server accepted (answered C{250} to the end of DATA).

    @ivar mail_from: the reverse path, C{""} for the null sender.
    @ivar recipients: the accepted forward paths, in RCPT order.
    @ivar data: the message after un-dot-stuffing, lines ending in CRLF,
        without the terminating ``.`` line.
    @ivar raw: the exact bytes received between the C{354} reply and the end
        of the terminating ``.\\r\\n`` line (dot-stuffing included).
    @ivar tls: whether STARTTLS had been negotiated for the transaction.
    """

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    raw: bytes
    tls: bool


class Maildir:
    """
    Writes each accepted message to its own file in a folder, atomically.
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self._tmp = os.path.join(path, ".tmp")
        self._fsync = fsync
        self._counter = itertools.count()
        os.makedirs(self._tmp, exist_ok=True)

    def write(self, received: Received, when: float) -> str:
        """
        Write C{received} and return the final path of its file.

        @param when: arrival time in seconds since the epoch, from the
            server's clock; it names the file.
        """
        lines = [b"X-Envelope-From: <" + received.mail_from.encode("utf-8") + b">\r\n"]
        lines.extend(
            b"X-Envelope-To: <" + rcpt.encode("utf-8") + b">\r\n"
            for rcpt in received.recipients
        )
        lines.append(received.data)
        nanos = int(when * 1_000_000_000)
        n = next(self._counter)
        tmp = os.path.join(self._tmp, f"{os.getpid()}-{n}.tmp")
        with open(tmp, "wb") as f:
            f.writelines(lines)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        try:
            while True:
                final = os.path.join(self.path, f"{nanos}-{n}.eml")
                try:
                    # link, unlike rename, refuses to replace a file that
                    # another writer (another stub process) already put there.
                    os.link(tmp, final)
                except FileExistsError:
                    n = next(self._counter)
                    continue
                return final
        finally:
            os.unlink(tmp)


class Mailbox:
    """
    The in-memory record of every message a server accepted.

    @ivar messages: accepted messages in the order their C{250} was sent.
    """

    def __init__(self, maildir: str | None = None, *, fsync: bool = False) -> None:
        """
        @param maildir: if given, also write each message to this folder
            (see L{Maildir}).
        """
        self.messages: list[Received] = []
        self.maildir = Maildir(maildir, fsync=fsync) if maildir is not None else None
        self._waiting: list[tuple[int, Deferred[list[Received]]]] = []

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[Received]:
        return iter(self.messages)

    def deliver(self, received: Received, when: float) -> None:
        """
        Record an accepted message.

        @param when: arrival time in seconds since the epoch.
        """
        if self.maildir is not None:
            self.maildir.write(received, when)
        self.messages.append(received)
        if self._waiting:
            ready = [(n, d) for (n, d) in self._waiting if n <= len(self.messages)]
            self._waiting = [
                (n, d) for (n, d) in self._waiting if n > len(self.messages)
            ]
            for _, d in ready:
                d.callback(list(self.messages))

    def wait_for(self, count: int) -> Deferred[list[Received]]:
        """
        A L{Deferred} that fires with the messages once at least C{count}
        have been accepted (immediately if they already have).
        """
        if len(self.messages) >= count:
            return succeed(list(self.messages))
        d: Deferred[list[Received]] = Deferred()
        self._waiting.append((count, d))
        return d

    def to(self, address: str) -> list[Received]:
        """
        The messages accepted for C{address} (compared case-insensitively).
        """
        wanted = address.lower()
        return [m for m in self.messages if wanted in (r.lower() for r in m.recipients)]

    def clear(self) -> None:
        """
        Forget the messages recorded so far (files already written stay).
        """
        self.messages.clear()


def self_signed_context(hostname: str) -> CertificateOptions:
    """
    Server TLS options with a fresh self-signed certificate for C{hostname}.

    The certificate is valid from a day ago for a year (real wall-clock time,
    since the peer checks it against its own clock).  No client will verify
    it, which is the point: mmgun's opportunistic TLS must still deliver.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # pyOpenSSL takes cryptography objects directly (its own are deprecated),
    # though Twisted's annotations still name the pyOpenSSL types.
    return CertificateOptions(privateKey=key, certificate=cert)  # type: ignore[arg-type]


@dataclass
class _ServerState:
    """
    What all connections to one server share: counters outlive connections.
    """

    clock: IReactorTime
    mailbox: Mailbox
    hostname: bytes
    slow_seconds: float
    maildir: Maildir | None
    greeting_code: int | None
    timeout: int | None
    seen: dict[str, int] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    connections: set[_StubESMTP] = field(default_factory=set)

    def abort_connections(self) -> None:
        """
        Abort every open connection at once (a test's cleanup, so that none
        outlives the test).
        """
        for connection in list(self.connections):
            connection.abort()

    def accept(self, received: Received) -> None:
        when = self.clock.seconds()
        if self.maildir is not None:
            self.maildir.write(received, when)
        self.mailbox.deliver(received, when)
        _log.info(
            "accepted {size} bytes from <{mail_from}> for {recipients} (tls={tls})",
            size=len(received.data),
            mail_from=received.mail_from,
            recipients=list(received.recipients),
            tls=received.tls,
        )


def _fault(address: str) -> str:
    """
    The scripted behaviour named by the local part of C{address}.
    """
    local = address.rsplit("@", 1)[0].lower()
    return local.split("+", 1)[0]


@implementer(IMessageSMTP)
class _Message:
    """
    One mail transaction's message, for all of its recipients.

    The SMTP base class makes one L{IMessageSMTP} per recipient; this stub
    wants one L{Received} per transaction, so the protocol makes just one.
    """

    def __init__(
        self,
        server: _ServerState,
        mail_from: str,
        recipients: tuple[str, ...],
        tls: bool,
        later: _Later,
    ) -> None:
        self._server = server
        self._mail_from = mail_from
        self._recipients = recipients
        self._tls = tls
        self._later = later
        self._lines: list[bytes] = []
        self.raw_lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        """
        Decide this message's fate.

        @return: fires when it is accepted (and recorded); fails with
            L{SMTPServerError} to reply with that error, or with L{_Drop} to
            close the connection without a reply.
        """
        server = self._server
        faults = {address: _fault(address) for address in self._recipients}
        for address, fault in faults.items():
            if fault == "drop" and address.lower() not in server.dropped:
                server.dropped.add(address.lower())
                _log.info(
                    "scripted drop during DATA for {recipient}", recipient=address
                )
                return fail(_Drop())
        for address, fault in faults.items():
            if fault == "datareject":
                _log.info(
                    "scripted rejection after DATA for {recipient}", recipient=address
                )
                return fail(SMTPServerError(554, "5.7.1 message content rejected"))
        if "slowdata" in faults.values():
            return self._later(server.slow_seconds, None).addCallback(
                lambda _: self._accept()
            )
        return maybeDeferred(self._accept)

    def _accept(self) -> None:
        self._server.accept(
            Received(
                mail_from=self._mail_from,
                recipients=self._recipients,
                data=b"".join(line + b"\r\n" for line in self._lines),
                raw=b"".join(line + b"\r\n" for line in self.raw_lines),
                tls=self._tls,
            )
        )

    def connectionLost(self) -> None:
        self._lines.clear()
        self.raw_lines.clear()


class _Drop(Exception):
    """
    Close the connection instead of answering the end of DATA.
    """


class _StubESMTP(ESMTP):
    """
    L{ESMTP} with scripted faults, pipelining and one message per transaction.

    Commands are answered strictly in order: a line that arrives while an
    earlier command's reply is still pending (a delayed RCPT, say) waits in a
    backlog, which is what makes advertising PIPELINING (RFC 2920) honest.
    """

    noisy = False
    # Be lenient: mmgun's line-length discipline is checked on Received.raw.
    MAX_LENGTH = 1 << 20

    def __init__(
        self, server: _ServerState, context: CertificateOptions | None
    ) -> None:
        super().__init__(contextFactory=context)
        self._server = server
        self.host = server.hostname
        # twisted.mail's SMTP declares "timeout = 600" in its class body; None turns it off.
        self.timeout = server.timeout  # type: ignore[assignment]
        self._backlog: deque[bytes] = deque()
        self._awaiting_reply = False
        self._draining = False
        self._message: _Message | None = None
        self._delayed: set[IDelayedCall] = set()

    # The TimeoutMixin reaches for the global reactor; use the injected one.
    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self._server.clock.callLater(period, func)

    def _later(self, seconds: float, value: _T) -> Deferred[_T]:
        """
        A L{Deferred} firing with C{value} after C{seconds}, unless the
        connection is lost first (then it never fires).
        """
        d: Deferred[_T] = Deferred()

        def fire() -> None:
            self._delayed.discard(call)
            d.callback(value)

        call = self._server.clock.callLater(seconds, fire)
        self._delayed.add(call)
        return d

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._server.connections.add(self)
        code = self._server.greeting_code
        if code is not None:
            self.sendLine(b"%d %d.3.2 service not available" % (code, code // 100))
            self.transport.loseConnection()
            return
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._server.connections.discard(self)
        for call in self._delayed:
            if call.active():
                call.cancel()
        self._delayed.clear()
        self._backlog.clear()
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
        super().connectionLost(reason)

    def greeting(self) -> bytes:
        return self.host + b" ESMTP mmgun.testing"

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = super().extensions()
        ext[b"PIPELINING"] = None
        ext[b"8BITMIME"] = None
        return ext

    def sendCode(self, code: int, message: bytes = b"") -> None:
        super().sendCode(code, message)
        self._awaiting_reply = False
        if self._backlog:
            self._drain()

    def lineReceived(self, line: bytes) -> None:
        self._backlog.append(line)
        self._drain()

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._backlog and not self._awaiting_reply:
                # ITransport does not declare disconnecting; every Twisted transport has it.
                if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
                    self._backlog.clear()
                    return
                line = self._backlog.popleft()
                if self.mode == COMMAND:
                    self._awaiting_reply = True
                super().lineReceived(line)
        finally:
            self._draining = False

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendCode(500, b"5.5.2 line too long")
        assert self.transport is not None
        self.transport.loseConnection()

    def ext_STARTTLS(self, rest: bytes) -> None:
        super().ext_STARTTLS(rest)
        # Anything pipelined after STARTTLS arrived in the clear: discard it
        # (RFC 3207 section 4.2).
        self._backlog.clear()

    def validateFrom(self, helo: tuple[bytes, bytes], origin: Address) -> Address:
        return origin

    def validateTo(self, user: User) -> Deferred[User] | User:
        """
        Apply the recipient's scripted fault.  The return value only needs to
        be truthy: L{do_DATA} here builds the message itself.
        """
        address = str(user.dest)
        key = address.lower()
        fault = _fault(address)
        server = self._server
        seen = server.seen.get(key, 0)
        server.seen[key] = seen + 1
        tempfail = _TEMPFAIL.fullmatch(fault)
        if tempfail is not None and seen < int(tempfail.group(1)):
            _log.info(
                "scripted tempfail #{n} for {recipient}", n=seen + 1, recipient=address
            )
            raise SMTPServerError(451, "4.3.0 try again later")
        if fault == "reject":
            _log.info("scripted reject for {recipient}", recipient=address)
            raise SMTPServerError(550, "5.1.1 no such user")
        if fault == "slow":
            _log.info("scripted slow RCPT for {recipient}", recipient=address)
            return self._later(server.slow_seconds, user)
        return user

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: Address, recipients: list[User]
    ) -> None:
        # Received.data must be exactly what the client sent.
        return None

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 need MAIL and RCPT first")
            return
        recipients = tuple(str(user.dest) for user, _ in self._to)
        self._message = _Message(
            self._server, str(self._from), recipients, self.startedTLS, self._later
        )
        self._from = None
        self._to = []
        self.mode = DATA
        self.sendCode(354, b"Start mail input; end with <CRLF>.<CRLF>")

    def state_DATA(self, line: bytes) -> None:
        message = self._message
        assert message is not None
        message.raw_lines.append(line)
        if line[:1] == b".":
            if line == b".":
                self.mode = COMMAND
                self._message = None
                self._awaiting_reply = True
                message.eomReceived().addCallbacks(self._accepted, self._refused)
                return
            line = line[1:]
        message.lineReceived(line)

    def _accepted(self, _: object) -> None:
        self.sendCode(250, b"2.0.0 message accepted")

    def abort(self) -> None:
        """
        Drop the connection without a reply or a QUIT.
        """
        assert self.transport is not None
        # Declared by ITCPTransport, not ITransport; TCP, TLS and StringTransport all have it.
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _refused(self, reason: Failure) -> None:
        if reason.check(_Drop):
            self.abort()
        elif reason.check(SMTPServerError):
            error: Any = reason.value
            self.sendCode(error.code, error.resp.encode("ascii"))
        else:
            _log.failure("failed to accept a message", reason)
            self.sendCode(451, b"4.3.0 local error")


class _SMTPStubFactory(ServerFactory):
    noisy = False

    def __init__(
        self, server: _ServerState, context: CertificateOptions | None
    ) -> None:
        self.server = server
        self.mailbox = server.mailbox
        self._context = context

    def buildProtocol(self, addr: IAddress | None) -> _StubESMTP:
        protocol = _StubESMTP(self.server, self._context)
        protocol.factory = self
        return protocol


def smtp_server_factory(
    reactor: IReactorTime,
    mailbox: Mailbox,
    *,
    tls: bool = True,
    hostname: str = "smtpstub.test",
    slow_seconds: float = 3600.0,
    maildir: str | None = None,
    greeting_code: int | None = None,
    fsync: bool = False,
    timeout: int | None = 600,
    tls_context: CertificateOptions | None = None,
) -> _SMTPStubFactory:
    """
    A factory for the scriptable ESMTP server; listen with it anywhere.

    @param reactor: the clock for scripted delays and idle timeouts.
    @param mailbox: receives every accepted message.
    @param tls: offer STARTTLS with a self-signed certificate made now.
    @param hostname: named in the greeting, EHLO reply and certificate.
    @param slow_seconds: how long ``slow@`` and ``slowdata@`` wait.
    @param maildir: if given, also write each message to this folder.
    @param greeting_code: if given (e.g. 421), greet every connection with
        ``<code> <class>.3.2 service not available`` and close it.
    @param fsync: fsync each maildir file before it becomes visible.
    @param timeout: idle seconds before a connection is closed with 421.
    @param tls_context: with C{tls}, the server's TLS options instead of a
        self-signed certificate (e.g. one a test CA issued for the MX name).

    The factory's C{server} attribute holds the per-server fault counters
    (C{seen}, C{dropped}), which persist across connections, and the open
    C{connections}.
    """
    server = _ServerState(
        clock=reactor,
        mailbox=mailbox,
        hostname=hostname.encode("idna"),
        slow_seconds=slow_seconds,
        maildir=Maildir(maildir, fsync=fsync) if maildir is not None else None,
        greeting_code=greeting_code,
        timeout=timeout,
    )
    context = (tls_context or self_signed_context(hostname)) if tls else None
    return _SMTPStubFactory(server, context)
