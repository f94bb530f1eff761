"""
MTA-STS for outgoing delivery (RFC 8461): ``--tls mta-sts``.

A recipient domain that publishes a policy says which of its MX hosts are genuine and
that they must be reached over TLS with a certificate valid for their names. Without a
policy (most domains) delivery stays opportunistic STARTTLS, as ``--tls opportunistic``.

- Discovery (section 3.1): the TXT record ``_mta-sts.<domain>``, looked up through the
  daemon's caching resolver; exactly one record starting ``v=STSv1;``, with an ``id``
  (:func:`parse_record`), or the domain has no policy.
- Fetch (section 3.3, :class:`PolicyFetcher`): ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
  with treq; the certificate verified for ``mta-sts.<domain>`` (the platform's trust store, or
  ``--mta-sts-ca`` in tests), no redirect followed, only a ``200`` with ``Content-Type:
  text/plain``, at most 64 KiB, within 10 s; the address it resolves to screened as MX
  addresses are (:mod:`mmgun.mx`'s policy). Parsed per section 3.2 (:func:`parse_policy`).
- Cache (:class:`PolicyCache`): each policy is stored (``mta_sts_policies``) for its
  ``max_age`` (clamped to a year), so restarts and other senders share it (an older fetch
  never replaces a newer one); it is fetched again when the TXT record's ``id`` changes
  (sections 3.1, 5.1), and refreshed in the background when it is used in the last tenth of
  its ``max_age`` or its last day, whichever is shorter, whatever the TXT record says
  (sections 5.1, 10.2). A failed refetch or refresh keeps the unexpired policy in use, as
  does a missing or failing TXT lookup (section 3.3). "No policy" is remembered in memory
  for NO_POLICY_TIME, but never concluded from a store that could not be read: then, unless
  DNS and a fetch give a policy, the domain is deferred (:class:`PolicyUnknown`).
  Concurrent lookups of one domain share one fetch.
- Applying it (:class:`MTASTSRouter`, sections 4 and 5): in ``enforce`` mode only MX hosts
  matching the policy's ``mx`` patterns (section 4.1) are used (put first before the MX
  resolver's ``--mx-address-limit`` cut, so that non-matching hosts cannot crowd them
  out), each marked (:attr:`mmgun.mx.MXHost.mta_sts`) so that the sender connects to it
  only with STARTTLS and
  a certificate valid for its name (section 4.2; :func:`enforcing`). No MX matching: the
  domain's recipients are deferred with a reply saying so. ``testing`` mode logs what
  ``enforce`` would refuse and delivers as without a policy; ``none`` changes nothing.

Each domain's policy lookup runs on its own, concurrently with its MX lookup: a policy
server that never answers holds back only its own domain's mail, for at most the fetch
timeout, after which the domain is treated as having no policy (unless one is cached).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Protocol, TypeVar, cast

import attrs
from treq import collect
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DomainError
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH

from .mx import AddressPolicy, HostSource, MXHost, MXResolver, TemporaryDNSError
from .smtp import Reply, SessionFailed, SMTPSettings, TLSMode
from .store import MTASTSPolicy, StorageError, Store

_log = Logger()

__all__ = [
    "MTASTSRouter",
    "MTASTSRefusal",
    "PolicyCache",
    "PolicyError",
    "PolicyFetcher",
    "PolicyUnknown",
    "FetchFailed",
    "enforced_settings",
    "enforcing",
    "mx_matches",
    "parse_policy",
    "parse_record",
]

#: Section 3.3: "senders SHOULD ... limit ... the policy body ... e.g. 64 kilobytes".
MAX_POLICY_SIZE = 64 * 1024
#: Seconds a policy fetch (connection, TLS, request and body) may take.
FETCH_TIMEOUT = 10.0
#: Section 3.2: max_age is at most 31557600 seconds (about a year); larger values are clamped to it.
MAX_MAX_AGE = 31557600
#: How long a domain found without a usable policy (no TXT record, an invalid one, a failed
#: fetch and nothing cached) is not looked at again, in memory only.
NO_POLICY_TIME = 300.0
#: How long, after a failed refetch (for a changed TXT id, or a refresh before expiry), the
#: cached policy is used without trying again.
REFETCH_PAUSE = 300.0
#: A policy in use is refreshed (fetched again, whatever the TXT record says) once it is in
#: the last REFRESH_SHARE of its max_age or the last REFRESH_BEFORE seconds, whichever is
#: shorter (sections 5.1, 10.2): an attacker blocking DNS cannot simply wait for it to expire.
REFRESH_SHARE = 0.1
REFRESH_BEFORE = 86400.0
#: Domains remembered in memory (policies and "no policy") before the memory is trimmed.
MAX_REMEMBERED = 10_000

POLICY_PATH = "/.well-known/mta-sts.txt"


# -- section 3.1: the TXT record ----------------------------------------------------------

# sts-text-record = sts-version 1*(*WSP field-delim *WSP sts-field) [field-delim]
# sts-field = sts-id / sts-extension; sts-extension = sts-ext-name "=" sts-ext-value
_EXT_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
_EXT_VALUE = r"[\x21-\x3a\x3c\x3e-\x7e]+"
# Trailing spaces are allowed too (the ABNF has none after the last field).
_RECORD = re.compile(rf"v=STSv1(?:[ \t]*;[ \t]*{_EXT_NAME}={_EXT_VALUE})+[ \t]*;?[ \t]*")
_RECORD_FIELD = re.compile(rf";[ \t]*({_EXT_NAME})=({_EXT_VALUE})")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def parse_record(text: str) -> str:
    """
    The ``id`` of an MTA-STS TXT record (``v=STSv1; id=20160831085700Z;``).

    @raise ValueError: It is not a valid STSv1 record, or has no valid id.
    """
    if _RECORD.fullmatch(text) is None:
        raise ValueError("not an STSv1 record")
    for name, value in _RECORD_FIELD.findall(text):
        if name == "id":
            # The first instance counts.
            if _ID.fullmatch(value) is None:
                raise ValueError("its id is not 1-32 letters and digits")
            return value
    raise ValueError("no id")


async def lookup_policy_id(resolver: IResolver, domain: str) -> str | None:
    """
    The ``id`` of ``domain``'s MTA-STS TXT record, or None: no record, an invalid one, more
    than one starting ``v=STSv1;`` (section 3.1), or the lookup failed.
    """
    name = f"_mta-sts.{domain}"
    try:
        # IResolver's annotations make timeout required; every implementation defaults it.
        answers, _authority, _additional = await resolver.lookupText(name)  # type: ignore[call-arg]
    except DomainError:
        return None  # NXDOMAIN, or no answer: the common case, no policy
    except Exception as e:
        _log.info("DNS TXT lookup of {name} failed: {error}", name=name, error=str(e) or type(e).__name__)
        return None
    records = []
    # IResolver's annotations give a tuple of three RRHeaders; it is three lists of them.
    for rr in cast("list[dns.RRHeader]", answers):
        data = getattr(rr.payload, "data", None)
        if not isinstance(data, list):
            continue  # a CNAME on the way
        try:
            text = b"".join(data).decode("ascii")
        except UnicodeDecodeError:
            continue
        # Section 3.1: records that do not begin with "v=STSv1;" are discarded.
        if text.startswith("v=STSv1;"):
            records.append(text)
    if len(records) != 1:
        if records:
            _log.info("{name} has {count} STSv1 records: no MTA-STS policy", name=name, count=len(records))
        return None
    try:
        return parse_record(records[0])
    except ValueError as e:
        _log.info("invalid MTA-STS record at {name} ({reason}): no MTA-STS policy", name=name, reason=str(e))
        return None


# -- section 3.2: the policy ----------------------------------------------------------------


class PolicyError(ValueError):
    """A policy body that is not a valid STSv1 policy."""


@attrs.frozen
class ParsedPolicy:
    mode: str
    mx: tuple[str, ...]
    max_age: int


_POLICY_LINE = re.compile(rf"({_EXT_NAME}):[ \t]*(.*?)[ \t]*")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_MODES = ("enforce", "testing", "none")


def parse_policy(body: bytes) -> ParsedPolicy:
    """
    Parse a policy body: ``key: value`` lines separated by CRLF or LF. ``version`` (STSv1),
    ``mode`` and ``max_age`` are required and only their first instance counts; ``mx`` may
    repeat, and at least one is required unless the mode is ``none``; other keys (extensions)
    are ignored. Blank lines are tolerated.

    @raise PolicyError: Saying what is wrong.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip():
            continue
        match = _POLICY_LINE.fullmatch(line)
        if match is None:
            raise PolicyError(f"not a 'key: value' line: {line[:40]!r}")
        key, value = match.groups()
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise PolicyError(f"a control character in {key}")
        if key == "mx":
            pattern = value.lower()
            if _MX_PATTERN.fullmatch(pattern) is None or len(pattern) > 253:
                raise PolicyError(f"invalid mx pattern {value[:80]!r}")
            if pattern not in mx:
                mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in _MODES:
        raise PolicyError("mode is not enforce, testing or none")
    max_age = fields.get("max_age", "")
    if not (max_age.isascii() and max_age.isdigit() and len(max_age) <= 10):
        raise PolicyError("max_age is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without any mx")
    # Section 3.2 allows values "up to 31557600": a larger one is clamped rather than the
    # policy refused, so that the domain stays protected (for a year at a time).
    return ParsedPolicy(mode, tuple(mx), min(int(max_age), MAX_MAX_AGE))


# -- section 4.1: MX host matching ------------------------------------------------------------


def mx_matches(pattern: str, host: str) -> bool:
    """
    Whether MX host name ``host`` matches policy pattern ``pattern``: equal (ignoring case and
    a final dot), or for ``*.example.com`` a name with exactly one more label in front
    (``mail.example.com``; neither ``example.com`` nor ``a.b.example.com``).
    """
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


# -- section 3.3: fetching ----------------------------------------------------------------------


class FetchFailed(Exception):
    """No policy could be fetched; the message says why (safe to log)."""


class _TooBig(Exception):
    pass


def _no_cookies() -> IndexableCookieJar:
    return IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class Fetcher(Protocol):
    async def fetch(self, domain: str) -> ParsedPolicy: ...


class PolicyFetcher:
    """
    Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (section 3.3).

    The host name is resolved by ``resolver`` (an C{IHostnameResolver}, e.g.
    :class:`mmgun.webhooks.DNSHostResolver` over the daemon's caching resolver) and its
    addresses screened by ``policy`` (as MX addresses are); the certificate is verified for
    ``mta-sts.<domain>`` against ``trust_root`` (None: the platform's trust store). ``port``
    is for tests only (the certificate is still verified for the name). ``reactor``
    connects; ``clock`` times the fetch out after ``timeout`` seconds.
    """

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        *,
        resolver: Any,
        policy: AddressPolicy,
        trust_root: Any = None,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        max_size: int = MAX_POLICY_SIZE,
    ) -> None:
        from .webhooks import WebhookAgent

        self._reactor = reactor
        self._clock = clock
        self._port = port
        self.timeout = timeout
        self._max_size = max_size
        pool = HTTPConnectionPool(reactor, persistent=False)
        # WebhookAgent: connects only where the address policy allows, TLS verified for the
        # URL's host, and neither asks for nor decodes a compressed body.
        agent = WebhookAgent(reactor, resolver=resolver, policy=policy, pool=pool, connect_timeout=timeout, trust_root=trust_root)
        self._http = HTTPClient(agent, cookiejar=_no_cookies())

    def url(self, domain: str) -> str:
        authority = f"mta-sts.{domain}" if self._port == 443 else f"mta-sts.{domain}:{self._port}"
        return f"https://{authority}{POLICY_PATH}"

    async def fetch(self, domain: str) -> ParsedPolicy:
        """
        The domain's policy.

        @raise FetchFailed: Anything else (a timeout, a TLS failure, a status other than 200,
            a redirect, another content type, an oversized or invalid body).
        """
        def timed_out(value: object, timeout: float) -> Failure:
            # Whatever the cancellation became (the agent wraps it in ResponseNeverReceived).
            return Failure(FetchFailed(f"no answer within {timeout:g} s"))

        call = Deferred.fromCoroutine(self._fetch(domain))
        call.addTimeout(self.timeout, self._clock, onTimeoutCancel=timed_out)
        try:
            return await call
        except FetchFailed:
            raise
        except (TimeoutError, CancelledError):
            raise FetchFailed(f"no answer within {self.timeout:g} s") from None
        except Exception as e:
            from .webhooks import _describe

            raise FetchFailed(_describe(e)) from e

    async def _fetch(self, domain: str) -> ParsedPolicy:
        response = await self._http.get(self.url(domain), allow_redirects=False, unbuffered=True, reactor=self._reactor)
        if response.code != 200:
            # Section 3.3: a redirect (3xx) is not followed, so it is a failed fetch too.
            response.original.deliverBody(_Discard())
            raise FetchFailed(f"HTTP {response.code}")
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        media_type = types[0].split(b";", 1)[0].strip().lower()
        if media_type != b"text/plain":
            response.original.deliverBody(_Discard())
            raise FetchFailed(f"Content-Type {media_type.decode('latin-1')[:60]!r}, not text/plain")
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_size:
            response.original.deliverBody(_Discard())
            raise FetchFailed(f"policy of {response.length} bytes, over {self._max_size}")
        parts: list[bytes] = []
        size = [0]

        def collector(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > self._max_size:
                raise _TooBig()
            parts.append(data)

        try:
            await collect(response.original, collector)
        except _TooBig:
            raise FetchFailed(f"policy over {self._max_size} bytes") from None
        try:
            return parse_policy(b"".join(parts))
        except PolicyError as e:
            raise FetchFailed(f"invalid policy: {e}") from None


class _Discard:
    """A body protocol that closes the connection at once: the body is not wanted."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


# -- the cache ------------------------------------------------------------------------------------


@attrs.frozen
class PolicyUnknown:
    """
    ``domain``'s policy cannot be known for now: the store (the policy cache) could not be
    read, and neither DNS nor a fetch gave a policy, so a cached ``enforce`` policy may be in
    force. Its mail is deferred (:func:`apply_policy`), never sent as if it had no policy.
    """

    domain: str


#: What :meth:`PolicyCache.policy` gives: the policy in effect, None (no policy), or PolicyUnknown.
PolicyState = MTASTSPolicy | PolicyUnknown | None


class PolicyCache:
    """
    Each domain's MTA-STS policy (:meth:`policy`): from memory, the store or a fetch, as the
    module's docstring says. ``clock`` (monotonic) times the in-memory remembering; ``wall``
    gives the wall-clock time policies are stored with.
    """

    def __init__(
        self,
        store: Store,
        resolver: IResolver,
        fetcher: Fetcher,
        clock: IReactorTime,
        wall: Callable[[], float],
        *,
        no_policy_time: float = NO_POLICY_TIME,
        refetch_pause: float = REFETCH_PAUSE,
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._fetcher = fetcher
        self._clock = clock
        self._wall = wall
        self._no_policy_time = no_policy_time
        self._refetch_pause = refetch_pause
        #: Policies known here, by domain (each still checked against the TXT id and its expiry).
        self._known: dict[str, MTASTSPolicy] = {}
        #: Domains without a usable policy: not looked at again before the (monotonic) time given.
        self._none_until: dict[str, float] = {}
        #: Domains whose refetch failed: their cached policy is used until then without trying again.
        self._refetch_after: dict[str, float] = {}
        #: Lookups in progress, by domain: each caller waits on its own Deferred.
        self._waiting: dict[str, list[Deferred[PolicyState]]] = {}
        #: Domains whose policy is being refreshed before its expiry.
        self._refreshing: set[str] = set()
        #: Fetches made (each a policy fetch over HTTPS), for tests and logs.
        self.fetches = 0

    def policy(self, domain: str) -> Deferred[PolicyState]:
        """
        ``domain``'s policy in effect, None, or :class:`PolicyUnknown` (the store could not be
        read and nothing else told). Never fails. Concurrent calls for one domain share one
        lookup (and at most one fetch). A policy near its expiry is returned at once and
        refreshed in the background.
        """
        waiter: Deferred[PolicyState] = Deferred()
        waiters = self._waiting.get(domain)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiting[domain] = [waiter]
        Deferred.fromCoroutine(self._guarded(domain)).addBoth(self._done, domain)
        return waiter

    def _done(self, result: PolicyState | Failure, domain: str) -> None:
        policy = None if isinstance(result, Failure) else result
        for waiter in self._waiting.pop(domain, []):
            waiter.callback(policy)

    async def _guarded(self, domain: str) -> PolicyState:
        try:
            return await self._lookup(domain)
        except Exception:
            _log.failure("MTA-STS policy lookup of {domain} failed unexpectedly; delivering without", domain=domain)
            return None

    def _remember_none(self, domain: str) -> None:
        if len(self._none_until) >= MAX_REMEMBERED:
            self._none_until.clear()
        self._none_until[domain] = self._clock.seconds() + self._no_policy_time

    def _remember(self, policy: MTASTSPolicy) -> MTASTSPolicy:
        if len(self._known) >= MAX_REMEMBERED and policy.domain not in self._known:
            self._known.clear()
        self._known[policy.domain] = policy
        self._none_until.pop(policy.domain, None)
        return policy

    async def _cached(self, domain: str, now: float) -> MTASTSPolicy | None:
        """
        The unexpired policy known here or stored (another sender's, an earlier run's).

        @raise StorageError: The store could not be read: whether a policy is cached is unknown.
        """
        known = self._known.get(domain)
        if known is not None and known.expires_at > now:
            return known
        self._known.pop(domain, None)
        stored = await self._store.mta_sts_policy(domain, now)
        return None if stored is None else self._remember(stored)

    def _unknown(self, domain: str, why: str) -> PolicyUnknown:
        _log.warn(
            "MTA-STS policy of {domain} unknown: the cached policies could not be read and {why}; deferring its mail",
            domain=domain,
            why=why,
        )
        return PolicyUnknown(domain)

    async def _lookup(self, domain: str) -> PolicyState:
        until = self._none_until.get(domain)
        if until is not None:
            if self._clock.seconds() < until:
                return None
            del self._none_until[domain]
        policy_id = await lookup_policy_id(self._resolver, domain)
        now = self._wall()
        known = self._known.get(domain)
        if known is not None and known.expires_at > now and (policy_id is None or known.policy_id == policy_id):
            return self._refreshing_if_due(known, now)
        unreadable = False
        try:
            cached = await self._cached(domain, now)
        except StorageError as e:
            # Not "no cached policy": that could let a DNS-blocking attacker downgrade the domain.
            _log.warn("reading the cached MTA-STS policy of {domain} failed: {error}", domain=domain, error=str(e))
            cached, unreadable = None, True
        if policy_id is None:
            # Section 3.3: no live policy in DNS, but an unexpired cached one still applies.
            if cached is not None:
                return self._refreshing_if_due(cached, now)
            if unreadable:
                return self._unknown(domain, "DNS gives no policy id")
            self._remember_none(domain)
            return None
        if cached is not None:
            if cached.policy_id == policy_id:
                return self._refreshing_if_due(cached, now)
            if self._clock.seconds() < self._refetch_after.get(domain, float("-inf")):
                return cached
        self.fetches += 1
        try:
            parsed = await self._fetcher.fetch(domain)
        except FetchFailed as e:
            if cached is None and unreadable:
                return self._unknown(domain, f"its policy could not be fetched ({e})")
            if cached is None:
                _log.warn(
                    "MTA-STS policy of {domain} (id {policy_id}) could not be fetched: {reason}; delivering without",
                    domain=domain,
                    policy_id=policy_id,
                    reason=str(e),
                )
                self._remember_none(domain)
            else:
                _log.warn(
                    "MTA-STS policy of {domain} (new id {policy_id}) could not be fetched: {reason}; "
                    "keeping the cached one (id {cached_id}, mode {mode}) until it expires",
                    domain=domain,
                    policy_id=policy_id,
                    reason=str(e),
                    cached_id=cached.policy_id,
                    mode=cached.mode,
                )
                self._refetch_after[domain] = self._clock.seconds() + self._refetch_pause
            return cached
        return await self._adopt(domain, policy_id, parsed)

    def _refreshing_if_due(self, policy: MTASTSPolicy, now: float) -> MTASTSPolicy:
        """
        ``policy``, in use at ``now``; if it is near its expiry, a refresh started in the
        background (sections 5.1, 10.2: a policy in use is fetched again before it expires,
        even with an unchanged TXT id or none, so that blocking DNS until it lapses does not
        downgrade the domain). A failed refresh keeps ``policy`` until it expires, and is
        tried again after REFETCH_PAUSE.
        """
        domain = policy.domain
        if policy.expires_at - now > min(policy.max_age * REFRESH_SHARE, REFRESH_BEFORE):
            return policy
        if domain in self._refreshing or self._clock.seconds() < self._refetch_after.get(domain, float("-inf")):
            return policy
        self._refreshing.add(domain)
        refresh = Deferred.fromCoroutine(self._refresh(policy))
        refresh.addErrback(lambda f: _log.failure("refreshing the MTA-STS policy of {domain} failed unexpectedly", f, domain=domain))
        refresh.addBoth(lambda _: self._refreshing.discard(domain))
        return policy

    async def _refresh(self, policy: MTASTSPolicy) -> None:
        domain = policy.domain
        self.fetches += 1
        try:
            parsed = await self._fetcher.fetch(domain)
        except FetchFailed as e:
            _log.warn(
                "MTA-STS policy of {domain} (id {policy_id}, mode {mode}) could not be refreshed: {reason}; "
                "keeping it until it expires in {left:.0f} s",
                domain=domain,
                policy_id=policy.policy_id,
                mode=policy.mode,
                reason=str(e),
                left=policy.expires_at - self._wall(),
            )
            self._refetch_after[domain] = self._clock.seconds() + self._refetch_pause
            return
        await self._adopt(domain, policy.policy_id, parsed)

    async def _adopt(self, domain: str, policy_id: str, parsed: ParsedPolicy) -> MTASTSPolicy:
        """A policy just fetched: logged, stored (with the time now) and remembered."""
        self._refetch_after.pop(domain, None)
        policy = MTASTSPolicy(domain, policy_id, parsed.mode, parsed.mx, parsed.max_age, self._wall())
        _log.info(
            "MTA-STS policy of {domain}: id {policy_id}, mode {mode}, mx {mx}, max_age {max_age}",
            domain=domain,
            policy_id=policy_id,
            mode=policy.mode,
            mx=list(policy.mx),
            max_age=policy.max_age,
        )
        try:
            await self._store.save_mta_sts_policy(policy)
        except StorageError as e:
            _log.warn("storing the MTA-STS policy of {domain} failed: {error}", domain=domain, error=str(e))
        return self._remember(policy)


# -- applying it ------------------------------------------------------------------------------------


class MTASTSRefusal(TemporaryDNSError):
    """No MX host of the domain is allowed by its enforced policy: its recipients are deferred."""


def _names(hosts: list[MXHost], limit: int = 3) -> str:
    names = list(dict.fromkeys(h.name for h in hosts))
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def apply_policy(domain: str, policy: PolicyState, hosts: list[MXHost]) -> list[MXHost]:
    """
    ``hosts`` as ``policy`` allows them (section 5): unchanged without a policy, in mode
    ``none`` and in mode ``testing`` (which logs the hosts ``enforce`` would refuse); in mode
    ``enforce`` only those matching an ``mx`` pattern, each marked as needing a verified
    certificate.

    @raise MTASTSRefusal: Mode ``enforce`` and no host matches, or the policy is unknown.
    """
    if isinstance(policy, PolicyUnknown):
        raise MTASTSRefusal(f"451 4.7.5 MTA-STS policy state of {domain} unknown (its cached policy could not be read); not delivering")
    if policy is None or policy.mode == "none":
        return hosts
    allowed = [h for h in hosts if any(mx_matches(p, h.name) for p in policy.mx)]
    refused = [h for h in hosts if h not in allowed]
    if policy.mode == "testing":
        if refused:
            _log.warn(
                "MTA-STS policy of {domain} (testing) would refuse MX {refused}: not matching {patterns}; delivering anyway",
                domain=domain,
                refused=_names(refused),
                patterns=list(policy.mx),
            )
        return hosts
    if not allowed:
        _log.warn(
            "MTA-STS policy of {domain} (enforce) allows none of its MX hosts ({refused}); deferring",
            domain=domain,
            refused=_names(refused),
            patterns=list(policy.mx),
        )
        raise MTASTSRefusal(
            f"451 4.7.5 MTA-STS policy of {domain}: no MX host matches its mx patterns "
            f"({_names(refused)} vs {', '.join(policy.mx[:3])}); not delivering"
        )
    if refused:
        _log.info(
            "MTA-STS policy of {domain} (enforce): skipping MX {refused}, not matching {patterns}",
            domain=domain,
            refused=_names(refused),
            patterns=list(policy.mx),
        )
    return [attrs.evolve(h, mta_sts=domain) for h in allowed]


class MTASTSRouter:
    """
    A :class:`mmgun.mx.HostSource` that applies each domain's MTA-STS policy to the hosts
    ``inner`` (an :class:`mmgun.mx.MXResolver`) gives; the policy is looked up while the
    MX records are.
    """

    def __init__(self, inner: HostSource, policies: PolicyCache) -> None:
        self._inner = inner
        self._policies = policies

    async def hosts(self, domain: str) -> list[MXHost]:
        policy = _Pending(self._policies.policy(domain))  # started now, alongside the MX lookup; never fails
        if isinstance(self._inner, MXResolver):
            # The enforced policy's MX hosts first, before the resolver's limits cut the list.
            hosts = await self._inner.hosts(domain, prefer=policy.enforced_names)
        else:
            hosts = await self._inner.hosts(domain)
        return apply_policy(domain, await policy.get(), hosts)

    def mark_bad(self, host: MXHost) -> None:
        self._inner.mark_bad(host)

    def mark_good(self, host: MXHost) -> None:
        self._inner.mark_good(host)


class _Pending:
    """
    A policy lookup under way, which both the router and :class:`mmgun.mx.MXResolver` may
    await (a Deferred's result goes to its first awaiter only).
    """

    def __init__(self, lookup: Deferred[PolicyState]) -> None:
        self._lookup = lookup
        self._result: list[PolicyState] = []
        lookup.addCallback(self._keep)

    def _keep(self, policy: PolicyState) -> PolicyState:
        self._result.append(policy)
        return policy

    async def get(self) -> PolicyState:
        if not self._result:
            await self._lookup
        return self._result[0]

    async def enforced_names(self) -> Callable[[str], bool] | None:
        """Whether an MX name matches the policy, if it is enforced (:data:`mmgun.mx.NamePreference`)."""
        policy = await self.get()
        if not isinstance(policy, MTASTSPolicy) or policy.mode != "enforce":
            return None
        patterns = policy.mx
        return lambda name: any(mx_matches(pattern, name) for pattern in patterns)


# -- the SMTP session to a host of an enforced policy -------------------------------------------------

_T = TypeVar("_T")


def enforced_settings(settings: SMTPSettings, trust_root: object = None) -> SMTPSettings:
    """
    ``settings`` for a host of an enforced policy (section 4.2): STARTTLS required, the
    certificate verified for the MX name against ``trust_root`` (None: ``settings``'s, the
    platform's trust store by default).
    """
    return attrs.evolve(settings, tls=TLSMode.VERIFY, trust_root=trust_root if trust_root is not None else settings.trust_root)


def _tls_failure(reply: Reply) -> bool:
    # The SMTP client's own replies when TLS cannot be had: "4.7.0 ... does not offer
    # STARTTLS / refused STARTTLS / refused EHLO ...; TLS is required", "4.7.5 TLS with ... failed".
    return reply.text.startswith("4.7.") and "TLS" in reply.text


def enforcing(session: Callable[..., Coroutine[Any, Any, _T]], domain: str) -> Callable[..., Coroutine[Any, Any, _T]]:
    """
    ``session`` (:func:`mmgun.smtp.send_session`'s signature), its TLS failures worded for
    ``domain``'s policy: "421 4.7.5 MTA-STS policy of example.com requires TLS with a
    certificate valid for mx.example.com: <what failed>".
    """

    async def run(reactor: Any, host: str, address: str, port: int, transactions: Any, settings: SMTPSettings, *args: Any, **kwargs: Any) -> _T:
        try:
            return await session(reactor, host, address, port, transactions, settings, *args, **kwargs)
        except SessionFailed as e:
            if not _tls_failure(e.reply):
                raise
            reply = Reply(
                e.reply.code,
                f"4.7.5 MTA-STS policy of {domain} requires TLS with a certificate valid for {host.rstrip('.')}: {e.reply}",
            )
            raise SessionFailed(reply, connected=e.connected) from e

    return run


# -- wiring -------------------------------------------------------------------------------------------


def load_trust_root(path: str) -> Any:
    """
    The CA certificates of PEM file ``path`` as a trust root (``--mta-sts-ca``).

    @raise ValueError: The file cannot be read or holds no certificate.
    """
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"cannot read --mta-sts-ca {path}: {e.strerror or e}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if not blocks:
        raise ValueError(f"--mta-sts-ca {path} holds no PEM certificate")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


def make_router(
    inner: HostSource,
    store: Store,
    resolver: IResolver,
    reactor: Any,
    *,
    policy: AddressPolicy,
    wall: Callable[[], float],
    ca_file: str | None = None,
    port: int = 443,
) -> tuple[MTASTSRouter, Any]:
    """
    ``inner`` with MTA-STS applied (``--tls mta-sts``), and the trust root the sender verifies
    the certificates of enforced MX hosts against (None: the platform's).
    """
    from .webhooks import DNSHostResolver

    trust_root = load_trust_root(ca_file) if ca_file is not None else None
    fetcher = PolicyFetcher(reactor, reactor, resolver=DNSHostResolver(resolver), policy=policy, trust_root=trust_root, port=port)
    return MTASTSRouter(inner, PolicyCache(store, resolver, fetcher, reactor, wall)), trust_root
