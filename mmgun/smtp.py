"""
The outgoing ESMTP client: one SMTP session to one MX address, carrying one or
more mail transactions, each ending in a definite per-recipient outcome.

Built on L{twisted.mail.smtp.ESMTPClient}, which does the greeting, EHLO (with
the HELO fallback), STARTTLS, the idle timeout and the DATA body streaming. The
mail transactions themselves (MAIL, RCPT, DATA, RSET) are driven here rather
than through C{getMailFrom}/C{getMailTo}/C{sentMail}, because the stock ones
would lose what this module has to report:

    - C{quoteaddr} runs every address through C{email.utils.parseaddr}, which
      rewrites some valid addresses (C{"a,b@c.example"} becomes C{<a>});
    - C{sentMail} gets the same C{code} for "MAIL FROM refused", "DATA
      refused" and "end of data refused", and C{successAddresses} is not reset
      between messages;
    - after a refused HELO the client sends HELO again, for ever;
    - C{transformChunk} dot-stuffs each 16 KiB chunk on its own (a "." line at
      a chunk boundary goes out unstuffed) and turns CRLF into CR CR LF: the
      body is instead put in its wire form once, by L{wire_form};
    - its factories reconnect and re-send after a connection drops, even after
      the final "." went out; this module never reconnects once a transaction
      has started.

When the server's EHLO reply lists PIPELINING (RFC 2920), each transaction's
MAIL FROM, RCPT TOs and DATA (after a failed transaction: RSET first) go out
in one write, and the replies are then read in order; a body of up to
C{_ONE_WRITE_MAX} (256 KiB) goes out in one more write with its final "." and
the next transaction's MAIL FROM, RCPT TOs and DATA; a larger one is streamed
through a producer, a chunk at a time as the peer takes it. A session
therefore holds at most about 256 KiB of its own in the transport's buffer
towards a slow MX: with C{--max-connections} 100, about 25 MiB in all. Without
PIPELINING, every command waits for the previous one's reply.

A message with a byte of 0x80 or more goes out with C{MAIL FROM:<...>
BODY=8BITMIME} when the server's EHLO reply lists 8BITMIME (RFC 6152); when
it does not (or after the HELO fallback), that transaction is not sent: its
recipients fail permanently (554 5.6.3). It is not converted to 7 bit.

The caller gets one L{TransactionResult} per L{Transaction}, or
L{SessionFailed} when nothing was attempted on this host.

L{SessionCache} keeps sessions open between calls (no QUIT) for the next
call to the same MX, which then skips TCP, EHLO and STARTTLS; a parked
session the peer closed, or spoke on, is dropped and never reused.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from io import BytesIO
from typing import TYPE_CHECKING, Literal, Protocol, cast, runtime_checkable

import attrs
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.mail.smtp import SUCCESS, ESMTPClient, SMTPClientError
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "Reply",
    "RecipientResult",
    "SMTPSettings",
    "SessionCache",
    "SessionFailed",
    "TLSMode",
    "Transaction",
    "TransactionResult",
    "send_session",
    "wire_form",
]

_log = Logger()


@runtime_checkable
class _Abortable(Protocol):
    """
    A transport that can drop its connection without flushing. Every transport
    that carries a session has C{abortConnection} (TCP, TLS, the testing
    ones), but only L{twisted.internet.interfaces.ITCPTransport} declares it.
    """

    def abortConnection(self) -> None: ...


def _recipients(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(addresses)


class TLSMode(enum.Enum):
    """
    What to do about STARTTLS (RFC 3207).

    OPPORTUNISTIC: encrypt when the server offers it, without checking its
    certificate (RFC 7435); plain text when it doesn't or refuses STARTTLS,
    and a second connection in plain text when the connection dies during
    STARTTLS or the TLS handshake.
    REQUIRE: never send in clear; the certificate is not checked.
    VERIFY: REQUIRE, plus the certificate must be valid for the MX host name.
    """

    OPPORTUNISTIC = "opportunistic"
    REQUIRE = "require"
    VERIFY = "verify"


@attrs.frozen
class Reply:
    """
    An SMTP reply, as received or as synthesized by this module.

    C{text} is the reply without its code; the lines of a multi-line reply
    are joined with a space.
    """

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.text else str(self.code)


@attrs.frozen
class Transaction:
    """
    One message to send. Addresses are ASCII (domains already IDNA-encoded);
    an empty C{mail_from} is the null reverse-path C{<>}. C{message} is the
    RFC 5322 message with CRLF line endings, not dot-stuffed.
    """

    key: object
    mail_from: str
    recipients: tuple[str, ...] = attrs.field(converter=_recipients)
    message: bytes
    #: C{wire_form(message)}, when the caller already has it: the sender computes it
    #: once per message, not once per transaction (a 2 MB message to 1,000 domains).
    wire: bytes | None = attrs.field(default=None, kw_only=True, repr=False)
    #: Whether the message has a byte of 0x80 or more, so that it goes out only as
    #: C{BODY=8BITMIME} (RFC 6152), to a server that offers it. Like C{wire}, the sender
    #: gives it once per message; made from C{message} when not given.
    eight_bit: bool = attrs.field(
        default=attrs.Factory(lambda self: not self.message.isascii(), takes_self=True), kw_only=True
    )

    def payload(self) -> bytes:
        """The DATA payload: L{wire_form} of the message."""
        return self.wire if self.wire is not None else wire_form(self.message)


@attrs.frozen
class RecipientResult:
    """
    C{outcome} is "sent", "failed" (permanent) or "deferred" (try again later);
    C{at_rcpt}: the reply answered this recipient's own RCPT TO (not MAIL FROM or the
    message, whose refusal says nothing about the address).
    """

    outcome: str
    reply: Reply
    #: Not part of equality: a result is its outcome and reply; this says which command drew it.
    at_rcpt: bool = attrs.field(default=False, eq=False)


@attrs.frozen
class TransactionResult:
    """
    The outcome of one L{Transaction}: one entry per (distinct) recipient.
    C{started} is C{False} when the session ended before its MAIL FROM was
    sent, or (with PIPELINING) while its MAIL FROM, RCPT TOs and DATA, sent
    behind the previous message's final ".", were still unanswered: none of
    its message went out, so another host can be tried at once without risk
    of a duplicate. All its recipients are then deferred.
    """

    key: object
    started: bool
    recipients: dict[str, RecipientResult]


class SessionFailed(Exception):
    """
    Nothing was attempted on this host: connect failure or timeout, 4xx/5xx
    greeting, EHLO and HELO refused, TLS required but not offered or failed.
    The caller then tries the next MX.

    @ivar reply: the peer's reply, or one synthesized here (code 421).
    @ivar connected: C{False} when no connection was made (refused, timed
        out): no SMTP session took place.
    """

    def __init__(self, reply: Reply, *, connected: bool = True) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.connected = connected


@attrs.frozen
class SMTPSettings:
    """
    @ivar helo: our name for EHLO/HELO.
    @ivar command_timeout: seconds to wait for any reply (and for progress
        while sending the body).
    @ivar data_timeout: seconds to wait for the reply to the final "."
        (RFC 5321 4.5.3.2.6 says at least 10 minutes).
    @ivar trust_root: an L{IOpenSSLTrustRoot} for L{TLSMode.VERIFY};
        C{None} means the platform's trust store.
    """

    helo: str
    tls: TLSMode = TLSMode.OPPORTUNISTIC
    command_timeout: float = 300.0
    connect_timeout: float = 30.0
    data_timeout: float = 600.0
    trust_root: object = None


_ANY_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def wire_form(message: bytes) -> bytes:
    """
    The DATA payload as written on the wire: every line CRLF terminated (a
    stray CR or LF becomes CRLF), every line starting with "." dot-stuffed
    (RFC 5321 4.5.2). The client adds the terminating ".\\r\\n" once. Pure.

    Normalising bare CR and LF, rather than passing them on, is what keeps a
    body from ending the DATA early at servers that accept "\\n.\\n" as the
    end of data (SMTP smuggling).
    """
    if not message:
        return b""
    wire = _ANY_LINE_BREAK.sub(b"\r\n", message)
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    # Every line now starts at offset 0 or right after a CRLF.
    wire = wire.replace(b"\r\n.", b"\r\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    return wire


def _check_address(address: str, what: str) -> None:
    if (
        not address.isascii()
        or any(c in address for c in "<>")
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in address)
    ):
        raise ValueError(f"{what} {address!r} is not an ASCII address without control characters or angle brackets")


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
_ENHANCED_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |$)")
# What a peer's reply must not carry into last_reply and the logs: C0 and C1
# controls, DEL, and the other characters str.splitlines() and log viewers
# break lines at (U+2028, U+2029; U+0085 is C1), and bidirectional overrides
# that make a logged line read differently from what it says.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")

# A reply longer than this is hostile or broken; SMTPClient would buffer it
# without limit.
_MAX_REPLY_LINES = 100

# With PIPELINING, a body up to this size goes out with its final "." in one
# write; a larger one is streamed as without PIPELINING, so that the idle
# timeout keeps measuring the progress of the transfer. It bounds what one
# session puts in its transport's buffer at once (times --max-connections).
_ONE_WRITE_MAX = 256 * 1024

#: How long a cached session's QUIT may wait for its reply before the connection is dropped.
QUIT_TIMEOUT = 5.0


def _reply(code: int, resp: bytes | str) -> Reply:
    """
    Turn what L{SMTPClient} hands its state callbacks (the reply lines joined
    with "\\n", without codes) into a L{Reply}. An enhanced status code
    repeated on every line of a multi-line reply is kept only once.
    """
    text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else resp
    lines = [_CONTROL.sub(" ", line).strip() for line in text.split("\n")]
    status = _ENHANCED_STATUS.match(lines[0])
    if status is not None:
        prefix = status.group(0)
        lines[1:] = [line[len(prefix) :].lstrip() if line.startswith(prefix) else line for line in lines[1:]]
    return Reply(code, " ".join(line for line in lines if line))


def _rcpt_command(recipient: str) -> bytes:
    return b"RCPT TO:<" + recipient.encode("ascii") + b">"


def _mail_command(transaction: Transaction) -> bytes:
    """MAIL FROM, with C{BODY=8BITMIME} for an 8-bit message (RFC 6152 3); a 7-bit one has no BODY parameter."""
    command = b"MAIL FROM:<" + transaction.mail_from.encode("ascii") + b">"
    return command + b" BODY=8BITMIME" if transaction.eight_bit else command


def _group(transaction: Transaction) -> bytes:
    """MAIL FROM, a RCPT TO per distinct recipient, DATA: one pipelined group (RFC 2920 3.1: DATA last)."""
    lines = [_mail_command(transaction) + b"\r\n"]
    lines.extend(_rcpt_command(recipient) + b"\r\n" for recipient in dict.fromkeys(transaction.recipients))
    lines.append(b"DATA\r\n")
    return b"".join(lines)


def _outcome_for(code: int) -> str:
    return "failed" if 500 <= code < 600 else "deferred"


@implementer(IOpenSSLClientConnectionCreator)
class _UnauthenticatedTLS:
    """
    Client TLS that encrypts without checking the server's certificate or
    name: RFC 7435 opportunistic security (and L{TLSMode.REQUIRE}). Sends SNI,
    which some MX hosts use to pick their certificate.
    """

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions()  # verify=False
        self._server_name: bytes | None = None
        if hostname.isascii() and not (isIPAddress(hostname) or isIPv6Address(hostname)):
            self._server_name = hostname.encode("ascii")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def _tls_creator(settings: SMTPSettings, host: str) -> IOpenSSLClientConnectionCreator:
    # MX names from DNS may be absolute ("mx.example."); certificates and SNI
    # never carry the trailing dot.
    name = host.rstrip(".")
    if settings.tls is TLSMode.VERIFY:
        trust_root = settings.trust_root if settings.trust_root is not None else platformTrust()
        return optionsForClientTLS(name, trustRoot=cast("IOpenSSLTrustRoot", trust_root))
    return _UnauthenticatedTLS(name)


class _Phase(enum.Enum):
    """Where the session is; the value is used in synthesized replies."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    TLS = "TLS handshake"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    RSET = "RSET"
    QUIT = "QUIT"
    IDLE = "idle"


@attrs.define
class _Progress:
    """The transaction in flight."""

    transaction: Transaction
    recipients: tuple[str, ...]
    outcomes: dict[str, RecipientResult] = attrs.Factory(dict)
    accepted: list[str] = attrs.Factory(list)
    next_recipient: int = 0
    last_reply: Reply | None = None


@attrs.frozen
class _Outcome:
    results: list[TransactionResult]
    last_replies: list[Reply | None]  # per result, for the log
    failure: Reply | None  # set when no transaction was started
    tls_failed: bool
    #: A reused session whose connection was found dead before the peer answered anything:
    #: nothing of it was started, and a fresh connection may be tried at once.
    stale: bool = False
    #: The session, when it was kept open (SessionCache) rather than ended with QUIT.
    session: _ESMTPSession | None = None


_Then = Literal["quit", "close", "abort", "nothing", "park"]


class _ESMTPSession(ESMTPClient):
    """
    One connection's worth of L{Transaction}s. L{ended} fires with an
    L{_Outcome} as soon as every outcome is known (possibly before the
    connection has closed, e.g. while QUIT is on its way); never errbacks
    except on cancellation.

    ESMTPClient routes every attribute assignment into the instance dict, so
    this class keeps to plain attributes.
    """

    debug = False  # SMTPClient would otherwise keep a transcript in self.log

    def __init__(
        self,
        *,
        clock: IReactorTime,
        host: str,
        transactions: Sequence[Transaction],
        settings: SMTPSettings,
        tls: IOpenSSLClientConnectionCreator | None,
        on_result: Callable[[TransactionResult], object] | None = None,
        may_start: Callable[[Transaction], bool] | None = None,
        on_dot_sent: Callable[[Transaction], object] | None = None,
        keep: bool = False,
    ) -> None:
        super().__init__(None, tls, settings.helo)
        # ESMTPClient declares C{context = None}; this is the same object, typed.
        self._tls = tls
        self._on_result = on_result
        self._may_start = may_start
        self._on_dot_sent = on_dot_sent
        self._clock = clock
        self.requireTransportSecurity = settings.tls is not TLSMode.OPPORTUNISTIC
        self.ended: Deferred[_Outcome] = Deferred(lambda d: self._cancel())
        self._host = host
        self._settings = settings
        self._transactions = transactions
        self._next_index = 0
        self._current: _Progress | None = None
        self._results: list[TransactionResult] = []
        self._last_replies: list[Reply | None] = []
        self._started = 0
        self._phase = _Phase.GREETING
        self._reply_lines: list[bytes] = []
        self._body_sent = False
        self._finished = False
        # RFC 2920: set from each EHLO reply (the one after STARTTLS too).
        self._pipelining = False
        # RFC 6152: likewise; without it an 8-bit message is not sent (_refuse_eight_bit).
        self._eight_bit_mime = False
        # Replies to pipelined RCPTs still to be read after a refused MAIL.
        self._unread_rcpt_replies = 0
        # A 354 came in; the body goes out on the reactor's next turn (_body_turn).
        self._body_due = False
        self._body_call: IDelayedCall | None = None
        # The next transaction's group went out behind the final "." (_send_body_and_dot).
        self._group_sent = False
        # Connection cache (SessionCache): at the end of the transactions, park the session
        # (no QUIT) rather than end it; a parked session can be given more with reuse().
        self._keep = keep
        self._parked = False
        # The server has a mail transaction open (all recipients refused): RSET before the next MAIL.
        self._rset_due = False
        # Told when a parked session can no longer be used (the peer closed it or spoke unasked).
        self.on_idle_lost: Callable[[_ESMTPSession], object] | None = None
        # Set when the connection is gone (or going): never reused after that.
        self.gone = False
        # Since the last reuse(): whether any reply came, and whether the caller held the run back.
        self._reused = False
        self._replied = False
        self._held = False
        # When the connection was made (the clock's time), for SessionCache's max_age.
        self.connected_at = 0.0
        # Fired when the connection is closed, if set (SessionCache.close waits on it).
        self.connection_closed: Deferred[None] | None = None

    # -- connection and reply parsing ----------------------------------------

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's clock: the injected one, not the global reactor.
        return self._clock.callLater(period, func)

    def connectionMade(self) -> None:
        # Otherwise Nagle + the peer's delayed ACK can hold back the small
        # ".\r\n" after a body by ~40 ms, per message.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()
        self.connected_at = self._clock.seconds()
        # SMTPClient.timeout is None: no timeout at all.
        self.setTimeout(self._settings.command_timeout)
        self._phase = _Phase.GREETING

    def dataReceived(self, data: bytes) -> None:
        if self._parked:
            # Nothing is asked while idle: whatever comes (a 421 before the server's own idle
            # timeout, or garbage) makes the session unusable.
            self._idle_lost()
            self._connected().loseConnection()
            return
        super().dataReceived(data)
        if self._body_due and self._body_call is None:
            # Not now but on the reactor's next turn: a reply the server sent behind
            # its 354 (in the rest of this read, in the next TLS record of it, or as
            # half a line) was sent before it could have read the body, and must not
            # pass for the reply to the final ".".
            self._body_call = self._clock.callLater(0, self._body_turn)

    def _body_turn(self) -> None:
        self._body_call = None
        if not self._body_due or self._finished:
            return  # a premature reply already ended the transaction (_end_of_data_reply)
        self._body_due = False
        if self._buffer or self._reply_lines:
            # Part of a reply came after the 354: the session can't go on.
            reply = self._synthesized(f"4.5.0 {self._host} replied during the message data")
            self._settle_accepted(_outcome_for(reply.code), reply)
            self._finish(reply, then="abort")
            return
        self._send_body_and_dot()

    def lineReceived(self, line: bytes) -> None:
        """
        Replaces SMTPClient.lineReceived, which accepts anything int() can
        parse as a code and buffers continuation lines without limit. Replies
        are dispatched to the same C{_expected}/C{_okresponse}/C{_failresponse}
        state callbacks, with the text lines joined by "\\n" as before.
        """
        self.resetTimeout()
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            self._protocol_error("malformed reply")
            return
        self._reply_lines.append(match.group(3) or b"")
        if match.group(2) == b"-":
            if len(self._reply_lines) > _MAX_REPLY_LINES:
                self._protocol_error("overlong multi-line reply")
            return
        code = int(match.group(1))
        resp = b"\n".join(self._reply_lines)
        self._reply_lines = []
        self._replied = True
        if self._finished and self._phase is not _Phase.QUIT:
            # Lines that were already buffered when the session was given up.
            return
        if code == 421 and not self._finished:
            # RFC 5321 3.8: the server is closing the channel.
            self._finish(_reply(code, resp), then="close")
            return
        if code in self._expected:
            self._okresponse(code, resp)
        else:
            self._failresponse(code, resp)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error("overlong reply line")

    def timeoutConnection(self) -> None:
        if self._finished:
            self._abort()
        elif self._phase in (_Phase.STARTTLS, _Phase.TLS):
            self._tls_failed("timed out")
        else:
            waited = f"{self.timeOut:g}s" if self.timeOut is not None else ""
            self._finish(
                self._synthesized(
                    f"4.4.2 timed out after {waited} waiting for {self._host} during {self._phase.value}"
                ),
                then="abort",
            )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._idle_lost()
        if self.connection_closed is not None and not self.connection_closed.called:
            self.connection_closed.callback(None)
        if self._finished:
            return
        if self._phase in (_Phase.STARTTLS, _Phase.TLS):
            self._tls_failed(reason.getErrorMessage())
        else:
            self._finish(self._synthesized(f"4.4.2 connection lost during {self._phase.value} with {self._host}"))

    def sendError(self, exc: BaseException) -> None:
        """
        SMTPClient's catch-all error path. What still reaches it here: the
        body producer failing (the connection dropped while sending DATA;
        connectionLost follows and reports it) and Twisted-generated
        L{SMTPClientError}s.
        """
        if self._finished or not isinstance(exc, SMTPClientError):
            self._abort()
            return
        detail = _reply(exc.code, exc.resp or b"").text
        self._finish(self._synthesized(f"4.5.0 {detail} ({self._host}, {self._phase.value})"), then="abort")

    # -- greeting, EHLO/HELO, STARTTLS ---------------------------------------

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        # A greeting other than 220.
        self._finish(_reply(code, resp), then="quit")

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        self._phase = _Phase.EHLO
        super().esmtpState_ehlo(code, resp)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        self._phase = _Phase.HELO
        self._pipelining = False
        self._eight_bit_mime = False
        super().smtpState_helo(code, resp)
        # Left alone, a refused HELO would be answered with another HELO.
        self._failresponse = self._helo_refused

    def _helo_refused(self, code: int, resp: bytes) -> None:
        self._finish(_reply(code, resp), then="quit")

    def esmtpEHLORequired(self, code: int = -1, resp: bytes | None = None) -> None:
        # EHLO refused while TLS is required: no STARTTLS without EHLO.
        refusal = _reply(code, resp or b"")
        self._finish(Reply(421, f"4.7.0 {self._host} refused EHLO ({refusal}); TLS is required"), then="quit")

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        """
        EHLO accepted. Replaces ESMTPClient's tryTLS/authenticate: extension
        keywords are case-insensitive (RFC 5321 4.1.1.1), which tryTLS's
        C{b"STARTTLS" in items} is not, and there is no SMTP AUTH here.
        """
        keywords = {line.split(None, 1)[0].upper() for line in resp.split(b"\n")[1:] if line.strip()}
        self._pipelining = b"PIPELINING" in keywords
        self._eight_bit_mime = b"8BITMIME" in keywords
        if self._tlsMode or self._tls is None:
            self.smtpState_from(code, resp)
        elif b"STARTTLS" in keywords:
            self._phase = _Phase.STARTTLS
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self.esmtpTLSFailed
            self.sendLine(b"STARTTLS")
        elif self.requireTransportSecurity:
            self.esmtpTLSRequired()
        else:
            self.smtpState_from(code, resp)

    def esmtpTLSRequired(self, code: int = -1, resp: bytes | None = None) -> None:
        self._finish(Reply(421, f"4.7.0 {self._host} does not offer STARTTLS; TLS is required"), then="quit")

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:
        # STARTTLS refused (e.g. 454).
        if self.requireTransportSecurity:
            refusal = _reply(code, resp or b"")
            self._finish(Reply(421, f"4.7.0 {self._host} refused STARTTLS ({refusal}); TLS is required"), then="quit")
        else:
            # RFC 3207 4: the session may go on in clear after a refusal.
            self.smtpState_from(code, resp)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        # Anything already received after the 220 came in clear text but
        # would be read as if it came over TLS (response injection, cf.
        # CVE-2011-0411 and "NO STARTTLS", USENIX Security 2021).
        if self.clearLineBuffer():
            self._tls_failed("clear-text data after the STARTTLS reply")
            return
        self._phase = _Phase.TLS
        # RFC 3207 4.2: forget what the clear-text EHLO reply said.
        self._pipelining = False
        self._eight_bit_mime = False
        try:
            assert self._tls is not None, "STARTTLS is only sent with a TLS context"
            ITLSTransport(self.transport).startTLS(self._tls)
        except Exception as e:
            self._tls_failed(str(e))
            return
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)
        # Until the reply to this EHLO arrives, a lost connection means the
        # handshake failed.
        self._phase = _Phase.TLS

    def _tls_failed(self, detail: str) -> None:
        # The detail may quote what the peer sent (an alert, a certificate name).
        detail = _CONTROL.sub(" ", detail)
        self._finish(Reply(421, f"4.7.5 TLS with {self._host} failed: {detail}"), then="abort", tls_failed=True)

    # -- mail transactions ---------------------------------------------------
    #
    # Each reply is dispatched to the handler set for it; with PIPELINING the
    # handlers are the same, they only skip sending what already went out with
    # the MAIL FROM (RFC 2920 3.1: the replies come in the order the commands
    # were sent). C{_phase} always names the command whose reply is awaited.

    def smtpState_from(self, code: int, resp: object) -> None:
        """Start the next transaction (after EHLO/HELO, RSET or a finished one)."""
        self._refuse_eight_bit()
        if self._next_index >= len(self._transactions):
            self._end_of_transactions(rset=False)
            return
        if not self._may_open():
            self._hold_back(then="quit")
            return
        self._open_transaction(rset=False)
        self._expect_mail_reply()

    def _open_transaction(self, *, rset: bool) -> None:
        """
        Make the next transaction current and send its MAIL FROM; with
        PIPELINING, its RCPT TOs and DATA in the same write, preceded by RSET
        if C{rset} (RFC 2920 3.1 allows RSET, MAIL and RCPT anywhere in a
        group, DATA only last), unless they already went out behind the
        previous message.
        """
        transaction = self._transactions[self._next_index]
        self._next_index += 1
        self._started += 1
        progress = _Progress(transaction, tuple(dict.fromkeys(transaction.recipients)))
        self._current = progress
        if self._group_sent:
            self._group_sent = False
        elif self._pipelining:
            group = _group(transaction)
            self._connected().write(b"RSET\r\n" + group if rset else group)
        else:
            assert not rset
            self.sendLine(_mail_command(transaction))

    def _sendable(self, transaction: Transaction) -> bool:
        return self._eight_bit_mime or not transaction.eight_bit

    def _may_open(self) -> bool:
        """Whether the caller's C{may_start} lets the next transaction start now."""
        if self._may_start is None:
            return True
        try:
            return bool(self._may_start(self._transactions[self._next_index]))
        except Exception:
            _log.failure("may_start callback failed; starting no more transactions on {host}", host=self._host)
            return False

    def _hold_back(self, *, then: _Then) -> None:
        """End the session before the next transaction, which the caller holds back: it and the rest are not started."""
        self._held = True
        self._finish(self._synthesized(f"4.3.0 transaction held back by mmgun; nothing sent ({self._host})"), then=then)

    def _refuse_eight_bit(self) -> None:
        """
        Settle the transactions next in line whose message is 8-bit while the server
        did not offer 8BITMIME (or was greeted with HELO): failed, permanently, with
        nothing sent. RFC 6152 3 forbids sending them as they are; converting them to
        7 bit (as Postfix does) is not done here.
        """
        while self._next_index < len(self._transactions):
            transaction = self._transactions[self._next_index]
            if self._sendable(transaction):
                return
            self._next_index += 1
            self._started += 1
            progress = _Progress(transaction, tuple(dict.fromkeys(transaction.recipients)))
            reply = Reply(554, f"5.6.3 message has 8-bit content and {self._host} does not offer 8BITMIME")
            for recipient in progress.recipients:
                progress.outcomes[recipient] = RecipientResult("failed", reply)
            progress.last_reply = reply
            self._complete(progress)

    def _expect_mail_reply(self, code: int = 0, resp: object = b"") -> None:
        self._phase = _Phase.MAIL
        self._expected = SUCCESS
        self._okresponse = self._mail_accepted
        self._failresponse = self._mail_refused

    def _mail_refused(self, code: int, resp: bytes) -> None:
        progress = self._progress()
        reply = _reply(code, resp)
        for recipient in progress.recipients:
            progress.outcomes[recipient] = RecipientResult(_outcome_for(code), reply)
        progress.last_reply = reply
        self._complete(progress)
        if self._pipelining:
            # The RCPTs and DATA sent with it still get their replies (503s
            # from a conforming server), which are read and ignored.
            self._phase = _Phase.RCPT
            self._unread_rcpt_replies = len(progress.recipients)
            self._expected = SUCCESS
            self._okresponse = self._failresponse = self._rcpt_reply_after_refused_mail
        else:
            self._next_transaction(rset=False)  # no transaction is open

    def _rcpt_reply_after_refused_mail(self, code: int, resp: bytes) -> None:
        self._unread_rcpt_replies -= 1
        if self._unread_rcpt_replies == 0:
            self._expect_data_reply_without_recipients(rset=False)

    def _mail_accepted(self, code: int, resp: bytes) -> None:
        self._phase = _Phase.RCPT
        self._expected = SUCCESS
        self._okresponse = self._failresponse = self._rcpt_reply
        if not self._pipelining:
            self._send_rcpt()

    def _send_rcpt(self) -> None:
        progress = self._progress()
        self.sendLine(_rcpt_command(progress.recipients[progress.next_recipient]))

    def _rcpt_reply(self, code: int, resp: bytes) -> None:
        progress = self._progress()
        recipient = progress.recipients[progress.next_recipient]
        progress.next_recipient += 1
        if code in SUCCESS:
            progress.accepted.append(recipient)
        else:
            reply = _reply(code, resp)
            progress.outcomes[recipient] = RecipientResult(_outcome_for(code), reply, at_rcpt=True)
            progress.last_reply = reply
        if progress.next_recipient < len(progress.recipients):
            if not self._pipelining:
                self._send_rcpt()
        elif not progress.accepted:
            self._complete(progress)
            if self._pipelining:
                self._expect_data_reply_without_recipients(rset=True)
            else:
                self._next_transaction(rset=True)
        else:
            self._phase = _Phase.DATA
            self._body_sent = False
            self._expected = [354]
            self._okresponse = self.smtpState_data
            self._failresponse = self._data_refused
            if not self._pipelining:
                self.sendLine(b"DATA")

    def _expect_data_reply_without_recipients(self, *, rset: bool) -> None:
        """
        The reply to a pipelined DATA after no recipient was accepted; the
        transaction's outcome is already settled. RFC 2920 3.1: the client
        must read it rather than assume a refusal, may go on (with RSET) after
        a refusal, and should send a single dot after a 354.
        """
        self._phase = _Phase.DATA
        self._expected = [354]
        self._failresponse = self._after_rset if rset else self._after_no_rset
        self._okresponse = self._empty_data

    def _empty_data(self, code: int, resp: bytes) -> None:
        self._expected = SUCCESS
        self._okresponse = self._failresponse = self._after_rset
        self.sendLine(b".")

    def _after_rset(self, code: int, resp: bytes) -> None:
        self._next_transaction(rset=True)

    def _after_no_rset(self, code: int, resp: bytes) -> None:
        self._next_transaction(rset=False)

    def _data_refused(self, code: int, resp: bytes) -> None:
        # Anything but 354 to DATA; the transaction is still open.
        reply = _reply(code, resp)
        if code in SUCCESS:
            reply = Reply(451, f"4.5.0 {self._host} answered DATA with {reply}")
        self._settle_accepted(_outcome_for(reply.code), reply)
        self._next_transaction(rset=True)

    def smtpState_data(self, code: int, resp: bytes) -> None:
        if self._pipelining and len(self._progress().transaction.message) <= _ONE_WRITE_MAX:
            # Sent by _body_turn, once whatever came with the 354 is parsed.
            self._body_due = True
        else:
            # SMTPClient streams getMailData() through transformChunk with a
            # FileSender, then calls finishedFileTransfer.
            super().smtpState_data(code, resp)
        self._expected = SUCCESS
        self._okresponse = self._failresponse = self._end_of_data_reply

    def _send_body_and_dot(self) -> None:
        # wire_form() output is empty or ends with CRLF.
        self._body_sent = True
        transaction = self._progress().transaction
        data = [transaction.payload(), b".\r\n"]
        if (
            self._next_index < len(self._transactions)
            and self._sendable(self._transactions[self._next_index])
            and self._may_open()
        ):
            # RFC 2920 3.1: the message content may lead a group, so the next
            # transaction's commands save a write and a round trip. No RSET: the
            # reply to "." ends this transaction whatever it is (RFC 5321 4.1.1.4).
            data.append(_group(self._transactions[self._next_index]))
            self._group_sent = True
        self._dot_sent(transaction)
        self._connected().write(b"".join(data))
        # For the reply to "."; _end_of_data_reply sets the command timeout for the group's.
        self.setTimeout(self._settings.data_timeout)

    def getMailData(self) -> BytesIO:
        return BytesIO(self._progress().transaction.payload())

    def transformChunk(self, chunk: bytes) -> bytes:
        # Already in wire form; keep the idle timeout from firing while a
        # large body is being sent.
        self.resetTimeout()
        return chunk

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        if self._finished:
            return
        # wire_form() output is empty or ends with CRLF.
        self._body_sent = True
        self._dot_sent(self._progress().transaction)
        self.sendLine(b".")
        self.setTimeout(self._settings.data_timeout)

    def _dot_sent(self, transaction: Transaction) -> None:
        """Tell the caller that C{transaction}'s final "." is going out: from now on the peer may take the message."""
        if self._on_dot_sent is not None:
            try:
                self._on_dot_sent(transaction)
            except Exception:
                _log.failure("on_dot_sent callback failed for transaction {key}", key=transaction.key)

    def _end_of_data_reply(self, code: int, resp: bytes) -> None:
        """The reply to the final "." (or one that came while sending the body)."""
        self._body_due = False
        self.setTimeout(self._settings.command_timeout)
        reply = _reply(code, resp)
        if not self._body_sent:
            # The rest of the body is still on its way: the session can't go on.
            if code in SUCCESS:
                reply = Reply(451, f"4.5.0 {self._host} replied {reply} before the end of the message data")
            self._settle_accepted(_outcome_for(reply.code), reply)
            self._finish(self._synthesized(f"4.5.0 {self._host} replied during the message data"), then="abort")
        elif code in SUCCESS:
            self._settle_accepted("sent", reply)
            self._next_transaction(rset=False)
        else:
            self._settle_accepted(_outcome_for(code), reply)
            self._next_transaction(rset=True)

    def _settle_accepted(self, outcome: str, reply: Reply) -> None:
        """Give the recipients accepted by RCPT their outcome and close the transaction."""
        progress = self._progress()
        for recipient in progress.accepted:
            progress.outcomes[recipient] = RecipientResult(outcome, reply)
        progress.last_reply = reply
        self._complete(progress)

    def _next_transaction(self, *, rset: bool) -> None:
        if not self._group_sent:
            self._refuse_eight_bit()
        if self._next_index >= len(self._transactions):
            self._end_of_transactions(rset=rset)
        elif (self._group_sent or (rset and self._pipelining)) and not self._may_open():
            # The caller holds the next transaction back. If its MAIL FROM, RCPT TOs and
            # DATA already went out behind the final "." (a QUIT would now be read as
            # message data), the connection is dropped: the peer gets no message from it.
            self._hold_back(then="abort" if self._group_sent else "quit")
        elif self._group_sent:
            # Its commands went out behind the final "."; their replies come next.
            self._open_transaction(rset=False)
            self._expect_mail_reply()
        elif rset and self._pipelining:
            # The RSET leads the next transaction's group.
            self._open_transaction(rset=True)
            self._phase = _Phase.RSET
            self._expected = SUCCESS
            self._okresponse = self._expect_mail_reply
            self._failresponse = self._rset_refused
        elif rset:
            self._phase = _Phase.RSET
            self._expected = SUCCESS
            self._okresponse = self.smtpState_from
            self._failresponse = self._rset_refused
            self.sendLine(b"RSET")
        else:
            self.smtpState_from(0, b"")

    def _rset_refused(self, code: int, resp: bytes) -> None:
        # With PIPELINING the next transaction's commands are already out
        # (that transaction then ends deferred): no QUIT behind them.
        self._finish(
            self._synthesized(f"4.5.0 {self._host} refused RSET ({_reply(code, resp)})"),
            then="close" if self._current is not None else "quit",
        )

    # -- bookkeeping ---------------------------------------------------------

    def _progress(self) -> _Progress:
        assert self._current is not None
        return self._current

    def _connected(self) -> ITransport:
        # Set by makeConnection before any reply can arrive, and never cleared.
        assert self.transport is not None
        return self.transport

    def _complete(self, progress: _Progress) -> None:
        recipients = {recipient: progress.outcomes[recipient] for recipient in progress.recipients}
        result = TransactionResult(progress.transaction.key, True, recipients)
        self._results.append(result)
        self._last_replies.append(progress.last_reply)
        self._current = None
        if self._on_result is not None:
            # At once, not at the end of the session: the caller commits each result
            # while the next transaction runs, which keeps the duplicate window short.
            try:
                self._on_result(result)
            except Exception:
                _log.failure("on_result callback failed for transaction {key}", key=result.key)

    def _synthesized(self, text: str) -> Reply:
        # 421 ("service not available") while nothing was attempted, which
        # ends up in SessionFailed; 451 for what happens to transactions.
        return Reply(451 if self._started else 421, text)

    def _protocol_error(self, detail: str) -> None:
        if self._finished:
            self._abort()
        else:
            self._finish(
                self._synthesized(f"4.5.0 {detail} from {self._host} during {self._phase.value}"),
                then="abort",
            )

    def _finish(self, reason: Reply | None, *, then: _Then = "nothing", tls_failed: bool = False) -> None:
        """
        Settle every outcome (what is still open gets C{reason}, deferred),
        leave the session as C{then} says, and fire L{ended}.
        """
        if self._finished:
            return
        self._finished = True
        # A reused session that died before the peer answered anything (it had closed the
        # idle connection meanwhile): the MAIL FROM may have gone out, but no message did
        # (its body waits for a 354), so nothing here was started.
        stale = reason is not None and self._reused and not self._replied and not self._held
        if stale:
            self._current = None
            self._next_index = len(self._results)
        if reason is not None:
            if self._current is not None:
                progress = self._current
                for recipient in progress.recipients:
                    progress.outcomes.setdefault(recipient, RecipientResult("deferred", reason))
                progress.last_reply = reason
                self._complete(progress)
            for transaction in self._transactions[self._next_index :]:
                deferred = RecipientResult("deferred", reason)
                self._results.append(
                    TransactionResult(transaction.key, False, dict.fromkeys(transaction.recipients, deferred))
                )
                self._last_replies.append(reason)
            self._next_index = len(self._transactions)
        outcome = _Outcome(
            results=self._results,
            last_replies=self._last_replies,
            failure=reason if not self._started or stale else None,
            tls_failed=tls_failed,
            stale=stale,
            session=self if then == "park" else None,
        )
        if then == "park":
            self._parked = True
            self._phase = _Phase.IDLE
            self.setTimeout(None)  # the cache's idle timer takes over
            # Hold no message or caller state while idle (the outcome keeps its own lists).
            self._transactions = ()
            self._results = []
            self._last_replies = []
            self._on_result = self._may_start = self._on_dot_sent = None
        elif then == "quit":
            self._phase = _Phase.QUIT
            self._disconnectFromServer()
        elif then == "close" and self.transport is not None:
            self.transport.loseConnection()
        elif then == "abort":
            self._abort()
        self.ended.callback(outcome)

    def _abort(self) -> None:
        if isinstance(self.transport, _Abortable):
            self.transport.abortConnection()
        elif self.transport is not None:
            self.transport.loseConnection()

    def _cancel(self) -> None:
        self._finished = True
        self.gone = True
        self._abort()

    # -- connection cache -------------------------------------------------------

    def _end_of_transactions(self, *, rset: bool) -> None:
        """Every transaction has its outcome: QUIT, or park the session for the cache."""
        if self._keep and not self.gone and not (self._buffer or self._reply_lines):
            self._rset_due = rset
            self._finish(None, then="park")
        else:
            self._finish(None, then="quit")

    def _idle_lost(self) -> None:
        """The connection can no longer carry a session: never reused; the cache is told if it holds it."""
        if self.gone:
            return
        self.gone = True
        if self._parked:
            self._parked = False
            if self.on_idle_lost is not None:
                self.on_idle_lost(self)

    def reuse(
        self,
        transactions: Sequence[Transaction],
        on_result: Callable[[TransactionResult], object] | None,
        may_start: Callable[[Transaction], bool] | None,
        on_dot_sent: Callable[[Transaction], object] | None,
    ) -> Deferred[_Outcome]:
        """
        Run more transactions over this parked session (no new TCP, EHLO or STARTTLS), as
        a fresh session would; L{ended} is a new Deferred for them. When the connection turns
        out dead before any reply, the outcome is C{stale}: nothing started.
        """
        assert self._parked and not self.gone, "only a parked, live session is reused"
        self._parked = False
        self._transactions = transactions
        self._on_result = on_result
        self._may_start = may_start
        self._on_dot_sent = on_dot_sent
        self._next_index = 0
        self._current = None
        self._results = []
        self._last_replies = []
        self._started = 0
        self._finished = False
        self._reused = True
        self._replied = False
        self._held = False
        self.ended = Deferred(lambda d: self._cancel())
        self.setTimeout(self._settings.command_timeout)
        self._next_transaction(rset=self._rset_due)
        return self.ended

    def quit(self) -> None:
        """Close a parked session politely: QUIT, then close; aborted if the peer does not answer in time."""
        if not self._parked or self.gone:
            return
        self._parked = False
        self.gone = True
        self._phase = _Phase.QUIT
        self.setTimeout(min(self._settings.command_timeout, QUIT_TIMEOUT))
        self._disconnectFromServer()


def _endpoint(reactor: IReactorTCP, address: str, port: int, timeout: float) -> IStreamClientEndpoint:
    if isIPv6Address(address):
        return TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, address, port, timeout=timeout)


def _connect_failed(host: str, address: str, exc: Exception, timed_out: bool) -> Reply:
    if timed_out or isinstance(exc, error.TimeoutError):
        return Reply(421, f"4.4.1 connection to {host} [{address}] timed out")
    if isinstance(exc, error.ConnectionRefusedError):
        return Reply(421, f"4.4.1 connection refused by {host} [{address}]")
    return Reply(421, f"4.4.1 cannot connect to {host} [{address}]: {exc}")


class _OneSession(Factory):
    """connectProtocol's factory, without its two "Starting/Stopping factory" log lines a connection."""

    noisy = False

    def __init__(self, session: _ESMTPSession) -> None:
        self._session = session

    def buildProtocol(self, addr: object) -> _ESMTPSession:
        return self._session


class SessionCache:
    """
    SMTP sessions kept open between deliveries, as Postfix's scache: a session that ends
    with every transaction settled is parked (no QUIT) for C{idle_time} seconds, and the
    next L{send_session} to the same MX (host name, address and port) runs over it without
    a new TCP connection, EHLO or STARTTLS. A parked session is closed with QUIT when its
    time is up, when it has been open C{max_age} seconds, or at L{close}; one that the
    peer closed or spoke on while idle is dropped from the cache at once and never reused,
    and one that turns out dead when reused (before any reply) has started nothing: the
    session goes on over another parked one, or a new connection.

    At most C{per_destination} sessions are parked for one MX, and C{size} in all: a
    session that would pass either bound is ended with QUIT instead, except that the one
    idle longest elsewhere is closed to make room under C{size}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        idle_time: float = 2.0,
        per_destination: int = 10,
        size: int = 100,
        max_age: float = 300.0,
    ) -> None:
        self._clock = clock
        self._idle_time = idle_time
        self._per_destination = per_destination
        self._size = size
        self._max_age = max_age
        #: Parked sessions by MX, most recently parked last; each with its expiry timer.
        self._idle: dict[tuple[str, str, int], list[tuple[_ESMTPSession, IDelayedCall]]] = {}
        self._closed = False

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    async def send_session(
        self,
        reactor: IReactorTCP,
        host: str,
        address: str,
        port: int,
        transactions: Sequence[Transaction],
        settings: SMTPSettings,
        on_result: Callable[[TransactionResult], object] | None = None,
        may_start: Callable[[Transaction], bool] | None = None,
        on_dot_sent: Callable[[Transaction], object] | None = None,
    ) -> list[TransactionResult]:
        """L{send_session}, over a parked session when there is one, leaving its own parked."""
        return await _send_session(
            reactor, host, address, port, transactions, settings, on_result, may_start, on_dot_sent, cache=self
        )

    def _take(self, key: tuple[str, str, int]) -> _ESMTPSession | None:
        """The most recently parked live session to C{key}, out of the cache; None if there is none."""
        entries = self._idle.get(key)
        while entries:
            session, timer = entries.pop()
            if not entries:
                del self._idle[key]
            if timer.active():
                timer.cancel()
            session.on_idle_lost = None
            if not session.gone:
                return session
        return None

    def _park(self, key: tuple[str, str, int], session: _ESMTPSession) -> None:
        if self._closed or session.gone or self._clock.seconds() - session.connected_at >= self._max_age:
            self._end(session)
            return
        entries = self._idle.setdefault(key, [])
        if len(entries) >= self._per_destination:
            self._end(session)
            return
        if len(self) >= self._size:
            oldest = min(
                (entry for k, es in self._idle.items() if k != key for entry in es[:1]),
                key=lambda entry: entry[1].getTime(),
                default=None,
            )
            if oldest is None:
                self._end(session)
                return
            self._drop(oldest[0])
            self._end(oldest[0])
        timer = self._clock.callLater(self._idle_time, self._expire, session)
        session.on_idle_lost = self._lost
        entries.append((session, timer))

    def _drop(self, session: _ESMTPSession) -> None:
        """Take C{session} out of the cache (its timer cancelled), wherever it is."""
        for key, entries in list(self._idle.items()):
            for index, (parked, timer) in enumerate(entries):
                if parked is session:
                    del entries[index]
                    if not entries:
                        del self._idle[key]
                    if timer.active():
                        timer.cancel()
                    session.on_idle_lost = None
                    return

    def _end(self, session: _ESMTPSession) -> None:
        """QUIT a session that is not (or no longer) in the cache."""
        session.quit()

    def _expire(self, session: _ESMTPSession) -> None:
        self._drop(session)
        self._end(session)

    def _lost(self, session: _ESMTPSession) -> None:
        """The peer closed a parked session, or spoke on it unasked: out of the cache, never reused."""
        self._drop(session)

    def close(self) -> Deferred[None]:
        """
        QUIT every parked session and park none from now on; fires once their connections
        are closed (a peer that does not answer QUIT is cut off after QUIT_TIMEOUT).
        """
        self._closed = True
        waits: list[Deferred[None]] = []
        for entries in list(self._idle.values()):
            for session, _ in list(entries):
                self._drop(session)
                closed: Deferred[None] = Deferred()
                session.on_idle_lost = None
                session.connection_closed = closed
                waits.append(closed)
                self._end(session)
        done: Deferred[None] = Deferred()
        if not waits:
            done.callback(None)
            return done
        DeferredList(waits).addBoth(lambda _: done.callback(None))
        return done


async def _attempt(
    reactor: IReactorTCP,
    clock: IReactorTime,
    host: str,
    address: str,
    port: int,
    transactions: Sequence[Transaction],
    settings: SMTPSettings,
    tls: IOpenSSLClientConnectionCreator | None,
    on_result: Callable[[TransactionResult], object] | None = None,
    may_start: Callable[[Transaction], bool] | None = None,
    on_dot_sent: Callable[[Transaction], object] | None = None,
    keep: bool = False,
) -> _Outcome:
    session = _ESMTPSession(
        clock=clock,
        host=host,
        transactions=transactions,
        settings=settings,
        tls=tls,
        on_result=on_result,
        may_start=may_start,
        on_dot_sent=on_dot_sent,
        keep=keep,
    )
    connecting = _endpoint(reactor, address, port, settings.connect_timeout).connect(_OneSession(session))
    # Also enforced here, on the injected clock, whatever the reactor does
    # with the endpoint's timeout.
    timed_out = False

    def time_out() -> None:
        nonlocal timed_out
        timed_out = True
        connecting.cancel()

    timer = clock.callLater(settings.connect_timeout, time_out)
    try:
        await connecting
    except Exception as e:
        raise SessionFailed(_connect_failed(host, address, e, timed_out=timed_out), connected=False) from e
    finally:
        if timer.active():
            timer.cancel()
    return await session.ended


async def send_session(
    reactor: IReactorTCP,
    host: str,
    address: str,
    port: int,
    transactions: Sequence[Transaction],
    settings: SMTPSettings,
    on_result: Callable[[TransactionResult], object] | None = None,
    may_start: Callable[[Transaction], bool] | None = None,
    on_dot_sent: Callable[[Transaction], object] | None = None,
) -> list[TransactionResult]:
    """
    One SMTP session to C{address}:C{port} (the MX C{host} name is for TLS,
    logs and synthesized replies), running C{transactions} one after another
    over the same connection, then QUIT.

    C{on_result}, if given, is called with each started transaction's result
    the moment it is known (e.g. right after the 250 to the final "."), so
    that the caller can commit it before the next transaction ends.

    C{may_start}, if given, is asked before each transaction's MAIL FROM goes
    out (with PIPELINING, also before it would go out behind the previous
    final "."): when it answers False, that transaction and the rest are not
    started (their results have C{started} False) and the session ends. So a
    caller that must stop sending (its database is gone, a lease may have run
    out) stops between two transactions rather than at the end of the session.
    C{on_dot_sent}, if given, is called with each transaction whose final "."
    is being written: from then on the peer may have taken the message, even
    if the connection is lost before its reply.

    Through L{SessionCache.send_session}, the same, except that the session
    may run over a connection a previous session left open, and is left open
    in its turn (no QUIT) for the next.

    Returns one L{TransactionResult} per transaction, in order, as soon as all
    outcomes are known. Raises L{SessionFailed} if no transaction was started.
    Never reconnects once a transaction has started, so nothing is sent
    twice; the only reconnection is the retry in clear text after a failed
    TLS handshake in L{TLSMode.OPPORTUNISTIC}.

    @param reactor: provides L{IReactorTCP} and L{IReactorTime}.
    @raise ValueError: an address is not ASCII or contains control characters
        or angle brackets, or a transaction has no recipients.
    """
    return await _send_session(
        reactor, host, address, port, transactions, settings, on_result, may_start, on_dot_sent, cache=None
    )


async def _send_session(
    reactor: IReactorTCP,
    host: str,
    address: str,
    port: int,
    transactions: Sequence[Transaction],
    settings: SMTPSettings,
    on_result: Callable[[TransactionResult], object] | None,
    may_start: Callable[[Transaction], bool] | None,
    on_dot_sent: Callable[[Transaction], object] | None,
    *,
    cache: SessionCache | None,
) -> list[TransactionResult]:
    for transaction in transactions:
        _check_address(transaction.mail_from, "sender")
        if not transaction.recipients:
            raise ValueError(f"transaction {transaction.key!r} has no recipients")
        for recipient in transaction.recipients:
            _check_address(recipient, "recipient")
            if not recipient:
                raise ValueError(f"transaction {transaction.key!r} has an empty recipient")
    if not transactions:
        return []
    clock = IReactorTime(reactor)
    key = (host, address, port)
    keep = cache is not None
    reused = False
    try:
        outcome: _Outcome | None = None
        while cache is not None and outcome is None:
            idle = cache._take(key)
            if idle is None:
                break
            outcome = await idle.reuse(transactions, on_result, may_start, on_dot_sent)
            if outcome.stale:
                # The peer closed it while it was idle (or just then): nothing was started;
                # the next idle one, or a new connection.
                _log.info(
                    "cached session with {host} [{address}] was closed by the peer; not reused",
                    host=host,
                    address=address,
                    reply=str(outcome.failure),
                )
                outcome = None
            else:
                reused = True
        if outcome is None:
            outcome = await _attempt(
                reactor,
                clock,
                host,
                address,
                port,
                transactions,
                settings,
                _tls_creator(settings, host),
                on_result,
                may_start,
                on_dot_sent,
                keep,
            )
        if outcome.tls_failed and settings.tls is TLSMode.OPPORTUNISTIC:
            _log.warn(
                "TLS with {host} [{address}] failed ({reply}); retrying in clear text",
                host=host,
                address=address,
                reply=str(outcome.failure),
            )
            outcome = await _attempt(
                reactor,
                clock,
                host,
                address,
                port,
                transactions,
                settings,
                None,
                on_result,
                may_start,
                on_dot_sent,
                keep,
            )
        if outcome.failure is not None:
            raise SessionFailed(outcome.failure)
    except SessionFailed as e:
        _log.warn(
            "session with {host} [{address}]:{port} failed: {reply}",
            host=host,
            address=address,
            port=port,
            code=e.reply.code,
            reply=str(e.reply),
        )
        raise
    # One event per session (the caller logs each delivery attempt): a line per
    # transaction here too would double the logging cost of a busy sender.
    counts = {"sent": 0, "failed": 0, "deferred": 0}
    for result in outcome.results:
        for recipient_result in result.recipients.values():
            counts[recipient_result.outcome] += 1
    if outcome.session is not None and cache is not None:
        cache._park(key, outcome.session)
    _log.info(
        "session with {host} [{address}]: {transactions} transactions, {sent} sent, {failed} failed, {deferred} deferred",
        host=host,
        address=address,
        reused=reused,
        transactions=len(outcome.results),
        started=sum(1 for r in outcome.results if r.started),
        codes=[r.code if r is not None else None for r in outcome.last_replies],
        **counts,
    )
    return outcome.results
