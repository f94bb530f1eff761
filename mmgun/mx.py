"""
Where to deliver: MX resolution for outgoing mail (RFC 5321 section 5.1).

L{MXResolver} turns a recipient domain into the ordered list of L{MXHost}
addresses the sender should try; L{RelayHost} does the same for a configured
smarthost.  Both remember hosts that failed (L{MXResolver.mark_bad}) and move
them to the end of the list for a while.

Failures are classified for the sender: L{PermanentDNSError} (bounce the
domain's recipients) or L{TemporaryDNSError} (defer them), each carrying the
SMTP-style C{reply} to record against the recipients.

L{make_resolver} builds the caching C{twisted.names} resolver to use.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from random import Random
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.mail.relaymanager import MXCalculator
from twisted.names import client, common, dns, hosts as hosts_module, resolve
from twisted.names.cache import CacheResolver
from twisted.names.error import (
    AuthoritativeDomainError,
    DNSFormatError,
    DNSNameError,
    DNSNotImplementedError,
    DNSQueryRefusedError,
    DNSServerError,
    DNSUnknownError,
    DomainError,
)
from zope.interface import implementer

_log = Logger()

#: Seconds to wait for each round of queries to the nameservers before retrying;
#: a lookup gives up after their sum.  client.Resolver's default (1, 3, 11, 45)
#: would hold a delivery attempt for a minute.
DEFAULT_TIMEOUT: tuple[int, ...] = (1, 3, 5)

#: A Timeout as accepted by the IResolver lookup methods.
_Timeout = Sequence[int] | None


@attrs.frozen
class MXHost:
    """
    One address to connect to.

    @ivar name: The MX host name, or the domain itself for the A/AAAA fallback,
        or the relay host as configured.
    @ivar address: An IPv4 or IPv6 address literal.
    @ivar port: The TCP port.
    """

    name: str
    address: str
    port: int


class DNSError(Exception):
    """
    Resolution failed; C{reply} is the SMTP-style reply to record for the
    recipients ("550 5.1.2 ...", "451 4.4.3 ...").
    """

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class PermanentDNSError(DNSError):
    """The domain cannot receive mail: its recipients fail permanently."""


class TemporaryDNSError(DNSError):
    """Resolution failed for now: the domain's recipients are deferred."""


class HostSource(Protocol):
    """What the sender needs: L{MXResolver} and L{RelayHost} both provide it."""

    async def hosts(self, domain: str) -> list[MXHost]: ...

    def mark_bad(self, host: MXHost) -> None: ...

    def mark_good(self, host: MXHost) -> None: ...


# Which twisted.names exception stands for which outcome.  Careful: every
# rcode exception (DNSServerError for SERVFAIL, DNSQueryRefusedError, ...) is
# a subclass of DomainError, so only DNSNameError (NXDOMAIN from a server)
# and AuthoritativeDomainError (NXDOMAIN from an in-process authority, which
# is not a DomainError at all) mean "does not exist".
_NXDOMAIN = (DNSNameError, AuthoritativeDomainError)
_RCODE_NAMES: dict[type[Exception], str] = {
    DNSServerError: "SERVFAIL",
    DNSQueryRefusedError: "REFUSED",
    DNSFormatError: "FORMERR",
    DNSNotImplementedError: "NOTIMP",
}


def _is_nxdomain(error: BaseException) -> bool:
    return isinstance(error, _NXDOMAIN)


def _reason(error: BaseException) -> str:
    """A short description of a failed lookup, for replies and logs."""
    if _is_nxdomain(error):
        return "NXDOMAIN"
    for cls, name in _RCODE_NAMES.items():
        if isinstance(error, cls):
            return name
    if isinstance(error, DNSUnknownError):
        message = error.args[0] if error.args else None
        if isinstance(message, dns.Message):
            return f"rcode {message.rCode}"
        return "unknown rcode"
    # client.Resolver gives up with a plain defer.TimeoutError, not the
    # DNSQueryTimeoutError (a subclass) its individual attempts raise.
    if isinstance(error, TimeoutError):
        return "timeout"
    if type(error) is DomainError:
        # Raised by resolvers that have no answer at all (e.g. an empty chain).
        return "no answer"
    return f"{type(error).__name__}: {error}"


def _temporary(domain: str, error: BaseException) -> TemporaryDNSError:
    return TemporaryDNSError(f"451 4.4.3 DNS lookup of {domain} failed: {_reason(error)}")


def _nxdomain(domain: str) -> PermanentDNSError:
    return PermanentDNSError(f"550 5.1.2 domain {domain} does not exist (NXDOMAIN)")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _addresses_from(records: Sequence[dns.RRHeader], name: str | None = None) -> list[str]:
    """
    The A then the AAAA addresses in C{records} (owned by C{name} if given)
    as address literals.
    """
    ipv4: list[str] = []
    ipv6: list[str] = []
    for rr in records:
        if name is not None and str(rr.name).lower() != name:
            continue
        if rr.type == dns.A:
            ipv4.append(rr.payload.dottedQuad())
        elif rr.type == dns.AAAA:
            ipv6.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
    return ipv4 + ipv6


@attrs.frozen
class _Addresses:
    """The outcome of looking up a name's A and AAAA records."""

    addresses: list[str]
    errors: list[BaseException]

    @property
    def nxdomain(self) -> bool:
        return any(_is_nxdomain(e) for e in self.errors)

    @property
    def temporary(self) -> BaseException | None:
        """The first error other than NXDOMAIN, if any."""
        return next((e for e in self.errors if not _is_nxdomain(e)), None)


async def _lookup_addresses(resolver: IResolver, name: str) -> _Addresses:
    """
    Look up A and AAAA for C{name} concurrently; IPv4 addresses come first.
    Never raises: failures are collected, and logged, in the result.
    """
    lookups = [
        ("A", resolver.lookupAddress(name)),
        ("AAAA", resolver.lookupIPV6Address(name)),
    ]
    addresses: list[str] = []
    errors: list[BaseException] = []
    for rtype, lookup in lookups:
        try:
            answers, _authority, _additional = await lookup
        except Exception as e:
            errors.append(e)
            _log.info(
                "DNS {rtype} lookup of {name} failed: {reason}",
                rtype=rtype,
                name=name,
                reason=_reason(e),
            )
        else:
            addresses.extend(_addresses_from(answers))
    return _Addresses(addresses, errors)


def _is_bad(marks: MXCalculator, key: str) -> bool:
    """
    Whether C{key} is marked bad in C{marks} and its timeout has not passed
    (the check C{MXCalculator.getMX} makes, which we do not use).
    """
    until = marks.badMXs.get(key)
    if until is None:
        return False
    if marks.clock.seconds() >= until:
        del marks.badMXs[key]
        return False
    return True


def _bad_last(marks: MXCalculator, hosts: list[MXHost]) -> list[MXHost]:
    """C{hosts}, those marked bad moved to the end, order otherwise kept."""
    # Bad hosts are still tried, last: if every MX is marked bad the only
    # alternative would be not to try at all.
    bad = [_is_bad(marks, host.address) for host in hosts]
    return [h for h, b in zip(hosts, bad) if not b] + [h for h, b in zip(hosts, bad) if b]


class MXResolver(MXCalculator):
    """
    The hosts to deliver a domain's mail to, per RFC 5321 section 5.1, with
    null MX (RFC 7505) and IPv6.

    Built on L{MXCalculator} for its bad-host bookkeeping only: its C{getMX}
    picks a single host, knows neither AAAA nor null MX, and treats every
    error as "no MX", so it is not used.
    """

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        port: int = 25,
        *,
        bad_timeout: float = 300.0,
        random: Random | None = None,
    ) -> None:
        MXCalculator.__init__(self, resolver, clock)
        self.timeOutBadMX = bad_timeout
        self.port = port
        self._random = random if random is not None else Random()

    def mark_bad(self, host: MXHost) -> None:
        """
        C{host} failed: put it last for C{bad_timeout} seconds.  Keyed by
        address, so the other addresses of the same MX name are unaffected.
        """
        self.markBad(host.address)

    def mark_good(self, host: MXHost) -> None:
        """C{host} worked: forget that it failed."""
        self.markGood(host.address)

    async def hosts(self, domain: str) -> list[MXHost]:
        """
        All hosts to try for C{domain}, best first.

        MX records in preference order, equal preferences shuffled, each
        expanded to its A then AAAA addresses (from the additional section if
        the server sent them there); hosts marked bad come last.  Without MX
        records, the domain's own addresses.  Never empty.

        @raise PermanentDNSError: NXDOMAIN, null MX, or neither MX nor address
            records.
        @raise TemporaryDNSError: Any other failure, including MX hosts none
            of which has an address.
        """
        try:
            answers, _authority, additional = await self.resolver.lookupMailExchange(domain)
        except Exception as e:
            if _is_nxdomain(e):
                _log.info("DNS MX lookup of {domain}: NXDOMAIN", domain=domain)
                raise _nxdomain(domain) from e
            _log.warn(
                "DNS MX lookup of {domain} failed: {reason}", domain=domain, reason=_reason(e)
            )
            raise _temporary(domain, e) from e

        records = [rr.payload for rr in answers if rr.type == dns.MX]
        if not records:
            return _bad_last(self, await self._fallback(domain))

        # RFC 7505: a single MX of "." says the domain accepts no mail.  A
        # null MX mixed with real ones (a misconfiguration) is ignored.
        exchanges = [mx for mx in records if str(mx.name) not in ("", ".")]
        if not exchanges:
            raise PermanentDNSError(f"556 5.1.10 {domain} accepts no mail (null MX, RFC 7505)")

        names = self._ordered_names(exchanges)
        found = await self._expand(names, additional)
        result = [
            MXHost(name, address, self.port) for name, addresses in found for address in addresses
        ]
        if not result:
            _log.warn(
                "no MX host of {domain} has an address: {names}", domain=domain, names=names
            )
            raise TemporaryDNSError(f"451 4.4.4 no MX host of {domain} has an address")
        return _bad_last(self, _unique(result))

    def _ordered_names(self, exchanges: list[dns.Record_MX]) -> list[str]:
        """MX names by preference, shuffled within a preference (RFC 5321 5.1)."""
        by_preference: dict[int, list[str]] = {}
        for mx in exchanges:
            by_preference.setdefault(mx.preference, []).append(str(mx.name).lower().rstrip("."))
        names: list[str] = []
        for preference in sorted(by_preference):
            group = by_preference[preference]
            self._random.shuffle(group)
            for name in group:
                if name not in names:
                    names.append(name)
        return names

    async def _expand(
        self, names: list[str], additional: Sequence[dns.RRHeader]
    ) -> list[tuple[str, list[str]]]:
        """Each of C{names} with its addresses, looked up concurrently if needed."""
        pending: dict[str, Deferred[_Addresses]] = {}
        known: dict[str, list[str]] = {}
        for name in names:
            glue = _addresses_from(additional, name)
            if glue:
                known[name] = glue
            else:
                pending[name] = Deferred.fromCoroutine(_lookup_addresses(self.resolver, name))
        for name, lookup in pending.items():
            known[name] = (await lookup).addresses
        return [(name, known[name]) for name in names]

    async def _fallback(self, domain: str) -> list[MXHost]:
        """The implicit MX: the domain's own A/AAAA (RFC 5321 section 5.1)."""
        found = await _lookup_addresses(self.resolver, domain)
        if found.addresses:
            return _unique([MXHost(domain, a, self.port) for a in found.addresses])
        if (error := found.temporary) is not None:
            raise _temporary(domain, error) from error
        if found.nxdomain:
            raise _nxdomain(domain)
        raise PermanentDNSError(f"550 5.1.2 domain {domain} has no MX and no address records")


class RelayHost:
    """
    The configured smarthost (C{--relay-host}): every domain goes there.

    A name that does not resolve is a configuration problem, not the
    recipients' fault, so every failure is a L{TemporaryDNSError}.

    Bad-host ordering only matters when the name has several addresses, and
    needs C{clock}; without it L{mark_bad} and L{mark_good} do nothing.
    """

    def __init__(
        self,
        resolver: IResolver,
        host: str,
        port: int,
        *,
        clock: IReactorTime | None = None,
        bad_timeout: float = 300.0,
    ) -> None:
        self.resolver = resolver
        self.host = host
        self.port = port
        self._marks: MXCalculator | None = None
        if clock is not None:
            self._marks = MXCalculator(resolver, clock)
            self._marks.timeOutBadMX = bad_timeout

    def mark_bad(self, host: MXHost) -> None:
        """C{host} failed: put it last for C{bad_timeout} seconds."""
        if self._marks is not None:
            self._marks.markBad(host.address)

    def mark_good(self, host: MXHost) -> None:
        """C{host} worked: forget that it failed."""
        if self._marks is not None:
            self._marks.markGood(host.address)

    async def hosts(self, domain: str) -> list[MXHost]:
        """The relay's addresses (A then AAAA), whatever C{domain} is."""
        if _is_ip_literal(self.host):
            return [MXHost(self.host, self.host, self.port)]
        found = await _lookup_addresses(self.resolver, self.host)
        if not found.addresses:
            error = found.temporary or (found.errors[0] if found.errors else None)
            reason = _reason(error) if error is not None else "no address records"
            _log.warn(
                "relay host {host} does not resolve: {reason}", host=self.host, reason=reason
            )
            raise TemporaryDNSError(f"451 4.4.3 relay host {self.host} does not resolve: {reason}")
        result = _unique([MXHost(self.host, a, self.port) for a in found.addresses])
        return result if self._marks is None else _bad_last(self._marks, result)


def _unique(hosts: list[MXHost]) -> list[MXHost]:
    """C{hosts} without repeated addresses (the first occurrence is kept)."""
    seen: set[tuple[str, int]] = set()
    result = []
    for host in hosts:
        key = (host.address, host.port)
        if key not in seen:
            seen.add(key)
            result.append(host)
    return result


@implementer(IResolver)
class CachingResolver(common.ResolverBase):
    """
    Answers from memory while their TTL lasts, otherwise asks C{upstream}.

    C{createResolver}'s chain does include a L{CacheResolver}, but nothing on
    the client side ever fills it (only C{DNSServerFactory} calls
    C{cacheResult}), so that chain caches nothing.  This does.

    Successful answers with at least one record are cached for their smallest
    TTL (a NODATA answer for the TTL of its SOA); errors such as NXDOMAIN are
    not cached.
    """

    def __init__(self, upstream: IResolver, reactor: IReactorTime) -> None:
        super().__init__()
        self.upstream = upstream
        self.cache = CacheResolver(reactor=reactor)

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: _Timeout
    ) -> Deferred[tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]]:
        return Deferred.fromCoroutine(self._query(dns.Query(name, type, cls), timeout))

    async def _query(
        self, query: dns.Query, timeout: _Timeout
    ) -> tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]:
        try:
            return await self.cache.query(query, timeout)
        except DomainError:
            pass  # a miss, or expired
        result = await self.upstream.query(query, timeout)
        if any(result):
            self.cache.cacheResult(query, result)
        return result

    def clear(self) -> None:
        """Forget everything, and cancel the timers that would expire entries."""
        for call in self.cache.cancel.values():
            if call.active():
                call.cancel()
        self.cache.cancel.clear()
        self.cache.cache.clear()


def make_resolver(
    nameservers: list[tuple[str, int]] | None,
    reactor: IReactorTime,
    timeout: Sequence[int] = DEFAULT_TIMEOUT,
) -> CachingResolver:
    """
    A caching C{twisted.names} resolver.

    @param nameservers: (address, port) of the nameservers to ask (tried in
        order, then round-robin on timeouts); L{None} for those in
        C{/etc/resolv.conf}, with C{/etc/hosts} consulted first.
    @param reactor: Also an C{IReactorUDP} and C{IReactorTCP}.
    @param timeout: Seconds per round of queries before retrying.
    """
    upstream: IResolver
    if nameservers is not None:
        # Not createResolver(servers=...): that also reads /etc/resolv.conf
        # and falls back to its servers, and ignores our reactor.
        upstream = client.Resolver(
            servers=list(nameservers), timeout=tuple(timeout), reactor=reactor
        )
    else:
        upstream = resolve.ResolverChain(
            [
                hosts_module.Resolver(b"/etc/hosts", ttl=300),
                client.Resolver(
                    resolv=b"/etc/resolv.conf", timeout=tuple(timeout), reactor=reactor
                ),
            ]
        )
    return CachingResolver(upstream, reactor)


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    """
    Split C{"host"}, C{"host:2525"}, C{"[::1]:2525"}, C{"[::1]"}, C{"::1"} or
    C{"127.0.0.1:25"} into host and port.

    @raise ValueError: For an empty host or a port that is not 1-65535.
    """
    text = value.strip()
    port_text: str | None = None
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise ValueError(f"unclosed '[' in {value!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"unexpected {rest!r} after ']' in {value!r}")
            port_text = rest[1:]
        if not _is_ip_literal(host) or ":" not in host:
            raise ValueError(f"not an IPv6 address in brackets: {value!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        # No colon, or a bare IPv6 address (which cannot carry a port).
        host = text
        if ":" in host and not _is_ip_literal(host):
            raise ValueError(f"invalid host {value!r}")
    if not host:
        raise ValueError(f"no host in {value!r}")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port in {value!r}")
    return host, int(port_text)
