"""
SMTP submission (RFC 6409): every program that sends mail by SMTP can use mmgun.

An ESMTP server on twisted.mail's :class:`~twisted.mail.smtp.ESMTP` (its EHLO, HELO and
extension machinery, its SASL challengers) and twisted.cred (:class:`SubmissionRealm`,
:class:`APIKeyChecker`: the password is an mmgun API key, the user name ``api`` or the
key's client id). Each transaction of an authenticated client is queued through the
HTTP API's :class:`mmgun.web.submit.Pipeline` exactly as a ``/v3/.../messages.mime``
is — admission (free space, rate limit, sender policy, queue caps), DKIM signing, one
submission stored once — with a ``Received:`` field on top; the reply to the final dot,
``250 2.0.0 queued as <submission id>``, comes only after the commit.

What it adds to twisted.mail's server, whose line handling is not safe for a relay:

- Only ``<CRLF>.<CRLF>`` ends DATA, and a bare CR or LF anywhere in a message refuses
  it (``550 5.6.11``) rather than be normalised: a ``<LF>.<LF>`` or ``<CR>.<CR>`` is
  then content of a refused message, never the end of one and the start of another
  (SMTP smuggling, CVE-2023-51764/5/6). Commands with a CR, LF or NUL are refused too.
- A line longer than 1,000 octets (with its CRLF) is refused and discarded without
  leaving DATA (twisted.mail would go back to reading commands from the message).
- Replies come in the order of the commands: while a reply waits for the store (AUTH,
  MAIL's key check, the final dot) later pipelined commands wait, and reading pauses.
- Replies are never buffered without limit: the protocol is its transport's push
  producer, and handles no command while the transport's write buffer is full (a client
  that pipelines and never reads). A dropped connection is closed after its last reply,
  or aborted :data:`DROP_GRACE` seconds later if the peer does not take it.
- A message arriving is one buffer of its own size; all connections together hold at
  most ``max_data_in_flight`` octets of DATA (default :data:`DATA_IN_FLIGHT_MESSAGES`
  times the largest message), past which DATA is ``452 4.3.1``.
- Commands sent in the same packet as STARTTLS are discarded (CVE-2011-0411), and what
  was learnt before TLS, AUTH included, is forgotten (RFC 3207 4.2).
- With ``greet_pause``, a client that talks before the greeting gets ``554`` and is
  dropped (as Postfix's postscreen does to early talkers).
- A timeout between commands and one for the whole DATA, caps on connections in all
  and per source address, and per connection on errors, failed AUTHs, junk commands
  (NOOP, RSET, EHLO, HELO, VRFY, HELP since the last message queued) and messages.
  Only a fixed list of verbs is served.
- SMTPUTF8 (RFC 6531) is offered: a transaction whose MAIL FROM carries the ``SMTPUTF8``
  parameter may have addresses with UTF-8 local parts and UTF-8 header fields (RFC 6532),
  each checked (valid UTF-8, no control characters; the From address as messages.mime's).
  Without the parameter a non-ASCII address is ``553 5.6.7`` and a non-ASCII header field
  ``550 5.6.7`` (RFC 6531 3.3), saying so. 8-bit bodies are taken (8BITMIME).
- AUTH PLAIN and LOGIN are offered only under TLS (STARTTLS or an ``ssl:`` listener)
  or on a loopback listener; no transaction without authentication, whatever the
  recipient: never an open relay. The key is checked again at each MAIL (a key revoked
  during a session stops it, within the 2 s the key cache allows).
"""

from __future__ import annotations

import re
import sys
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, cast

import attrs
from twisted.application.service import MultiService, Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport, ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.mail._except import IllegalClientResponse
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.mail.smtp import AUTH, COMMAND, DATA, ESMTP
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from .limits import LogTally
from .message import BadRequest, MessageTooLarge, normalize_address
from .store import StorageError
from .web.errors import REASONS, HTTPError
from .web.mailgun import check_mime, other_senders
from .web.signing import SenderRefused
from .web.site import source_key
from .web.submit import Pipeline, QueueCapReached, RawMessage

_log = Logger()

#: The longest line, its CRLF included (RFC 5321 4.5.3.1.4, 4.5.3.1.6).
MAX_LINE = 1000
#: Errors (5xx to commands) one connection may make before it is dropped (Postfix's smtpd_hard_error_limit).
MAX_ERRORS = 20
#: Failed AUTH attempts one connection may make before it is dropped.
MAX_AUTH_FAILURES = 3
#: Commands that move no mail (NOOP, RSET, EHLO, HELO, VRFY, EXPN, HELP) allowed since the last message
#: queued, before 421 and a drop (Postfix's smtpd_junk_command_limit).
MAX_JUNK_COMMANDS = 100
#: MAIL commands one connection may give before 421 (Exim's smtp_accept_max_per_connection).
MAX_TRANSACTIONS = 1000
#: The server-wide budget of DATA octets held at once, as a number of the largest messages.
DATA_IN_FLIGHT_MESSAGES = 8
#: Seconds a dropped connection has to take its last reply before it is aborted.
DROP_GRACE = 5.0
#: The verbs served; any other is 500 5.5.2 (twisted.mail's other do_ methods stay unreachable).
VERBS = frozenset(b"EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP".split())
#: Why a non-ASCII address or header field was refused in a transaction without SMTPUTF8 (RFC 6531 3.3).
NO_SMTPUTF8 = "internationalized mail needs the SMTPUTF8 parameter on MAIL FROM (RFC 6531)"
#: What the greeting, the EHLO reply and the Received field say this server is.
SOFTWARE = "mmgun"
#: A HELO/EHLO argument good enough to be written into a Received field as it is.
_HELO = re.compile(rb"[A-Za-z0-9._:\[\]-]{1,255}")


@attrs.frozen(kw_only=True)
class SubmissionSettings:
    """Everything the submission server reads, resolved once from the Config (:func:`settings_from`)."""

    #: This relay's name: the greeting, the EHLO reply, the Received field, generated Message-IDs.
    hostname: str
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    #: Seconds a connection may stay silent between commands (and between lines of DATA).
    command_timeout: float = 300.0
    #: Seconds from the 354 to the final dot.
    data_timeout: float = 600.0
    #: Seconds to wait before the greeting (0: greet at once; no early-talker check).
    greet_pause: float = 0.0
    max_connections: int = 1000
    max_connections_per_source: int = 20
    max_junk_commands: int = MAX_JUNK_COMMANDS
    max_transactions: int = MAX_TRANSACTIONS
    #: DATA octets all connections may hold at once (messages arriving, and waiting for their commit).
    max_data_in_flight: int = attrs.field(
        default=attrs.Factory(lambda self: DATA_IN_FLIGHT_MESSAGES * self.max_message_size, takes_self=True)
    )


def settings_from(config: Any) -> SubmissionSettings:
    return SubmissionSettings(
        hostname=config.helo,
        max_message_size=config.max_message_size,
        max_recipients=config.max_recipients,
        command_timeout=config.smtp_command_timeout,
        data_timeout=config.smtp_data_timeout,
        greet_pause=config.smtp_greet_pause,
        max_connections=config.max_smtp_connections,
        max_connections_per_source=config.max_smtp_connections_per_source,
    )


def tls_options(cert_path: str, key_path: str) -> CertificateOptions:
    """Server TLS options from a PEM certificate file (leaf first, then any chain) and a PEM key file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(cert_path, "rb") as f:
        certificates = x509.load_pem_x509_certificates(f.read())
    with open(key_path, "rb") as f:
        key = load_pem_private_key(f.read(), password=None)
    # pyOpenSSL takes cryptography objects; Twisted's annotations still name pyOpenSSL's.
    return CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=certificates[0],  # type: ignore[arg-type]
        extraCertChain=certificates[1:],  # type: ignore[arg-type]
    )


# -- twisted.cred: who may submit -------------------------------------------------------


class ISourcedCredentials(IUsernamePassword):
    """A user name and password given over SMTP AUTH, with where the connection comes from."""

    source = Attribute("the peer's address as the failed-attempt limit counts it (mmgun.web.site.source_key)")


@implementer(ISourcedCredentials)
class PlainCredentials(PLAINCredentials):
    """AUTH PLAIN (RFC 4616): an authorization identity, if given, must be the user itself."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3 or parts[0] not in (b"", parts[1]):
            raise IllegalClientResponse("malformed PLAIN response")
        _, self.username, self.password = parts


@implementer(ISourcedCredentials)
class LoginCredentials(LOGINCredentials):
    """AUTH LOGIN: the user name, then the password, each asked for."""

    def __init__(self, source: str) -> None:
        super().__init__()
        # Without twisted's NUL at their ends (some clients print them).
        self.challenges = [b"Password:", b"Username:"]
        self.source = source


class ISubmitter(Interface):
    """The avatar of an authenticated submission client."""

    client = Attribute("the client id whose keys, limits and domains apply")


@implementer(ISubmitter)
@attrs.frozen
class Submitter:
    client: str


@implementer(IRealm)
class SubmissionRealm:
    """Every authenticated client may submit: its avatar only names it."""

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> tuple[Any, Submitter, Callable[[], None]]:
        if ISubmitter not in interfaces:
            raise NotImplementedError("submission avatars provide only ISubmitter")
        return ISubmitter, Submitter(avatarId), lambda: None


class TooManyFailures(UnauthorizedLogin):
    """The source address is slowed down for failed attempts: try again after ``wait`` seconds."""

    def __init__(self, wait: str) -> None:
        super().__init__()
        self.wait = wait


@implementer(ICredentialsChecker)
class APIKeyChecker:
    """
    The password is an mmgun API key, the user name ``api`` or the key's client id: the
    HTTP API's keys, revocation and failed-attempt limit per source address
    (:meth:`mmgun.web.submit.Pipeline.authenticate_key`).
    """

    credentialInterfaces = (ISourcedCredentials,)

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    @staticmethod
    def user_and_key(credentials: Any) -> tuple[str, str]:
        """The user name and the API key given (empty if they cannot be: refused as any wrong key is)."""
        try:
            return bytes(credentials.username).decode("utf-8"), bytes(credentials.password).decode("ascii")
        except (UnicodeDecodeError, TypeError):
            return "", ""

    async def _check(self, credentials: Any) -> str:
        user, key = self.user_and_key(credentials)
        try:
            return await self._pipeline.authenticate_key(user, key, credentials.source)
        except HTTPError as e:
            if e.code == 429:
                raise TooManyFailures(e.headers.get(b"Retry-After", b"60").decode("ascii")) from None
            raise UnauthorizedLogin() from None


def submission_portal(pipeline: Pipeline) -> Portal:
    return Portal(SubmissionRealm(), [APIKeyChecker(pipeline)])


# -- the server -------------------------------------------------------------------------


#: A refused submission: the reply's code and text, and the HTTP status the API answers for the
#: same failure — whose label (mmgun.web.errors.REASONS) counts it in mmgun_submissions_rejected_total.
Refused = tuple[int, str, int]


class _Refusal(Exception):
    """A transaction refused: ``code`` and ``text`` (with its enhanced status code) are the reply; ``status`` as for Refused."""

    def __init__(self, code: int, text: str, status: int) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.status = status


def refusal(failure: Failure) -> Refused | None:
    """
    The reply to a transaction the pipeline did not queue, and the HTTP status of the same
    failure; None for a bug (logged by the caller). The codes are those of issue 16
    (RFC 3463's enhanced codes).
    """
    error = failure.value
    if isinstance(error, _Refusal):
        return error.code, error.text, error.status
    if isinstance(error, QueueCapReached):
        return 452, f"4.3.1 {error.message}; try again later", error.code
    if isinstance(error, HTTPError) and error.code == 429:
        return 451, f"4.7.1 {error.message}; try again later", error.code
    if isinstance(error, HTTPError) and error.code == 503:
        return 452, f"4.3.1 {error.message}", error.code
    if isinstance(error, MessageTooLarge):
        return 552, f"5.3.4 {error}", 413
    if isinstance(error, SenderRefused):
        return 550, f"5.7.1 {error}", 403
    if isinstance(error, BadRequest):
        return 550, f"5.6.0 {str(error).replace('field ' + repr('message'), 'the message')}", error.status
    if isinstance(error, StorageError):
        return 451, "4.3.0 cannot store messages now; try again later", 503
    return None


class SubmissionServer:
    """
    What every connection of every submission listener shares: the pipeline, the
    portal, the settings, the clock, and the open connections (for the caps and the
    graceful stop). ``wall`` (default ``clock.seconds``) dates the Received fields.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        settings: SubmissionSettings,
        clock: IReactorTime,
        *,
        wall: Callable[[], float] | None = None,
        portal: Portal | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
        self.settings = settings
        self.clock = clock
        self.wall = wall if wall is not None else clock.seconds
        self.portal = portal if portal is not None else submission_portal(pipeline)
        self.connections: set[SubmissionProtocol] = set()
        self._per_source: dict[str | None, int] = {}
        self.refused = LogTally(
            clock,
            "refused {count} SMTP connections over the connection caps since the last report (latest from {source}: {reason})",
        )
        self.dropped = LogTally(clock, "dropped {count} SMTP connections since the last report (latest from {source}: {reason})")
        #: DATA octets held by every connection (arriving, or waiting for their commit): at most max_data_in_flight.
        self.data_in_flight = 0

    def hold_data(self, octets: int) -> bool:
        """Count ``octets`` more of DATA against the server-wide budget; False (nothing counted) if they do not fit."""
        if self.data_in_flight + octets > self.settings.max_data_in_flight:
            return False
        self.data_in_flight += octets
        return True

    def release_data(self, octets: int) -> None:
        self.data_in_flight -= octets

    def rejected(self, status: int) -> None:
        """A submission refused, counted in mmgun_submissions_rejected_total under the label HTTP gives ``status``."""
        self.metrics.rejected.labels(REASONS.get(status, str(status))).inc()

    def factory(self, *, local: bool, tls: CertificateOptions | None) -> SubmissionFactory:
        """A listener's factory: ``local`` (a loopback listener) allows AUTH without TLS; ``tls`` offers STARTTLS."""
        return SubmissionFactory(self, local=local, tls=tls)

    def admit(self, source: str | None) -> str | None:
        """None if a connection from ``source`` may open (it is counted); else why not."""
        if len(self.connections) >= self.settings.max_connections:
            return f"{self.settings.max_connections} connections open"
        if source is not None and self._per_source.get(source, 0) >= self.settings.max_connections_per_source:
            return f"{self.settings.max_connections_per_source} connections open from there"
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return None

    def forget(self, protocol: SubmissionProtocol) -> None:
        if protocol not in self.connections:
            return
        self.connections.discard(protocol)
        left = self._per_source.get(protocol.source, 0) - 1
        if left > 0:
            self._per_source[protocol.source] = left
        else:
            self._per_source.pop(protocol.source, None)

    def busy(self) -> bool:
        """Whether a connection waits for the store (a commit in flight)."""
        return any(protocol.busy for protocol in self.connections)


class SubmissionFactory(ServerFactory):
    noisy = False

    def __init__(self, server: SubmissionServer, *, local: bool, tls: CertificateOptions | None) -> None:
        self.server = server
        self.local = local
        self.tls = tls

    def buildProtocol(self, addr: Any) -> Any:
        source = source_key(addr)
        refused = self.server.admit(source)
        if refused is not None:
            self.server.refused.note(source=source or "local", reason=refused)
            return _Refused()
        protocol = SubmissionProtocol(self.server, source, local=self.local, tls=self.tls)
        protocol.factory = self
        self.server.connections.add(protocol)
        return protocol


class _Refused(Protocol):
    """A connection over a cap: 421 and closed (aborted under TLS, before any handshake can hold it)."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if ISSLTransport.providedBy(transport):
            transport.abortConnection()
            return
        transport.write(b"421 4.7.0 too many connections, try again later\r\n")
        transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        pass


@implementer(IPushProducer)
class SubmissionProtocol(ESMTP):
    """
    One submission connection. twisted.mail's ESMTP gives EHLO/HELO, the extension list
    and the SASL challengers; framing, ordering, AUTH's outcome, the transaction and
    every reply's enhanced status code are this class's (see the module docstring).

    It is its transport's push producer (of replies): while the transport's write buffer
    is full (the peer does not read), no command is handled and, once lines wait, the
    peer is not read: a client that pipelines commands and never reads the replies holds
    at most the transport's buffer and one read of commands.
    """

    def __init__(self, server: SubmissionServer, source: str | None, *, local: bool, tls: CertificateOptions | None) -> None:
        super().__init__(contextFactory=tls)
        self.server = server
        self.settings = server.settings
        self.host = server.settings.hostname.encode("idna")
        self._portal = server.portal
        #: Whom the connection counts against (caps, failed AUTHs): source_key of the peer.
        self.source = source
        self._local = local
        self.secure = False
        self.client: str | None = None
        #: What the client authenticated with (user, API key): checked again at each MAIL.
        self._credentials: tuple[str, str] | None = None
        #: Waiting for the store: later lines wait in ``_lines``, reading is paused.
        self.busy = False
        #: The transport's write buffer is full (it paused this producer): lines wait, reading is paused.
        self._write_paused = False
        #: Whether the transport is reading (paused while lines wait: see _flow).
        self._reading = True
        self._draining = False
        self._abort_call: IDelayedCall | None = None
        self._buffer = b""
        self._overlong = False
        #: Complete lines not handled yet; None: a line too long.
        self._lines: deque[bytes | None] = deque()
        self._lost = False
        self._greeted = False
        self._greet_call: IDelayedCall | None = None
        self._data_deadline: IDelayedCall | None = None
        self._errors = 0
        self._auth_failures = 0
        self._junk = 0
        self._transactions = 0
        #: The current DATA: its octets (one buffer, CRLFs included), their count, and the reply that refuses it if any.
        self._data = bytearray()
        self._data_size = 0
        self._data_problem: Refused | None = None
        #: Octets of this connection counted in the server's DATA budget (SubmissionServer.hold_data).
        self._data_held = 0
        self._reset()
        self.challengers = {
            b"PLAIN": lambda: PlainCredentials(self.source or "local"),
            b"LOGIN": lambda: LoginCredentials(self.source or "local"),
        }

    # -- the connection

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's idle timeout, on the server's clock."""
        return self.server.clock.callLater(period, func)

    def connectionMade(self) -> None:
        transport: Any = self.transport
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        peer = transport.getPeer()
        self._peer = str(getattr(peer, "host", "") or "local")
        self._helo = (None, self._peer.encode("ascii", "replace"))
        self.secure = ISSLTransport.providedBy(transport)
        self.canStartTLS = self.ctx is not None and ITLSTransport.providedBy(transport) and not self.secure
        transport.registerProducer(self, True)
        self.setTimeout(self.settings.command_timeout or None)
        if self.settings.greet_pause > 0:
            self._greet_call = self.server.clock.callLater(self.settings.greet_pause, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greet_call = None
        self._greeted = True
        self.sendCode(220, self.host + b" ESMTP " + SOFTWARE.encode("ascii"))

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        self._cancel_timers()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._lines.clear()
        self._data = bytearray()
        self._release_data()
        self.server.forget(self)

    def _cancel_timers(self) -> None:
        for call in (self._greet_call, self._data_deadline):
            if call is not None and call.active():
                call.cancel()
        self._greet_call = self._data_deadline = None
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        self._drop(421, "4.4.2 " + self.settings.hostname + " timeout: closing the connection", "idle timeout")

    def _drop(self, code: int, text: str, why: str) -> None:
        self.server.dropped.note(source=self.source or "local", reason=why)
        self._reply(code, text)
        self._close()

    def shut_down(self) -> None:
        """421 and closed: the server is stopping."""
        if not self._lost and not cast(Any, self.transport).disconnecting:
            self._reply(421, "4.3.2 shutting down")
            self._close()

    def _close(self) -> None:
        """
        Close once the replies written are sent; abort :data:`DROP_GRACE` seconds later if
        the peer has not taken them (a peer that never reads cannot keep the connection).
        No timer fires after this but the abort.
        """
        transport: Any = self.transport
        self._lines.clear()
        self._cancel_timers()
        if self._lost or transport.disconnecting:
            return
        # A transport with a producer registered would wait for it before closing, forever.
        transport.unregisterProducer()
        transport.loseConnection()
        if not self._lost:  # some transports are lost at once
            self._abort_call = self.server.clock.callLater(DROP_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._lost:
            self.server.dropped.note(source=self.source or "local", reason="did not take its last reply")
            cast(Any, self.transport).abortConnection()

    # -- IPushProducer: the transport's write buffer

    def pauseProducing(self) -> None:
        self._write_paused = True
        self._flow()

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._drain()

    def stopProducing(self) -> None:
        pass  # the transport is closing: connectionLost follows

    def _reply(self, code: int, text: str) -> None:
        self.sendCode(code, text.encode("utf-8"))

    def _error(self, code: int, text: str) -> None:
        """A 5xx to a command: counted, and the connection dropped after :data:`MAX_ERRORS`."""
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._drop(421, "4.7.0 too many errors; closing the connection", "too many errors")
            return
        self._reply(code, text)

    # -- framing: CRLF lines, none longer than MAX_LINE, in order

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if self._lost or transport.disconnecting:
            return
        if not self._greeted:
            self._drop(554, "5.5.1 protocol error: commands sent before the greeting", "talked before the greeting")
            return
        lines = (self._buffer + data).split(b"\r\n")
        self._buffer = lines.pop()
        for line in lines:
            if self._overlong or len(line) > MAX_LINE - 2:
                # Too long, or the end of a line already too long.
                self._overlong = False
                self._lines.append(None)
            else:
                self._lines.append(line)
        # A trailing CR may be the start of its line's CRLF: not counted (a 1000-octet line split between CR and LF).
        if len(self._buffer) - self._buffer.endswith(b"\r") > MAX_LINE - 2:
            # Not kept: only whether the line is too long matters.
            self._overlong = True
            self._buffer = self._buffer[-1:] if self._buffer.endswith(b"\r") else b""
        self._drain()

    def _drain(self) -> None:
        """Handle the lines waiting, in order, while nothing holds them (the store, a full write buffer); then read or not."""
        if self._draining:
            return  # a reply that came at once (_done) from a line handled below: the loop goes on
        transport: Any = self.transport
        self._draining = True
        try:
            self._handle_lines(transport)
        finally:
            self._draining = False
        self._flow()

    def _handle_lines(self, transport: Any) -> None:
        while self._lines and not self.busy and not self._write_paused and not self._lost and not transport.disconnecting:
            line = self._lines.popleft()
            tls = self.startedTLS
            self.resetTimeout()
            if line is None:
                self._line_too_long()
            else:
                getattr(self, "state_" + self.mode)(line)
            if self.startedTLS and not tls:
                # CVE-2011-0411: what came with STARTTLS in the clear is not part of the TLS session.
                self._lines.clear()
                self._buffer = b""
                self._overlong = False

    def _flow(self) -> None:
        """
        Stop reading from the peer while lines wait (for the store, or for the transport's
        write buffer to drain); read again when none do. Reading goes on while nothing waits:
        a TLS handshake pauses writes until it is done, and it needs reading to be done.
        """
        transport: Any = self.transport
        if self._lost or transport.disconnecting:
            return
        reading = not self._lines or not (self.busy or self._write_paused)
        if reading != self._reading:
            self._reading = reading
            if reading:
                transport.resumeProducing()
            else:
                transport.pauseProducing()

    def _line_too_long(self) -> None:
        if self.mode == AUTH:
            self.mode, self.challenger = COMMAND, None
            self._error(501, f"5.5.2 line longer than {MAX_LINE} octets: authentication cancelled")
        elif self.mode == DATA:
            self._data_problem = self._data_problem or (500, f"5.5.2 a line of the message is longer than {MAX_LINE} octets", 400)
        else:
            self._error(500, f"5.5.2 line longer than {MAX_LINE} octets")

    def _wait(self) -> None:
        """Later lines wait until :meth:`_done` (replies stay in order); reading pauses if some do."""
        self.busy = True
        self.setTimeout(None)
        self._flow()

    def _done(self) -> None:
        self.busy = False
        transport: Any = self.transport
        if self._lost or transport.disconnecting:
            return
        self.setTimeout(self.settings.command_timeout or None)
        self._drain()

    # -- commands

    def state_COMMAND(self, line: bytes) -> None:
        if b"\r" in line or b"\n" in line or b"\0" in line:
            self._error(500, "5.5.2 a command may not hold CR, LF or NUL")
            return
        verb, _, rest = line.strip().partition(b" ")
        method = self.lookupMethod(verb)
        if method is None:
            self._error(500, "5.5.2 command not recognized")
            return
        method(rest.strip())

    def lookupMethod(self, command: bytes) -> Any:
        """Only the :data:`VERBS` (twisted.mail's do_UNKNOWN and the like are not commands)."""
        verb = command.upper()
        return getattr(self, "do_" + verb.decode("ascii")) if verb in VERBS else None

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.settings.max_message_size).encode("ascii")],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
            b"SMTPUTF8": None,
        }
        if self.canStartTLS and not self.startedTLS:
            ext[b"STARTTLS"] = None
        if self._auth_allowed() and self.client is None:
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    def _auth_allowed(self) -> bool:
        return self.secure or self.startedTLS or self._local

    def _junk_command(self) -> bool:
        """Count a command that moves no mail; True if it was one too many (the connection is dropped)."""
        self._junk += 1
        if self._junk > self.settings.max_junk_commands:
            self._drop(421, "4.7.0 too many junk commands (NOOP, RSET, EHLO, HELO, VRFY, HELP); closing the connection", "too many junk commands")
            return True
        return False

    def do_EHLO(self, rest: bytes) -> None:
        if self._junk_command():
            return
        self._reset()
        super().do_EHLO(rest)

    def do_HELO(self, rest: bytes) -> None:
        if self._junk_command():
            return
        self._reset()
        super().do_HELO(rest)

    def do_NOOP(self, rest: bytes) -> None:
        if not self._junk_command():
            self._reply(250, "2.0.0 OK")

    def do_RSET(self, rest: bytes) -> None:
        if not self._junk_command():
            self._reset()
            self._reply(250, "2.0.0 OK")

    def do_HELP(self, rest: bytes) -> None:
        if not self._junk_command():
            self._reply(214, "2.0.0 SMTP submission (RFC 6409): EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, RSET, NOOP, QUIT")

    def do_QUIT(self, rest: bytes) -> None:
        self._reply(221, "2.0.0 bye")
        self._close()

    def do_VRFY(self, rest: bytes) -> None:
        if not self._junk_command():
            self._error(502, "5.5.1 VRFY is not offered")

    do_EXPN = do_VRFY

    def do_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS or self.secure:
            self._error(503, "5.5.1 TLS already active")
        elif rest:
            self._error(501, "5.5.4 STARTTLS takes no parameters")
        elif not self.canStartTLS:
            self._reply(454, "4.7.0 TLS not available")
        else:
            self._reply(220, "2.0.0 ready to start TLS")
            transport: Any = self.transport
            transport.startTLS(self.ctx)
            self.startedTLS = True
            # RFC 3207 4.2: forget everything learnt before TLS, AUTH included (a loopback listener allows it in the clear).
            self._helo = (None, self._helo[1])
            self.client, self._credentials, self.authenticated = None, None, False
            self._reset()

    def do_AUTH(self, rest: bytes) -> None:
        if self.client is not None:
            self._error(503, "5.5.1 already authenticated")
            return
        if self._from is not None:
            self._error(503, "5.5.1 AUTH is not allowed during a mail transaction")
            return
        if not self._auth_allowed():
            self._error(538, "5.7.11 encryption required for requested authentication mechanism (use STARTTLS)")
            return
        mechanism, _, initial = rest.partition(b" ")
        factory = self.challengers.get(mechanism.upper())
        if factory is None:
            self._error(504, "5.5.4 unrecognized authentication type")
            return
        self.challenger = factory()
        self.mode = AUTH
        if initial:
            self.challenger.getChallenge()  # answered by the initial response (RFC 4954 4)
            self.state_AUTH(b"" if initial == b"=" else initial.strip())
        else:
            self._challenge()

    def _challenge(self) -> None:
        import base64

        self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))

    def state_AUTH(self, response: bytes) -> None:
        import base64
        import binascii

        if response == b"*":
            self.mode, self.challenger = COMMAND, None
            self._error(501, "5.0.0 authentication cancelled")
            return
        try:
            self.challenger.setResponse(base64.b64decode(response, validate=True))
        except (binascii.Error, ValueError, IllegalClientResponse):
            self.mode, self.challenger = COMMAND, None
            self._error(501, "5.5.2 cannot decode the AUTH response")
            self.server.rejected(401)
            return
        if self.challenger.moreChallenges():
            self._challenge()
            return
        credentials, self.challenger = self.challenger, None
        self.mode = COMMAND
        self._wait()
        login = self._portal.login(credentials, None, ISubmitter)
        login.addCallbacks(self._authenticated, self._not_authenticated, callbackArgs=(credentials,))
        login.addErrback(self._bug, "authentication")
        login.addBoth(lambda _: self._done())

    def _authenticated(self, result: tuple[Any, Submitter, Callable[[], None]], credentials: Any) -> None:
        _, avatar, _ = result
        self.client = avatar.client
        self._credentials = APIKeyChecker.user_and_key(credentials)
        self.authenticated = True
        self._reply(235, "2.7.0 authentication successful")

    def _not_authenticated(self, failure: Failure) -> None:
        self._auth_failures += 1
        if failure.check(TooManyFailures):
            wait = cast(TooManyFailures, failure.value).wait
            self._reply(454, f"4.7.0 too many failed authentication attempts from your address; try again in {wait} seconds")
            self.server.rejected(429)
        elif failure.check(UnauthorizedLogin):
            self._reply(535, "5.7.8 authentication credentials invalid")
            self.server.rejected(401)
        elif failure.check(StorageError):
            self._reply(454, "4.7.0 temporary authentication failure; try again later")
            self.server.rejected(503)
        else:
            failure.raiseException()
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._drop(421, "4.7.0 too many failed authentication attempts; closing the connection", "failed AUTH")

    def _bug(self, failure: Failure, what: str) -> None:
        _log.failure("SMTP submission: internal error in {what} for {source}", failure, what=what, source=self.source or "local")
        self._reply(451, "4.3.0 internal error; try again later")
        self.server.rejected(500)

    # -- the transaction

    def _reset(self) -> None:
        self._from: str | None = None
        self._to: list[str] = []
        #: MAIL FROM's SIZE parameter (RFC 1870), 0 if not given.
        self._declared_size = 0
        #: MAIL FROM's SMTPUTF8 parameter (RFC 6531 3.4): UTF-8 addresses and header fields allowed.
        self._smtputf8 = False

    def do_MAIL(self, rest: bytes) -> None:
        if self.client is None:
            self._error(530, "5.7.0 authentication required")
            self.server.rejected(401)
            return
        self._transactions += 1
        if self._transactions > self.settings.max_transactions:
            self._drop(
                421,
                f"4.7.0 too many messages on one connection (at most {self.settings.max_transactions}); reconnect to send more",
                "too many transactions",
            )
            return
        if self._from is not None:
            self._error(503, "5.5.1 nested MAIL command")
            return
        match = re.fullmatch(rb"(?i:FROM:)\s*<([^<>]*)>((?: +[^ ]+)*) *", rest)
        if match is None:
            self._error(501, "5.5.4 syntax: MAIL FROM:<address> [parameters]")
            return
        size = 0
        smtputf8 = False
        for parameter in match.group(2).split():
            name, _, value = parameter.partition(b"=")
            name = name.upper()
            if name == b"SIZE" and value.isdigit():
                if int(value) > self.settings.max_message_size:
                    self._error(552, f"5.3.4 message size exceeds the maximum of {self.settings.max_message_size} octets")
                    self.server.rejected(413)
                    return
                size = int(value)
            elif name == b"BODY" and value.upper() in (b"7BIT", b"8BITMIME"):
                pass
            elif name == b"AUTH" and value:
                pass  # RFC 4954 5: the submitter's claim; mmgun knows who authenticated
            elif name == b"SMTPUTF8" and b"=" not in parameter:
                smtputf8 = True  # RFC 6531 3.4: a parameter without a value
            else:
                self._error(555, f"5.5.4 MAIL parameter {name.decode('ascii', 'replace')} not recognized")
                self.server.rejected(400)
                return
        path = match.group(1)
        if not path:
            self._error(550, "5.7.1 a null sender (MAIL FROM:<>) is not accepted for submission")
            self.server.rejected(400)
            return
        sender = self._address(path, 553, "5.1.7 bad sender address syntax", smtputf8)
        if sender is None:
            self.server.rejected(400)
            return
        # The key may have been revoked since AUTH: checked again (the Authenticator caches it for 2 s).
        self._wait()
        checked = Deferred.fromCoroutine(self._key_still_valid())
        checked.addCallbacks(self._mail_accepted, self._key_refused, callbackArgs=(sender, size, smtputf8))
        checked.addErrback(self._bug, "checking the API key")
        checked.addBoth(lambda _: self._done())

    async def _key_still_valid(self) -> str:
        assert self._credentials is not None
        user, key = self._credentials
        return await self.server.pipeline.authenticate_key(user, key, self.source or "local")

    def _mail_accepted(self, client: str, sender: str, size: int, smtputf8: bool) -> None:
        if client != self.client:
            self._key_refused(Failure(UnauthorizedLogin()))
            return
        self._from = sender
        self._to = []
        self._declared_size = size
        self._smtputf8 = smtputf8
        self._reply(250, "2.1.0 sender OK")

    def _key_refused(self, failure: Failure) -> None:
        if failure.check(HTTPError, UnauthorizedLogin):
            self._drop(421, "4.7.0 the API key of this session was revoked; closing the connection", "API key revoked")
            self.server.rejected(401)
        elif failure.check(StorageError):
            self._reply(451, "4.3.0 cannot check the API key now; try again later")
            self.server.rejected(503)
        else:
            failure.raiseException()

    def do_RCPT(self, rest: bytes) -> None:
        if self._from is None:
            self._error(503, "5.5.1 need MAIL before RCPT")
            return
        match = re.fullmatch(rb"(?i:TO:)\s*<([^<>]+)>((?: +[^ ]+)*) *", rest)
        if match is None:
            self._error(501, "5.5.4 syntax: RCPT TO:<address>")
            return
        if match.group(2).strip():
            self._error(555, "5.5.4 RCPT parameters are not recognized")
            return
        recipient = self._address(match.group(1), 553, "5.1.3 bad recipient address syntax", self._smtputf8)
        if recipient is None:
            return
        if recipient not in self._to and len(self._to) >= self.settings.max_recipients:
            self._reply(452, f"4.5.3 too many recipients (at most {self.settings.max_recipients} in one message)")
            return
        if recipient not in self._to:
            self._to.append(recipient)
        self._reply(250, "2.1.5 recipient OK")

    def _address(self, path: bytes, code: int, text: str, smtputf8: bool) -> str | None:
        """The address normalized; None once refused. UTF-8 only in a transaction with SMTPUTF8 (RFC 6531 3.3)."""
        if not path.isascii() and not smtputf8:
            self._error(553, f"5.6.7 non-ASCII address without SMTPUTF8: {NO_SMTPUTF8}")
            return None
        try:
            return normalize_address(path.decode("utf-8"), "address")
        except UnicodeDecodeError:
            self._error(553, "5.6.7 the address is not valid UTF-8")
        except BadRequest:
            self._error(code, text)
        return None

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None:
            self._error(503, "5.5.1 need MAIL before DATA")
            return
        if not self._to:
            self._reset()  # fail closed: what follows is not part of this transaction
            self._error(554, "5.5.1 no valid recipients")
            self.server.rejected(400)
            return
        left = self.settings.max_data_in_flight - self.server.data_in_flight
        if left < MAX_LINE or left < self._declared_size:
            self._reset()
            self._reply(452, "4.3.1 too many messages arriving at once; try again later")
            self.server.rejected(503)
            return
        self.mode = DATA
        self._data = bytearray()
        self._data_size = 0
        self._data_problem = None
        self._data_deadline = self.server.clock.callLater(self.settings.data_timeout, self._data_too_slow)
        self._reply(354, "end data with <CR><LF>.<CR><LF>")

    def _data_too_slow(self) -> None:
        self._data_deadline = None
        self._drop(421, "4.4.2 the message did not arrive in time; closing the connection", "slow DATA")

    def state_DATA(self, line: bytes) -> None:
        if line == b".":
            self._end_of_data()
            return
        if line[:1] == b".":
            line = line[1:]
        if self._data_problem is not None:
            return
        if b"\r" in line or b"\n" in line:
            self._data_problem = (550, "5.6.11 bare CR or LF in the message: end every line with CRLF", 400)
        elif b"\0" in line:
            self._data_problem = (550, "5.6.0 NUL octet in the message", 400)
        else:
            self._data_size += len(line) + 2
            if self._data_size > self.settings.max_message_size:
                self._data_problem = (552, f"5.3.4 message size exceeds the maximum of {self.settings.max_message_size} octets", 413)
            elif not self.server.hold_data(len(line) + 2):
                self._data_problem = (452, "4.3.1 too many messages arriving at once; try again later", 503)
            else:
                self._data_held += len(line) + 2
                self._data += line
                self._data += b"\r\n"
        if self._data_problem is not None:
            # Refused: nothing more of it is kept.
            self._data = bytearray()
            self._release_data()

    def _release_data(self) -> None:
        self.server.release_data(self._data_held)
        self._data_held = 0

    def _end_of_data(self) -> None:
        if self._data_deadline is not None and self._data_deadline.active():
            self._data_deadline.cancel()
        self._data_deadline = None
        self.mode = COMMAND
        sender, recipients, problem, smtputf8 = self._from, self._to, self._data_problem, self._smtputf8
        message, self._data = bytes(self._data), bytearray()
        # Counted until the commit: the message is in memory until then.
        held, self._data_held = self._data_held, 0
        self._reset()
        if problem is not None:
            self.server.release_data(held)
            code, text, status = problem
            self._reply(code, text)
            self.server.rejected(status)
            return
        assert sender is not None and self.client is not None
        self._wait()
        queued = Deferred.fromCoroutine(self._queue(self.client, sender, recipients, message, smtputf8))
        del message
        queued.addCallbacks(self._queued, self._not_queued)
        queued.addErrback(self._bug, "queueing")
        queued.addBoth(self._committed, held)

    def _committed(self, _: object, held: int) -> None:
        """The message is no longer in memory (stored, or refused): its DATA budget is free; the next lines go on."""
        self.server.release_data(held)
        self._done()

    def _queued(self, submission: str) -> None:
        self._junk = 0  # as Postfix counts junk commands: since the last message
        self._reply(250, f"2.0.0 queued as {submission}")

    def _not_queued(self, failure: Failure) -> None:
        answer = refusal(failure)
        if answer is None:
            failure.raiseException()
        assert answer is not None
        code, text, status = answer
        self._reply(code, text)
        self.server.rejected(status)

    async def _queue(self, client: str, sender: str, recipients: Iterable[str], data: bytes, smtputf8: bool) -> str:
        settings = self.settings
        now = self.server.wall()
        # A Date and a Message-ID are added when missing (RFC 6409 8.2, 8.3), Bcc fields removed;
        # the size is checked below, once the Received field is on.
        size = len(data)
        if not smtputf8 and not data.partition(b"\r\n\r\n")[0].isascii():
            raise _Refusal(550, f"5.6.7 non-ASCII octets in a header field without SMTPUTF8: {NO_SMTPUTF8}", 400)
        message, message_id, author = check_mime(data, hostname=settings.hostname, now=now, max_size=sys.maxsize, utf8=smtputf8)
        del data  # the caller holds no other reference: one copy fewer while the message is stored
        message = self._received(now) + message
        if len(message) > settings.max_message_size:
            raise _Refusal(
                552,
                f"5.3.4 the message is {size} octets but {len(message)} with the header fields this server adds"
                f" (Received; Date and Message-ID when missing), more than the maximum of {settings.max_message_size}",
                413,
            )
        raw = RawMessage(
            sender=sender,
            recipients=tuple(recipients),
            message=message,
            # The sender policy checks the From field and the others that name a sender, not only MAIL FROM.
            other_senders=tuple(dict.fromkeys((author, *other_senders(message)))),
            # DKIM-signed for the From domain (DMARC alignment), whatever the MAIL FROM (a bounce address).
            author=author,
        )
        return await self.server.pipeline.submit(client, raw, None, message_id=message_id)

    def _received(self, now: float) -> bytes:
        """The Received field (RFC 5321 4.4), without "for" (it would show Bcc recipients)."""
        helo = self._helo[0] if self._helo[0] and _HELO.fullmatch(self._helo[0]) else b"unknown"
        protocol = b"ESMTPSA" if (self.secure or self.startedTLS) else b"ESMTPA"  # RFC 3848
        date = format_datetime(datetime.fromtimestamp(now, UTC)).encode("ascii")
        return (
            b"Received: from " + helo + b" ([" + self._peer.encode("ascii", "replace") + b"])\r\n"
            b"\tby " + self.host + b" (" + SOFTWARE.encode("ascii") + b") with " + protocol + b";\r\n"
            b"\t" + date + b"\r\n"
        )


class SubmissionService(MultiService):
    """
    The submission listeners. On stop: stop listening, give commits in flight ``grace``
    seconds, then close every connection with ``421``.
    """

    def __init__(
        self,
        server: SubmissionServer,
        descriptions: Iterable[str],
        reactor: Any,
        *,
        tls: CertificateOptions | None,
        grace: float = 10.0,
    ) -> None:
        from .service import Listener, listens_beyond_loopback

        super().__init__()
        self.server = server
        self._reactor = reactor
        self._grace = grace
        self.listeners: list[Listener] = []
        for description in descriptions:
            factory = server.factory(local=not listens_beyond_loopback(description), tls=tls)
            listener = Listener(description, factory, reactor)
            listener.setServiceParent(self)
            self.listeners.append(listener)

    async def _stop(self) -> None:
        for listener in self.listeners:
            await maybeDeferred(listener.stopService)
        deadline = self._reactor.seconds() + self._grace
        while self.server.busy() and self._reactor.seconds() < deadline:
            await deferLater(self._reactor, 0.05, lambda: None)
        for protocol in list(self.server.connections):
            if protocol.transport is not None:
                protocol.shut_down()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())
