"""
Attacks on where mail goes (issue 11 items 6, 7, 11 and 16): a recipient
domain whose MX points inside the relay's network, a DNS server that sets TC
on every answer, a domain with 300 MX names, and MX replies and MX names that
carry line breaks.  Real in-process DNS and SMTP servers on 127.0.0.1 where
the attack goes over the network; in-memory resolvers and transports where the
logic alone is at stake.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any, cast

import treq
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from mmgun.mx import (
    ANY_ADDRESS,
    BoundedResolver,
    LocalAddresses,
    MXHost,
    MXResolver,
    PermanentDNSError,
    PublicOnly,
    RelayHost,
    TemporaryDNSError,
    gather_local_addresses,
    make_resolver,
    non_public_reason,
)
from mmgun.smtp import SessionFailed, parse_reply, wire_form
from mmgun.testing.dnsserver import SERVFAIL, TRUNCATED, ZoneResolver, listen_dns
from mmgun.testing.ports import port_number
from mmgun.testing.smtpserver import Mailbox, smtp_server_factory

from .fakes import FakeMX, Session, transaction
from .helpers import CLIENT, start_mmgun

DEADLINE = 30.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _mx(preference: int, name: bytes) -> dns.Record_MX:
    return dns.Record_MX(preference, name, ttl=60)


def _hosts(source: Any, domain: str) -> Deferred[list[MXHost]]:
    return Deferred.fromCoroutine(source.hosts(domain))


async def _bounded(d: Deferred[Any], seconds: float = 10.0) -> Any:
    """C{d}'s result, or a test failure (TimeoutError) after C{seconds}: no test hangs."""
    return await d.addTimeout(seconds, _reactor())


class _CountingFactory(ServerFactory):
    """Counts the connections accepted, then hands them to C{inner}."""

    def __init__(self, inner: ServerFactory) -> None:
        self.inner = inner
        self.accepted: list[IAddress | None] = []

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        self.accepted.append(addr)
        return cast("Protocol | None", self.inner.buildProtocol(addr))


# -- item 6: MX hosts on internal addresses --------------------------------------

INTERNAL_ZONE: dict[str, Any] = {
    "loop.example": [_mx(10, b"mx.loop.example")],
    "mx.loop.example": [dns.Record_A("127.0.0.1", ttl=60)],
    "zero.example": [_mx(10, b"mx.zero.example")],
    "mx.zero.example": [dns.Record_A("0.0.0.0", ttl=60)],
    "ten.example": [_mx(10, b"mx.ten.example")],
    "mx.ten.example": [dns.Record_A("10.0.0.1", ttl=60)],
    "v6loop.example": [_mx(10, b"mx.v6loop.example")],
    "mx.v6loop.example": [dns.Record_AAAA("::1", ttl=60)],
    "mapped.example": [_mx(10, b"mx.mapped.example")],
    "mx.mapped.example": [dns.Record_AAAA("::ffff:127.0.0.1", ttl=60)],
    # No MX: the implicit MX is the domain's own address.
    "bare.example": [dns.Record_A("127.0.0.1", ttl=60)],
}

EXPECTED_REFUSALS = {
    "a@loop.example": "550 5.4.4 MX hosts of loop.example resolve only to non-public addresses"
    " (mx.loop.example 127.0.0.1: loopback); refused (see --allow-private-mx)",
    "b@zero.example": "550 5.4.4 MX hosts of zero.example resolve only to non-public addresses"
    " (mx.zero.example 0.0.0.0: unspecified); refused (see --allow-private-mx)",
    "c@ten.example": "550 5.4.4 MX hosts of ten.example resolve only to non-public addresses"
    " (mx.ten.example 10.0.0.1: private); refused (see --allow-private-mx)",
    "d@v6loop.example": "550 5.4.4 MX hosts of v6loop.example resolve only to non-public addresses"
    " (mx.v6loop.example ::1: loopback); refused (see --allow-private-mx)",
    "e@mapped.example": "550 5.4.4 MX hosts of mapped.example resolve only to non-public addresses"
    " (mx.mapped.example ::ffff:127.0.0.1: loopback, embedded in IPv6); refused (see --allow-private-mx)",
    "f@bare.example": "550 5.4.4 bare.example (no MX) resolves only to non-public addresses"
    " (bare.example 127.0.0.1: loopback); refused (see --allow-private-mx)",
}


class InternalMXTests(TestCase):
    """
    The whole relay (HTTP API, store, sender) with a real DNS server and a
    real SMTP server listening on 127.0.0.1 (and ::1 where the host has IPv6)
    at the port mmgun delivers to.
    """

    def setUp(self) -> None:
        reactor = _reactor()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        udp, tcp = listen_dns(reactor, INTERNAL_ZONE)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.dns_port = port_number(udp)
        self.mailbox = Mailbox()
        self.smtp = _CountingFactory(smtp_server_factory(reactor, self.mailbox, tls=False))
        v4 = reactor.listenTCP(0, self.smtp, interface="127.0.0.1")
        self.addCleanup(v4.stopListening)
        self.smtp_port = port_number(v4)
        try:
            v6 = reactor.listenTCP(self.smtp_port, self.smtp, interface="::1")
        except CannotListenError:
            pass  # no IPv6 here: ::1 could not be reached anyway
        else:
            self.addCleanup(v6.stopListening)

    async def send(self, url: str, recipients: list[str]) -> dict[str, Any]:
        """POST /send, then poll /status until the submission is final (up to DEADLINE)."""
        response = await treq.post(url + "/send", data=json.dumps({
            "client_id": CLIENT, "sender": "me@example.com", "recipients": recipients, "subject": "s", "body": "b",
        }).encode(), pool=self.pool)
        self.assertEqual(response.code, 200)
        submission = json.loads(await response.content())["submission_id"]
        deadline = _reactor().seconds() + DEADLINE
        while True:
            response = await treq.post(url + "/status", data=json.dumps({
                "client_id": CLIENT, "submission_id": submission,
            }).encode(), pool=self.pool)
            status: dict[str, Any] = json.loads(await response.content())
            if status["status"] != "queued":
                return status
            if _reactor().seconds() > deadline:
                self.fail(f"submission still queued after {DEADLINE}s: {status}")
            await deferLater(_reactor(), 0.05, lambda: None)

    async def test_internal_mx_refused_by_default(self) -> None:
        """
        issue 11 item 6: MX hosts (or the implicit MX) on 127.0.0.1, 0.0.0.0,
        10.0.0.1, ::1 and ::ffff:127.0.0.1 are never connected to; each
        recipient fails permanently, with a reply saying why.
        """
        url = start_mmgun(self, self.dns_port, self.smtp_port)
        status = await self.send(url, list(EXPECTED_REFUSALS))
        self.assertEqual(status["status"], "failed")
        self.assertEqual(
            {r["address"]: (r["status"], r["attempts"], r["last_reply"]) for r in status["recipients"]},
            {address: ("failed", 1, reply) for address, reply in EXPECTED_REFUSALS.items()},
        )
        self.assertEqual(self.smtp.accepted, [])
        self.assertEqual(self.mailbox.messages, [])

    async def test_allow_private_mx_delivers(self) -> None:
        """
        issue 11 item 6: with --allow-private-mx the same loopback MX gets the
        mail (so the test above would see a connection if one were made).
        """
        url = start_mmgun(self, self.dns_port, self.smtp_port, allow_private_mx=True)
        status = await self.send(url, ["a@loop.example", "f@bare.example"])
        self.assertEqual(status["status"], "sent")
        self.assertEqual(
            sorted(tuple(m.recipients) for m in self.mailbox.messages), [("a@loop.example",), ("f@bare.example",)]
        )
        self.assertNotEqual(self.smtp.accepted, [])

    async def test_relay_host_on_loopback_exempt(self) -> None:
        """issue 11 item 6: --relay-host, chosen by the operator, may be on loopback without the flag."""
        url = start_mmgun(self, self.dns_port, self.smtp_port, "--relay-host", f"127.0.0.1:{self.smtp_port}")
        status = await self.send(url, ["a@loop.example"])
        self.assertEqual(status["status"], "sent")
        self.assertEqual([tuple(m.recipients) for m in self.mailbox.messages], [("a@loop.example",)])


OWN = ipaddress.ip_address("1.2.3.4")


class AddressPolicyTests(SynchronousTestCase):
    """L{PublicOnly} and L{non_public_reason}, with an in-memory zone."""

    def mx(self, records: dict[str, Any], **kwargs: Any) -> MXResolver:
        policy = PublicOnly(lambda: frozenset({OWN}))
        return MXResolver(ZoneResolver(records), Clock(), policy=policy, **kwargs)

    def test_non_public_reasons(self) -> None:
        """issue 11 item 6: every internal range is named, public addresses pass."""
        cases = {
            "127.0.0.2": "loopback",
            "0.0.0.0": "unspecified",
            "0.1.2.3": "this network",
            "10.1.2.3": "private",
            "172.16.0.1": "private",
            "192.168.1.1": "private",
            "169.254.169.254": "link-local",
            "100.64.0.1": "shared (CGNAT)",
            "224.0.0.1": "multicast",
            "240.0.0.1": "reserved",
            "255.255.255.255": "broadcast",
            "192.0.2.1": "documentation",
            "198.18.0.1": "benchmarking",
            "::": "unspecified",
            "::1": "loopback",
            "fe80::1": "link-local",
            "fc00::1": "private",
            "fd12:3456::1": "private",
            "fec0::1": "site-local",
            "ff02::1": "multicast",
            "2001:db8::1": "documentation",
            "::ffff:10.0.0.1": "private, embedded in IPv6",
            "::ffff:169.254.169.254": "link-local, embedded in IPv6",
            "2002:7f00:1::": "loopback, embedded in IPv6",  # 6to4 of 127.0.0.1
            "64:ff9b::a00:1": "private, embedded in IPv6",  # NAT64 of 10.0.0.1
            "::7f00:1": "reserved",  # IPv4-compatible 127.0.0.1
            "1.2.3.4": None,
            "8.8.8.8": None,
            "::ffff:8.8.8.8": None,
            "2a00:1450:4001::1": None,
        }
        self.assertEqual({a: non_public_reason(ipaddress.ip_address(a)) for a in cases}, cases)

    def test_special_purpose_blocks_whatever_the_python_version(self) -> None:
        """
        issue 11 item 6: the IANA special-purpose blocks are refused by mmgun's own list,
        not by ipaddress's tables (Python 3.11 calls 192.0.0.8 and 3fff::1 global); and
        NAT64's well-known prefix is judged by the IPv4 address it embeds, so that an
        IPv6-only host behind DNS64 can deliver to an IPv4-only domain (Python calls all of
        64:ff9b::/96 reserved).
        """
        cases = {
            "192.0.0.8": "IETF protocol assignments",
            "192.88.99.1": "6to4 relay anycast",
            "3fff::1": "documentation",
            "64:ff9b:1::a00:1": "local-use NAT64",
            "100::1": "discard-only",
            "2001::1": "IETF protocol assignments",
            "2001:2::1": "benchmarking",
            "64:ff9b::7f00:1": "loopback, embedded in IPv6",
            "64:ff9b::c0a8:101": "private, embedded in IPv6",
            "64:ff9b::808:808": None,
            "2002:808:808::1": None,  # 6to4 of 8.8.8.8
        }
        self.assertEqual({a: non_public_reason(ipaddress.ip_address(a)) for a in cases}, cases)

    def test_nat64_address_of_a_public_mx_is_used(self) -> None:
        """issue 11 item 6: an IPv6-only network with DNS64: the MX's only address is 64:ff9b::808:808, and it is used."""
        mx = self.mx({"v4only.example": [_mx(10, b"mx.v4only.example")], "mx.v4only.example": [dns.Record_AAAA("64:ff9b::808:808")]})
        hosts = self.successResultOf(_hosts(mx, "v4only.example"))
        self.assertEqual(hosts, [MXHost("mx.v4only.example", "64:ff9b::808:808", 25)])

    def test_nat64_address_of_this_host_refused(self) -> None:
        """issue 11 item 6: a NAT64 address that leads to one of this host's own (public) addresses is refused."""
        mx = self.mx({"self.example": [_mx(10, b"mx.self.example")], "mx.self.example": [dns.Record_AAAA("64:ff9b::102:304")]})
        failure = self.failureResultOf(_hosts(mx, "self.example"), PermanentDNSError)
        self.assertIn("64:ff9b::102:304: this host's own address", failure.value.reply)

    def test_own_public_address_refused(self) -> None:
        """issue 11 item 6: an MX on one of this host's own (public) addresses is refused."""
        mx = self.mx({"own.example": [_mx(10, b"mx.own.example")], "mx.own.example": [dns.Record_A(str(OWN))]})
        failure = self.failureResultOf(_hosts(mx, "own.example"), PermanentDNSError)
        self.assertEqual(
            failure.value.reply,
            "550 5.4.4 MX hosts of own.example resolve only to non-public addresses"
            " (mx.own.example 1.2.3.4: this host's own address); refused (see --allow-private-mx)",
        )

    def test_internal_hosts_dropped_public_kept(self) -> None:
        """issue 11 item 6: internal MX hosts are skipped (and logged); the public ones are used."""
        mx = self.mx({
            "mixed.example": [_mx(10, b"in.mixed.example"), _mx(20, b"out.mixed.example")],
            "in.mixed.example": [dns.Record_A("192.168.0.25"), dns.Record_AAAA("::1")],
            "out.mixed.example": [dns.Record_A("8.8.8.8")],
        })
        with capturedLogs() as events:
            hosts = self.successResultOf(_hosts(mx, "mixed.example"))
        self.assertEqual(hosts, [MXHost("out.mixed.example", "8.8.8.8", 25)])
        self.assertEqual(
            [formatEvent(e) for e in events if "not connecting" in e.get("log_format", "")],
            [
                "not connecting to in.mixed.example (192.168.0.25) for mixed.example: private address",
                "not connecting to in.mixed.example (::1) for mixed.example: loopback address",
            ],
        )

    def test_internal_only_with_a_failed_lookup_is_temporary(self) -> None:
        """
        issue 11 item 6: when another MX name failed to resolve for now, it
        may yet have a public address: defer rather than fail.
        """
        mx = self.mx({
            "half.example": [_mx(10, b"in.half.example"), _mx(20, b"broken.half.example")],
            "in.half.example": [dns.Record_A("127.0.0.1")],
            "broken.half.example": SERVFAIL,
        })
        failure = self.failureResultOf(_hosts(mx, "half.example"), TemporaryDNSError)
        self.assertTrue(failure.value.reply.startswith("451 4.4.4 MX hosts of half.example resolve only"))

    def test_any_address_allows_internal(self) -> None:
        """issue 11 item 6: the --allow-private-mx policy lets loopback through."""
        mx = MXResolver(
            ZoneResolver({"loop.example": [_mx(10, b"mx.loop.example")], "mx.loop.example": [dns.Record_A("127.0.0.1")]}),
            Clock(),
            policy=ANY_ADDRESS,
        )
        self.assertEqual(self.successResultOf(_hosts(mx, "loop.example")), [MXHost("mx.loop.example", "127.0.0.1", 25)])


class LocalAddressesTests(SynchronousTestCase):
    def test_gathers_loopback(self) -> None:
        """issue 11 item 6: this host's addresses are found (loopback is always there on Linux)."""
        if not sys.platform.startswith("linux"):
            self.skipTest("gathers from Linux ioctls and /proc")
        addresses = gather_local_addresses()
        self.assertIn(ipaddress.ip_address("127.0.0.1"), addresses)

    def test_gathered_at_start_and_refreshed_when_stale(self) -> None:
        """issue 11 item 6: gathered once at start, again after max_age seconds or a clock step back."""
        clock = Clock()
        clock.advance(1000)
        calls: list[float] = []

        def gather() -> frozenset[Any]:
            calls.append(clock.seconds())
            return frozenset({ipaddress.ip_address(f"1.2.3.{len(calls)}")})

        local = LocalAddresses(clock, max_age=60, gather=gather)
        self.assertEqual(calls, [1000])
        clock.advance(59)
        self.assertEqual(local(), {ipaddress.ip_address("1.2.3.1")})
        clock.advance(1)
        self.assertEqual(local(), {ipaddress.ip_address("1.2.3.2")})
        clock.rightNow -= 10
        self.assertEqual(local(), {ipaddress.ip_address("1.2.3.3")})
        self.assertEqual(len(calls), 3)


# -- item 7: a DNS server that truncates everything ----------------------------------


class _QueryLog(list[tuple[str, int, str]]):
    """
    The queries a server received.  Past C{limit} it refuses to record more
    (the server then drops the query), so that a resolver that loops is cut
    off and its test fails instead of spinning the reactor forever.
    """

    limit = 50

    def append(self, query: tuple[str, int, str]) -> None:
        if len(self) >= self.limit:
            raise RuntimeError(f"more than {self.limit} DNS queries: the resolver loops")
        super().append(query)


class TruncationLoopTests(TestCase):
    """A real DNS server on 127.0.0.1 that sets TC on every answer, over UDP and TCP."""

    def setUp(self) -> None:
        reactor = _reactor()
        self.queries = _QueryLog()
        udp, tcp = listen_dns(
            reactor,
            {
                "loop.example": TRUNCATED,
                "hosts.example": [_mx(10, b"mx.hosts.example")],
                "mx.hosts.example": TRUNCATED,
            },
            queries=self.queries,
        )
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        self.server = tcp.factory  # type: ignore[attr-defined]
        self.resolver = make_resolver([("127.0.0.1", port_number(udp))], reactor)
        self.addCleanup(self.resolver.clear)
        self.addCleanup(self.close_tcp)
        self.mx = MXResolver(self.resolver, reactor, policy=ANY_ADDRESS)

    async def close_tcp(self) -> None:
        """The resolver keeps its TCP connection open: close it, and wait until both ends are gone."""
        upstream = self.resolver.upstream
        assert isinstance(upstream, BoundedResolver)
        for protocol in list(cast("list[Any]", upstream.connections)):
            protocol.transport.loseConnection()
        deadline = _reactor().seconds() + 5
        while (upstream.connections or self.server.connections) and _reactor().seconds() < deadline:
            await deferLater(_reactor(), 0.01, lambda: None)

    async def test_truncated_tcp_answer_is_temporary_failure(self) -> None:
        """
        issue 11 item 7: TC=1 over UDP then over TCP ends the lookup as a
        TemporaryDNSError after one UDP and one TCP query (it used to re-query
        over TCP ~5,000 times a second, forever).
        """
        with self.assertRaises(TemporaryDNSError) as raised:
            await _bounded(_hosts(self.mx, "loop.example"))
        self.assertEqual(raised.exception.reply, "451 4.4.3 DNS lookup of loop.example failed: truncated answer over TCP")
        self.assertEqual(self.queries, [("loop.example", dns.MX, "udp"), ("loop.example", dns.MX, "tcp")])

    async def test_truncated_address_lookups_bounded(self) -> None:
        """issue 11 item 7: the MX host's A and AAAA lookups, truncated too, make one UDP and one TCP query each."""
        with self.assertRaises(TemporaryDNSError) as raised:
            await _bounded(_hosts(self.mx, "hosts.example"))
        self.assertEqual(raised.exception.reply, "451 4.4.4 no MX host of hosts.example has an address")
        self.assertEqual(
            sorted(self.queries),
            sorted([
                ("hosts.example", dns.MX, "udp"),
                ("mx.hosts.example", dns.A, "udp"),
                ("mx.hosts.example", dns.A, "tcp"),
                ("mx.hosts.example", dns.AAAA, "udp"),
                ("mx.hosts.example", dns.AAAA, "tcp"),
            ]),
        )


class _FakeUDPPort:
    def __init__(self, sent: list[bytes]) -> None:
        self._sent = sent

    def write(self, datagram: bytes, address: Any) -> None:
        self._sent.append(datagram)

    def stopListening(self) -> None:
        pass


class _UDPMemoryReactor(MemoryReactorClock):
    """A memory reactor whose UDP ports record what is sent; TCP connections never complete."""

    def __init__(self) -> None:
        super().__init__()
        self.datagrams: list[bytes] = []
        self.udp_protocols: list[Any] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> _FakeUDPPort:
        transport = _FakeUDPPort(self.datagrams)
        protocol.makeConnection(transport)
        self.udp_protocols.append(protocol)
        return transport


def _answer_truncated(reactor: _UDPMemoryReactor, server: tuple[str, int]) -> None:
    """Answer the one query sent so far with an empty, truncated answer."""
    [datagram] = reactor.datagrams
    query = dns.Message()
    query.fromStr(datagram)
    answer = dns.Message(id=query.id, answer=1, trunc=1)
    answer.queries = query.queries
    reactor.udp_protocols[0].datagramReceived(answer.toStr(), server)


class DeadlineTests(SynchronousTestCase):
    def test_lookup_has_overall_deadline(self) -> None:
        """
        issue 11 item 7: an answer truncated over UDP sends the query to TCP,
        whose connection never completes (twisted.names sets no timeout on
        it): the lookup still ends, at its deadline (1 + 3 + 5 s of UDP
        rounds, 5 s for TCP, 1 s margin), as a TemporaryDNSError.
        """
        reactor = _UDPMemoryReactor()
        server = ("192.0.2.53", 53)
        mx = MXResolver(make_resolver([server], reactor), reactor, policy=ANY_ADDRESS)
        d = _hosts(mx, "example.com")
        _answer_truncated(reactor, server)
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [server])
        reactor.advance(14.9)
        self.assertNoResult(d)
        reactor.advance(0.1)
        failure = self.failureResultOf(d, TemporaryDNSError)
        self.assertEqual(failure.value.reply, "451 4.4.3 DNS lookup of example.com failed: timeout")

    def test_joined_lookups_share_the_deadline(self) -> None:
        """
        issue 11 item 7: a second lookup of the same name while the first is
        stuck on TCP (twisted.names sends the query once and hands both the
        result) ends with the first's deadline, as a timeout too.
        """
        reactor = _UDPMemoryReactor()
        server = ("192.0.2.53", 53)
        resolver = BoundedResolver(servers=[server], timeout=(1, 3, 5), reactor=reactor)
        first = resolver.lookupMailExchange("example.com")
        _answer_truncated(reactor, server)
        reactor.advance(5)
        second = resolver.lookupMailExchange("example.com")
        reactor.advance(10)
        self.failureResultOf(first, TimeoutError)
        self.failureResultOf(second, TimeoutError)
        self.assertEqual(len(reactor.datagrams), 1)

    def test_deadline_counts_every_server_and_round(self) -> None:
        """issue 11 item 7: the deadline leaves every UDP retry its time."""
        resolver = BoundedResolver(servers=[("192.0.2.1", 53), ("192.0.2.2", 53)], timeout=(1, 3, 5), reactor=Clock())
        self.assertEqual(resolver.deadline(), 2 * 9 + 5 + 1)
        self.assertEqual(resolver.deadline((2,)), 2 * 2 + 5 + 1)


# -- item 11: 300 MX names ------------------------------------------------------------

MANY = 300
MANY_ZONE: dict[str, Any] = {
    "many.example": [_mx(i, b"mx%03d.many.example" % i) for i in range(MANY)],
    **{f"mx{i:03d}.many.example": [dns.Record_A(f"127.0.{i // 200}.{i % 200 + 1}", ttl=60)] for i in range(MANY)},
}


class FanOutTests(TestCase):
    def setUp(self) -> None:
        reactor = _reactor()
        self.queries: list[tuple[str, int, str]] = []
        udp, tcp = listen_dns(reactor, MANY_ZONE, queries=self.queries)
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        resolver = make_resolver([("127.0.0.1", port_number(udp))], reactor)
        self.addCleanup(resolver.clear)
        self.mx = MXResolver(resolver, reactor, policy=ANY_ADDRESS)

    async def test_many_mx_names_bounded(self) -> None:
        """
        issue 11 item 11: 300 MX names make at most 1 + 2 x 10 queries (only
        the 10 best names are looked up; it used to be 633), and the 5 best
        addresses come back.
        """
        hosts = await _bounded(_hosts(self.mx, "many.example"))
        self.assertEqual([h.name for h in hosts], [f"mx{i:03d}.many.example" for i in range(5)])
        self.assertLessEqual(len(self.queries), 21)
        self.assertEqual(
            {name for name, _type, _transport in self.queries} - {"many.example"},
            {f"mx{i:03d}.many.example" for i in range(10)},
        )

    async def test_address_limit_applies_after_bad_hosts_move_last(self) -> None:
        """issue 11 item 11: a host marked bad gives its place to the next best, not to nothing."""
        first = (await _bounded(_hosts(self.mx, "many.example")))[0]
        self.mx.mark_bad(first)
        hosts = await _bounded(_hosts(self.mx, "many.example"))
        self.assertEqual([h.name for h in hosts], [f"mx{i:03d}.many.example" for i in range(1, 6)])


class AddressLimitTests(SynchronousTestCase):
    def test_relay_host_addresses_capped(self) -> None:
        """issue 11 item 11: a relay host name with 8 addresses yields the first address_limit of them."""
        zone = ZoneResolver({"relay.example": [dns.Record_A(f"192.0.2.{i}") for i in range(1, 9)]})
        relay = RelayHost(zone, "relay.example", 25, address_limit=3)
        self.assertEqual(
            [h.address for h in self.successResultOf(_hosts(relay, "x.example"))], ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
        )

    def test_configured_limit(self) -> None:
        """issue 11 item 11: MXResolver honours address_limit and max_names."""
        zone = ZoneResolver({
            "d.example": [_mx(i, b"mx%d.d.example" % i) for i in range(4)],
            **{f"mx{i}.d.example": [dns.Record_A(f"192.0.2.{i + 1}"), dns.Record_A(f"192.0.2.{i + 101}")] for i in range(4)},
        })
        mx = MXResolver(zone, Clock(), policy=ANY_ADDRESS, max_names=2, address_limit=3)
        hosts = self.successResultOf(_hosts(mx, "d.example"))
        self.assertEqual([(h.name, h.address) for h in hosts], [
            ("mx0.d.example", "192.0.2.1"), ("mx0.d.example", "192.0.2.101"), ("mx1.d.example", "192.0.2.2"),
        ])


# -- item 16: line breaks in what the MX (or DNS) says --------------------------------

# Every character str.splitlines() breaks at, beyond CR and LF.
LINE_BREAKS = [chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) == 2]
HOSTILE = "\x85\u2028\u2029"


class SlowMXBufferTests(SynchronousTestCase):
    """What one session to a slow MX puts in its transport's buffer at once."""

    def test_body_over_256_kib_is_streamed_not_written_at_once(self) -> None:
        """
        issue 11 item 8: a 300 kB body to an MX with PIPELINING goes out through the
        producer, a chunk at a time, not in one write: at --max-connections 100, each
        session to a slow MX holds at most 256 KiB of its own in the transport's buffer.
        """
        message = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300
        session = Session([transaction(message=message)])
        server = FakeMX(pipelining=True)
        session.accept(server)
        [result] = self.successResultOf(session.result)
        self.assertEqual(result.recipients["b@example.net"].status, "sent")
        self.assertEqual(server.payloads, [message + b".\r\n"])
        writes = session.client_transports[0].writes
        self.assertLessEqual(max(len(w) for w in writes), 256 * 1024, [len(w) for w in writes])

    def test_body_under_256_kib_goes_in_one_write(self) -> None:
        """issue 11 item 8: a 200 kB body still goes out in one write behind the pipelined commands."""
        message = b"Subject: mid\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200
        session = Session([transaction(message=message)])
        server = FakeMX(pipelining=True)
        session.accept(server)
        self.successResultOf(session.result)
        writes = session.client_transports[0].writes
        self.assertIn(wire_form(message) + b".\r\n", writes)


class ReplySanitisingTests(SynchronousTestCase):
    def test_line_breaks_stripped_from_recipient_replies(self) -> None:
        """
        issue 11 item 16: U+0085, U+2028 and U+2029 in a real RCPT and
        end-of-data reply (UTF-8 on the wire) do not reach the recorded reply.
        """
        session = Session([transaction("env1", "nobody@example.net", "b@example.net")])
        server = FakeMX({
            b"RCPT": lambda line: "550 5.1.1 no\u2028such\x85user\u2029here".encode() if b"nobody" in line else None,
            b".": "250 2.0.0 queued\u2028as 1\x85\u2029".encode(),
        })
        session.accept(server)
        [result] = self.successResultOf(session.result)
        replies = {a: str(r.reply) for a, r in result.recipients.items()}
        self.assertEqual(replies, {
            "nobody@example.net": "550 5.1.1 no such user here",
            "b@example.net": "250 2.0.0 queued as 1",
        })

    def test_line_breaks_stripped_from_session_failure_and_logs(self) -> None:
        """issue 11 item 16: a hostile greeting's line breaks reach neither the reply nor the text logs."""
        session = Session([transaction()])
        with capturedLogs() as events:
            session.accept(FakeMX(greeting="421 4.3.2 busy\u2028FAKE: delivered OK\x85\u2029".encode()))
            failure = self.failureResultOf(session.result, SessionFailed)
        self.assertEqual(str(failure.value.reply), "421 4.3.2 busy FAKE: delivered OK")
        logged = [formatEvent(e) for e in events]
        self.assertTrue(any("busy FAKE" in line for line in logged), logged)
        self.assertEqual([line for line in logged if any(c in line for c in HOSTILE)], [])

    def test_no_line_break_survives(self) -> None:
        """issue 11 item 16: whatever the peer sends, a recorded reply is one line for str.splitlines()."""
        self.assertIn("\u2028", LINE_BREAKS)
        text = "x".join(LINE_BREAKS).encode("utf-8")
        self.assertEqual(len(str(parse_reply(550, text)).splitlines()), 1)


class _GlueResolver(ZoneResolver):
    """A zone whose MX answers carry C{additional} records (glue), as a hostile server may send them."""

    def __init__(self, records: dict[str, Any], additional: list[dns.RRHeader]) -> None:
        super().__init__(records)
        self.additional = additional

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return super().lookupMailExchange(name, timeout).addCallback(
            lambda result: (result[0], result[1], self.additional)
        )


class GlueTests(SynchronousTestCase):
    def test_non_ascii_glue_owner_ignored(self) -> None:
        """issue 11 item 16: an additional record owned by a non-ASCII name is skipped, not crashed on."""
        hostile = dns.RRHeader(b"m\xff.evil.example", dns.A, dns.IN, 60, dns.Record_A("192.0.2.9"))
        glue = dns.RRHeader(b"mx.evil.example", dns.A, dns.IN, 60, dns.Record_A("192.0.2.10"))
        zone = _GlueResolver({"evil.example": [_mx(10, b"mx.evil.example")]}, [hostile, glue])
        mx = MXResolver(zone, Clock(), policy=ANY_ADDRESS)
        self.assertEqual(self.successResultOf(_hosts(mx, "evil.example")), [MXHost("mx.evil.example", "192.0.2.10", 25)])


class MXNameTests(TestCase):
    """MX names with control characters or non-ASCII bytes, from a real DNS server."""

    def setUp(self) -> None:
        reactor = _reactor()
        udp, tcp = listen_dns(reactor, {
            "evil.example": [_mx(10, b"mx\r\nFAKE\x85.evil.example"), _mx(20, b"m\xc3\xa9x.evil.example"),
                             _mx(30, b"good.evil.example")],
            "good.evil.example": [dns.Record_A("127.0.0.2")],
            "worse.example": [_mx(10, b"mx\x00.worse.example")],
        })
        self.addCleanup(udp.stopListening)
        self.addCleanup(tcp.stopListening)
        resolver = make_resolver([("127.0.0.1", port_number(udp))], reactor)
        self.addCleanup(resolver.clear)
        self.mx = MXResolver(resolver, reactor, policy=ANY_ADDRESS)

    async def test_invalid_mx_names_ignored(self) -> None:
        """issue 11 item 16: MX names that are not host names never reach logs, replies or connections."""
        with capturedLogs() as events:
            hosts = await _bounded(_hosts(self.mx, "evil.example"))
        self.assertEqual(hosts, [MXHost("good.evil.example", "127.0.0.2", 25)])
        logged = [formatEvent(e) for e in events]
        self.assertEqual(len([line for line in logged if "not a host name" in line]), 2, logged)
        self.assertEqual([line for line in logged if "\r" in line or "\n" in line or "\x85" in line], [])

    async def test_only_invalid_names_is_temporary(self) -> None:
        """issue 11 item 16: a domain whose only MX name is invalid is deferred, not crashed on."""
        with self.assertRaises(TemporaryDNSError) as raised:
            await _bounded(_hosts(self.mx, "worse.example"))
        self.assertEqual(raised.exception.reply, "451 4.4.4 no MX host of worse.example has a valid name")
