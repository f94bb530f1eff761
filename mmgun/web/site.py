"""
The request limits every API on the port shares, in one place: the Site caps the open
connections (in all and per source), a connection must deliver each request within
``request_timeout``, and a request buffers at most ``max_message_size`` bytes of body.
Each gets its settings in its constructor.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ..limits import LogTally
from ..metrics import Metrics
from .errors import HTTPError
from .settings import WebSettings


def source_key(address: object) -> str | None:
    """
    Whom a connection counts against for ``max_connections_per_source``: its IPv4
    address, or the /64 of an IPv6 address (one host commonly holds a whole /64);
    None for a Unix socket (a local peer, capped only by the total).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str) or not host:
        return None
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class FrontendChannel(HTTPChannel):
    """
    One HTTP connection to the frontend, made by :meth:`FrontendSite.buildProtocol` with
    its site and its source.

    A request must arrive whole — request line, headers and body — within the site's
    ``request_timeout``, counted from the accept for a connection's first request and
    from the first byte of each later one on a keep-alive connection. twisted.web's own
    idle timeout restarts with every byte, so a client that trickles its request line
    a byte at a time (slowloris) would otherwise hold the connection forever; and a
    Request object exists only once the request line is complete. Between requests only
    the idle timeout applies.
    """

    _deadline: IDelayedCall | None = None
    _busy = False

    def __init__(self, site: FrontendSite, source: str | None) -> None:
        super().__init__()
        # What HTTPFactory.buildProtocol and Site.buildProtocol would set.
        self.factory = site
        self.site = site
        self.requestFactory = site.requestFactory
        self.timeOut = site.timeOut  # type: ignore[assignment]  # HTTPFactory's is a float
        #: Whom this connection counts against (:func:`source_key`).
        self.source = source

    def callLater(self, period: float, func: Callable[..., object], *args: object, **kwargs: object) -> IDelayedCall:
        """The idle timeout and the abort of a client that does not close run on the site's clock."""
        return self.site.clock.callLater(period, func, *args, **kwargs)

    def connectionMade(self) -> None:
        # Twisted writes a response's headers and body separately; with Nagle's algorithm
        # and the client's delayed ACK that costs ~40 ms per request (also under TLS,
        # whose wrapper forwards setTcpNoDelay to the TCP transport).
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        super().connectionMade()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        # While a request is answered, later (pipelined) bytes are only buffered: their
        # request's deadline starts when they are replayed, after the answer.
        if data and self._deadline is None and not self._busy:
            self._arm()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        self._busy = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._busy = False
        super().requestDone(request)

    def connectionLost(self, reason: Any = None) -> None:
        self._disarm()
        self.site.forget(self)
        super().connectionLost(reason)

    def _arm(self) -> None:
        timeout = self.site.settings.request_timeout
        if timeout:
            self._deadline = self.site.clock.callLater(timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.site.too_slow.note(timeout=self.site.settings.request_timeout, source=self.source or "local")
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


class _Refused(Protocol):
    """
    A connection over a cap: aborted as soon as it is made. Returning None from
    buildProtocol closes a plain TCP connection, but a wrapping factory (the TLS of an
    ``ssl:`` listener) wraps the None, fails on it and leaves the socket open.
    """

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.abortConnection()


class LimitedRequest(Request):
    """
    A request on a :class:`FrontendChannel`: buffers at most ``max_message_size`` bytes
    of a body (beyond that, marks it ``too_large``), counts as in flight until answered,
    and reports its latency to the metrics.
    """

    too_large = False
    _received = 0
    _started: float | None = None
    _counted = False

    def __init__(self, channel: FrontendChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # Kept here: a request forgets its channel when the connection is lost.
        self._frontend = channel.site
        self._limit = channel.site.settings.max_message_size

    def process(self) -> None:
        site = self._frontend
        self._started = site.clock.seconds()
        site.in_flight += 1
        self._counted = True
        self.notifyFinish().addBoth(self._done)
        super().process()

    def _done(self, result: object) -> None:
        if self._counted:
            self._counted = False
            self._frontend.in_flight -= 1

    def finish(self) -> None:
        super().finish()
        if self._started is not None:
            site = self._frontend
            site.metrics.http_request(self.path, self.code, site.clock.seconds() - self._started)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.too_large or self._received > self._limit:
            self.too_large = True
            return
        super().handleContentChunk(data)


def read_body(request: IRequest, limit: int) -> bytes:
    """
    The whole body of ``request``; 413 if it is longer than ``limit`` bytes (a
    :class:`LimitedRequest` stopped buffering it; any other request, as under StubTreq,
    is measured after the fact).
    """
    if isinstance(request, LimitedRequest) and request.too_large:
        raise HTTPError(413, f"request body larger than {limit} bytes")
    content = request.content.read()
    if len(content) > limit:
        raise HTTPError(413, f"request body larger than {limit} bytes")
    return content


class FrontendSite(Site):
    """
    The frontend's Site: builds :class:`FrontendChannel` connections (whose requests are
    :class:`LimitedRequest`), caps how many are open (in all and per source), and knows
    them and the requests in flight for a graceful stop.

    A connection over a cap is aborted as soon as it is accepted (also under TLS: before
    the handshake) and counted in ``refused``; so one address cannot take every file
    descriptor of the process, and another client still gets in.
    """

    displayTracebacks = False

    def __init__(self, resource: Resource, settings: WebSettings, *, clock: IReactorTime, metrics: Metrics) -> None:
        # parsePOSTFormSubmission=False: no API takes a form through twisted.web's decoding,
        # which parses every POST's Content-Type with the email package (~0.2 ms) and buffers
        # every part (an API that takes forms parses them itself, as a stream).
        super().__init__(resource, requestFactory=LimitedRequest, reactor=clock, parsePOSTFormSubmission=False)
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.channels: set[FrontendChannel] = set()
        self.in_flight = 0
        self._per_source: dict[str | None, int] = {}
        self.refused = LogTally(
            clock,
            "refused {count} HTTP connections over the connection caps since the last report (latest from {source}: {reason})",
        )
        self.too_slow = LogTally(
            clock,
            "dropped {count} HTTP connections whose request did not arrive within {timeout}s since the last report (latest from {source})",
        )

    @property
    def max_connections(self) -> int:
        return self.settings.max_connections

    @property
    def max_connections_per_source(self) -> int:
        return self.settings.max_connections_per_source

    def log(self, request: Any) -> None:
        """
        No access log: every submission already gets a structured event, and the
        metrics count requests by endpoint and code; a formatted line per request
        would cost more than the rest of a /send.
        """

    def busy(self) -> bool:
        return self.in_flight > 0

    def buildProtocol(self, addr: Any) -> Any:
        """A :class:`FrontendChannel` from ``addr``; over a cap, a protocol that aborts the connection at once."""
        source = source_key(addr)
        if len(self.channels) >= self.max_connections:
            self.refused.note(source=source or "local", reason=f"{self.max_connections} connections open")
            return _Refused()
        from_source = self._per_source.get(source, 0)
        if source is not None and from_source >= self.max_connections_per_source:
            self.refused.note(source=source, reason=f"{self.max_connections_per_source} connections open from there")
            return _Refused()
        channel = FrontendChannel(self, source)
        self.channels.add(channel)
        self._per_source[source] = from_source + 1
        return channel

    def forget(self, channel: FrontendChannel) -> None:
        """``channel`` is closed: it no longer counts against the caps."""
        if channel not in self.channels:
            return
        self.channels.discard(channel)
        left = self._per_source.get(channel.source, 0) - 1
        if left > 0:
            self._per_source[channel.source] = left
        else:
            self._per_source.pop(channel.source, None)

    def connections_from(self, address: object) -> int:
        return self._per_source.get(source_key(address), 0)
