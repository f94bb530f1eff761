"""The service tree of one mmgun process: a store shared by the roles it runs."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from .clients import Clients, ClientsFileError, load_clients
from .config import Config
from .metrics import Metrics
from .store import Store
from .store.sqlite import SQLiteStore

_log = Logger()


class StoreService(Service):
    """Closes the store last: it is the first child, so a MultiService stops it after the roles."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def stopService(self) -> Any:
        super().stopService()
        return Deferred.fromCoroutine(self.store.close())


class OrderedService(MultiService):
    """Stops its children one at a time, last added first: the roles finish before the store closes."""

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("error stopping {service}", service=child)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())


class ClientsHolder:
    """The current set of clients; reloaded in place so the frontend never restarts for it."""

    def __init__(self, path: str, clients: Clients | None = None) -> None:
        self.path = path
        self.clients = clients if clients is not None else load_clients(path)

    def __call__(self) -> Clients:
        return self.clients

    def reload(self) -> bool:
        try:
            self.clients = load_clients(self.path)
        except ClientsFileError as e:
            _log.error("clients file not reloaded, keeping the previous {count} clients: {error}", count=len(self.clients), error=str(e))
            return False
        _log.info("clients file reloaded: {count} clients", count=len(self.clients))
        return True


class ClientsReloader(TimerService):
    """Reloads the clients file when its modification time or size changes, or on SIGHUP."""

    def __init__(self, holder: ClientsHolder, clock: Any, interval: float = 2.0) -> None:
        super().__init__(interval, self.check)
        self.clock = clock
        self._holder = holder
        self._seen = self._signature()
        self._previous_handler: Any = None

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._holder.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def check(self) -> None:
        signature = self._signature()
        if signature != self._seen:
            self._seen = signature
            self._holder.reload()

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP") and hasattr(self.clock, "callFromThread"):
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> Any:
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return super().stopService()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.clock.callFromThread(self._holder.reload)


class QueueGauges(TimerService):
    """
    Refreshes the queue gauges of /metrics from the store every few seconds (never on
    scrape), with ``queue_depth``: it reads only unfinished envelopes, so a long
    retention of finished mail does not make each refresh slower.
    """

    def __init__(self, store: Any, metrics: Metrics, clock: Any, interval: float = 5.0) -> None:
        super().__init__(interval, self.refresh)
        self.clock = clock
        self._store = store
        self._metrics = metrics

    def refresh(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refresh())

    async def _refresh(self) -> None:
        try:
            now = self.clock.seconds()
            depth = await self._store.queue_depth(now)
        except Exception:
            _log.failure("reading queue statistics failed")
            return
        gauges = self._metrics.queue
        gauges.depth = dict(depth.recipients)
        gauges.envelopes = depth.unfinished_envelopes
        gauges.oldest_age = 0.0 if depth.oldest_created_at is None else now - depth.oldest_created_at


def make_service(config: Config, reactor: Any, *, clients: Clients | None = None) -> IService:
    root = OrderedService()
    metrics = Metrics()
    store = SQLiteStore.open(config.database, reactor)
    StoreService(store).setServiceParent(root)
    if config.metrics_listen:
        # This process's own counters, whatever its roles (a sender's are on no API port);
        # added early, so stopped last: scrapes work while deliveries drain.
        strports.service(config.metrics_listen, metrics_site(metrics), reactor=reactor).setServiceParent(root)

    if "frontend" in config.roles:
        from .frontend import Frontend

        from .limits import QueueCap

        holder = ClientsHolder(config.clients, clients)
        queue_cap = QueueCap(store, reactor, config.max_queued)
        queue_cap.setServiceParent(root)
        frontend = Frontend(
            store,
            holder,
            reactor,
            hostname=config.helo,
            max_recipients=config.max_recipients,
            max_message_size=config.max_message_size,
            metrics=metrics,
            rate_limit=config.rate_limit,
            rate_burst=config.rate_burst,
            queue_cap=queue_cap,
            request_timeout=config.request_timeout,
        )
        ClientsReloader(holder, reactor).setServiceParent(root)
        QueueGauges(store, metrics, reactor).setServiceParent(root)
        http = HTTPService(config.listen, frontend.site(), reactor, grace=min(config.shutdown_timeout, 10.0))

    if "sender" in config.roles:
        make_sender(config, store, reactor, metrics).setServiceParent(root)

    if "cleaner" in config.roles:
        from .cleaner import Cleaner

        Cleaner(store, reactor, interval=config.clean_interval, retention=config.retention).setServiceParent(root)
    if "frontend" in config.roles:
        # Added last, so stopped first: no new request is accepted while deliveries drain.
        http.setServiceParent(root)
    return root


def metrics_site(metrics: Metrics) -> Site:
    """GET /metrics and nothing else (404 elsewhere), without an access log."""
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    site.displayTracebacks = False
    return site


class HTTPService(MultiService):
    """
    The API's listening port. On stop: stop listening, give requests in flight ``grace``
    seconds to be answered, then close every connection (idle keep-alive ones at once).
    """

    def __init__(self, listen: str, site: Any, reactor: Any, grace: float) -> None:
        super().__init__()
        self.site = site
        self._reactor = reactor
        self._grace = grace
        self.listener = strports.service(listen, site, reactor=reactor)
        self.listener.setServiceParent(self)

    async def _stop(self) -> None:
        await maybeDeferred(self.listener.stopService)
        deadline = self._reactor.seconds() + self._grace
        while self.site.busy() and self._reactor.seconds() < deadline:
            await deferLater(self._reactor, 0.05, lambda: None)
        for channel in list(self.site.channels):
            channel.transport.abortConnection() if self.site.busy() else channel.transport.loseConnection()
        while self.site.channels and self._reactor.seconds() < deadline + 1:
            await deferLater(self._reactor, 0.01, lambda: None)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())


def make_sender(config: Config, store: Store, reactor: Any, metrics: Metrics | None = None) -> MultiService:
    from .mx import MXResolver, RelayHost, make_resolver, parse_hostport
    from .sender import Sender, SenderSettings
    from .smtp import SMTPSettings, TLSMode

    servers = [parse_hostport(n, 53) for n in config.nameservers] or None
    resolver = make_resolver(servers, reactor)
    if config.relay_host:
        host, port = parse_hostport(config.relay_host, config.smtp_port)
        router: Any = RelayHost(resolver, host, port, clock=reactor)
    else:
        router = MXResolver(resolver, reactor, config.smtp_port)
    smtp = SMTPSettings(helo=config.helo, tls=TLSMode(config.tls), command_timeout=config.smtp_timeout)
    settings = SenderSettings(
        poll_interval=config.poll_interval,
        retry_min=config.retry_min,
        retry_max=config.retry_max,
        queue_lifetime=config.queue_lifetime,
        max_connections=config.max_connections,
        max_per_destination=config.max_per_destination,
        shutdown_timeout=config.shutdown_timeout,
        lease_time=config.lease_time,
    )
    sender = MultiService()
    # The DNS cache keeps a timer per entry; dropping it at stop leaves the reactor clean.
    _OnStop(getattr(resolver, "clear", lambda: None)).setServiceParent(sender)
    Sender(store, router, reactor, smtp, settings, metrics=metrics).setServiceParent(sender)
    return sender


class _OnStop(Service):
    def __init__(self, callback: Any) -> None:
        self._callback = callback

    def stopService(self) -> None:
        super().stopService()
        self._callback()
