"""Shared test fixtures: a real SQLite file, a frontend on a Clock, a StubTreq client."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mmgun.clients import Clients, client_label
from mmgun.store.sqlite import SQLiteStore
from mmgun.testing.ports import port_number
from mmgun.web.app import Frontend

CLIENT = "test-client-aaaaaaaaaaaaaaaa"
OTHER_CLIENT = "test-client-bbbbbbbbbbbbbbbb"
CLIENT_LABEL = client_label(CLIENT)


def sync_store(case: SynchronousTestCase, name: str = "mmgun.sqlite3") -> tuple[SQLiteStore, str]:
    """A real SQLite store whose Deferreds fire at once (no threads): usable with a Clock."""
    path = case.mktemp() + "-" + name
    store = SQLiteStore.open_sync(path)
    case.addCleanup(lambda: result(case, store.close()))
    return store, path


def result(case: SynchronousTestCase, coroutine_or_deferred: Any) -> Any:
    from twisted.internet.defer import Deferred, ensureDeferred

    d = coroutine_or_deferred if isinstance(coroutine_or_deferred, Deferred) else ensureDeferred(coroutine_or_deferred)
    return case.successResultOf(d)


class APIClient:
    """Drives the real root resource (every API) through StubTreq, synchronously."""

    def __init__(self, case: SynchronousTestCase, frontend: Frontend) -> None:
        self.case = case
        self.frontend = frontend
        self.treq = StubTreq(frontend.resource())

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        # StubTreq copies treq's functions onto itself in __init__: type checkers do not see them.
        d = self.treq.request(method, "http://mmgun.test" + path, data=data, headers=headers or {})  # type: ignore[attr-defined]
        self.treq.flush()
        response = self.case.successResultOf(d)
        content = self.case.successResultOf(response.content())
        self.case.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content)

    def send(self, client: str = CLIENT, headers: dict | None = None, **fields: Any) -> tuple[int, Any]:
        body = {
            "client_id": client,
            "sender": "me@example.com",
            "recipients": ["alice@another.com", "bob@third.com"],
            "subject": "important message",
            "body": "hello!",
        }
        body.update(fields)
        return self.request("POST", "/send", body, headers=headers)

    def status(self, submission_id: str, client: str = CLIENT) -> tuple[int, Any]:
        return self.request("POST", "/status", {"client_id": client, "submission_id": submission_id})


def make_api(case: SynchronousTestCase, **kwargs: Any) -> tuple[APIClient, SQLiteStore, Clock]:
    store, _ = sync_store(case)
    clock = Clock()
    clock.advance(1_800_000_000)
    clients = Clients.from_ids([CLIENT, OTHER_CLIENT])
    frontend = Frontend(store, lambda: clients, clock, hostname="mmgun.test", **kwargs)
    return APIClient(case, frontend), store, clock


def http_url(service: Any) -> str:
    """The URL of a started service tree's HTTP API (listening on port 0)."""
    from twisted.internet.interfaces import IListeningPort

    from mmgun.service import HTTPService

    (http,) = [s for s in service if isinstance(s, HTTPService)]
    ports: list[IListeningPort] = []

    def keep(port: IListeningPort) -> IListeningPort:
        ports.append(port)
        # Returns the port on, so stopService still finds it.
        return port

    http.listener._waitingForPort.addCallback(keep)
    assert len(ports) == 1, "port 0 is bound synchronously"
    return f"http://127.0.0.1:{port_number(ports[0])}"


def serve(case: Any, frontend: Any) -> str:
    """
    Serve ``frontend`` on 127.0.0.1 port 0 with the real reactor for one trial TestCase;
    the cleanup stops listening and waits (with a deadline) until every connection is
    closed, so no idle-connection timer outlives the test.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    site = frontend.site()
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def close() -> None:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped
        for channel in list(site.channels):
            channel.transport.loseConnection()
        deadline = reactor.seconds() + 5
        while site.channels and reactor.seconds() < deadline:
            await deferLater(reactor, 0.01, lambda: None)

    case.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return f"http://127.0.0.1:{port_number(port)}"


async def wait_until(predicate: Callable[[], object], what: str, deadline: float = 30.0, interval: float = 0.05) -> None:
    """
    Poll ``predicate`` on the real reactor every ``interval`` seconds until it holds;
    fail with "timed out waiting for ``what``" after ``deadline`` seconds.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    end = reactor.seconds() + deadline
    while not predicate():
        if reactor.seconds() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


def start_mmgun(case: Any, dns_port: int, smtp_port: int, *extra: str, allow_private_mx: bool = False) -> str:
    """
    Start mmgun in this process on the real reactor (frontend and sender roles, fast
    retries, the test DNS server on 127.0.0.1:``dns_port``, delivering to ``smtp_port``),
    with ``extra`` command-line options; the cleanup stops it. Returns the HTTP API's URL.
    """
    from twisted.internet import reactor

    from mmgun.config import Options
    from mmgun.service import make_service

    clients = case.mktemp()
    with open(clients, "w") as f:
        f.write(CLIENT + "\n")
    options = Options({})
    options.parseOptions([
        "--listen", "tcp:0:interface=127.0.0.1", "--database", case.mktemp(), "--clients", clients,
        "--role", "frontend", "--role", "sender",
        "--nameserver", f"127.0.0.1:{dns_port}", "--smtp-port", str(smtp_port),
        "--helo", "mmgun.test", "--poll-interval", "0.05", "--retry-min", "0.2s", "--retry-max", "0.4s",
        "--smtp-timeout", "10s", *(["--allow-private-mx"] if allow_private_mx else []), *extra,
    ])  # fmt: skip
    service = make_service(options.config, reactor)
    service.startService()
    case.addCleanup(service.stopService)
    return http_url(service)
