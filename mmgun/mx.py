"""
Where to deliver: MX resolution for outgoing mail (RFC 5321 section 5.1).

L{MXResolver} turns a recipient domain into the ordered list of L{MXHost}
addresses the sender should try; L{RelayHost} does the same for a configured
smarthost.  Both remember hosts that failed (L{MXResolver.mark_bad}) and move
them to the end of the list for a while.

Failures are classified for the sender: L{PermanentDNSError} (bounce the
domain's recipients) or L{TemporaryDNSError} (defer them), each carrying the
SMTP-style C{reply} to record against the recipients.

What DNS says is not trusted blindly.  An L{AddressPolicy} screens the
addresses an MX resolves to: L{PublicOnly}, the daemon's default, refuses
loopback, private, link-local, CGNAT, multicast, reserved and documentation
addresses and this host's own (L{LocalAddresses}), so that a recipient domain
cannot point mmgun at services on its own host or network; L{ANY_ADDRESS}
(C{--allow-private-mx}) accepts everything.  At most C{max_names} MX names are
looked up and C{address_limit} addresses returned.

L{make_resolver} builds the caching C{twisted.names} resolver to use; its
lookups have an overall deadline and a bounded number of queries, and a
truncated answer over TCP is a temporary failure (L{TruncatedAnswerError}).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Collection, Sequence
from random import Random
from typing import Any, Protocol, TypeVar, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
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
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger()

_T = TypeVar("_T")

#: Seconds to wait for each round of queries to the nameservers before retrying;
#: a lookup gives up after their sum.  client.Resolver's default (1, 3, 11, 45)
#: would hold a delivery attempt for a minute.
DEFAULT_TIMEOUT: tuple[int, ...] = (1, 3, 5)

#: A Timeout as accepted by the IResolver lookup methods.
_Timeout = Sequence[int] | None

#: MX names looked up per domain, best first; the rest are ignored.  A domain
#: with 300 MX names made 633 queries per attempt without it (issue 11).
DEFAULT_MAX_NAMES = 10

#: Addresses returned per domain, best first (Postfix's smtp_mx_address_limit).
DEFAULT_ADDRESS_LIMIT = 5

#: What L{MXResolver.hosts} may be given to put some MX names first (an MTA-STS policy's
#: C{mx} patterns): called once the MX records are in, it gives a predicate on MX names, or
#: None for the usual order.
NamePreference = Callable[[], Awaitable[Callable[[str], bool] | None]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class MXHost:
    """
    One address to connect to.

    @ivar name: The MX host name, or the domain itself for the A/AAAA fallback,
        or the relay host as configured.
    @ivar address: An IPv4 or IPv6 address literal.
    @ivar port: The TCP port.
    @ivar mta_sts: The recipient domain whose MTA-STS policy in C{enforce}
        mode this host is used under (L{mmgun.mtasts}): it may only be
        delivered to over STARTTLS with a certificate valid for C{name};
        L{None} for an ordinary host.
    """

    name: str
    address: str
    port: int
    mta_sts: str | None = attrs.field(default=None, kw_only=True)


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
    if isinstance(error, TruncatedAnswerError):
        return "truncated answer over TCP"
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


# -- which addresses mmgun may connect to --------------------------------------

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(*spec: tuple[str, str]) -> list[tuple[_Network, str]]:
    return [(ipaddress.ip_network(network), name) for network, name in spec]


# The address blocks of the IANA special-purpose address registries (RFC 6890 and its
# updates) that are not globally reachable, named. Kept here rather than left to
# ipaddress's is_global / is_private / is_reserved, whose tables change between Python
# versions (3.11 calls 192.0.0.8 and 3fff::1 global, and 64:ff9b::/96 reserved); those
# are asked as well, after this list, so that they can only refuse more. A more specific
# block comes before the block that holds it.
_NON_PUBLIC_V4 = _networks(
    ("0.0.0.0/32", "unspecified"),
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    # Whole, though 192.0.0.9 and 192.0.0.10 (anycast) are globally reachable: no MX is there.
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
_NON_PUBLIC_V6 = _networks(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001:2::/48", "benchmarking"),
    # Whole, though a few of its blocks (anycast addresses, AMT, AS112, ORCHIDv2, drone
    # remote ID) are globally reachable: none is where an MX is.
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "private"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)

# The IPv6 forms that lead to an IPv4 address, judged by that address: IPv4-mapped,
# NAT64's well-known prefix (RFC 6052: the IPv4 address in the last 32 bits; what DNS64
# hands an IPv6-only host for an IPv4-only MX) and 6to4 (RFC 3056: bits 16 to 48).
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, for the forms that embed one."""
    if address in _MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _6TO4:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def non_public_reason(address: IPAddress) -> str | None:
    """
    Why C{address} is not a public Internet address ("loopback", "private",
    ...), or L{None} if it is one.

    An IPv4-mapped, NAT64 (C{64:ff9b::/96}) or 6to4 address is judged by the
    IPv4 address it leads to: C{64:ff9b::808:808} is public (8.8.8.8 through
    the network's NAT64), C{64:ff9b::7f00:1} is loopback. Otherwise the
    special-purpose blocks above decide, then C{ipaddress}'s own tables
    (which only add refusals: IPv4-compatible C{::7f00:1} is "reserved").
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = non_public_reason(embedded)
            return None if reason is None else f"{reason}, embedded in IPv6"
        table = _NON_PUBLIC_V6
    else:
        table = _NON_PUBLIC_V4
    for network, name in table:
        if address in network:
            return name
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not globally routable"
    return None


class AddressPolicy(Protocol):
    """Decides which resolved addresses mmgun may connect to."""

    def refusal(self, address: str) -> str | None:
        """Why mmgun must not connect to C{address}, or L{None} if it may."""


@attrs.frozen
class AnyAddress:
    """Every address is fine: C{--allow-private-mx}, test setups, private networks."""

    def refusal(self, address: str) -> str | None:
        return None


#: The policy of C{--allow-private-mx}.
ANY_ADDRESS = AnyAddress()

# struct ifreq: 16 bytes of interface name, then a struct sockaddr_in whose
# address is at bytes 4-8.  SIOCGIFADDR is Linux's; elsewhere the ioctl fails
# and /proc is absent, and only the non-public ranges protect.
_SIOCGIFADDR = 0x8915


def _ipv4_by_interface() -> set[IPAddress]:
    """Each interface's (primary) IPv4 address, by ioctl."""
    found: set[IPAddress] = set()
    try:
        import fcntl

        names = [name for _index, name in socket.if_nameindex()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for name in names:
                request = struct.pack("256s", name.encode("ascii", "replace")[:15])
                try:
                    reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
                except OSError:
                    continue  # no IPv4 address on this interface
                found.add(ipaddress.IPv4Address(reply[20:24]))
    except (ImportError, OSError):
        pass
    return found


def _ipv4_from_fib_trie(path: str = "/proc/net/fib_trie") -> set[IPAddress]:
    """
    Every IPv4 address of this host, aliases included: the kernel's routing
    trie marks them "/32 host LOCAL".
    """
    found: set[IPAddress] = set()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            last: str | None = None
            for line in f:
                text = line.strip()
                if text.startswith("|-- "):
                    last = text[4:]
                elif text.startswith("/32 host LOCAL") and last is not None:
                    try:
                        found.add(ipaddress.IPv4Address(last))
                    except ValueError:
                        pass
    except OSError:
        pass
    return found


def _ipv6_from_proc(path: str = "/proc/net/if_inet6") -> set[IPAddress]:
    """Every IPv6 address of this host: the first field of each line, in hex."""
    found: set[IPAddress] = set()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                try:
                    found.add(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
                except (IndexError, ValueError):
                    pass
    except OSError:
        pass
    return found


def gather_local_addresses() -> frozenset[IPAddress]:
    """
    This host's own addresses, as far as it can tell without DNS: each
    interface's IPv4 address (ioctl), all local IPv4 addresses
    (C{/proc/net/fib_trie}) and all IPv6 addresses (C{/proc/net/if_inet6}).

    A public address that reaches this host only through NAT is not among
    them; nothing local can know it.
    """
    return frozenset(_ipv4_by_interface() | _ipv4_from_fib_trie() | _ipv6_from_proc())


class LocalAddresses:
    """
    This host's addresses, gathered again when they are C{max_age} seconds old
    (or the clock went back), so that an address added while mmgun runs is
    known within a minute; gathering costs a few system calls.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_age: float = 60.0,
        gather: Callable[[], Collection[IPAddress]] = gather_local_addresses,
    ) -> None:
        self._clock = clock
        self._max_age = max_age
        self._gather = gather
        self._addresses: frozenset[IPAddress] = frozenset()
        self._gathered_at: float | None = None
        self()  # at start, so the first delivery pays nothing

    def __call__(self) -> frozenset[IPAddress]:
        now = self._clock.seconds()
        at = self._gathered_at
        if at is None or not at <= now < at + self._max_age:
            self._addresses = frozenset(self._gather())
            self._gathered_at = now
            _log.debug("this host's addresses: {addresses}", addresses=sorted(map(str, self._addresses)))
        return self._addresses


class PublicOnly:
    """
    The default policy: public Internet addresses only (L{non_public_reason})
    and none of this host's own (C{local}, e.g. a L{LocalAddresses}).
    """

    def __init__(self, local: Callable[[], Collection[IPAddress]] = frozenset) -> None:
        self._local = local

    def refusal(self, address: str) -> str | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return "not an IP address"
        reason = non_public_reason(ip)
        if reason is not None:
            return reason
        own = self._local()
        if ip in own or (isinstance(ip, ipaddress.IPv6Address) and _embedded_ipv4(ip) in own):
            return "this host's own address"
        return None


def _screen(policy: AddressPolicy, domain: str, hosts: list[MXHost]) -> tuple[list[MXHost], list[tuple[MXHost, str]]]:
    """C{hosts} split into those C{policy} allows and those it refuses (with why), logged."""
    allowed: list[MXHost] = []
    refused: list[tuple[MXHost, str]] = []
    for host in hosts:
        reason = policy.refusal(host.address)
        if reason is None:
            allowed.append(host)
        else:
            refused.append((host, reason))
            _log.warn(
                "not connecting to {mx} ({address}) for {domain}: {reason} address",
                mx=host.name,
                address=host.address,
                domain=domain,
                reason=reason,
            )
    return allowed, refused


def _describe_refused(refused: list[tuple[MXHost, str]], limit: int = 3) -> str:
    """"mx.test 127.0.0.1: loopback, ...", at most C{limit} of them."""
    parts = [f"{host.name} {host.address}: {reason}" for host, reason in refused[:limit]]
    if len(refused) > limit:
        parts.append(f"and {len(refused) - limit} more")
    return "; ".join(parts)


# An MX name from DNS is bytes that may hold anything (control characters,
# non-ASCII); it ends up in logs, replies and TLS SNI, so only host names
# (RFC 1123 letters, digits, hyphens; underscores seen in the wild) are used.
_HOST_NAME = re.compile(rb"(?=.{1,253}\.?\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?", re.ASCII)


def _host_name(name: dns.Name) -> str | None:
    """C{name} as a lower-case host name without the final dot, or L{None} if it is not one."""
    if _HOST_NAME.fullmatch(name.name) is None:
        return None
    return name.name.decode("ascii").lower().rstrip(".")


def _addresses_from(records: Sequence[dns.RRHeader], name: str | None = None) -> list[str]:
    """
    The A then the AAAA addresses in C{records} (owned by C{name} if given)
    as address literals.
    """
    ipv4: list[str] = []
    ipv6: list[str] = []
    for rr in records:
        # Bytes: str() of a Name fails on non-ASCII, which a hostile server may send.
        if name is not None and rr.name.name.lower() != name.encode("ascii"):
            continue
        # RRHeader checks that its payload is of its type: an A record's is a Record_A.
        if isinstance(rr.payload, dns.Record_A):
            ipv4.append(rr.payload.dottedQuad())
        elif isinstance(rr.payload, dns.Record_AAAA):
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
    # IResolver's annotations make timeout required, though every implementation
    # defaults it (None: the resolver's own), and give a tuple of three RRHeaders
    # where its docstring and the implementations give three lists of them.
    lookups = [
        ("A", resolver.lookupAddress(name)),  # type: ignore[call-arg]  # timeout: see above
        ("AAAA", resolver.lookupIPV6Address(name)),  # type: ignore[call-arg]  # timeout: see above
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
            addresses.extend(_addresses_from(answers))  # type: ignore[arg-type]  # a list: see above
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
    return [h for h, b in zip(hosts, bad, strict=True) if not b] + [h for h, b in zip(hosts, bad, strict=True) if b]


def _first(items: list[_T], wanted: Callable[[_T], bool]) -> list[_T]:
    """C{items}, those C{wanted} accepts first, order otherwise kept."""
    keep = [wanted(item) for item in items]
    return [i for i, k in zip(items, keep, strict=True) if k] + [i for i, k in zip(items, keep, strict=True) if not k]


class MXResolver(MXCalculator):
    """
    The hosts to deliver a domain's mail to, per RFC 5321 section 5.1, with
    null MX (RFC 7505) and IPv6.

    Built on L{MXCalculator} for its bad-host bookkeeping only: its C{getMX}
    picks a single host, knows neither AAAA nor null MX, and treats every
    error as "no MX", so it is not used.

    @param policy: Which addresses may be returned: L{PublicOnly} refuses
        internal ones, L{ANY_ADDRESS} none.  Required, so that no caller gets
        an open door by forgetting it.
    @param max_names: At most this many MX names (the best) are looked up.
    @param address_limit: At most this many addresses are returned.
    """

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        port: int = 25,
        *,
        policy: AddressPolicy,
        bad_timeout: float = 300.0,
        random: Random | None = None,
        max_names: int = DEFAULT_MAX_NAMES,
        address_limit: int = DEFAULT_ADDRESS_LIMIT,
    ) -> None:
        MXCalculator.__init__(self, resolver, clock)
        # MXCalculator's attribute is inferred int from its default (3600); it is only added to clock.seconds().
        self.timeOutBadMX = bad_timeout  # type: ignore[assignment]  # see above
        self.port = port
        self.policy = policy
        self.max_names = max_names
        self.address_limit = address_limit
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

    async def hosts(self, domain: str, *, prefer: NamePreference | None = None) -> list[MXHost]:
        """
        The hosts to try for C{domain}, best first: at most C{address_limit}.

        C{prefer} (L{mmgun.mtasts}: an enforced policy's C{mx} patterns) is awaited once
        the MX records are in; the names its predicate accepts then go first, before the
        C{max_names} and C{address_limit} cuts, so that unacceptable MX hosts ranking
        higher cannot crowd out acceptable ones.  Nothing is dropped for it.

        MX records in preference order, equal preferences shuffled, the first
        C{max_names} names each expanded to its A then AAAA addresses (from
        the additional section if the server sent them there); addresses the
        policy refuses dropped; hosts marked bad moved last.  Without MX
        records, the domain's own addresses.  Never empty.

        @raise PermanentDNSError: NXDOMAIN, null MX, neither MX nor address
            records, or only addresses the policy refuses.
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
            return self._best(await self._fallback(domain))

        # RFC 7505: a single MX of "." says the domain accepts no mail.  A
        # null MX mixed with real ones (a misconfiguration) is ignored.
        exchanges = [mx for mx in records if mx.name.name not in (b"", b".")]
        if not exchanges:
            raise PermanentDNSError(f"556 5.1.10 {domain} accepts no mail (null MX, RFC 7505)")

        names = self._ordered_names(domain, exchanges)
        wanted = await prefer() if prefer is not None else None
        if wanted is not None:
            names = _first(names, wanted)
        if not names:
            raise TemporaryDNSError(f"451 4.4.4 no MX host of {domain} has a valid name")
        if len(names) > self.max_names:
            _log.warn(
                "{domain} has {count} MX names; looking up the first {limit}",
                domain=domain,
                count=len(names),
                limit=self.max_names,
            )
            names = names[: self.max_names]
        found = await self._expand(names, additional)
        candidates = [
            MXHost(name, address, self.port) for name, result in found for address in result.addresses
        ]
        allowed, refused = _screen(self.policy, domain, _unique(candidates))
        if allowed:
            return self._best(allowed, wanted)
        if refused:
            # Only internal addresses: an MX name whose lookups failed for
            # now might still have a public one; otherwise this will not change.
            temporary = any(
                not result.addresses and result.temporary is not None for _name, result in found
            )
            raise _refused(f"MX hosts of {domain} resolve", refused, temporary=temporary)
        _log.warn("no MX host of {domain} has an address: {names}", domain=domain, names=names)
        raise TemporaryDNSError(f"451 4.4.4 no MX host of {domain} has an address")

    def _best(self, hosts: list[MXHost], wanted: Callable[[str], bool] | None = None) -> list[MXHost]:
        """
        C{hosts} with the bad ones last, cut to C{address_limit}; with C{wanted}, the hosts
        whose names it accepts first (a bad wanted host before a good unwanted one).
        """
        ordered = _bad_last(self, hosts)
        if wanted is not None:
            ordered = _first(ordered, lambda host: wanted(host.name))
        return ordered[: self.address_limit]

    def _ordered_names(self, domain: str, exchanges: list[dns.Record_MX]) -> list[str]:
        """
        Valid MX names by preference, shuffled within a preference (RFC 5321
        5.1); names that are not host names are dropped, and logged.
        """
        by_preference: dict[int, list[str]] = {}
        for mx in exchanges:
            name = _host_name(mx.name)
            if name is None:
                _log.warn(
                    "ignoring MX {name} of {domain}: not a host name",
                    name=repr(mx.name.name),  # escaped: it may hold line breaks
                    domain=domain,
                )
                continue
            by_preference.setdefault(mx.preference, []).append(name)
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
    ) -> list[tuple[str, _Addresses]]:
        """Each of C{names} with its addresses, looked up concurrently if needed."""
        pending: dict[str, Deferred[_Addresses]] = {}
        known: dict[str, _Addresses] = {}
        for name in names:
            glue = _addresses_from(additional, name)
            if glue:
                known[name] = _Addresses(glue, [])
            else:
                pending[name] = Deferred.fromCoroutine(_lookup_addresses(self.resolver, name))
        for name, lookup in pending.items():
            known[name] = await lookup
        return [(name, known[name]) for name in names]

    async def _fallback(self, domain: str) -> list[MXHost]:
        """The implicit MX: the domain's own A/AAAA (RFC 5321 section 5.1)."""
        found = await _lookup_addresses(self.resolver, domain)
        if found.addresses:
            hosts = _unique([MXHost(domain, a, self.port) for a in found.addresses])
            allowed, refused = _screen(self.policy, domain, hosts)
            if not allowed:
                raise _refused(f"{domain} (no MX) resolves", refused, temporary=False)
            return allowed
        if (error := found.temporary) is not None:
            raise _temporary(domain, error) from error
        if found.nxdomain:
            raise _nxdomain(domain)
        raise PermanentDNSError(f"550 5.1.2 domain {domain} has no MX and no address records")


def _refused(what: str, refused: list[tuple[MXHost, str]], *, temporary: bool) -> DNSError:
    """The error for a domain whose every address the policy refused."""
    text = (
        f"{what} only to non-public addresses ({_describe_refused(refused)}); "
        "refused (see --allow-private-mx)"
    )
    if temporary:
        return TemporaryDNSError(f"451 4.4.4 {text}, and other lookups failed")
    return PermanentDNSError(f"550 5.4.4 {text}")


class RelayHost:
    """
    The configured smarthost (C{--relay-host}): every domain goes there.

    A name that does not resolve is a configuration problem, not the
    recipients' fault, so every failure is a L{TemporaryDNSError}.

    Bad-host ordering only matters when the name has several addresses, and
    needs C{clock}; without it L{mark_bad} and L{mark_good} do nothing.

    No address policy applies: the operator chose this host.  At most
    C{address_limit} addresses are returned.
    """

    def __init__(
        self,
        resolver: IResolver,
        host: str,
        port: int,
        *,
        clock: IReactorTime | None = None,
        bad_timeout: float = 300.0,
        address_limit: int = DEFAULT_ADDRESS_LIMIT,
    ) -> None:
        self.resolver = resolver
        self.host = host
        self.port = port
        self.address_limit = address_limit
        self._marks: MXCalculator | None = None
        if clock is not None:
            self._marks = MXCalculator(resolver, clock)
            # MXCalculator's attribute is inferred int from its default (3600); it is only added to clock.seconds().
            self._marks.timeOutBadMX = bad_timeout  # type: ignore[assignment]  # see above

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
        if self._marks is not None:
            result = _bad_last(self._marks, result)
        return result[: self.address_limit]


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
        # IResolver's annotations make timeout a required Sequence, though every
        # implementation accepts None (the resolver's default), and give a tuple of
        # three RRHeaders where its docstring and the implementations give three lists.
        result = await self.upstream.query(query, timeout)  # type: ignore[arg-type]  # see above
        if any(result):
            self.cache.cacheResult(query, result)
        return result  # type: ignore[return-value]  # see above

    def clear(self) -> None:
        """Forget everything, and cancel the timers that would expire entries."""
        for call in self.cache.cancel.values():
            if call.active():
                call.cancel()
        self.cache.cancel.clear()
        # CacheResolver's class attribute "cache = None" hides the dict its __init__ sets.
        self.cache.cache.clear()  # type: ignore[attr-defined]  # see above


class TruncatedAnswerError(Exception):
    """
    A DNS answer over TCP had the TC bit set: there is no bigger transport
    to ask again over, so the lookup fails (temporarily).
    """


class BoundedResolver(client.Resolver):
    """
    C{client.Resolver} with the bounds it lacks.

    It re-queries over TCP on any truncated answer, including one that came
    over TCP: a server setting TC on every answer made it query ~5,000 times
    a second, without end (issue 11).  Here a truncated TCP answer fails the
    lookup with L{TruncatedAnswerError}, so a lookup makes at most one query
    per nameserver and timeout over UDP plus one over TCP; and every lookup
    gives up after a deadline (C{defer.TimeoutError}): the UDP rounds, the TCP
    query's C{tcp_timeout} and C{margin} seconds.  The TCP query, whose
    connection attempt had no timeout of its own, is covered by the deadline.
    """

    def __init__(self, *args: Any, tcp_timeout: float | None = None, margin: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # client.Resolver sets timeout, servers and dynServers in __init__;
        # its class attributes, which the type checker sees, say None.
        self.tcp_timeout = tcp_timeout if tcp_timeout is not None else max(self._rounds())
        self.margin = margin

    def _rounds(self) -> Sequence[int]:
        return cast("Sequence[int]", self.timeout)

    def deadline(self, timeout: _Timeout = None) -> float:
        """Seconds after which a lookup with C{timeout} gives up."""
        rounds = self._rounds() if timeout is None else timeout
        servers = max(1, len(cast("list[Any]", self.servers)) + len(cast("list[Any]", self.dynServers)))
        return servers * sum(rounds) + self.tcp_timeout + self.margin

    def queryTCP(self, queries: list[dns.Query], timeout: float | None = None) -> Deferred[dns.Message]:
        return super().queryTCP(queries, self.tcp_timeout if timeout is None else timeout)

    def filterAnswers(self, message: dns.Message) -> Any:
        if message.trunc:
            return self.queryTCP(message.queries).addCallback(self._filter_tcp_answers)
        return super().filterAnswers(message)

    def _filter_tcp_answers(self, message: dns.Message) -> Any:
        if message.trunc:
            names = ", ".join(str(q.name) for q in message.queries)
            return Failure(TruncatedAnswerError(f"truncated answer over TCP for {names}"))
        return super().filterAnswers(message)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: _Timeout) -> Deferred[Any]:
        d: Deferred[Any] = super()._lookup(name, cls, type, timeout)
        d.addTimeout(self.deadline(timeout), self._reactor)
        # A lookup that joined an identical one in flight (client.Resolver
        # sends it once) fails with CancelledError when that one's deadline
        # passes: the same timeout, for the caller.
        return d.addErrback(_cancelled_as_timeout)


def _cancelled_as_timeout(failure: Failure) -> Failure:
    if failure.check(CancelledError):
        return Failure(TimeoutError("DNS lookup deadline passed"))
    return failure


def make_resolver(
    nameservers: list[tuple[str, int]] | None,
    reactor: IReactorTime,
    timeout: Sequence[int] = DEFAULT_TIMEOUT,
    *,
    hosts_file: bool = False,
) -> CachingResolver:
    """
    A caching C{twisted.names} resolver, over L{BoundedResolver}s.

    @param nameservers: (address, port) of the nameservers to ask (tried in
        order, then round-robin on timeouts); L{None} for those in
        C{/etc/resolv.conf}, with C{/etc/hosts} consulted first.
    @param reactor: Also an C{IReactorUDP} and C{IReactorTCP}.
    @param timeout: Seconds per round of queries before retrying.
    @param hosts_file: Consult C{/etc/hosts} before the given nameservers too
        (webhook receivers' names; MX lookups never use it).
    """
    upstream: IResolver
    if nameservers is not None:
        # Not createResolver(servers=...): that also reads /etc/resolv.conf
        # and falls back to its servers, and ignores our reactor.
        upstream = BoundedResolver(
            servers=list(nameservers), timeout=tuple(timeout), reactor=reactor
        )
        if hosts_file:
            upstream = resolve.ResolverChain([hosts_module.Resolver(b"/etc/hosts", ttl=300), upstream])
    else:
        upstream = resolve.ResolverChain(
            [
                hosts_module.Resolver(b"/etc/hosts", ttl=300),
                BoundedResolver(
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
