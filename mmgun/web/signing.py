"""
Sending domains as the frontend uses them: whose a domain is (the sender policy, the
Mailgun endpoints' ``{domain}``) and the keys its mail is signed with, read from the
store at most once per :data:`DOMAIN_CACHE_SECONDS` per domain; and the DKIM signing
itself, by a :class:`mmgun.signer.Signer` (in the service: a helper process,
:class:`mmgun.signer.SignerProcess`, which makes the fields of a message of up to 256 KiB
and the private-key operations of a larger one, so that signing holds the frontend's GIL
only to write the message on a pipe and read the fields back).

A message is signed only for the client its From domain is registered to: another
client sending from that domain (``--sender-policy any``) gets no signature, so the
relay never lends a domain's DKIM reputation (and DMARC alignment) to someone else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.interfaces import IReactorTime

from ..config import SENDER_POLICIES
from ..signer import InProcessSigner, Signer

if TYPE_CHECKING:
    from ..store import DomainKey, Store

#: How long a domain's owner and keys are trusted before the store is asked again: a
#: domain added, removed or rotated takes effect in every frontend within this many seconds.
DOMAIN_CACHE_SECONDS = 5.0
#: Domains cached at most; beyond, the cache starts over (a client sending from many
#: unregistered domains cannot make it grow without bound).
MAX_CACHED_DOMAINS = 10_000


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


class SendingDomains:
    """
    Domain lookups, the sender policy and signing for :class:`mmgun.web.submit.Pipeline`.
    ``clock`` times the cache (monotonic in production); ``signer`` makes the private-key
    operations (:class:`mmgun.signer.SignerProcess`; default: in this process, on the
    calling thread: tests and tools).
    """

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        *,
        policy: str = "any",
        signer: Signer | None = None,
    ) -> None:
        if policy not in SENDER_POLICIES:
            raise ValueError(f"unknown sender policy {policy!r}")
        self._store = store
        self._clock = clock
        self.policy = policy
        self.signer: Signer = signer if signer is not None else InProcessSigner()
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
        """
        ``message`` signed with ``state``'s keys when its domain is ``client``'s and has keys;
        else as it is. ValueError if a key does not match its algorithm.
        """
        if state.client != client or not state.keys:
            return message
        return await self.signer.sign_message(message, state.keys, now)
