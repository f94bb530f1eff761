"""
The HTTP API (the frontend role): authenticate, validate, queue, report.

Every response is JSON; every error is ``{"result": "error", "message": ...}``
with the right status code, and an error changes nothing.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from .auth import AuthenticationFailed, Authenticator
from .clients import Clients
from .limits import QueueCap, RateLimiter
from .metrics import Metrics
from .message import BadRequest, build_message, check_fields, parse_json_object, parse_send
from .store import IdempotencyConflict, NewSubmission, Store, SubmissionState

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
}


class HTTPError(Exception):
    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


def _too_many(message: str, wait: float) -> HTTPError:
    return HTTPError(429, message, {b"Retry-After": str(max(1, math.ceil(wait))).encode("ascii")})


def iso8601(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        request_timeout: float = 30.0,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self._store = store
        self._clock = clock
        self._auth = Authenticator(store, clients, clock)
        self._rate = RateLimiter(rate_limit, rate_burst, clock)
        self._queue_cap = queue_cap
        # Ten failures in a row, then one try every six seconds, per source address.
        self._auth_failures = auth_failures if auth_failures is not None else RateLimiter(10 / 60, 10, clock)
        self.request_timeout = request_timeout
        self._hostname = hostname
        self._max_recipients = max_recipients
        self.max_message_size = max_message_size

    def resource(self) -> Resource:
        return _API(self, self.app.resource())

    def site(self) -> Site:
        """A Site that stops buffering a request body once it passes the size limit."""
        # parsePOSTFormSubmission=False: the API takes JSON only, and twisted.web's form
        # decoding parses every POST's Content-Type with the email package (~0.2 ms).
        site = FrontendSite(self.resource(), reactor=self._clock, parsePOSTFormSubmission=False)
        site.requestFactory = LimitedRequest
        site.max_request_size = self.max_message_size  # type: ignore[attr-defined]
        site.metrics = self.metrics  # type: ignore[attr-defined]
        site.clock = self._clock  # type: ignore[attr-defined]
        site.request_timeout = self.request_timeout  # type: ignore[attr-defined]
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

    def render_send(self, request: IRequest) -> Any:
        """POST /send, written to ``request`` directly: the one route that has to be fast."""
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
        wait = self._rate.take(client)
        if wait:
            raise _too_many("rate limit exceeded for this client", wait)
        if self._queue_cap is not None and not self._queue_cap.admit(client, len(send.recipients)):
            raise _too_many(f"this client has more than {self._queue_cap.limit} recipients queued", self._queue_cap.step)
        now = self._clock.seconds()
        submission = NewSubmission(
            id=os.urandom(16).hex(),
            client=client,
            sender=send.sender,
            recipients=send.recipients,
            message=build_message(send, hostname=self._hostname, now=now),
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
        try:
            await self._store.ping()
        except Exception:
            _log.failure("health check: the database does not answer")
            return _json(request, 503, {"status": "unavailable", "message": "database does not answer"})
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
        """The caller's client label; takes ``client_id`` out of ``obj``. 401 says nothing more."""
        address = _source(request)
        wait = self._auth_failures.blocked(address)
        if wait:
            raise _too_many("too many failed authentication attempts", wait)
        authorization = request.getHeader(b"authorization")
        if authorization is not None and "client_id" in obj:
            raise BadRequest("use either an Authorization header or the client_id field, not both")
        try:
            return await self._auth.authenticate(authorization, obj.pop("client_id", None))
        except AuthenticationFailed:
            self._auth_failures.take(address)
            raise HTTPError(
                401, "authentication failed", {b"WWW-Authenticate": b'Basic realm="mmgun", charset="UTF-8"'}
            ) from None


def _source(request: IRequest) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


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

    def render(self, request: IRequest) -> Any:
        if request.path == b"/send" and request.method == b"POST":
            return self._frontend.render_send(request)
        return self._app.render(request)


class FrontendSite(Site):
    """A Site that knows its open connections and requests in flight, for a graceful stop."""

    def log(self, request: Any) -> None:
        """
        No access log: every submission already gets a structured event, and the
        metrics count requests by endpoint and code; a formatted line per request
        would cost more than the rest of a /send.
        """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: set[Any] = set()
        self.in_flight = 0

    def busy(self) -> bool:
        return self.in_flight > 0

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        self.channels.add(channel)
        make, lost = channel.makeConnection, channel.connectionLost

        def makeConnection(transport: Any) -> None:
            # Twisted writes a response's headers and body separately; with Nagle's
            # algorithm and the client's delayed ACK that costs ~40 ms per request.
            if hasattr(transport, "setTcpNoDelay"):
                transport.setTcpNoDelay(True)
            make(transport)

        def connectionLost(reason: Any) -> None:
            self.channels.discard(channel)
            lost(reason)

        channel.makeConnection = makeConnection
        channel.connectionLost = connectionLost
        return channel


class LimitedRequest(Request):
    """Buffers at most the site's ``max_request_size`` bytes of a body; beyond that, marks it too large."""

    too_large = False
    _received = 0
    _started: float | None = None
    _deadline: Any = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # A request must arrive whole (headers and body) within request_timeout: a
        # client that trickles bytes (slowloris) resets the idle timeout, not this one.
        site = getattr(channel, "site", None)
        timeout, clock = getattr(site, "request_timeout", None), getattr(site, "clock", None)
        if timeout and clock is not None:
            self._deadline = clock.callLater(timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        _log.info("dropping a request that did not arrive within {timeout}s", timeout=self.channel.site.request_timeout)
        self.channel.transport.abortConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        super().connectionLost(reason)

    _counted = False

    def process(self) -> None:
        site = self.channel.site
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
        site = self.channel.site if self.channel is not None else None
        super().finish()
        metrics = getattr(site, "metrics", None)
        if metrics is not None and self._started is not None:
            metrics.http_request(self.path, self.code, site.clock.seconds() - self._started)

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_request_size", 10 * 1024 * 1024)

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
