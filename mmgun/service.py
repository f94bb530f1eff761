"""The service tree of one mmgun process: a store shared by the roles it runs."""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .clients import Clients, ClientsFileError, load_clients
from .config import Config
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


def make_service(config: Config, reactor: Any, *, clients: Clients | None = None) -> IService:
    root = MultiService()
    store = SQLiteStore.open(config.database, reactor)
    StoreService(store).setServiceParent(root)

    if "frontend" in config.roles:
        from .frontend import Frontend

        holder = ClientsHolder(config.clients, clients)
        frontend = Frontend(
            store,
            holder,
            reactor,
            hostname=config.helo,
            max_recipients=config.max_recipients,
            max_message_size=config.max_message_size,
        )
        strports.service(config.listen, frontend.site(), reactor=reactor).setServiceParent(root)

    if "sender" in config.roles:
        make_sender(config, store, reactor).setServiceParent(root)

    if "cleaner" in config.roles:
        from .cleaner import Cleaner

        Cleaner(store, reactor, interval=config.clean_interval, retention=config.retention).setServiceParent(root)
    return root


def make_sender(config: Config, store: Store, reactor: Any) -> MultiService:
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
    Sender(store, router, reactor, smtp, settings).setServiceParent(sender)
    return sender


class _OnStop(Service):
    def __init__(self, callback: Any) -> None:
        self._callback = callback

    def stopService(self) -> None:
        super().stopService()
        self._callback()
