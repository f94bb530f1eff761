"""``--listen reuseport:…``: several frontends on one port (SO_REUSEPORT), on real sockets."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import treq
from twisted.application.service import IServiceCollection
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from mmgun.config import Options
from mmgun.service import HTTPService, make_service

from .helpers import CLIENT, http_url


class ParserTests(SynchronousTestCase):
    def test_tcp_arguments(self) -> None:
        endpoint = serverFromString(reactor, "reuseport:8025:interface=127.0.0.2:backlog=7")
        self.assertIsInstance(endpoint, TCP4ServerEndpoint)
        self.assertEqual((endpoint._port._port, endpoint._port._address, endpoint._backlog), (8025, "127.0.0.2", 7))
        self.assertTrue(endpoint._port._reusePort)

    def test_ipv6_interface(self) -> None:
        self.assertIsInstance(serverFromString(reactor, "reuseport:8025:interface=\\:\\:1"), TCP6ServerEndpoint)


class SharedPortTests(TestCase):
    async def listen(self, description: str) -> int:
        port = await serverFromString(reactor, description).listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def _two_listeners(self) -> None:
        number = await self.listen("reuseport:0:interface=127.0.0.1")
        self.assertEqual(await self.listen(f"reuseport:{number}:interface=127.0.0.1"), number)
        # A plain tcp: listener is still refused the port: SO_REUSEPORT is opt-in on both sides.
        with self.assertRaises(CannotListenError):
            await self.listen(f"tcp:{number}:interface=127.0.0.1")

    def test_two_listeners_share_a_port_plain_tcp_does_not(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._two_listeners())

    def start(self, database: str, clients: str, listen: str) -> tuple[str, HTTPService]:
        options = Options({})
        options.parseOptions(["--listen", listen, "--database", database, "--clients", clients, "--role", "frontend"])
        service = make_service(options.config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        (http,) = [s for s in IServiceCollection(service) if isinstance(s, HTTPService)]
        return http_url(service), http

    async def _two_frontends(self) -> None:
        database, clients = self.mktemp(), self.mktemp()
        with open(clients, "w") as f:
            f.write(CLIENT + "\n")
        url, first = self.start(database, clients, "reuseport:0:interface=127.0.0.1")
        same, second = self.start(database, clients, f"reuseport:{url.rsplit(':', 1)[1]}:interface=127.0.0.1")
        self.assertEqual(same, url)
        served = {first.site: 0, second.site: 0}
        for site in served:
            build = site.buildProtocol

            def counting(addr: object, site: object = site, build: Callable[[object], object] = build) -> object:
                served[site] += 1
                return build(addr)

            site.buildProtocol = counting
        pool = HTTPConnectionPool(reactor, persistent=False)  # a new connection for every request
        body = {"client_id": CLIENT, "sender": "a@b.example", "recipients": ["c@d.example"], "subject": "s", "body": "b"}
        responses = await gatherResults([treq.post(url + "/send", json=body, pool=pool) for _ in range(40)])
        self.assertEqual({r.code for r in responses}, {200})
        for response in responses:
            await response.content()
        # The kernel hashes each connection to one listener: with 40 connections, both got some
        # (the chance that one got all 40 is 2 in 2^40).
        self.assertEqual(sum(served.values()), 40)
        self.assertTrue(all(served.values()), served)
        conn = sqlite3.connect(database)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT count(*) FROM submissions").fetchone(), (40,))

    def test_two_frontends_on_one_port(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._two_frontends())
