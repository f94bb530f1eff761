"""
Tests for L{mmgun.mx}.

L{start_dns_server} runs a real C{twisted.names} authoritative server in
process; other test modules may import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from random import Random
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import authority, common, dns, server
from twisted.names.error import (
    DNSNameError,
    DNSQueryRefusedError,
    DNSQueryTimeoutError,
    DNSServerError,
    DNSUnknownError,
)
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun.mx import (
    ANY_ADDRESS,
    CachingResolver,
    MXHost,
    MXResolver,
    PermanentDNSError,
    RelayHost,
    TemporaryDNSError,
    make_resolver,
    parse_hostport,
)

Records = Mapping[str, Sequence[Any]]


class _MemoryAuthority(authority.FileAuthority):
    """
    An authority for the root zone, so that it answers for every name: names
    in C{records} get their records (or an empty NOERROR answer for other
    types), all others NXDOMAIN.
    """

    def __init__(self, records: Records) -> None:
        # FileAuthority.__init__ would load a file.  Its class attributes
        # "soa = None" and "records = None" make the type checker see None here.
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        self.soa = (  # type: ignore[assignment]  # see above
            b"",
            dns.Record_SOA(
                mname="ns.test",
                rname="hostmaster.test",
                serial=1,
                refresh=60,
                retry=60,
                expire=60,
                minimum=60,
                ttl=60,
            ),
        )
        self.records = {  # type: ignore[assignment]  # see above
            dns.domainString(name).lower(): list(rs) for name, rs in records.items()
        }


class _TestServerFactory(server.DNSServerFactory):
    """Records each query; answers names in C{rcodes} with that error code."""

    def __init__(
        self,
        records: Records,
        rcodes: Mapping[str, int],
        queries: list[tuple[str, int]],
    ) -> None:
        super().__init__(authorities=[_MemoryAuthority(records)])
        self._rcodes = rcodes
        self._queries = queries

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> Any:
        query = message.queries[0]
        name = str(query.name).lower()
        self._queries.append((name, query.type))
        if name in self._rcodes:
            response = self._responseFromMessage(message=message, rCode=self._rcodes[name])
            self.sendReply(protocol, response, address)
            return None
        return super().handleQuery(message, protocol, address)


def start_dns_server(
    reactor: Any,
    records: Records,
    *,
    add_cleanup: Callable[..., object],
    rcodes: Mapping[str, int] | None = None,
    queries: list[tuple[str, int]] | None = None,
) -> int:
    """
    Serve C{records} on 127.0.0.1, UDP and TCP, and return the port number.

    @param records: Name -> records, e.g. C{{"example.com":
        [dns.Record_MX(10, "mx1.example.com", ttl=60)], "mx1.example.com":
        [dns.Record_A("127.0.0.2")]}}.  Other names are NXDOMAIN.  Address
        records of MX targets go in the additional section, as real
        authorities do.
    @param add_cleanup: The test's C{addCleanup}, to close the ports.
    @param rcodes: Names answered with this rcode (e.g. C{dns.ESERVER}).
    @param queries: If given, each query received is appended as (name, type).
    """
    factory = _TestServerFactory(records, rcodes or {}, queries if queries is not None else [])
    for _attempt in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port: int = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            # The TCP side of this port number is taken; try another.
            udp.stopListening()
            continue
        add_cleanup(udp.stopListening)
        add_cleanup(tcp.stopListening)
        return port
    raise RuntimeError("no port free for both UDP and TCP")


def _mx(preference: int, name: str, ttl: int = 60) -> dns.Record_MX:
    return dns.Record_MX(preference, name, ttl=ttl)


class RealServerTests(TestCase):
    """
    L{MXResolver} over L{make_resolver} against a real in-process server.
    """

    def resolver(
        self, records: Records, rcodes: Mapping[str, int] | None = None
    ) -> tuple[CachingResolver, list[tuple[str, int]]]:
        from twisted.internet import reactor

        queries: list[tuple[str, int]] = []
        port = start_dns_server(
            reactor, records, add_cleanup=self.addCleanup, rcodes=rcodes, queries=queries
        )
        resolver = make_resolver([("127.0.0.1", port)], reactor)
        # The cache's expiry timers would leave the reactor dirty.
        self.addCleanup(resolver.clear)
        return resolver, queries

    def mx(self, records: Records, rcodes: Mapping[str, int] | None = None) -> MXResolver:
        from twisted.internet import reactor

        return MXResolver(self.resolver(records, rcodes)[0], reactor, policy=ANY_ADDRESS)

    async def test_mx_in_preference_order(self) -> None:
        mx = self.mx(
            {
                "example.com": [_mx(20, "mx2.example.com"), _mx(10, "mx1.example.com")],
                "mx1.example.com": [dns.Record_A("127.0.0.2")],
                "mx2.example.com": [dns.Record_A("127.0.0.3")],
            }
        )
        self.assertEqual(
            await mx.hosts("example.com"),
            [
                MXHost("mx1.example.com", "127.0.0.2", 25),
                MXHost("mx2.example.com", "127.0.0.3", 25),
            ],
        )

    async def test_mx_to_a_and_aaaa(self) -> None:
        mx = self.mx(
            {
                "example.com": [_mx(10, "mx1.example.com")],
                "mx1.example.com": [dns.Record_AAAA("::1"), dns.Record_A("127.0.0.2")],
            }
        )
        self.assertEqual(
            await mx.hosts("example.com"),
            [
                MXHost("mx1.example.com", "127.0.0.2", 25),
                MXHost("mx1.example.com", "::1", 25),
            ],
        )

    async def test_additional_section_used(self) -> None:
        """
        The server sends the MX targets' addresses along with the MX answer:
        no further queries are made.
        """
        resolver, queries = self.resolver(
            {
                "example.com": [_mx(10, "mx1.example.com")],
                "mx1.example.com": [dns.Record_A("127.0.0.2")],
            }
        )
        from twisted.internet import reactor

        hosts = await MXResolver(resolver, reactor, policy=ANY_ADDRESS).hosts("example.com")
        self.assertEqual(hosts, [MXHost("mx1.example.com", "127.0.0.2", 25)])
        self.assertEqual(queries, [("example.com", dns.MX)])

    async def test_no_mx_falls_back_to_address(self) -> None:
        mx = self.mx({"example.net": [dns.Record_A("127.0.0.4")]})
        self.assertEqual(await mx.hosts("example.net"), [MXHost("example.net", "127.0.0.4", 25)])

    async def test_null_mx_is_permanent(self) -> None:
        mx = self.mx({"example.org": [_mx(0, "")]})
        with self.assertRaises(PermanentDNSError) as raised:
            await mx.hosts("example.org")
        self.assertEqual(
            raised.exception.reply,
            "556 5.1.10 example.org accepts no mail (null MX, RFC 7505)",
        )

    async def test_nxdomain_is_permanent(self) -> None:
        mx = self.mx({"example.com": [_mx(10, "mx1.example.com")]})
        with self.assertRaises(PermanentDNSError) as raised:
            await mx.hosts("example.invalid")
        self.assertEqual(
            raised.exception.reply,
            "550 5.1.2 domain example.invalid does not exist (NXDOMAIN)",
        )

    async def test_servfail_is_temporary(self) -> None:
        mx = self.mx({}, rcodes={"example.com": dns.ESERVER})
        with self.assertRaises(TemporaryDNSError) as raised:
            await mx.hosts("example.com")
        self.assertEqual(
            raised.exception.reply, "451 4.4.3 DNS lookup of example.com failed: SERVFAIL"
        )

    async def test_refused_is_temporary(self) -> None:
        mx = self.mx({}, rcodes={"example.com": dns.EREFUSED})
        with self.assertRaises(TemporaryDNSError) as raised:
            await mx.hosts("example.com")
        self.assertEqual(
            raised.exception.reply, "451 4.4.3 DNS lookup of example.com failed: REFUSED"
        )

    async def test_second_lookup_within_ttl_is_cached(self) -> None:
        resolver, queries = self.resolver(
            {
                "example.com": [_mx(10, "mx1.example.com", ttl=300)],
                "mx1.example.com": [dns.Record_A("127.0.0.2", ttl=300)],
            }
        )
        from twisted.internet import reactor

        mx = MXResolver(resolver, reactor, policy=ANY_ADDRESS)
        first = await mx.hosts("example.com")
        sent = len(queries)
        second = await mx.hosts("example.com")
        self.assertEqual((first, len(queries)), (second, sent))
        self.assertEqual(sent, 1)

    async def test_relay_host_name(self) -> None:
        resolver, _queries = self.resolver(
            {"relay.test": [dns.Record_A("127.0.0.5"), dns.Record_AAAA("::1")]}
        )
        relay = RelayHost(resolver, "relay.test", 2525)
        self.assertEqual(
            await relay.hosts("example.com"),
            [MXHost("relay.test", "127.0.0.5", 2525), MXHost("relay.test", "::1", 2525)],
        )


class FakeResolver(common.ResolverBase):
    """
    An IResolver answering from C{records} (name -> record payloads; other
    names NXDOMAIN), with no additional section; C{errors} maps (name, type)
    to the exception that lookup fails with.  C{queries} records each lookup.
    """

    def __init__(
        self,
        records: Records,
        errors: Mapping[tuple[str, int], Exception] | None = None,
    ) -> None:
        super().__init__()
        self.records = records
        self.errors = errors or {}
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object) -> Deferred[Any]:
        text = name.decode("ascii")
        self.queries.append((text, type))
        if (text, type) in self.errors:
            return fail(self.errors[text, type])
        if text not in self.records:
            return fail(DNSNameError(text))
        answers = [
            dns.RRHeader(text, record.TYPE, dns.IN, record.ttl or 60, record)
            for record in self.records[text]
            if record.TYPE == type
        ]
        return succeed((answers, [], []))


def _hosts(source: Any, domain: str) -> Deferred[list[MXHost]]:
    return Deferred.fromCoroutine(source.hosts(domain))


class FakeResolverTests(SynchronousTestCase):
    """L{MXResolver} behaviour that is clearer with a fake resolver."""

    def hosts(self, resolver: FakeResolver, domain: str = "example.com", **kw: Any) -> Any:
        return self.successResultOf(_hosts(MXResolver(resolver, Clock(), policy=ANY_ADDRESS, **kw), domain))

    def reply(
        self, resolver: FakeResolver, error: type[Exception], domain: str = "example.com"
    ) -> str:
        failure = self.failureResultOf(_hosts(MXResolver(resolver, Clock(), policy=ANY_ADDRESS), domain), error)
        reply: str = failure.value.reply
        return reply

    def test_mx_addresses_looked_up_when_not_in_additional(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": [_mx(10, "mx1.example.com")],
                "mx1.example.com": [dns.Record_A("192.0.2.1"), dns.Record_AAAA("2001:db8::1")],
            }
        )
        self.assertEqual(
            self.hosts(resolver, port=2525),
            [
                MXHost("mx1.example.com", "192.0.2.1", 2525),
                MXHost("mx1.example.com", "2001:db8::1", 2525),
            ],
        )
        self.assertEqual(
            sorted(resolver.queries),
            [("example.com", dns.MX), ("mx1.example.com", dns.A), ("mx1.example.com", dns.AAAA)],
        )

    def test_equal_preferences_shuffled(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": [_mx(10, "a.test"), _mx(10, "b.test"), _mx(20, "c.test")],
                "a.test": [dns.Record_A("192.0.2.1")],
                "b.test": [dns.Record_A("192.0.2.2")],
                "c.test": [dns.Record_A("192.0.2.3")],
            }
        )
        orders = {
            tuple(h.name for h in self.hosts(resolver, random=Random(seed)))
            for seed in range(20)
        }
        self.assertEqual(
            orders, {("a.test", "b.test", "c.test"), ("b.test", "a.test", "c.test")}
        )

    def test_servfail_is_temporary(self) -> None:
        resolver = FakeResolver({}, {("example.com", dns.MX): DNSServerError()})
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.3 DNS lookup of example.com failed: SERVFAIL",
        )

    def test_refused_is_temporary(self) -> None:
        resolver = FakeResolver({}, {("example.com", dns.MX): DNSQueryRefusedError()})
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.3 DNS lookup of example.com failed: REFUSED",
        )

    def test_query_timeout_is_temporary(self) -> None:
        resolver = FakeResolver({}, {("example.com", dns.MX): DNSQueryTimeoutError(1)})
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.3 DNS lookup of example.com failed: timeout",
        )

    def test_final_timeout_is_temporary(self) -> None:
        """client.Resolver gives up with a plain defer.TimeoutError."""
        resolver = FakeResolver({}, {("example.com", dns.MX): TimeoutError()})
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.3 DNS lookup of example.com failed: timeout",
        )

    def test_unknown_rcode_is_temporary(self) -> None:
        error = DNSUnknownError(dns.Message(rCode=9))  # NOTAUTH
        resolver = FakeResolver({}, {("example.com", dns.MX): error})
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.3 DNS lookup of example.com failed: rcode 9",
        )

    def test_other_error_is_temporary(self) -> None:
        resolver = FakeResolver({}, {("example.com", dns.MX): OSError("boom")})
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.3 DNS lookup of example.com failed: OSError: boom",
        )

    def test_mx_without_any_address_is_temporary(self) -> None:
        resolver = FakeResolver({"example.com": [_mx(10, "gone.test")]})
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.4 no MX host of example.com has an address",
        )

    def test_mx_without_address_skipped(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": [_mx(10, "gone.test"), _mx(20, "ok.test")],
                "ok.test": [dns.Record_A("192.0.2.1")],
            }
        )
        self.assertEqual(self.hosts(resolver), [MXHost("ok.test", "192.0.2.1", 25)])

    def test_ipv6_failure_ignored_when_ipv4_resolves(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": [_mx(10, "mx.test")],
                "mx.test": [dns.Record_A("192.0.2.1")],
            },
            {("mx.test", dns.AAAA): DNSServerError()},
        )
        self.assertEqual(self.hosts(resolver), [MXHost("mx.test", "192.0.2.1", 25)])

    def test_null_mx_among_others_ignored(self) -> None:
        resolver = FakeResolver(
            {
                "example.com": [_mx(0, ""), _mx(10, "mx.test")],
                "mx.test": [dns.Record_A("192.0.2.1")],
            }
        )
        self.assertEqual(self.hosts(resolver), [MXHost("mx.test", "192.0.2.1", 25)])

    def test_fallback_aaaa_only(self) -> None:
        resolver = FakeResolver({"example.com": [dns.Record_AAAA("2001:db8::5")]})
        self.assertEqual(self.hosts(resolver), [MXHost("example.com", "2001:db8::5", 25)])

    def test_fallback_nxdomain_is_permanent(self) -> None:
        resolver = FakeResolver(
            {"example.com": []},
            {
                ("example.com", dns.A): DNSNameError(),
                ("example.com", dns.AAAA): DNSNameError(),
            },
        )
        self.assertEqual(
            self.reply(resolver, PermanentDNSError),
            "550 5.1.2 domain example.com does not exist (NXDOMAIN)",
        )

    def test_fallback_without_addresses_is_permanent(self) -> None:
        resolver = FakeResolver({"example.com": [dns.Record_TXT(b"v=spf1 -all")]})
        self.assertEqual(
            self.reply(resolver, PermanentDNSError),
            "550 5.1.2 domain example.com has no MX and no address records",
        )

    def test_fallback_servfail_is_temporary(self) -> None:
        resolver = FakeResolver(
            {"example.com": []}, {("example.com", dns.A): DNSServerError()}
        )
        self.assertEqual(
            self.reply(resolver, TemporaryDNSError),
            "451 4.4.3 DNS lookup of example.com failed: SERVFAIL",
        )


class BadHostTests(SynchronousTestCase):
    """L{MXResolver.mark_bad} and L{MXResolver.mark_good} on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mx = MXResolver(
            FakeResolver(
                {
                    "example.com": [_mx(10, "mx1.test"), _mx(20, "mx2.test")],
                    "mx1.test": [dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.11")],
                    "mx2.test": [dns.Record_A("192.0.2.2")],
                }
            ),
            self.clock,
            policy=ANY_ADDRESS,
            bad_timeout=300,
        )
        self.first, self.second, self.third = self.addresses()

    def addresses(self) -> list[MXHost]:
        return self.successResultOf(_hosts(self.mx, "example.com"))

    def test_bad_host_moves_to_end_until_timeout(self) -> None:
        self.mx.mark_bad(self.first)
        self.assertEqual(self.addresses(), [self.second, self.third, self.first])
        self.clock.advance(299)
        self.assertEqual(self.addresses(), [self.second, self.third, self.first])
        self.clock.advance(1)
        self.assertEqual(self.addresses(), [self.first, self.second, self.third])

    def test_marked_by_address(self) -> None:
        """The other address of the same MX name keeps its place."""
        self.assertEqual(self.first.name, self.second.name)
        self.mx.mark_bad(self.first)
        self.assertEqual(self.addresses()[0], self.second)

    def test_all_bad_still_tried(self) -> None:
        for host in (self.first, self.second, self.third):
            self.mx.mark_bad(host)
        self.assertEqual(self.addresses(), [self.first, self.second, self.third])

    def test_mark_good(self) -> None:
        self.mx.mark_bad(self.first)
        self.mx.mark_good(self.first)
        self.assertEqual(self.addresses(), [self.first, self.second, self.third])


class _FakeUDPPort:
    def __init__(self, sent: list[tuple[bytes, Any]]) -> None:
        self._sent = sent

    def write(self, datagram: bytes, address: Any) -> None:
        self._sent.append((datagram, address))

    def stopListening(self) -> None:
        pass


class _UDPMemoryReactor(MemoryReactorClock):
    """A memory reactor whose UDP ports record the datagrams sent."""

    def __init__(self) -> None:
        super().__init__()
        self.datagrams: list[tuple[bytes, Any]] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> _FakeUDPPort:
        transport = _FakeUDPPort(self.datagrams)
        protocol.makeConnection(transport)
        return transport


class ResolverTests(SynchronousTestCase):
    """L{make_resolver} and L{CachingResolver}."""

    def test_unanswered_queries_time_out(self) -> None:
        """
        With no answer, a lookup is retried after 1 and 3 seconds and given up
        5 seconds later, as a temporary failure.
        """
        reactor = _UDPMemoryReactor()
        mx = MXResolver(make_resolver([("192.0.2.53", 53)], reactor), reactor, policy=ANY_ADDRESS)
        d = _hosts(mx, "example.com")
        reactor.advance(1)
        reactor.advance(3)
        self.assertNoResult(d)
        reactor.advance(5)
        failure = self.failureResultOf(d, TemporaryDNSError)
        self.assertEqual(
            failure.value.reply, "451 4.4.3 DNS lookup of example.com failed: timeout"
        )
        self.assertEqual(
            [address for _datagram, address in reactor.datagrams], [("192.0.2.53", 53)] * 3
        )

    def test_make_resolver_from_resolv_conf(self) -> None:
        self.assertIsInstance(make_resolver(None, MemoryReactorClock()), CachingResolver)

    def test_cached_until_ttl_expires(self) -> None:
        clock = Clock()
        upstream = FakeResolver({"example.com": [_mx(10, "mx.test", ttl=60)]})
        resolver = CachingResolver(upstream, clock)
        first = self.successResultOf(resolver.lookupMailExchange("example.com"))
        second = self.successResultOf(resolver.lookupMailExchange("example.com"))
        self.assertEqual(len(upstream.queries), 1)
        self.assertEqual(
            [rr.payload for rr in first[0]], [rr.payload for rr in second[0]]
        )
        clock.advance(60)
        self.successResultOf(resolver.lookupMailExchange("example.com"))
        self.assertEqual(len(upstream.queries), 2)

    def test_errors_not_cached(self) -> None:
        upstream = FakeResolver({})
        resolver = CachingResolver(upstream, Clock())
        for _ in range(2):
            self.failureResultOf(resolver.lookupMailExchange("example.com"), DNSNameError)
        self.assertEqual(len(upstream.queries), 2)

    def test_clear(self) -> None:
        clock = Clock()
        upstream = FakeResolver({"example.com": [_mx(10, "mx.test")]})
        resolver = CachingResolver(upstream, clock)
        self.successResultOf(resolver.lookupMailExchange("example.com"))
        resolver.clear()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.successResultOf(resolver.lookupMailExchange("example.com"))
        self.assertEqual(len(upstream.queries), 2)


class RelayHostTests(SynchronousTestCase):
    def test_ipv4_literal(self) -> None:
        resolver = FakeResolver({})
        relay = RelayHost(resolver, "127.0.0.1", 2525)
        self.assertEqual(
            self.successResultOf(_hosts(relay, "example.com")),
            [MXHost("127.0.0.1", "127.0.0.1", 2525)],
        )
        self.assertEqual(resolver.queries, [])

    def test_ipv6_literal(self) -> None:
        relay = RelayHost(FakeResolver({}), "::1", 25)
        self.assertEqual(
            self.successResultOf(_hosts(relay, "example.com")), [MXHost("::1", "::1", 25)]
        )

    def test_name(self) -> None:
        resolver = FakeResolver(
            {"relay.test": [dns.Record_AAAA("2001:db8::1"), dns.Record_A("192.0.2.1")]}
        )
        relay = RelayHost(resolver, "relay.test", 587)
        self.assertEqual(
            self.successResultOf(_hosts(relay, "example.com")),
            [MXHost("relay.test", "192.0.2.1", 587), MXHost("relay.test", "2001:db8::1", 587)],
        )

    def test_unresolvable_name_is_temporary(self) -> None:
        relay = RelayHost(FakeResolver({}), "relay.test", 25)
        failure = self.failureResultOf(_hosts(relay, "example.com"), TemporaryDNSError)
        self.assertEqual(
            failure.value.reply, "451 4.4.3 relay host relay.test does not resolve: NXDOMAIN"
        )

    def test_mark_bad(self) -> None:
        clock = Clock()
        relay = RelayHost(
            FakeResolver({"relay.test": [dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.2")]}),
            "relay.test",
            25,
            clock=clock,
            bad_timeout=10,
        )
        first, second = self.successResultOf(_hosts(relay, "example.com"))
        relay.mark_bad(first)
        self.assertEqual(self.successResultOf(_hosts(relay, "example.com")), [second, first])
        clock.advance(10)
        self.assertEqual(self.successResultOf(_hosts(relay, "example.com")), [first, second])


class ParseHostPortTests(SynchronousTestCase):
    def test_valid(self) -> None:
        cases = {
            "mail.example.com": ("mail.example.com", 25),
            "mail.example.com:2525": ("mail.example.com", 2525),
            "127.0.0.1": ("127.0.0.1", 25),
            "127.0.0.1:587": ("127.0.0.1", 587),
            "[::1]:2525": ("::1", 2525),
            "[::1]": ("::1", 25),
            "::1": ("::1", 25),
            "2001:db8::25": ("2001:db8::25", 25),
        }
        self.assertEqual({value: parse_hostport(value, 25) for value in cases}, cases)

    def test_invalid(self) -> None:
        for value in ["", ":25", "host:", "host:0", "host:65536", "host:x", "[::1", "[::1]x",
                      "[host]:25", "a:b:c"]:
            self.assertRaises(ValueError, parse_hostport, value, 25)


class HostsFileTests(SynchronousTestCase):
    def test_hosts_file_before_the_given_nameservers_only_when_asked(self) -> None:
        """issue 14 (review): webhook names in /etc/hosts resolve with --nameserver given; MX lookups never read it."""
        from mmgun.mx import make_resolver

        reactor = MemoryReactorClock()
        with_hosts = make_resolver([("192.0.2.53", 53)], reactor, hosts_file=True)
        answers, _, _ = self.successResultOf(with_hosts.lookupAddress("localhost"))
        self.assertIn("127.0.0.1", [a.payload.dottedQuad() for a in answers if a.type == dns.A])
        # Answered from the file: nothing but the cache's expiry is scheduled (no query under way).
        scheduled = [c.func.__name__ for c in reactor.getDelayedCalls()]  # type: ignore[attr-defined]
        self.assertEqual(scheduled, ["clearEntry"])
        other = MemoryReactorClock()
        without = make_resolver([("192.0.2.53", 53)], other)
        # Straight to the nameserver — which this reactor cannot even send a datagram to.
        self.failureResultOf(without.lookupAddress("localhost"), AttributeError)
