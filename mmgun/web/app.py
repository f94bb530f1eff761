"""
The frontend's root resource and the table of every endpoint on the port.

The JSON API's endpoints are each one :class:`Route` — a literal path, a handler per
method, the API's error shape — served only through it: :class:`Root` finds the route by
a dictionary lookup (so the hot ``POST /send`` costs no more than a comparison), runs the
handler, and answers every failure through :mod:`.errors` in the route's shape: 404 for
a path no route has, 405 with ``Allow`` for a method the route lacks.

An :class:`Area` with a ``resource`` is mounted: every request under its prefix goes to
that resource, which routes and answers it itself. The Mailgun v3 API is mounted so, as a
Klein app (:mod:`.mailgun`), under ``/v3/``. The JSON API is not a Klein app: Klein's
routing (werkzeug binds its URL map for every request, and the answer goes through more
Deferreds) cost about a tenth of a ``POST /send``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from types import CoroutineType
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..clients import Clients
from ..health import Health
from ..limits import QueueCap, RateLimiter
from ..metrics import Metrics
from ..signer import Signer
from ..store import Store
from . import json_api, mailgun
from .errors import ErrorShape, HTTPError, error_answer, method_not_allowed, no_such_endpoint, render_error
from .settings import WebSettings
from .site import FrontendSite
from .submit import Pipeline

_log = Logger()

#: A handler gets the request; it answers a body (a coroutine) or, for an answer it does
#: not write itself, a resource.
Handler = Callable[..., Coroutine[Any, Any, bytes] | IResource]


@attrs.frozen
class Route:
    """One endpoint at a literal ``path``. A GET handler answers HEAD too."""

    path: str
    methods: Mapping[bytes, Handler]
    #: How the API this endpoint belongs to shapes an error.
    shape: ErrorShape
    #: Takes submissions: every error it answers counts in mmgun_submissions_rejected_total.
    submission: bool = False

    @property
    def handlers(self) -> dict[bytes, Handler]:
        handlers = dict(self.methods)
        if b"GET" in handlers:
            handlers.setdefault(b"HEAD", handlers[b"GET"])
        return handlers


@attrs.frozen
class Area:
    """
    A part of the URL space an API owns: a path there that no route has is its 404; with
    a ``resource``, every request there is that resource's to answer (a mounted app).
    """

    prefix: bytes
    shape: ErrorShape
    resource: IResource | None = None
    #: The mounted resource's (method, path) operations, for :meth:`Root.operations`.
    operations: frozenset[tuple[str, str]] = frozenset()


class _Compiled:
    """A route ready to serve: its handlers and its ``Allow``."""

    def __init__(self, route: Route) -> None:
        if "{" in route.path:
            raise ValueError(f"a route's path is literal (mount an app for patterns): {route.path}")
        self.route = route
        self.handlers = route.handlers
        self.allowed = tuple(sorted(self.handlers))


class Root(Resource):
    """
    Serves every request on the port through its :class:`Route`. ``areas`` say whose
    404 a path is: the longest matching prefix wins (give ``b"/"`` for the rest).
    """

    isLeaf = True

    def __init__(self, routes: Iterable[Route], areas: Sequence[Area], *, store: Store, metrics: Metrics) -> None:
        super().__init__()
        self._routes = [_Compiled(route) for route in routes]
        paths = [route.route.path for route in self._routes]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a path is routed twice: {sorted(paths)}")
        self._literal = {c.route.path.encode("utf-8"): c for c in self._routes}
        self._areas = sorted(areas, key=lambda area: len(area.prefix), reverse=True)
        self._mounts = [area for area in self._areas if area.resource is not None]
        self._store = store
        self._metrics = metrics

    def operations(self) -> set[tuple[str, str]]:
        """Every (method, path) routed, without the HEAD each GET implies: for the OpenAPI document's test."""
        routed = {(method.decode("ascii"), c.route.path) for c in self._routes for method in c.route.methods}
        return routed.union(*(area.operations for area in self._mounts))

    def render(self, request: Request) -> int:
        compiled = self._literal.get(request.path)
        if compiled is None:
            for area in self._mounts:
                if request.path.startswith(area.prefix):
                    problem = _not_utf8(request)
                    if problem is not None:
                        # Klein would answer its own text/html 400 and log an error.
                        return self._refuse(request, None, area.shape, Failure(problem))
                    return cast(int, cast(IResource, area.resource).render(request))
            compiled = self._find(request)
            if compiled is None:
                return self._refuse(request, None, self._area(request.path), Failure(no_such_endpoint()))
        handler = compiled.handlers.get(request.method)
        if handler is None:
            error = method_not_allowed(request.method, compiled.allowed)
            return self._refuse(request, compiled.route, compiled.route.shape, Failure(error))
        try:
            answer = handler(request)
        except Exception:
            return self._refuse(request, compiled.route, compiled.route.shape, Failure())
        # (A plain type check: zope's providedBy on every request would cost ~1 µs.)
        if isinstance(answer, CoroutineType):
            return self._respond(request, compiled.route, answer)
        return cast(IResource, answer).render(request)

    def _find(self, request: Request) -> _Compiled | None:
        """
        The route of a path that is not literally one: percent-decoded, and with an empty
        first segment dropped (``//send`` is ``/send``), as Klein's routing used to see it.
        """
        try:
            path = b"/".join(unquote_to_bytes(segment) for segment in request.path[1:].split(b"/")).decode("utf-8")
        except UnicodeDecodeError:
            return None
        path = path if path.startswith("/") else "/" + path
        return self._literal.get(path.encode("utf-8"))

    def _area(self, path: bytes) -> ErrorShape:
        for area in self._areas:
            if path.startswith(area.prefix):
                return area.shape
        return json_api.error_document

    def _respond(self, request: Request, route: Route, body: Coroutine[Any, Any, bytes]) -> int:
        # Nothing is written to a request whose client went away, but the handler runs
        # to its end: a submission being committed is kept (and found by a retry with
        # its Idempotency-Key).
        lost: list[Failure] = []
        request.notifyFinish().addErrback(lost.append)

        def respond(content: bytes) -> None:
            if not lost:
                request.write(content)
                request.finish()

        d = Deferred.fromCoroutine(body)
        d.addErrback(lambda failure: self._error(request, route, route.shape, failure))
        d.addCallback(respond)
        d.addErrback(lambda failure: _log.failure("could not answer a request for {path}", failure, path=_text(request.path)))
        return NOT_DONE_YET

    def _refuse(self, request: Request, route: Route | None, shape: ErrorShape, failure: Failure) -> int:
        request.write(self._error(request, route, shape, failure))
        request.finish()
        return NOT_DONE_YET

    def _error(self, request: IRequest, route: Route | None, shape: ErrorShape, failure: Failure) -> bytes:
        answer = error_answer(failure, self._store, request.path)
        if route is not None and route.submission:
            self._metrics.rejected.labels(answer.reason).inc()
        return render_error(request, answer, shape)


def _not_utf8(request: Request) -> HTTPError | None:
    """
    Why a mounted app cannot route ``request`` (Klein needs its path and host name as
    text): a path that is not UTF-8 once percent-decoded names no endpoint, as for the
    JSON API (:meth:`Root._find`); a host name that is not UTF-8 is a bad request.
    """
    try:
        b"/".join(request.postpath or ()).decode("utf-8")
    except UnicodeDecodeError:
        return no_such_endpoint()
    try:
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return HTTPError(400, "header 'Host' is not UTF-8")
    return None


def _text(path: bytes) -> str:
    return path.decode("ascii", "replace")


def routes(api: json_api.JSONAPI, v3: mailgun.MailgunAPI | None = None) -> tuple[list[Route], list[Area]]:
    """Every endpoint on the port, and whose 404 each part of the URL space is; the v3 API mounted under /v3/."""
    shape = json_api.error_document
    areas = [Area(b"/", shape)]
    if v3 is not None:
        areas.append(Area(b"/v3/", mailgun.error_document, v3.resource(), frozenset(v3.operations())))
    return [
        Route("/", {b"GET": api.index}, shape),
        Route("/send", {b"POST": api.send}, shape, submission=True),
        Route("/status", {b"POST": api.status}, shape),
        Route("/healthz", {b"GET": api.healthz}, shape),
        Route("/metrics", {b"GET": api.prometheus}, shape),
        Route("/events", {b"GET": api.events}, shape),
        Route("/suppressions", api.suppressions.methods(), shape),
    ], areas


class Frontend:
    """
    The HTTP frontend of one process: :meth:`resource` serves every API, :meth:`site`
    listens with the shared request limits. ``clients`` is a callable so the set can be
    reloaded while running.

    ``signer`` DKIM-signs messages (:class:`mmgun.signer.SignerProcess`;
    default: on the calling thread).

    ``settings`` come from the Config (:func:`mmgun.service.make_service`); ``fields``
    (names of :class:`WebSettings` fields) override some of them, or make them all with
    the defaults when ``settings`` is None: ``Frontend(store, clients, clock,
    hostname="h", request_timeout=5)``.
    """

    def __init__(
        self,
        store: Store,
        clients: Callable[[], Clients],
        clock: IReactorTime,
        settings: WebSettings | None = None,
        *,
        metrics: Metrics | None = None,
        queue_cap: QueueCap | None = None,
        auth_failures: RateLimiter | None = None,
        health: Health | None = None,
        wall: Callable[[], float] | None = None,
        signer: Signer | None = None,
        wake: Callable[[], None] | None = None,
        **fields: Any,
    ) -> None:
        self.settings = WebSettings(**fields) if settings is None else attrs.evolve(settings, **fields)
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self.pipeline = Pipeline(
            store,
            clients,
            clock,
            self.settings,
            metrics=self.metrics,
            queue_cap=queue_cap,
            auth_failures=auth_failures,
            health=health,
            wall=wall,
            signer=signer,
            wake=wake,
        )
        self.json_api = json_api.JSONAPI(
            self.pipeline, store, self.settings, metrics=self.metrics, health=health, wall=wall if wall is not None else clock.seconds
        )
        self.mailgun = mailgun.MailgunAPI(
            self.pipeline, store, self.settings, metrics=self.metrics, wall=wall if wall is not None else clock.seconds
        )
        endpoints, areas = routes(self.json_api, self.mailgun)
        self._root = Root(endpoints, areas, store=store, metrics=self.metrics)

    def resource(self) -> Root:
        return self._root

    def site(self) -> FrontendSite:
        """
        The frontend's Site: a request body is buffered only up to the size limit, a
        request must arrive within ``request_timeout``, and connections are capped (see
        :mod:`.site`).
        """
        return FrontendSite(self._root, self.settings, clock=self._clock, metrics=self.metrics)
