"""
The HTTP API (the frontend role): authenticate, validate, queue, report.

Every response is JSON; every error is ``{"result": "error", "message": ...}``
with the right status code, and an error changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from .auth import AuthenticationFailed, Authenticator, KeyFailures
from .clients import Clients
from .health import Health, database_problem
from .limits import QueueCap, RateLimiter
from .message import BadRequest, build_message, check_fields, parse_json_object, parse_send
from .metrics import Metrics
from .store import (
    DatabaseFull,
    DatabaseGone,
    IdempotencyConflict,
    NewSubmission,
    StorageError,
    Store,
    SubmissionState,
)

_log = Logger()

API_VERSION = "1"
MAX_IDEMPOTENCY_KEY = 255
STATUS_FIELDS = ("submission_id",)
_REASONS = {
    400: "invalid",
    401: "unauthorized",
    405: "method",
    409: "idempotency_conflict",
    413: "too_large",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}


class HTTPError(Exception):
    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


#: Retry-After of a 503: the database cannot take a submission now (full, gone, read-only, low on space).
STORAGE_RETRY_AFTER = 30


def _unavailable(message: str) -> HTTPError:
    return HTTPError(503, message, {b"Retry-After": str(STORAGE_RETRY_AFTER).encode("ascii")})


def _too_many(message: str, wait: float) -> HTTPError:
    return HTTPError(429, message, {b"Retry-After": str(max(1, math.ceil(wait))).encode("ascii")})


def iso8601(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_document(state: SubmissionState) -> dict[str, Any]:
    return {
        "result": "success",
        "status": state.status,
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "updated_at": iso8601(r.updated_at),
            }
            for r in state.recipients
        ],
    }


class Frontend:
    """The Klein application. ``clients`` is a callable so the set can be reloaded while running."""

    app = Klein()

    def __init__(
        self,
        store: Store,
        clients: Callable[[], Clients],
        clock: IReactorTime,
        *,
        hostname: str,
        max_recipients: int = 1000,
        max_message_size: int = 10 * 1024 * 1024,
        metrics: Metrics | None = None,
        rate_limit: float = 0.0,
        rate_burst: float = 1.0,
        queue_cap: QueueCap | None = None,
        auth_failures: RateLimiter | None = None,
        health: Health | None = None,
        request_timeout: float = 30.0,
        max_connections: int = 4000,
        max_connections_per_source: int = 1000,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self._store = store
        self._clock = clock
        #: Wall-clock time for created_at and the Date header (the reactor's clock is monotonic: mmgun.clock).
        self._wall = wall if wall is not None else clock.seconds
        self._auth = Authenticator(store, clients, clock, self._wall)
        self._rate = RateLimiter(rate_limit, rate_burst, clock)
        self._queue_cap = queue_cap
        # Ten failures in a row, then one try every six seconds, per source address.
        self._auth_failures = auth_failures if auth_failures is not None else RateLimiter(10 / 60, 10, clock)
        self._key_failures = KeyFailures(clock)
        self.request_timeout = request_timeout
        #: Whether this process can accept mail now (free space, the database's file); None: ask only the store.
        self._health = health
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self._hostname = hostname
        self._max_recipients = max_recipients
        self.max_message_size = max_message_size

    def resource(self) -> Resource:
        return _API(self, self.app.resource())

    def site(self) -> FrontendSite:
        """
        The API's Site: a request body is buffered only up to the size limit, a request
        must arrive within ``request_timeout``, and connections are capped (see
        :class:`FrontendSite`, :class:`FrontendChannel`).
        """
        # parsePOSTFormSubmission=False: the API takes JSON only, and twisted.web's form
        # decoding parses every POST's Content-Type with the email package (~0.2 ms).
        site = FrontendSite(
            self.resource(),
            clock=self._clock,
            request_timeout=self.request_timeout,
            max_request_size=self.max_message_size,
            metrics=self.metrics,
            max_connections=self.max_connections,
            max_connections_per_source=self.max_connections_per_source,
            requestFactory=LimitedRequest,
            parsePOSTFormSubmission=False,
        )
        site.displayTracebacks = False
        return site

    # -- routes ----------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        return _json(
            request,
            200,
            {
                "service": "mmgun",
                "api_version": API_VERSION,
                "endpoints": {"POST /send": "queue a message", "POST /status": "a submission's status"},
            },
        )

    @app.route("/send", methods=["POST"])
    async def send(self, request: IRequest) -> bytes:
        """Routed here only when the Klein resource is used alone: :class:`_API` serves POST /send itself."""
        return await self._send(request)

    def render_send(self, request: Request) -> Any:
        """
        POST /send, written to ``request`` directly: the one route that has to be fast.
        ``request`` is the Site's (IRequest does not declare ``notifyFinish``).
        """
        lost: list[Failure] = []
        request.notifyFinish().addErrback(lost.append)

        def respond(body: bytes) -> None:
            if not lost:
                request.write(body)
                request.finish()

        d = Deferred.fromCoroutine(self._send(request))
        d.addErrback(lambda failure: self.failure_body(request, failure))
        d.addCallback(respond)
        d.addErrback(lambda failure: _log.failure("could not answer a /send request", failure))
        return NOT_DONE_YET

    async def _send(self, request: IRequest) -> bytes:
        obj = self._read_json(request)
        client = await self._authenticate(request, obj)
        key = _idempotency_key(request)
        send = parse_send(obj, self._max_recipients)
        if self._health is not None:
            problem = self._health.admission()
            if problem is not None:
                raise _unavailable(f"cannot queue messages now: {problem}")
        wait = self._rate.take(client)
        if wait:
            raise _too_many("rate limit exceeded for this client", wait)
        now = self._wall()
        message = build_message(send, hostname=self._hostname, now=now)
        if self._queue_cap is not None:
            refused = self._queue_cap.admit(client, len(send.recipients), len(message))
            if refused is not None:
                raise _too_many(refused, self._queue_cap.step)
        submission = NewSubmission(
            id=os.urandom(16).hex(),
            client=client,
            sender=send.sender,
            recipients=send.recipients,
            message=message,
            created_at=now,
            idempotency_key=key,
            request_hash=send.digest() if key is not None else None,
        )
        try:
            submission_id = await self._store.add_submission(submission)
        except IdempotencyConflict:
            raise HTTPError(409, "Idempotency-Key was already used with a different request") from None
        if submission_id == submission.id:
            self.metrics.accepted.inc()
            _log.info(
                "accepted submission {submission} from {client}: {recipients} recipients",
                submission=submission_id,
                client=client,
                recipients=len(send.recipients),
            )
        else:
            _log.info("idempotent replay of submission {submission} from {client}", submission=submission_id, client=client)
        return _json(request, 200, {"result": "queued", "submission_id": submission_id})

    @app.route("/status", methods=["POST"])
    async def status(self, request: IRequest) -> bytes:
        obj = self._read_json(request)
        client = await self._authenticate(request, obj)
        check_fields(obj, STATUS_FIELDS)
        submission_id = obj["submission_id"]
        if not isinstance(submission_id, str):
            raise BadRequest("field 'submission_id' must be a string")
        state = None
        if _looks_like_id(submission_id):
            state = await self._store.submission(client, submission_id)
        if state is None:
            raise HTTPError(404, "no such submission")
        return _json(request, 200, status_document(state))

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        """200 only if this process can accept mail now (see :class:`mmgun.health.Health`); else 503 with the reason."""
        if self._health is not None:
            problem = await self._health.check()
        else:
            problem = await database_problem(self._store)
        if problem is not None:
            return _json(request, 503, {"status": "unavailable", "message": problem})
        return _json(request, 200, {"status": "ok"})

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: IRequest) -> Any:
        from prometheus_client.twisted import MetricsResource

        return MetricsResource(self.metrics.registry)

    # -- errors ----------------------------------------------------------------

    def _rejected(self, request: IRequest, code: int) -> None:
        if request.path == b"/send":
            self.metrics.rejected.labels(_REASONS.get(code, str(code))).inc()

    def failure_body(self, request: IRequest, failure: Failure) -> bytes:
        """The JSON error for a request that failed with ``failure``: 4xx for the client's mistakes, else 500."""
        error = failure.value
        if isinstance(error, HTTPError):
            self._rejected(request, error.code)
            for name, value in error.headers.items():
                request.setHeader(name, value)
            return _error(request, error.code, error.message)
        if isinstance(error, BadRequest):
            self._rejected(request, 400)
            return _error(request, 400, str(error))
        if isinstance(error, StorageError):
            # Rolled back: nothing was acknowledged, and the client may retry. A lasting
            # cause (a full disk, a deleted database) was logged once by the store.
            if self._store.write_problem() is None:
                _log.warn("storage error handling {path}: {error}", path=request.path.decode("ascii", "replace"), error=str(error))
            self._rejected(request, 503)
            request.setHeader(b"Retry-After", str(STORAGE_RETRY_AFTER).encode("ascii"))
            return _error(request, 503, _storage_message(error))
        _log.failure("internal error handling {path}", failure, path=request.path.decode("ascii", "replace"))
        self._rejected(request, 500)
        return _error(request, 500, "internal error")

    @app.handle_errors(HTTPError)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        return self.failure_body(request, failure)

    @app.handle_errors(BadRequest)
    def bad_request(self, request: IRequest, failure: Failure) -> bytes:
        return self.failure_body(request, failure)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _error(request, 404, "no such endpoint")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = failure.value.valid_methods or []
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return _error(request, 405, f"method {request.method.decode('ascii', 'replace')} not allowed here")

    @app.handle_errors(HTTPException)
    def other_http(self, request: IRequest, failure: Failure) -> bytes:
        return _error(request, failure.value.code or 400, failure.value.name or "bad request")

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        return self.failure_body(request, failure)

    # -- helpers ---------------------------------------------------------------

    def _read_json(self, request: IRequest) -> dict[str, Any]:
        if getattr(request, "too_large", False):
            raise HTTPError(413, f"request body larger than {self.max_message_size} bytes")
        content = request.content.read()
        if len(content) > self.max_message_size:
            raise HTTPError(413, f"request body larger than {self.max_message_size} bytes")
        return parse_json_object(content)

    async def _authenticate(self, request: IRequest, obj: dict[str, Any]) -> str:
        """
        The caller's client label; takes ``client_id`` out of ``obj``. 401 says nothing more.

        Failed attempts are limited per source address (ten in a row, then one every
        six seconds: 429), to slow down guessing without locking out the clients that
        hold valid credentials behind the same address (a NAT, a proxy):

        - An API key is always checked, even from a blocked address, and a valid one is
          admitted. Its secret is 256 random bits: being told whether a guess was right
          helps nobody, so the block need not hide the answer. A failed key attempt
          counts against the address (and, for an existing key id, is logged as a
          warning naming the key id); from a blocked address it answers 429.
        - A ``client_id`` of the deprecated clients file may be short and chosen by a
          person: from a blocked address it is not even checked (429), or the block
          would not slow the guessing down. A client using one behind a shared address
          can be locked out by a neighbour's failures: one more reason to move to keys.
        """
        address = source_key(request.getClientAddress()) or "local"
        authorization = request.getHeader(b"authorization")
        if authorization is not None and "client_id" in obj:
            raise BadRequest("use either an Authorization header or the client_id field, not both")
        if authorization is None:
            wait = self._auth_failures.blocked(address)
            if wait:
                raise _too_many("too many failed authentication attempts", wait)
        try:
            return await self._auth.authenticate(authorization, obj.pop("client_id", None))
        except AuthenticationFailed as e:
            if e.key_id is not None:
                self._key_failures.failed(e.key_id, address)
            wait = self._auth_failures.take(address)
            if wait:
                raise _too_many("too many failed authentication attempts", wait) from None
            raise HTTPError(
                401, "authentication failed", {b"WWW-Authenticate": b'Basic realm="mmgun", charset="UTF-8"'}
            ) from None


def _storage_message(error: StorageError) -> str:
    if isinstance(error, DatabaseFull):
        return "cannot store messages now: the disk is full; try again later"
    if isinstance(error, DatabaseGone):
        return "cannot store messages now: the database is unavailable; try again later"
    return "cannot store messages now; try again later"


def _looks_like_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _idempotency_key(request: IRequest) -> str | None:
    raw = request.getHeader(b"idempotency-key")
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_IDEMPOTENCY_KEY or not all(0x20 <= b < 0x7F for b in raw):
        raise BadRequest(f"header 'Idempotency-Key' must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters")
    return raw.decode("ascii")


def _json(request: IRequest, code: int, document: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(document).encode("utf-8") + b"\n"


def _error(request: IRequest, code: int, message: str) -> bytes:
    return _json(request, code, {"result": "error", "message": message})


class _API(Resource):
    """
    The API's root: POST /send goes straight to :meth:`Frontend.render_send`, every
    other request to the Klein app. Klein's routing (werkzeug binds its URL map for
    every request, and the response goes through two more Deferreds) cost about a
    tenth of a /send.
    """

    isLeaf = True

    def __init__(self, frontend: Frontend, app: Resource) -> None:
        super().__init__()
        self._frontend = frontend
        self._app = app

    def render(self, request: Request) -> Any:
        if request.path == b"/send" and request.method == b"POST":
            return self._frontend.render_send(request)
        return self._app.render(request)


class _Tally:
    """
    Counts events of one kind and logs them at most once per ``interval`` seconds, with
    the count since the last line: a flood of refused connections is a few lines a
    minute, not one per connection.
    """

    def __init__(self, clock: IReactorTime, text: str, interval: float = 60.0) -> None:
        self._clock = clock
        self._text = text
        self._interval = interval
        self._logged = float("-inf")
        self._pending = 0
        #: Every event since the start, for tests and operators.
        self.total = 0

    def note(self, **fields: object) -> None:
        self.total += 1
        self._pending += 1
        now = self._clock.seconds()
        if now - self._logged >= self._interval:
            _log.warn(self._text, count=self._pending, **fields)
            self._logged, self._pending = now, 0


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
    One HTTP connection to the API.

    A request must arrive whole — request line, headers and body — within the site's
    ``request_timeout``, counted from the accept for a connection's first request and
    from the first byte of each later one on a keep-alive connection. twisted.web's own
    idle timeout restarts with every byte, so a client that trickles its request line
    a byte at a time (slowloris) would otherwise hold the connection forever; and a
    Request object (where this deadline used to live) exists only once the request
    line is complete. Between requests only the idle timeout applies.
    """

    site: FrontendSite
    source: str | None = None
    _deadline: IDelayedCall | None = None
    _busy = False

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
        timeout = self.site.request_timeout
        if timeout:
            self._deadline = self.site.clock.callLater(timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.site.too_slow.note(timeout=self.site.request_timeout, source=self.source or "local")
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


class FrontendSite(Site):
    """
    The API's Site: builds :class:`FrontendChannel` connections, caps how many are open
    (in all and per source), and knows them and the requests in flight for a graceful stop.

    A connection over a cap is closed as soon as it is accepted (``buildProtocol``
    returns None) and counted in ``refused``; so one address cannot take every file
    descriptor of the process, and another client still gets in.
    """

    # HTTPFactory types it as its own private _GenericHTTPChannelProtocol factory; any HTTPChannel class works.
    protocol = FrontendChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        *,
        clock: IReactorTime,
        request_timeout: float = 30.0,
        max_request_size: int = 10 * 1024 * 1024,
        metrics: Metrics | None = None,
        max_connections: int = 4000,
        max_connections_per_source: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=clock, **kwargs)
        self.clock = clock
        self.request_timeout = request_timeout
        self.max_request_size = max_request_size
        self.metrics = metrics
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self.channels: set[FrontendChannel] = set()
        self.in_flight = 0
        self._per_source: dict[str | None, int] = {}
        self.refused = _Tally(
            clock,
            "refused {count} HTTP connections over the connection caps since the last report (latest from {source}: {reason})",
        )
        self.too_slow = _Tally(
            clock,
            "dropped {count} HTTP connections whose request did not arrive within {timeout}s since the last report (latest from {source})",
        )

    def log(self, request: Any) -> None:
        """
        No access log: every submission already gets a structured event, and the
        metrics count requests by endpoint and code; a formatted line per request
        would cost more than the rest of a /send.
        """

    def busy(self) -> bool:
        return self.in_flight > 0

    def buildProtocol(self, addr: Any) -> Any:
        source = source_key(addr)
        if len(self.channels) >= self.max_connections:
            self.refused.note(source=source or "local", reason=f"{self.max_connections} connections open")
            return None
        from_source = self._per_source.get(source, 0)
        if source is not None and from_source >= self.max_connections_per_source:
            self.refused.note(source=source, reason=f"{self.max_connections_per_source} connections open from there")
            return None
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        channel.source = source
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


class LimitedRequest(Request):
    """Buffers at most the site's ``max_request_size`` bytes of a body; beyond that, marks it too large."""

    too_large = False
    _received = 0
    _started: float | None = None
    _counted = False

    def process(self) -> None:
        site = getattr(self.channel, "site", None)
        clock = getattr(site, "clock", None)
        self._started = clock.seconds() if clock is not None else None
        if isinstance(site, FrontendSite):
            site.in_flight += 1
            self._counted = True
            self.notifyFinish().addBoth(self._done, site)
        super().process()

    def _done(self, result: object, site: FrontendSite) -> None:
        if self._counted:
            self._counted = False
            site.in_flight -= 1

    def finish(self) -> None:
        site: Any = getattr(self.channel, "site", None)
        super().finish()
        metrics = getattr(site, "metrics", None)
        if metrics is not None and self._started is not None:
            metrics.http_request(self.path, self.code, site.clock.seconds() - self._started)

    def _limit(self) -> int:
        return getattr(getattr(self.channel, "site", None), "max_request_size", 10 * 1024 * 1024)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.too_large or self._received > self._limit():
            self.too_large = True
            return
        super().handleContentChunk(data)
