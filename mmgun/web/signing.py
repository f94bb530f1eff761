"""
Sending domains as the frontend uses them: whose a domain is (the sender policy, the
Mailgun endpoints' ``{domain}``) and the keys its mail is signed with, read from the
store at most once per :data:`DOMAIN_CACHE_SECONDS` per domain; and the DKIM signing
itself (:func:`mmgun.dkim.sign`), which runs in a small thread pool
(:class:`SigningPool`) so that the reactor keeps serving requests meanwhile.

A message is signed only for the client its From domain is registered to: another
client sending from that domain (``--sender-policy any``) gets no signature, so the
relay never lends a domain's DKIM reputation (and DMARC alignment) to someone else.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .. import dkim
from ..config import SENDER_POLICIES

if TYPE_CHECKING:
    from ..store import DomainKey, Store

#: How long a domain's owner and keys are trusted before the store is asked again: a
#: domain added, removed or rotated takes effect in every frontend within this many seconds.
DOMAIN_CACHE_SECONDS = 5.0
#: Domains cached at most; beyond, the cache starts over (a client sending from many
#: unregistered domains cannot make it grow without bound).
MAX_CACHED_DOMAINS = 10_000

#: Signs a message with keys at a POSIX time: :func:`mmgun.dkim.sign`'s signature.
SignFunction = Callable[[bytes, "Sequence[DomainKey]", float], bytes]
#: Runs a signing call somewhere (inline, or in a thread): its result, when done.
Runner = Callable[[Callable[[], bytes]], Awaitable[bytes]]


class SenderRefused(Exception):
    """The sender policy refuses this sender (403); the message names the domain and is safe to show."""


@attrs.frozen
class DomainState:
    """A domain as the frontend sees it: its client (None: not registered) and the keys to sign with now."""

    client: str | None
    keys: tuple[DomainKey, ...] = ()


@attrs.define
class _Cached:
    state: DomainState
    fetched_at: float


def inline(work: Callable[[], bytes]) -> Awaitable[bytes]:
    """A :data:`Runner` that signs on the calling thread (tests, tools; no pool)."""
    return succeed(work())


class SendingDomains:
    """
    Domain lookups, the sender policy and signing for :class:`mmgun.web.submit.Pipeline`.
    ``clock`` times the cache (monotonic in production); ``run`` runs each signature
    (:meth:`SigningPool.run`; default: inline); ``sign`` is :func:`mmgun.dkim.sign`
    unless given.
    """

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        *,
        policy: str = "any",
        run: Runner | None = None,
        sign: SignFunction | None = None,
    ) -> None:
        if policy not in SENDER_POLICIES:
            raise ValueError(f"unknown sender policy {policy!r}")
        self._store = store
        self._clock = clock
        self.policy = policy
        self._run = run if run is not None else inline
        self._sign: SignFunction = sign if sign is not None else dkim.sign
        self._cache: dict[str, _Cached] = {}

    async def lookup(self, domain: str) -> DomainState:
        """``domain``'s (IDNA, lower-case) client and signing keys, cached; StorageError when the store fails."""
        now = self._clock.seconds()
        cached = self._cache.get(domain)
        if cached is None or now - cached.fetched_at >= DOMAIN_CACHE_SECONDS:
            registered = await self._store.domain(domain)
            if registered is None:
                state = DomainState(None)
            else:
                state = DomainState(registered.client, tuple(await self._store.signing_keys(domain)))
            if len(self._cache) >= MAX_CACHED_DOMAINS:
                self._cache.clear()
            cached = self._cache[domain] = _Cached(state, now)
        return cached.state

    async def owned(self, client: str, domain: str) -> bool:
        """Whether ``domain`` is registered to ``client``."""
        return (await self.lookup(domain)).client == client

    async def admit(self, client: str, sender: str) -> DomainState:
        """
        The state of ``sender``'s domain, after the sender policy: with ``domains``, a
        sender whose domain is not ``client``'s raises :class:`SenderRefused`. The sender
        is the envelope sender, which every API makes the From header's address too
        (/send's ``sender``, v3's ``from``, messages.mime's From): one check covers both.
        messages.mime's Sender and Resent-* fields: :meth:`admit_others`.
        """
        domain = sender.rpartition("@")[2]
        state = await self.lookup(domain)
        if self.policy == "domains" and state.client != client:
            raise SenderRefused(
                f"the sender's domain ({domain}) is not one of this client's sending domains"
                " (this relay's sender policy is 'domains')"
            )
        return state

    async def admit_others(self, client: str, senders: Iterable[str]) -> None:
        """
        With the ``domains`` policy, raise :class:`SenderRefused` unless every one of
        ``senders`` (a message's Sender, Resent-From and Resent-Sender addresses) is at one
        of ``client``'s domains; with ``any``, nothing. Checked one domain at a time, each
        once, stopping at the first refused: at most one lookup of a domain not ``client``'s.
        """
        if self.policy != "domains":
            return
        for domain in dict.fromkeys(sender.rpartition("@")[2] for sender in senders):
            if (await self.lookup(domain)).client != client:
                raise SenderRefused(
                    f"the domain of the message's Sender or Resent-* field ({domain}) is not one of this"
                    " client's sending domains (this relay's sender policy is 'domains')"
                )

    async def sign(self, client: str, state: DomainState, message: bytes, now: float) -> bytes:
        """``message`` signed with ``state``'s keys when its domain is ``client``'s and has keys; else as it is."""
        if state.client != client or not state.keys:
            return message
        keys, sign = state.keys, self._sign
        return await self._run(lambda: sign(message, keys, now))


class SigningPool(Service):
    """
    The frontend's signing threads: one per core (at most ``size``), started and stopped
    with the service tree. An RSA signature costs about 0.3 ms of CPU, during which
    ``cryptography`` releases the GIL: in a thread, it runs beside the reactor on another
    core instead of holding every other request up.
    """

    def __init__(self, reactor: Any, size: int | None = None) -> None:
        self._reactor = reactor
        threads = size if size is not None else max(1, min(4, os.cpu_count() or 1))
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="mmgun-signing")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        # Waits for a signature in progress: its request is then answered (or lost) as usual.
        self.pool.stop()

    def run(self, work: Callable[[], bytes]) -> Deferred[bytes]:
        return deferToThreadPool(self._reactor, self.pool, work)
