"""
Who is calling: API keys (``Authorization: Basic api:<key>`` or ``Bearer <key>``) and,
deprecated, the seed's ``client_id`` field checked against the clients file.

A key is ``mmk_<key id>_<secret>``: the key id (public, 16 hex digits) finds the row,
the secret (256 random bits) is never stored — only the SHA-256 of the whole key, which
is enough for a high-entropy secret — and is compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .clients import Clients
from .limits import LogTally
from .store import StoredKey

_log = Logger()

KEY_PREFIX = "mmk"
_KEY = re.compile(r"mmk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
#: Stable client ids: what the database and logs name a client by.
CLIENT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: How long a looked-up key is trusted before the database is asked again: a revoked
#: key is refused by every frontend within this many seconds.
KEY_CACHE_SECONDS = 2.0
#: last_used_at is written at most this often per key.
TOUCH_INTERVAL = 60.0
#: The ids of all keys are read at most this often, for the key ids sent from an address
#: blocked for failed attempts: a key created since is refused from there for this long.
KEY_IDS_INTERVAL = 5.0


class AuthenticationFailed(Exception):
    """
    Deliberately uninformative: the caller learns only that it failed. ``key_id`` (for
    our logs, never for the client) names the API key that was tried when it exists.
    """

    def __init__(self, key_id: str | None = None) -> None:
        super().__init__()
        self.key_id = key_id


def new_key() -> tuple[str, str]:
    """A fresh (key id, key)."""
    key_id = secrets.token_hex(8)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("ascii")).digest()


def check_client_id(client: str) -> str:
    """Client ids are lower-case names; ``c-…`` is kept for the labels of clients-file ids."""
    if not CLIENT_ID.fullmatch(client) or client.startswith("c-"):
        raise ValueError(
            f"invalid client id {client!r}: use 1-63 of a-z 0-9 . _ - starting with a letter or digit, not 'c-'"
        )
    return client


def key_from_authorization(header: bytes) -> str:
    """The API key carried by an Authorization header (Basic with user "api", or Bearer)."""
    scheme, _, credentials = header.strip().partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() == b"bearer":
        key = credentials
    elif scheme.lower() == b"basic":
        try:
            user, _, key = base64.b64decode(credentials, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            raise AuthenticationFailed() from None
        if user != b"api":
            raise AuthenticationFailed()
    else:
        raise AuthenticationFailed()
    try:
        return key.decode("ascii")
    except UnicodeDecodeError:
        raise AuthenticationFailed() from None


@attrs.define
class _CachedKey:
    stored: StoredKey | None
    fetched_at: float


class Authenticator:
    """
    Turns credentials into a client label, or raises AuthenticationFailed.

    A key id is looked up in the store at most once per :data:`KEY_CACHE_SECONDS`
    (found or not). Random key ids miss that cache, and a key from an address blocked
    for failed attempts is still checked (so that the valid keys behind a shared address
    keep working); so, from such an address, a key id is looked up only if it is the id
    of a real key (valid or revoked), as told by the set of all key ids, read at most
    once per :data:`KEY_IDS_INTERVAL` seconds (when a blocked address sends an id not in
    it) and completed by each key found. Any other key id is refused without a read.
    Guessing from blocked addresses, however fast and from however many, thus costs at
    most one read of the key ids per 5 s, besides one read per real key id per 2 s.
    The price: a key created less than 5 s ago may be refused from a blocked address
    (429) until the next read of the key ids.
    """

    def __init__(
        self,
        store: Any,
        clients: Callable[[], Clients],
        clock: IReactorTime,
        wall: Callable[[], float] | None = None,
    ) -> None:
        """
        ``clock`` times the key cache and the write interval (monotonic in production:
        :mod:`mmgun.clock`); ``wall`` (default ``clock.seconds``) is the time of use stored
        as ``last_used_at``.
        """
        self._store = store
        self._clients = clients
        self._clock = clock
        self._wall = wall if wall is not None else clock.seconds
        self._cache: dict[str, _CachedKey] = {}
        self._touched: dict[str, float] = {}
        #: The ids of all keys when last read, and the ids found since.
        self._key_ids: set[str] = set()
        self._key_ids_read = float("-inf")

    async def authenticate(self, authorization: bytes | None, client_id: object, *, blocked_source: str | None = None) -> str:
        """
        The client label for ``authorization`` (an API key) or else ``client_id``.
        ``blocked_source``: the caller's address when it is blocked for failed attempts
        (an unknown key id from it is looked up only as the class docstring says).
        """
        if authorization is not None:
            return await self._by_key(key_from_authorization(authorization), blocked_source)
        label = self._clients().authenticate(client_id)
        if label is None:
            raise AuthenticationFailed()
        return label

    async def _by_key(self, key: str, blocked_source: str | None) -> str:
        match = _KEY.fullmatch(key)
        if match is None:
            raise AuthenticationFailed()
        key_id = match.group(1)
        now = self._clock.seconds()
        cached = self._cache.get(key_id)
        if cached is None or now - cached.fetched_at >= KEY_CACHE_SECONDS:
            if blocked_source is not None and not await self._exists(key_id, now):
                raise AuthenticationFailed()
            cached = _CachedKey(await self._store.find_key(key_id), now)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = cached
            if cached.stored is not None:
                self._key_ids.add(key_id)
        stored = cached.stored
        # Compare even for an unknown id, so that timing does not tell the two apart.
        expected = stored.key_hash if stored is not None else b"\0" * 32
        if not hmac.compare_digest(expected, key_hash(key)) or stored is None or stored.revoked:
            raise AuthenticationFailed(key_id if stored is not None else None)
        self._touch(key_id, now)
        return stored.client

    async def _exists(self, key_id: str, now: float) -> bool:
        """Whether ``key_id`` names a real key, as far as the last read of the key ids tells."""
        if key_id not in self._key_ids and now - self._key_ids_read >= KEY_IDS_INTERVAL:
            self._key_ids_read = now  # before the read: concurrent requests do not read again
            self._key_ids = await self._store.key_ids()
        return key_id in self._key_ids

    def _touch(self, key_id: str, now: float) -> None:
        if now - self._touched.get(key_id, float("-inf")) < TOUCH_INTERVAL:
            return
        self._touched[key_id] = now

        def failed(f: Any) -> None:
            _log.failure("could not record the use of API key {key_id}", f, key_id=key_id)

        from twisted.internet.defer import Deferred

        Deferred.fromCoroutine(self._store.touch_keys([(key_id, self._wall())])).addErrback(failed)


class KeyFailures(LogTally):
    """
    Failed attempts per existing API key id, logged as a warning at most once per
    ``interval`` seconds per key id (with the count since the last line): someone
    holding a revoked key, or trying secrets for a known key id, shows in the logs
    without one line per attempt. The key itself is never logged.
    """

    def __init__(self, clock: IReactorTime, interval: float = 60.0, max_keys: int = 10_000) -> None:
        super().__init__(
            clock,
            "{count} failed authentication attempts with API key id {key_id} (latest from {source})",
            interval,
            max_keys,
        )

    def failed(self, key_id: str, source: str) -> None:
        self.note(key_id, key_id=key_id, source=source)
