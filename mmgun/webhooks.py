"""
Webhooks, the HTTP side: Mailgun's signed JSON body (L{sign_payload}), POSTed
with treq by a L{WebhookClient} to receivers it has checked may be reached,
and Mailgun's retry schedule (L{retry_delay}).

Mailgun's rule, which existing webhook handlers check: the body is
C{{"signature": {"timestamp", "token", "signature"}, "event-data": {...}}},
C{signature} being the hex HMAC-SHA256, under the client's webhook signing
key, of the timestamp (decimal seconds, as a string) followed by the token
(50 random hex characters, new for every POST).

A webhook URL is the client's to choose, so the client could aim it at
mmgun's own host or network (server-side request forgery).  L{WebhookAgent}
therefore resolves the URL's host itself (with C{twisted.names}, bounded and
with a deadline: L{DNSHostResolver}; no thread), refuses every address the
L{mmgun.mx.AddressPolicy} refuses (by default L{mmgun.mx.PublicOnly}: no
loopback, private, link-local, CGNAT, multicast, reserved or own address,
IPv4-mapped forms included) before any connection is made, and connects to
the address it checked: there is no second lookup for a rebinding DNS server
to answer differently.  HTTPS receivers' certificates are verified for the
URL's host name.

A slow or hostile receiver costs little: every POST has a deadline covering
connecting and the whole response, response bodies are read to at most
L{RESPONSE_LIMIT} bytes and dropped, redirects are not followed (a 3xx is a
failure), and at most C{max_per_receiver} POSTs go to one receiver,
C{max_per_client} for one client and C{max_concurrent} in all at once, a free
turn going first to the client holding the fewest (L{FairSlots}).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from http.cookiejar import DefaultCookiePolicy
from typing import Any, cast
from urllib.parse import unquote

import attrs
import hyperlink
from OpenSSL import SSL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error as net_error
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IResolutionReceiver,
    IResolver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.resolve import ResolverChain
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from .mx import ANY_ADDRESS, AddressPolicy, CachingResolver, LocalAddresses, PublicOnly, _addresses_from, make_resolver

_log = Logger()

#: Response bytes read, then the connection is dropped: a receiver's answer is
#: only its status code.
RESPONSE_LIMIT = 64 * 1024

#: Seconds between a failed POST of an event and the next: Mailgun's documented
#: schedule ("Automatic Retries": 5 min, 10 min, 15 min, 1 h, 2 h, 4 h, "during
#: 8 hours").  After the last one fails, the event's delivery is given up.
RETRY_SCHEDULE: tuple[float, ...] = (300.0, 600.0, 900.0, 3600.0, 7200.0, 14400.0)

#: Idle persistent connections to a receiver are closed after this many seconds.
IDLE_CONNECTION_TIMEOUT = 60

_HEADERS: dict[bytes | str, bytes | str] = {"Content-Type": "application/json", "User-Agent": "mmgun-webhooks"}
_TOKEN = re.compile(r"[0-9a-f]{50}")
# What the host of an http(s) URL may be once treq has made it ASCII: a DNS name or an IP literal.
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


# -- the payload -----------------------------------------------------------------


def signature(signing_key: str, timestamp: int, token: str) -> str:
    """Mailgun's webhook signature: hex HMAC-SHA256 of C{timestamp} then C{token} under C{signing_key}."""
    message = f"{timestamp}{token}".encode("ascii")
    return hmac.new(signing_key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign_payload(signing_key: str, event_data: Mapping[str, Any], *, timestamp: int, token: str) -> bytes:
    """
    The JSON body Mailgun POSTs to a webhook for one event.

    @param timestamp: Seconds since the epoch, by the wall clock (receivers
        commonly refuse a timestamp more than a few minutes from theirs).
    @param token: 50 lowercase hex characters, new for every POST
        (L{new_token}): receivers may refuse a token they have seen.
    @raise ValueError: For a token of another form.
    """
    if not _TOKEN.fullmatch(token):
        raise ValueError("a webhook token is 50 lowercase hex characters")
    body = {
        "signature": {
            "timestamp": str(int(timestamp)),
            "token": token,
            "signature": signature(signing_key, int(timestamp), token),
        },
        "event-data": event_data,
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def new_token() -> str:
    """A fresh random webhook token: 50 hex characters (25 random bytes)."""
    return secrets.token_hex(25)


def new_signing_key() -> str:
    """A new webhook signing key for a client: 32 random bytes, as 64 hex characters."""
    return secrets.token_hex(32)


def signed_body(signing_key: str, event_data: Mapping[str, Any], wall: Callable[[], float]) -> bytes:
    """L{sign_payload} with the time from C{wall} (e.g. the reactor's C{seconds}) and a new token."""
    return sign_payload(signing_key, event_data, timestamp=int(wall()), token=new_token())


def retry_delay(attempt: int) -> float | None:
    """
    Seconds to wait after the C{attempt}th failed POST of an event (1 for the
    first) before the next, or L{None} when Mailgun's 8 hours are used up
    (after the seventh failure: the first POST and six retries).
    """
    if 1 <= attempt <= len(RETRY_SCHEDULE):
        return RETRY_SCHEDULE[attempt - 1]
    if attempt < 1:
        raise ValueError(f"attempts are counted from 1, not {attempt}")
    return None


# -- URLs ------------------------------------------------------------------------


class WebhookURLError(ValueError):
    """A webhook URL mmgun will not POST to (its reason is safe to show and log)."""


@attrs.frozen
class Receiver:
    """Where a webhook URL's POSTs go: what concurrency is bounded per, and what logs name."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


#: Webhook URLs whose checks and URI forms are kept (a dispatcher POSTs to the same few
#: URLs again and again: parsing one with hyperlink and idna costs ~0.1 ms, four times a POST).
_URL_CACHE_SIZE = 256


@functools.lru_cache(maxsize=_URL_CACHE_SIZE)
def parse_url(url: str) -> Receiver:
    """
    Check a webhook URL: http or https, a host name or IP literal, any port,
    optionally C{user:password@} (sent as HTTP Basic authentication, as
    Mailgun does).  Its credentials, path and query (which may hold a secret
    of the receiver's) are not part of the result, which may be logged.

    @raise WebhookURLError: Saying what is wrong, without repeating the URL.
    """
    bare, _ = _split_userinfo(url)
    parsed = _uri_form(bare)
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLError("only http and https URLs are allowed")
    if parsed.userinfo or "@" in _authority(bare):
        raise WebhookURLError("the URL's user name and password are not user:password")
    host = parsed.host.lower()
    if not host:
        raise WebhookURLError("the URL has no host")
    if not _is_ip_literal(host) and not _HOST_NAME.fullmatch(host):
        raise WebhookURLError("the URL's host is not a host name or IP address")
    port = parsed.port
    if port is None or not 0 < port < 65536:
        raise WebhookURLError("the URL's port is not 1-65535")
    return Receiver(scheme, host if _is_ip_literal(host) else host.rstrip("."), port)


_URL_PARTS = re.compile(r"([^:/?#]*:(?://)?)([^/?#]*)(.*)", re.DOTALL)


def _authority(url: str) -> str:
    match = _URL_PARTS.fullmatch(url)
    return "" if match is None else match.group(2)


def _split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """
    C{url} without its C{user:password@}, and the (percent-decoded) pair;
    a user name alone, or an unencoded "@" in either, is refused (it would
    make the host ambiguous to a reader).
    """
    match = _URL_PARTS.fullmatch(url)
    if match is None or "@" not in match.group(2):
        return url, None
    userinfo, _, host = match.group(2).rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not colon or not user or "@" in userinfo:
        raise WebhookURLError("the URL's user name and password are not user:password")
    try:
        pair = (unquote(user, errors="strict"), unquote(password, errors="strict"))
    except UnicodeDecodeError as e:
        raise WebhookURLError("the URL's user name and password are not user:password") from e
    if any(ord(c) < 0x20 or c == "\x7f" for c in pair[0] + pair[1]) or ":" in pair[0]:
        raise WebhookURLError("the URL's user name and password are not user:password")
    return match.group(1) + host + match.group(3), pair


def url_credentials(url: str) -> tuple[str, str] | None:
    """The C{(user, password)} of a checked webhook URL (L{parse_url}), or L{None}."""
    return _split_userinfo(url)[1]


def redact_url(url: str) -> str:
    """C{url} with its password, if it has one, shown as C{***}: for listings and logs of the URL."""
    match = _URL_PARTS.fullmatch(url)
    if match is None or "@" not in match.group(2):
        return url
    userinfo, _, host = match.group(2).rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{match.group(1)}{user}:***@{host}{match.group(3)}"


def _basic_authorization(credentials: tuple[str, str]) -> bytes:
    user, password = credentials
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class _URIForm(hyperlink.URL):
    """
    A URL already in its ASCII URI form, which treq takes as it is.  treq
    calls C{to_uri()} on every URL, and hyperlink's IDNA-encodes an IPv6
    literal host and fails (hyperlink issues 68 and 188).
    """

    def to_uri(self) -> _URIForm:
        return self


@functools.lru_cache(maxsize=_URL_CACHE_SIZE)
def _uri_form(url: str) -> _URIForm:
    """
    C{url} in URI form (IDNA host, percent-encoded path and query); IP literal hosts kept as
    they are.  (Cached: the result is immutable; a refused URL raises again each time.)
    """
    if any(ord(c) < 0x21 or c == "\x7f" for c in url):
        raise WebhookURLError("the URL contains spaces or control characters")
    try:
        parsed = hyperlink.EncodedURL.from_text(url)
        host = parsed.host
        if _is_ip_literal(host):
            as_uri = parsed.replace(host="ip-literal.invalid").to_uri().replace(host=host)
        else:
            as_uri = parsed.to_uri()
        result = cast(_URIForm, _URIForm.from_text(as_uri.to_text()))
    except (ValueError, UnicodeError) as e:
        raise WebhookURLError("not a URL") from e
    return result


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- connecting only where the policy allows ---------------------------------------


class AddressRefused(Exception):
    """The receiver's host is, or resolves only to, addresses the policy refuses."""


class HostNotFound(Exception):
    """The receiver's host name resolved to no address."""


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects one host name resolution into C{done}."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        # Cancelled (the POST's deadline passed): the lookup is cancelled too, so it holds nothing.
        self.done: Deferred[list[str]] = Deferred(self._cancel)
        self._resolution: IHostResolution | None = None
        self._cancelled = False

    def _cancel(self, _: Deferred[list[str]]) -> None:
        self._cancelled = True
        if self._resolution is not None:
            self._resolution.cancel()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._resolution = resolutionInProgress

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)) and address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if not self.done.called and not self._cancelled:
            self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """
    Connects to C{host}'s first address that the policy allows and answers,
    never to one it refuses; over TLS verified for C{host} when C{tls}.
    """

    def __init__(self, factory: _CheckedEndpointFactory, host: str, port: int, tls: bool) -> None:
        self._factory = factory
        self._host = host
        self._port = port
        self._tls = tls

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        f = self._factory
        addresses = [self._host] if _is_ip_literal(self._host) else await self._lookup()
        if not addresses:
            raise HostNotFound(f"{self._host} has no address")
        allowed = [a for a in addresses if f.policy.refusal(a) is None]
        if not allowed:
            refused = ", ".join(f"{a} ({f.policy.refusal(a)})" for a in addresses[:3])
            name = "" if addresses == [self._host] else f"{self._host}: "
            raise AddressRefused(f"refused address {name}{refused} (see --webhook-allow-private)")
        last: Exception | None = None
        for address in allowed:
            endpoint: IStreamClientEndpoint
            if ":" in address:
                endpoint = TCP6ClientEndpoint(f.reactor, address, self._port, timeout=f.connect_timeout)
            else:
                endpoint = TCP4ClientEndpoint(f.reactor, address, self._port, timeout=f.connect_timeout)
            if self._tls:
                # Verified for the URL's host name (SNI too), whichever address was chosen.
                endpoint = wrapClientTLS(optionsForClientTLS(self._host, trustRoot=f.trust_root), endpoint)
            try:
                return await endpoint.connect(protocolFactory)
            except net_error.ConnectError as e:
                last = e
        assert last is not None
        raise last

    def _lookup(self) -> Deferred[list[str]]:
        receiver = _Addresses()
        self._factory.resolver.resolveHostName(
            receiver, self._host, self._port, addressTypes=[IPv4Address, IPv6Address], transportSemantics="TCP"
        )
        return receiver.done


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _CheckedEndpointFactory:
    reactor: Any
    resolver: IHostnameResolver
    policy: AddressPolicy
    connect_timeout: float
    trust_root: IOpenSSLTrustRoot | None

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        receiver = parse_url(uri.toBytes().decode("ascii"))
        return _CheckedEndpoint(self, receiver.host, receiver.port, receiver.scheme == "https")


@implementer(IAgent)
class WebhookAgent:
    """
    An C{IAgent} (usable by treq's C{HTTPClient}) that connects only to
    addresses C{policy} allows, found by C{resolver} and connected to
    without a second lookup; HTTPS certificates are verified for the URL's
    host against C{trust_root} (L{None}: the platform's trust store).

    It neither asks for nor decodes a compressed response (treq's
    C{ContentDecoderAgent}, above it, would otherwise inflate up to 64 MiB
    from one 64 KiB read): the C{Accept-Encoding} header treq adds is
    removed, and so is a response's C{Content-Encoding}, whose body is
    dropped unread anyway.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        resolver: IHostnameResolver,
        policy: AddressPolicy,
        pool: HTTPConnectionPool | None = None,
        connect_timeout: float = 10.0,
        trust_root: IOpenSSLTrustRoot | None = None,
    ) -> None:
        factory = _CheckedEndpointFactory(reactor, resolver, policy, connect_timeout, trust_root)
        self._agent = Agent.usingEndpointFactory(reactor, factory, pool=pool)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        try:
            parse_url(uri.decode("ascii"))
        except (WebhookURLError, UnicodeDecodeError) as e:
            return fail(WebhookURLError(str(e)))
        if headers is not None:
            headers = headers.copy()
            headers.removeHeader(b"accept-encoding")
        d: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return d.addCallback(_without_content_encoding)


def _without_content_encoding(response: IResponse) -> IResponse:
    response.headers.removeHeader(b"content-encoding")
    return response


# -- POSTing ---------------------------------------------------------------------


@attrs.frozen
class Delivery:
    """
    The outcome of one POST.  C{reason} is safe to log and to show the
    client: it never holds the body, the signing key or the URL's path or
    query.

    @ivar ok: A complete 2xx response arrived in time: the event is delivered.
    @ivar status: The response's status code, if one arrived.
    """

    ok: bool
    status: int | None
    reason: str

    def __str__(self) -> str:
        return self.reason


@implementer(IBodyProducer)
class _BytesProducer:
    """The request body, written at once (treq's default producer uses the global cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Drain(Protocol):
    """
    Reads a response body up to C{limit} bytes and drops it; past the limit
    the connection is closed.  C{done} fires when the body has ended (or was
    cut off), fails if the connection was lost first; cancelling it closes
    the connection.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._received = 0
        self._cut = False
        self._cancelled = False
        self.done: Deferred[None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._limit and not self._cut:
            self._cut = True
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._cancelled or self.done.called:
            return
        if self._cut or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _cancel(self, _: Deferred[None]) -> None:
        self._cancelled = True
        self._stop()

    def _stop(self) -> None:
        # The response's transport is also its producer; stopping it closes the connection.
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def _no_cookies() -> IndexableCookieJar:
    """A jar that keeps nothing: one receiver's cookies are not sent back, to it or another."""
    return IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _causes(error: BaseException) -> list[BaseException]:
    """C{error} and the errors a twisted.web client error wraps."""
    found = [error]
    for reason in getattr(error, "reasons", None) or ():
        if isinstance(reason, Failure):
            found.extend(_causes(reason.value))
    return found


def _describe(error: BaseException) -> str:
    """Words for a failed POST that are safe to log."""
    if isinstance(error, (AddressRefused, HostNotFound)):
        return str(error)
    if isinstance(error, WebhookURLError):
        return f"invalid webhook URL: {error}"
    causes = _causes(error)
    for cause in causes:
        if isinstance(cause, SSL.Error):
            details = sorted({str(part[-1]) for arg in cause.args if isinstance(arg, list) for part in arg if part})
            return "TLS handshake failed" + (f": {', '.join(details)}" if details else "")
        if type(cause).__name__ == "VerificationError":  # service_identity's: the certificate is for another name
            return "TLS handshake failed: the certificate is not for this host"
    if isinstance(error, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, net_error.TimeoutError):
        return "connecting timed out"
    if isinstance(error, net_error.DNSLookupError):
        return "host not found"
    if isinstance(error, net_error.ConnectError):
        return f"could not connect ({type(error).__name__})"
    if isinstance(error, ResponseNeverReceived):
        return "the connection closed before a response"
    if isinstance(error, RequestTransmissionFailed):
        return "the connection closed while sending the request"
    if isinstance(error, ResponseFailed):
        return "the connection closed during the response"
    return f"failed ({type(error).__name__})"


class FairSlots:
    """
    C{total} slots shared by owners (clients), at most C{per_owner} each.

    A freed slot goes to the waiting owner (below its cap) that holds the
    fewest slots, the one waiting longest among equals: an owner with work
    gets a turn before one that already holds many, however many requests
    the latter queued first.  Cancelling a waiting L{acquire} leaves the queue.
    """

    def __init__(self, total: int, per_owner: int) -> None:
        if total < 1 or per_owner < 1:
            raise ValueError("slots are at least 1")
        self.total = total
        self.per_owner = per_owner
        #: Slots held, per owner holding any.
        self.held: dict[str, int] = {}
        self._in_use = 0
        self._waiting: dict[str, list[tuple[int, Deferred[None]]]] = {}
        self._arrivals = 0
        self._handing_over = False

    @property
    def in_use(self) -> int:
        return self._in_use

    def waiting(self, owner: str) -> int:
        return len(self._waiting.get(owner, ()))

    def acquire(self, owner: str) -> Deferred[None]:
        """Fires when C{owner} has a slot (call L{release} once it is done)."""
        # While a release hands slots over, a new request joins the queue: the hand-over picks by the rules.
        if not self._handing_over and self._in_use < self.total and self.held.get(owner, 0) < self.per_owner:
            self._take(owner)
            return succeed(None)
        self._arrivals += 1
        entry: tuple[int, Deferred[None]] = (self._arrivals, Deferred(lambda d: self._cancel(owner, d)))
        self._waiting.setdefault(owner, []).append(entry)
        return entry[1]

    def release(self, owner: str) -> None:
        """
        Free one of C{owner}'s slots and hand free slots over.  A release made
        while a hand-over runs (the granted request ended at once, e.g. a
        refused address) only frees: the running hand-over grants the slot
        (a trampoline), so a long queue of requests that end at once is served
        in a loop, not by ever deeper recursion.
        """
        self._in_use -= 1
        left = self.held[owner] - 1
        if left:
            self.held[owner] = left
        else:
            del self.held[owner]
        if self._handing_over:
            return
        self._handing_over = True
        try:
            while self._in_use < self.total:
                eligible = [(self.held.get(o, 0), q[0][0], o) for o, q in self._waiting.items() if self.held.get(o, 0) < self.per_owner]
                if not eligible:
                    return
                _, _, chosen = min(eligible)
                queue = self._waiting[chosen]
                _, d = queue.pop(0)
                if not queue:
                    del self._waiting[chosen]
                self._take(chosen)
                d.callback(None)
        finally:
            self._handing_over = False

    def _take(self, owner: str) -> None:
        self._in_use += 1
        self.held[owner] = self.held.get(owner, 0) + 1

    def _cancel(self, owner: str, d: Deferred[None]) -> None:
        queue = self._waiting.get(owner, [])
        queue[:] = [entry for entry in queue if entry[1] is not d]
        if not queue:
            self._waiting.pop(owner, None)


class _Turns:
    """
    At most C{limit} holders at once, the others served first come first
    served; cancelling a waiting L{acquire} leaves the queue.  Like
    L{FairSlots}, a turn freed while turns are being handed over is handed
    over by the loop already doing it (no recursion however many waiting
    requests end at once).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.waiting: deque[Deferred[None]] = deque()
        self._handing_over = False

    @property
    def idle(self) -> bool:
        return self.in_use == 0 and not self.waiting

    def acquire(self) -> Deferred[None]:
        if self.in_use < self.limit and not self.waiting and not self._handing_over:
            self.in_use += 1
            return succeed(None)
        d: Deferred[None] = Deferred(self.waiting.remove)
        self.waiting.append(d)
        return d

    def release(self) -> None:
        self.in_use -= 1
        if self._handing_over:
            return
        self._handing_over = True
        try:
            while self.in_use < self.limit and self.waiting:
                d = self.waiting.popleft()
                self.in_use += 1
                d.callback(None)
        finally:
            self._handing_over = False


@implementer(IHostnameResolver)
class DNSHostResolver:
    """
    Resolves receivers' host names with a C{twisted.names} resolver (e.g.
    L{mmgun.mx.make_resolver}'s: C{/etc/hosts}, then the nameservers, with a
    deadline), A and AAAA at once: no thread is held, unlike the reactor's
    default resolver (C{getaddrinfo} on the shared thread pool, which a
    cancelled POST cannot get back and which a hostile name that never answers
    holds).  At most C{max_in_flight} names are looked up at once (the rest
    wait their turn); cancelling a resolution (the POST's deadline passed)
    cancels its lookups or its wait.
    """

    def __init__(self, resolver: IResolver, *, max_in_flight: int = 16) -> None:
        self._resolver = resolver
        self._turns = _Turns(max_in_flight)

    @property
    def in_flight(self) -> int:
        return self._turns.in_use

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _DNSResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        resolution.task = Deferred.fromCoroutine(self._resolve(resolutionReceiver, hostName, portNumber, addressTypes))
        resolution.task.addErrback(lambda f: f.trap(CancelledError))
        return resolution

    async def _resolve(
        self, receiver: IResolutionReceiver, name: str, port: int, types: Sequence[type[IAddress]] | None
    ) -> None:
        found: list[str] = []
        try:
            cached = self._cached(name, types)
            if cached is not None:
                found = cached
                return
            await self._turns.acquire()
            try:
                lookups: list[Deferred[Any]] = []
                if types is None or IPv4Address in types:
                    lookups.append(self._resolver.lookupAddress(name))  # type: ignore[call-arg]  # timeout: the resolver's
                if types is None or IPv6Address in types:
                    lookups.append(self._resolver.lookupIPV6Address(name))  # type: ignore[call-arg]  # timeout: the resolver's
                # Cancelling this (the resolution) cancels every lookup; each failed one adds nothing.
                for ok, answer in await DeferredList(lookups, consumeErrors=True):
                    if ok:
                        found.extend(_addresses_from(answer[0]))
            finally:
                self._turns.release()
        finally:
            # Also after a cancellation or an error: the receiver always hears the end (no addresses: not found).
            for address in dict.fromkeys(found):
                kind = IPv6Address if ":" in address else IPv4Address
                receiver.addressResolved(kind("TCP", address, port))
            receiver.resolutionComplete()


    def _cached(self, name: str, types: Sequence[type[IAddress]] | None) -> list[str] | None:
        """
        C{name}'s addresses if every answer wanted is in the resolver's cache (a
        L{mmgun.mx.CachingResolver}'s; a cached NODATA answer adds none), else L{None}.
        """
        if not isinstance(self._resolver, CachingResolver):
            return None
        wanted = [
            kind
            for kind, address in ((dns.A, IPv4Address), (dns.AAAA, IPv6Address))
            if types is None or address in types
        ]
        found: list[str] = []
        for kind in wanted:
            answers: list[Any] = []
            # A CacheResolver answers at once: a hit, or a DomainError for a miss.
            self._resolver.cache.query(dns.Query(name, kind, dns.IN)).addCallbacks(answers.append, lambda _: None)
            if not answers:
                return None
            found.extend(_addresses_from(answers[0][0]))
        return found


@implementer(IHostResolution)
class _DNSResolution:
    def __init__(self, name: str) -> None:
        self.name = name
        self.task: Deferred[None] | None = None

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class WebhookClient:
    """
    POSTs webhook bodies with treq through a L{WebhookAgent}, on C{reactor}.

    @param allow_private: C{--webhook-allow-private}: connect to any address
        (else L{mmgun.mx.PublicOnly}, this host's own addresses included).
    @param timeout: Seconds for one POST from its start (connecting, TLS,
        sending, the whole response); waiting for a turn does not count.
    @param max_concurrent: POSTs in flight at once, all receivers together.
    @param max_per_client: POSTs in flight at once for one client (the
        C{client} of L{post}); freed turns go first to the waiting client
        holding the fewest (L{FairSlots}), so one client's hanging receivers
        hold at most this many of the C{max_concurrent}.
    @param max_per_receiver: POSTs in flight at once to one receiver (scheme,
        host, port); also the persistent connections kept open to it.
    @param trust_root: What HTTPS certificates must chain to (L{None}: the
        platform's trust store).
    @param resolver: Resolves receivers' host names (default: a
        L{DNSHostResolver} over C{dns}).
    @param dns: The C{twisted.names} resolver names are looked up with
        (default: L{mmgun.mx.make_resolver}'s for C{/etc/hosts} and
        C{/etc/resolv.conf}, stopped by L{close}).
    @param max_lookups: Host names looked up at once (the default resolver's;
        default: C{max_concurrent}, so lookups never wait behind other
        clients' slow names); names answered from C{dns}'s cache (a
        L{mmgun.mx.CachingResolver}) take no lookup turn.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        allow_private: bool,
        timeout: float = 10.0,
        max_concurrent: int = 32,
        max_per_client: int = 8,
        max_per_receiver: int = 4,
        trust_root: IOpenSSLTrustRoot | None = None,
        resolver: IHostnameResolver | None = None,
        dns: IResolver | None = None,
        max_lookups: int | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._max_per_receiver = max_per_receiver
        self._own_dns: IResolver | None = None
        if resolver is None:
            if dns is None:
                dns = self._own_dns = make_resolver(None, reactor)
            # As many lookups as POSTs: a lookup runs only inside a POST's slot, so slow names use
            # up their own clients' slots, never lookups that other clients' POSTs wait for.
            resolver = DNSHostResolver(dns, max_in_flight=max_concurrent if max_lookups is None else max_lookups)
        if policy is None:
            policy = ANY_ADDRESS if allow_private else PublicOnly(LocalAddresses(reactor))
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_per_receiver
        self._pool.cachedConnectionTimeout = IDLE_CONNECTION_TIMEOUT
        self._pool.retryAutomatically = False
        self._pool._factory = _QuietHTTPFactory  # no "Starting factory" log lines per connection
        self.agent = WebhookAgent(
            reactor, resolver=resolver, policy=policy, pool=self._pool, connect_timeout=timeout, trust_root=trust_root
        )
        self._http = HTTPClient(self.agent, cookiejar=_no_cookies(), data_to_body_producer=_BytesProducer)
        self.slots = FairSlots(max_concurrent, max_per_client)
        #: POSTs that ended, by outcome (the dispatcher logs the failures).
        self.delivered = self.failed = 0
        self._per_receiver: dict[Receiver, _Turns] = {}
        self._per_client: dict[str, _Turns] = {}

    def in_flight(self, url: str) -> int:
        """POSTs to C{url}'s receiver now holding one of its turns (under way, or waiting for a slot of all)."""
        turns = self._per_receiver.get(parse_url(url))
        return 0 if turns is None else turns.in_use

    async def post(self, url: str, body: bytes | Callable[[], bytes], *, client: str = "") -> Delivery:
        """
        POST C{body} (JSON) to C{url}, once: no redirect is followed and
        nothing is retried here.  Waits for a turn first if C{url}'s receiver,
        C{client}, or all together, have as many POSTs in flight as allowed.
        C{body} may be a function making the body when the turn comes (so a
        signature's timestamp is not older than the POST).  A C{user:password}
        in the URL is sent as HTTP Basic authentication.  Never raises for
        anything the receiver or network does.
        """
        try:
            receiver = parse_url(url)
            bare, credentials = _split_userinfo(url)
            uri = _uri_form(bare)
        except WebhookURLError as e:
            return Delivery(False, None, f"invalid webhook URL: {e}")
        headers = dict(_HEADERS)
        if credentials is not None:
            headers["Authorization"] = _basic_authorization(credentials)
        # The client's own cap first, then the receiver's turn, then a slot of all: a client at
        # its cap waits holding nothing others need, and a POST waiting for a busy receiver holds
        # none of the max_concurrent slots.
        gate = self._per_client.get(client)
        if gate is None:
            gate = self._per_client[client] = _Turns(self.slots.per_owner)
        await gate.acquire()
        try:
            turns = self._per_receiver.get(receiver)
            if turns is None:
                turns = self._per_receiver[receiver] = _Turns(self._max_per_receiver)
            await turns.acquire()
            try:
                await self.slots.acquire(client)
                try:
                    delivery = await self._attempt(uri, body if isinstance(body, bytes) else body(), headers)
                finally:
                    self.slots.release(client)
            finally:
                turns.release()
                if turns.idle and self._per_receiver.get(receiver) is turns:
                    del self._per_receiver[receiver]
        finally:
            gate.release()
            if gate.idle and self._per_client.get(client) is gate:
                del self._per_client[client]
        if delivery.ok:
            self.delivered += 1
        else:
            self.failed += 1
        return delivery

    async def _attempt(self, uri: _URIForm, body: bytes, headers: dict[bytes | str, bytes | str]) -> Delivery:
        exchange = Deferred.fromCoroutine(self._exchange(uri, body, headers))
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            exchange.cancel()

        # treq's timeout ends with the response headers; this one covers the body too.
        timer = self._reactor.callLater(self._timeout, expire)
        try:
            return await exchange
        except Exception as e:
            if expired or any(isinstance(c, (CancelledError, net_error.ConnectingCancelledError)) for c in _causes(e)):
                return Delivery(False, None, f"no complete response within {self._timeout:g}s")
            return Delivery(False, None, _describe(e))
        finally:
            if timer.active():
                timer.cancel()

    async def _exchange(self, uri: _URIForm, body: bytes, headers: dict[bytes | str, bytes | str]) -> Delivery:
        response = await self._http.post(
            uri,
            data=body,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
            timeout=self._timeout,
            reactor=self._reactor,
        )
        code: int = response.code
        drain = _Drain(RESPONSE_LIMIT)
        response.deliverBody(drain)
        try:
            await drain.done
        except Exception as e:
            if isinstance(e, CancelledError):
                raise
            return Delivery(False, code, f"HTTP {code}, then {_describe(e)}")
        if 200 <= code < 300:
            return Delivery(True, code, f"HTTP {code}")
        if 300 <= code < 400:
            return Delivery(False, code, f"HTTP {code} (redirects are not followed)")
        return Delivery(False, code, f"HTTP {code}")

    def close(self) -> Deferred[None]:
        """Close the idle persistent connections (at shutdown); stop the default resolver's timers."""
        if self._own_dns is not None:
            _stop_dns(self._own_dns)
        return self._pool.closeCachedConnections()


class _QuietHTTPFactory(_HTTP11ClientFactory):
    """The pool's factory, without a log line at every connection's start and end."""

    noisy = False


def _stop_dns(resolver: Any) -> None:
    """Cancel the timers of a L{mmgun.mx.make_resolver} resolver (its cache's expiries, its resolv.conf re-reads)."""
    if isinstance(resolver, CachingResolver):
        resolver.clear()
        _stop_dns(resolver.upstream)
    elif isinstance(resolver, ResolverChain):
        for each in resolver.resolvers:
            _stop_dns(each)
    else:
        call = getattr(resolver, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()
