"""
A tiny authoritative DNS server for mmgun's MX resolution tests.

It is authoritative for every name: a name missing from the records gets
NXDOMAIN, a name present without records of the asked type gets an empty
NOERROR answer.  A name whose value is L{SERVFAIL} is answered with SERVFAIL;
one whose value is L{TIMEOUT} is never answered; one whose value is
L{TRUNCATED} gets an empty answer with the TC bit set, over UDP and over TCP
alike (a hostile server: over TCP there is nothing bigger to retry with).

Zone text (L{parse_zone}) has one record per line, ``name TTL TYPE data``::

    # comment
    example.test      60 MX    10 mx1.example.test
    mx1.example.test  60 A     127.0.0.2
    mx1.example.test  60 AAAA  ::1
    www.example.test  60 CNAME example.test
    nullmx.test       60 MX    0 .          # RFC 7505 null MX
    broken.test          SERVFAIL
    silent.test          TIMEOUT
    loop.test            TRUNCATED

Names are case-insensitive and may end with a dot.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.server import DNSServerFactory
from twisted.python.failure import Failure

from mmgun.testing.ports import port_number

__all__ = [
    "SERVFAIL",
    "TIMEOUT",
    "TRUNCATED",
    "Records",
    "ZoneResolver",
    "dns_server_factory",
    "listen_dns",
    "parse_zone",
]

SERVFAIL = "SERVFAIL"
TIMEOUT = "TIMEOUT"
TRUNCATED = "TRUNCATED"
_SCRIPTED = (SERVFAIL, TIMEOUT, TRUNCATED)

Record: TypeAlias = (
    dns.Record_A | dns.Record_AAAA | dns.Record_MX | dns.Record_CNAME | dns.Record_TXT
)
Records: TypeAlias = Mapping[str, Sequence[Record] | str]

# Plenty for any zone a test writes; stops a CNAME loop.
_MAX_CNAME_CHAIN = 8


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().rstrip(".")


class _ScriptedServerFailure(Exception):
    """
    The zone asked for SERVFAIL; not an error worth logging.
    """


class _ScriptedTruncation(Exception):
    """The zone asked for a truncated answer."""


class ZoneResolver(ResolverBase):
    """
    An in-memory L{twisted.internet.interfaces.IResolver} over C{records}.

    The DNS server answers from one of these; unit tests that need no sockets
    can hand one straight to the code under test.
    """

    def __init__(self, records: Records) -> None:
        super().__init__()
        self._records: dict[str, Sequence[Record] | str] = {
            _key(name): value for name, value in records.items()
        }
        self._parents = {
            parent
            for name in self._records
            for parent in (
                name.split(".", i)[-1] for i in range(1, name.count(".") + 1)
            )
        }

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: object
    ) -> Deferred[tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]]:
        answers: list[dns.RRHeader] = []
        owner = name
        for _ in range(_MAX_CNAME_CHAIN):
            value = self._records.get(_key(owner))
            if value is None:
                if answers or _key(owner) in self._parents:
                    # A dangling CNAME, or an empty non-terminal: no data.
                    break
                return fail(dns.AuthoritativeDomainError(name))
            if value == SERVFAIL:
                return fail(_ScriptedServerFailure(name))
            if value == TIMEOUT:
                return Deferred()
            if value == TRUNCATED:
                return fail(_ScriptedTruncation(name))
            assert not isinstance(value, str)
            matching = [r for r in value if type in (r.TYPE, dns.ALL_RECORDS)]
            answers.extend(_header(owner, r) for r in matching)
            cname = [r for r in value if isinstance(r, dns.Record_CNAME)]
            if matching or not cname:
                break
            answers.extend(_header(owner, r) for r in cname)
            # Twisted declares SimpleRecord.name as a class attribute "= None"; __init__ sets a Name.
            owner = cname[0].name.name  # type: ignore[attr-defined]
        return succeed((answers, [], []))


def _header(owner: bytes, record: Record) -> dns.RRHeader:
    return dns.RRHeader(
        owner,
        record.TYPE,
        dns.IN,
        record.ttl if record.ttl is not None else 60,
        record,
        auth=True,
    )


class _StubDNSServerFactory(DNSServerFactory):
    noisy = False

    def __init__(
        self, *args: Any, queries: list[tuple[str, int, str]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.queries = queries

    def handleQuery(
        self,
        message: dns.Message,
        protocol: dns.DNSProtocol | dns.DNSDatagramProtocol,
        address: tuple[str, int] | None,
    ) -> Any:
        if self.queries is not None:
            transport = "udp" if isinstance(protocol, dns.DNSDatagramProtocol) else "tcp"
            for query in message.queries:
                self.queries.append((_key(query.name.name), query.type, transport))
        return super().handleQuery(message, protocol, address)

    def gotResolverError(
        self,
        failure: Failure,
        protocol: dns.DNSProtocol | dns.DNSDatagramProtocol,
        message: dns.Message,
        address: tuple[str, int] | None,
    ) -> None:
        if failure.check(_ScriptedServerFailure):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        if failure.check(_ScriptedTruncation):
            response = self._responseFromMessage(message=message, rCode=dns.OK)
            response.trunc = 1
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


def dns_server_factory(
    records: Records,
    *,
    verbose: int = 0,
    queries: list[tuple[str, int, str]] | None = None,
) -> DNSServerFactory:
    """
    A DNS server factory answering from C{records}: use it with C{listenTCP}
    and, wrapped in L{dns.DNSDatagramProtocol}, with C{listenUDP}
    (L{listen_dns} does both).

    @param records: names (case-insensitive) to lists of C{dns.Record_*}, or
        to L{SERVFAIL}, L{TIMEOUT} or L{TRUNCATED}.
    @param queries: if given, each query received is appended to it as
        (name, type, "udp" or "tcp").
    """
    return _StubDNSServerFactory(
        authorities=[ZoneResolver(records)], verbose=verbose, queries=queries
    )


class _UDPAndTCPReactor(Protocol):
    def listenUDP(
        self, port: int, protocol: dns.DNSDatagramProtocol, interface: str = ...
    ) -> IListeningPort: ...

    def listenTCP(
        self,
        port: int,
        factory: ServerFactory,
        backlog: int = ...,
        interface: str = ...,
    ) -> IListeningPort: ...


def listen_dns(
    reactor: _UDPAndTCPReactor,
    records: Records,
    interface: str = "127.0.0.1",
    port: int = 0,
    *,
    queries: list[tuple[str, int, str]] | None = None,
) -> tuple[IListeningPort, IListeningPort]:
    """
    Serve C{records} on UDP and TCP on the same port number.

    @param port: 0 picks a port free for both protocols.
    @param queries: as for L{dns_server_factory}.
    @return: the UDP and TCP listening ports; C{port_number(udp)} is the
        port number.
    """
    factory = dns_server_factory(records, queries=queries)
    for _ in range(50):
        protocol = dns.DNSDatagramProtocol(controller=factory)
        protocol.noisy = False
        udp = reactor.listenUDP(port, protocol, interface=interface)
        chosen = port_number(udp)
        try:
            tcp = reactor.listenTCP(chosen, factory, interface=interface)
        except CannotListenError:
            udp.stopListening()
            if port:
                raise
            continue
        return udp, tcp
    raise CannotListenError(
        interface, port, OSError("no port free for both UDP and TCP")
    )


def parse_zone(text: str) -> dict[str, list[Record] | str]:
    """
    Parse the zone format described in this module's docstring.

    @raise ValueError: naming the line of the first malformed record.
    """
    records: dict[str, list[Record] | str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            name = _key(fields[0])
            rest = fields[1:]
            if rest and rest[0].isdigit():
                ttl: int | None = int(rest[0])
                rest = rest[1:]
            else:
                ttl = None
            if not rest:
                raise ValueError("missing record type")
            rtype, data = rest[0].upper(), rest[1:]
            existing = records.get(name)
            if rtype in _SCRIPTED:
                if data or existing is not None:
                    raise ValueError(f"{rtype} must be the only entry for {name}")
                records[name] = rtype
                continue
            if isinstance(existing, str):
                raise ValueError(f"{name} is already {existing}")
            record = _record(rtype, data, ttl if ttl is not None else 60)
            if existing is None:
                existing = records[name] = []
            existing.append(record)
        except ValueError as e:
            raise ValueError(f"zone line {lineno}: {e}: {line.strip()!r}") from e
    return records


def _record(rtype: str, data: list[str], ttl: int) -> Record:
    def need(n: int) -> None:
        if len(data) != n:
            raise ValueError(f"{rtype} takes {n} field(s)")

    if rtype == "A":
        need(1)
        return dns.Record_A(str(ipaddress.IPv4Address(data[0])), ttl=ttl)
    if rtype == "AAAA":
        need(1)
        return dns.Record_AAAA(str(ipaddress.IPv6Address(data[0])), ttl=ttl)
    if rtype == "MX":
        need(2)
        # "." is the root: a null MX (RFC 7505) has preference 0 and exchange ".".
        return dns.Record_MX(int(data[0]), _key(data[1]).encode("ascii"), ttl=ttl)
    if rtype == "CNAME":
        need(1)
        return dns.Record_CNAME(_key(data[0]).encode("ascii"), ttl=ttl)
    if rtype == "TXT":
        if not data:
            raise ValueError("TXT needs text")
        return dns.Record_TXT(" ".join(data).strip('"').encode("utf-8"), ttl=ttl)
    raise ValueError(f"unsupported record type {rtype}")
