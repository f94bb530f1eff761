"""The service tree of one mmgun process: a store shared by the roles it runs."""

from __future__ import annotations

import ipaddress
import os
import resource
import signal
import time
from collections.abc import Iterator
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from .clients import Clients, ClientsFileError, load_clients
from .config import Config
from .metrics import Metrics
from .store import Store, open_store
from .web.settings import WebSettings

_log = Logger()

#: The id conf/clients ships for trying mmgun out: anyone who read the README knows it.
DEMO_CLIENT_ID = "demo-client-0123456789abcdef"
#: File descriptors kept for everything but HTTP connections: the database, DNS, SMTP, logs.
FD_RESERVE = 100


class ListenError(Exception):
    """A listening endpoint cannot be used; the message is one line for the operator."""


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
    """
    The current set of clients; reloaded in place so the frontend never restarts for it.
    With ``public`` (the API listens beyond loopback), a file that accepts the demo id is
    refused at reload as it is at start.
    """

    def __init__(self, path: str, clients: Clients | None = None, *, public: bool = False) -> None:
        self.path = path
        self.public = public
        self.clients = clients if clients is not None else load_clients(path)

    def __call__(self) -> Clients:
        return self.clients

    def reload(self) -> bool:
        try:
            clients = load_clients(self.path)
            if self.public and accepts_demo_id(clients):
                raise ClientsFileError(f"{self.path} accepts the demo client id {DEMO_CLIENT_ID} while the API listens beyond loopback")
            self.clients = clients
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

    def __init__(self, store: Any, metrics: Metrics, clock: Any, interval: float = 5.0, wall: Any = None) -> None:
        super().__init__(interval, self.refresh)
        self.clock = clock
        self._interval = interval
        #: Wall-clock time, to compare with stored timestamps (the reactor's clock is monotonic).
        self._wall = wall if wall is not None else clock.seconds
        self._store = store
        self._metrics = metrics

    def refresh(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refresh())

    async def _refresh(self) -> None:
        from .limits import paced

        started = self.clock.seconds()
        try:
            now = self._wall()
            depth = await self._store.queue_depth(now)
        except Exception:
            _log.failure("reading queue statistics failed")
            return
        finally:
            paced(self, self._interval, self.clock.seconds() - started)
        gauges = self._metrics.queue
        gauges.depth = dict(depth.recipients)
        gauges.envelopes = depth.unfinished_envelopes
        gauges.oldest_age = 0.0 if depth.oldest_created_at is None else now - depth.oldest_created_at


def make_service(
    config: Config,
    reactor: Any,
    *,
    clients: Clients | None = None,
    workers: int = 0,
    inherited: IStreamServerEndpoint | None = None,
) -> OrderedService:
    """
    The roles of ``config`` on one store. With ``workers`` (twistd's makeService
    passes :func:`mmgun.workers.worker_count`) and the frontend role, the frontend runs in
    that many supervised worker processes instead (:class:`mmgun.workers.WorkerPool`);
    ``inherited``: in such a worker, the endpoint accepting on the listening socket it
    inherited, used instead of binding ``--listen``.
    """
    pool = None
    if workers >= 1 and "frontend" in config.roles:
        from .workers import WorkerPool

        pool = WorkerPool(config, reactor, workers)
        config = attrs.evolve(config, roles=tuple(role for role in config.roles if role != "frontend"))
    root = OrderedService()
    metrics = Metrics()
    store = open_store(config.database, reactor, config.database_pool_size, config.lease_time)
    StoreService(store).setServiceParent(root)
    from .health import DatabaseWatch, Health

    # Every role writes: each process notices (and says once) that its database file was deleted or replaced.
    DatabaseWatch(store, reactor).setServiceParent(root)
    if config.metrics_listen:
        # This process's own counters, whatever its roles (a sender's are on no API port);
        # added early, so stopped last: scrapes work while deliveries drain.
        Listener(config.metrics_listen, metrics_site(metrics), reactor).setServiceParent(root)

    wakeup = make_wakeup(config, reactor, root)
    if "frontend" in config.roles:
        from .limits import QueueCap
        from .signer import SignerProcess
        from .web.app import Frontend

        holder = ClientsHolder(config.clients, clients, public=listens_beyond_loopback(config.listen))
        queue_cap = QueueCap(store, reactor, config.max_queued, max_bytes=config.max_queued_bytes)
        queue_cap.setServiceParent(root)
        # Before the HTTP service, so stopped after it: requests in flight finish their signatures.
        signer = SignerProcess(reactor)
        signer.setServiceParent(root)
        frontend = Frontend(
            store,
            holder,
            reactor,
            web_settings(config, http_connection_cap(config, open_files_limit())),
            metrics=metrics,
            queue_cap=queue_cap,
            health=Health(store, config.database, reactor, min_free_space=config.min_free_space),
            wall=time.time,
            signer=signer,
            wake=wakeup,
        )
        ClientsReloader(holder, reactor).setServiceParent(root)
    if ("frontend" in config.roles and inherited is None) or pool is not None:
        # One process reads the queue's gauges: with workers, the supervisor (whose /metrics has
        # the sender's counters), not each worker (N scans of the queue, each with its page cache).
        QueueGauges(store, metrics, reactor, wall=time.time).setServiceParent(root)
    if "frontend" in config.roles:
        http = HTTPService(config.listen, frontend.site(), reactor, grace=min(config.shutdown_timeout, 10.0), endpoint=inherited)
        submission = make_submission(config, frontend.pipeline, reactor) if config.smtp_listen else None

    if "sender" in config.roles:
        make_sender(config, store, reactor, metrics, wakeup=wakeup).setServiceParent(root)

    if "cleaner" in config.roles:
        from .cleaner import Cleaner

        Cleaner(
            store, reactor, interval=config.clean_interval, retention=config.retention, wall=time.time
        ).setServiceParent(root)
    if "webhooks" in config.roles:
        if config.roles == ("webhooks",) or config.webhooks_in_process:
            make_webhooks(config, store, reactor).setServiceParent(root)
        else:
            from .supervisor import webhooks_process

            # Beside other roles: a supervised child POSTs the webhooks, on another core (issue 14's speed).
            webhooks_process(config, reactor).setServiceParent(root)
    if "frontend" in config.roles:
        # Added last, so stopped first: no new request is accepted while deliveries drain.
        http.setServiceParent(root)
        if submission is not None:
            submission.setServiceParent(root)
    if pool is not None:
        # Added last, so stopped first: the workers answer their requests in flight while the sender still runs.
        pool.setServiceParent(root)
    return root


def make_wakeup(config: Config, reactor: Any, root: MultiService) -> Any:
    """
    This process's :class:`mmgun.wakeup.Wakeup` (issue 17): a frontend calls it after each
    commit of mail due now; it wakes this process's sender directly (:func:`make_sender`
    subscribes it) and, through the wake directory beside an SQLite database, the senders
    of other processes. A notifier is made only where a frontend runs.
    """
    from .sender import default_identity
    from .wakeup import WakeNotifier, Wakeup, listener_name, wake_directory

    directory = wake_directory(config.database)
    if directory is None or "frontend" not in config.roles:
        return Wakeup()
    own = None
    if "sender" in config.roles:
        own = os.path.join(directory, listener_name(config.sender_id or default_identity()) + ".sock")
    notifier = WakeNotifier(directory, reactor, own=own)
    _OnStop(notifier.close).setServiceParent(root)
    return Wakeup(notifier)


def make_submission(config: Config, pipeline: Any, reactor: Any) -> MultiService:
    """SMTP submission (:mod:`mmgun.submission`) on every ``--smtp-listen``, through the HTTP API's ``pipeline``."""
    from .submission import SubmissionServer, SubmissionService, settings_from, tls_options

    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        try:
            tls = tls_options(config.tls_cert, config.tls_key)
        except (OSError, ValueError) as e:
            raise ListenError(f"cannot use --tls-cert {config.tls_cert} / --tls-key {config.tls_key}: {e}") from None
    settings = settings_from(config)
    cap = smtp_connection_cap(config, open_files_limit())
    settings = attrs.evolve(settings, max_connections=cap, max_connections_per_source=min(settings.max_connections_per_source, cap))
    server = SubmissionServer(pipeline, settings, reactor, wall=time.time)
    return SubmissionService(server, config.smtp_listen, reactor, tls=tls, grace=min(config.shutdown_timeout, 10.0))


def web_settings(config: Config, max_connections: int) -> WebSettings:
    """The frontend's settings from ``config``; ``max_connections`` as the open files limit allows (:func:`http_connection_cap`)."""
    return WebSettings(
        hostname=config.helo,
        max_recipients=config.max_recipients,
        max_message_size=config.max_message_size,
        request_timeout=config.request_timeout,
        rate_limit=config.rate_limit,
        rate_burst=config.rate_burst,
        max_connections=max_connections,
        max_connections_per_source=min(config.max_http_connections_per_source, max_connections),
        sender_policy=config.sender_policy,
        max_auth_failures=config.max_auth_failures,
    )


def metrics_site(metrics: Metrics) -> Site:
    """GET /metrics and nothing else (404 elsewhere), without an access log."""
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    site = _UnloggedSite(root)
    site.displayTracebacks = False
    return site


class _UnloggedSite(Site):
    """A Site without the access log."""

    def log(self, request: Request) -> None:
        pass


class HTTPService(MultiService):
    """
    The API's listening port. On stop: stop listening, give requests in flight ``grace``
    seconds to be answered, then close every connection (idle keep-alive ones at once).
    """

    def __init__(self, listen: str, site: Any, reactor: Any, grace: float, endpoint: IStreamServerEndpoint | None = None) -> None:
        super().__init__()
        self.site = site
        self._reactor = reactor
        self._grace = grace
        self.listener = Listener(listen, site, reactor, endpoint=endpoint)
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


class Listener(StreamServerEndpointService):
    """
    A listening port that can be bound before twistd starts the service tree
    (:func:`bind_listeners`), so that a port in use is one line at start, not a
    traceback from inside twistd; binding again later is a no-op.
    """

    def __init__(self, description: str, factory: Any, reactor: Any, endpoint: IStreamServerEndpoint | None = None) -> None:
        # ``endpoint``: listen there instead (an inherited socket; ``description`` names it in errors).
        try:
            if endpoint is None:
                endpoint = endpoints.serverFromString(reactor, description)
        except (ValueError, TypeError) as e:
            raise ListenError(f"cannot listen on {description}: {e}") from None
        super().__init__(endpoint, factory)
        self.description = description
        # Errors of listen() are raised by privilegedStartService, not only logged.
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        if self._waitingForPort is not None:
            return
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            error = e.socketError
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ListenError(f"cannot listen on {self.description}: {reason.lower()}") from None


def bind_listeners(service: IService) -> None:
    """Bind every :class:`Listener` of the tree now; raises ListenError for the first that cannot."""
    for listener in _walk(service):
        if isinstance(listener, Listener):
            listener.privilegedStartService()


def _walk(service: Any) -> Iterator[Any]:
    yield service
    if isinstance(service, MultiService):
        for child in service:
            yield from _walk(child)


def listens_beyond_loopback(description: str) -> bool:
    """
    Whether a strports description may accept connections from other hosts: a TCP
    (``tcp``, ``tcp6``, ``ssl``, ``reuseport``) endpoint without an interface or on a
    non-loopback one, and any endpoint type not known here; a Unix socket is local.
    """
    kind, positional, named = _split_strport(description)
    if kind == "unix":
        return False
    if kind not in ("tcp", "tcp6", "ssl", "reuseport"):
        return True
    try:
        return not ipaddress.ip_address(named.get("interface", "").strip("[]")).is_loopback
    except ValueError:
        return True  # "" (every interface) or not an address


def _split_strport(description: str) -> tuple[str, list[str], dict[str, str]]:
    """(type, positional arguments, keyword arguments), with strports' backslash escapes."""
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind, arguments = parts[0].lower(), parts[1:]
    if kind not in ("unix", "tcp", "tcp6", "ssl", "reuseport") and not arguments:
        # twisted's old form "8080" means tcp:8080 (every interface).
        kind, arguments = "tcp", parts
    named = dict(a.split("=", 1) for a in arguments if "=" in a)
    return kind, [a for a in arguments if "=" not in a], named


def accepts_demo_id(clients: Clients) -> bool:
    return clients.authenticate(DEMO_CLIENT_ID) is not None


def demo_id_problem(config: Config, clients: Clients) -> str | None:
    """
    Why this frontend must not start, or None: the API would be reachable from other
    hosts while the well-known demo id of conf/clients is accepted (an open relay).
    """
    if "frontend" in config.roles and listens_beyond_loopback(config.listen) and accepts_demo_id(clients):
        return (
            f"{config.clients} accepts the demo client id {DEMO_CLIENT_ID} and --listen {config.listen} "
            "reaches beyond loopback: remove the demo id (use API keys: mmgun keys create) or listen on 127.0.0.1"
        )
    return None


def open_files_limit() -> int:
    """This process's soft limit on open file descriptors (-1: none)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft


def raise_open_files_limit() -> int:
    """
    Raise the soft limit on open file descriptors to the hard limit (many distributions
    start services with 1024, which a thousand idle HTTP clients would exhaust); return
    the soft limit in force. Process-wide: called once, by twistd's makeService.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            _log.warn("could not raise the open files limit from {soft} to {target}: {error}", soft=soft, target=target, error=str(e))
    return open_files_limit()


def _other_work(config: Config) -> int:
    """Descriptors kept for all but client connections: ``FD_RESERVE``, plus a sender's SMTP sessions."""
    return FD_RESERVE + (config.max_connections if "sender" in config.roles else 0)


def _smtp_cap(config: Config, open_files: int) -> int:
    if open_files < 0 or not config.smtp_listen or "frontend" not in config.roles:
        return config.max_smtp_connections
    # At most half of what is left: the other half is HTTP's (http_connection_cap).
    return max(1, min(config.max_smtp_connections, (open_files - _other_work(config)) // 2))


def smtp_connection_cap(config: Config, open_files: int) -> int:
    """
    ``--max-smtp-connections``, lowered (with a warning) to at most half of the
    descriptors ``open_files`` leaves after the reserve, when SMTP submission runs.
    """
    cap = _smtp_cap(config, open_files)
    if cap < config.max_smtp_connections:
        _log.warn(
            "--max-smtp-connections {wanted} lowered to {cap}: this process may open {limit} files, keeps {reserve} for other work and shares the rest with HTTP",
            wanted=config.max_smtp_connections,
            cap=cap,
            limit=open_files,
            reserve=_other_work(config),
        )
    return cap


def http_connection_cap(config: Config, open_files: int) -> int:
    """
    ``--max-http-connections``, lowered (with a warning) so that the connections,
    ``FD_RESERVE`` descriptors, a sender's SMTP sessions and the SMTP submission
    connections (:func:`smtp_connection_cap`) fit under ``open_files``.
    """
    if open_files < 0:
        return config.max_http_connections
    reserve = _other_work(config)
    if config.smtp_listen and "frontend" in config.roles:
        reserve += _smtp_cap(config, open_files)
    cap = max(1, min(config.max_http_connections, open_files - reserve))
    if cap < config.max_http_connections:
        _log.warn(
            "--max-http-connections {wanted} lowered to {cap}: this process may open {limit} files and keeps {reserve} for other work",
            wanted=config.max_http_connections,
            cap=cap,
            limit=open_files,
            reserve=reserve,
        )
    return cap


def make_sender(
    config: Config, store: Store, reactor: Any, metrics: Metrics | None = None, *, wakeup: Any = None
) -> MultiService:
    """
    The sender role. With ``wakeup`` (:func:`make_wakeup`) this process's frontend wakes it
    directly; beside an SQLite database it also listens in the wake directory for the
    frontends of other processes (:mod:`mmgun.wakeup`), on PostgreSQL for the NOTIFY of
    every host's frontends (:mod:`mmgun.store.postgres.wake`).
    """
    from .mx import ANY_ADDRESS, LocalAddresses, MXResolver, PublicOnly, RelayHost, make_resolver, parse_hostport
    from .sender import Sender, SenderSettings
    from .smtp import SMTPSettings, TLSMode

    servers = [parse_hostport(n, 53) for n in config.nameservers] or None
    resolver = make_resolver(servers, reactor)
    if config.relay_host:
        host, port = parse_hostport(config.relay_host, config.smtp_port)
        # The operator's choice: no address policy.
        router: Any = RelayHost(resolver, host, port, clock=reactor, address_limit=config.mx_address_limit)
    else:
        policy = ANY_ADDRESS if config.allow_private_mx else PublicOnly(LocalAddresses(reactor))
        router = MXResolver(
            resolver, reactor, config.smtp_port, policy=policy, address_limit=config.mx_address_limit
        )
    mta_sts_trust = None
    if config.tls == "mta-sts":
        # Opportunistic STARTTLS, plus each recipient domain's MTA-STS policy (RFC 8461); a relay host is the
        # operator's choice, where no recipient domain's policy applies.
        from .mtasts import make_router

        if config.relay_host:
            _log.warn("--tls mta-sts applies to MX delivery only: with --relay-host it is opportunistic STARTTLS")
        else:
            router, mta_sts_trust = make_router(router, store, resolver, reactor, policy=policy, wall=time.time, ca_file=config.mta_sts_ca)
    tls = TLSMode.OPPORTUNISTIC if config.tls == "mta-sts" else TLSMode(config.tls)
    smtp = SMTPSettings(helo=config.helo, tls=tls, command_timeout=config.smtp_timeout)
    settings = SenderSettings(
        poll_interval=config.poll_interval,
        retry_min=config.retry_min,
        retry_max=config.retry_max,
        queue_lifetime=config.queue_lifetime,
        max_connections=config.max_connections,
        max_per_destination=config.max_per_destination,
        destination_pause=config.destination_pause,
        shutdown_timeout=config.shutdown_timeout,
        lease_time=config.lease_time,
        mx_address_limit=config.mx_address_limit,
        mx_session_limit=config.mx_session_limit,
        cache_time=config.smtp_cache_time,
        cache_size=config.smtp_cache_size,
    )
    sender = MultiService()
    # The DNS cache keeps a timer per entry; dropping it at stop leaves the reactor clean.
    _OnStop(getattr(resolver, "clear", lambda: None)).setServiceParent(sender)
    # Stored timestamps are wall-clock time; the reactor's clock is monotonic (mmgun.clock).
    role = Sender(
        store, router, reactor, smtp, settings, metrics=metrics, owner=config.sender_id, wall=time.time, mta_sts_trust_root=mta_sts_trust
    )
    role.setServiceParent(sender)
    if wakeup is not None:
        from .wakeup import WakeListener, listener_name, wake_directory

        # PostgreSQL: the NOTIFY of every host's submitting transactions (none on SQLite).
        notified = store.listen_for_wakeups(role.wake)
        if notified is not None:
            # This process's own submissions NOTIFY too: a direct wake as well would make
            # a second, empty claim for each of them.
            notified.setServiceParent(sender)
        else:
            wakeup.subscribe(role.wake)
            directory = wake_directory(config.database)
            if directory is not None:
                WakeListener(directory, listener_name(role.identity), role.wake, reactor).setServiceParent(sender)
    return sender


def make_webhooks(config: Config, store: Store, reactor: Any) -> OrderedService:
    """The webhooks role: a dispatcher POSTing every webhook's events (issue 14)."""
    from .dispatcher import WebhookDispatcher
    from .mx import make_resolver, parse_hostport
    from .sender import default_identity
    from .webhooks import WebhookClient

    # Receivers' names through mmgun's own resolver: /etc/hosts, then the --nameservers.
    dns = make_resolver([parse_hostport(n, 53) for n in config.nameservers] or None, reactor, hosts_file=True)
    client = WebhookClient(reactor, allow_private=config.webhook_allow_private, dns=dns)
    service = OrderedService()
    # Stopped after the dispatcher: then the idle connections to receivers are closed.
    _OnStop(client.close).setServiceParent(service)
    WebhookDispatcher(
        store,
        client,
        reactor,
        wall=time.time,
        owner=config.sender_id or default_identity(),
        # --lease-time bounds how long a killed dispatcher's webhooks and retries wait for another
        # (as a killed sender's envelopes); ticking (renewing) at least 3 times per lease.
        lease_time=config.lease_time,
        interval=min(1.0, config.lease_time / 3),
        grace=min(config.shutdown_timeout, 10.0),
    ).setServiceParent(service)
    return service


class _OnStop(Service):
    def __init__(self, callback: Any) -> None:
        self._callback = callback

    def stopService(self) -> None:
        super().stopService()
        self._callback()
