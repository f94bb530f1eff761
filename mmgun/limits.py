"""
Abuse limits: token buckets per client or per source address, a cap on queued
recipients, and a tally that logs refusals a few lines a minute.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

_log = Logger()


@attrs.define
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; take() says how long to wait when empty."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float, count: float = 1.0) -> float:
        """0 if ``count`` tokens were taken; else seconds until they would be there (nothing taken)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= count:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate if self.rate > 0 else float("inf")


class RateLimiter:
    """One token bucket per key (a client, a source address); ``rate`` 0 means no limit."""

    def __init__(self, rate: float, burst: float, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._max_keys = max_keys

    def take(self, key: str, count: float = 1.0) -> float:
        if self.rate <= 0:
            return 0.0
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                # Full buckets carry no information: forget them first.
                self._buckets = {k: b for k, b in self._buckets.items() if b.tokens + (now - b.updated) * b.rate < b.burst}
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
        return bucket.take(now, min(count, self.burst))

    def blocked(self, key: str) -> float:
        """Seconds until one token is there, without taking it."""
        if self.rate <= 0 or key not in self._buckets:
            return 0.0
        bucket = self._buckets[key]
        now = self._clock.seconds()
        tokens = min(bucket.burst, bucket.tokens + (now - bucket.updated) * bucket.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / bucket.rate


class LogTally:
    """
    Counts events and logs them as a warning at most once per ``interval`` seconds per
    key, with the count since that key's last line: a flood (refused connections, failed
    attempts with one API key id) is a few lines a minute, not one per event. At most
    ``max_keys`` keys are remembered (then all are forgotten: a key's next event logs).
    """

    def __init__(self, clock: IReactorTime, text: str, interval: float = 60.0, max_keys: int = 10_000) -> None:
        self._clock = clock
        self._text = text
        self._interval = interval
        self._max_keys = max_keys
        #: key -> (events not yet logged, when last logged)
        self._seen: dict[Hashable, tuple[int, float]] = {}
        #: Every event since the start, for tests and operators.
        self.total = 0

    def note(self, key: Hashable = None, /, **fields: object) -> None:
        """One event for ``key``; ``fields`` fill ``text`` (besides ``count``) when a line is logged."""
        self.total += 1
        now = self._clock.seconds()
        entry = self._seen.get(key)
        if entry is None and len(self._seen) >= self._max_keys:
            self._seen.clear()
        pending, logged = entry if entry is not None else (0, float("-inf"))
        pending += 1
        if now - logged >= self._interval:
            _log.warn(self._text, count=pending, **fields)
            pending, logged = 0, now
        self._seen[key] = (pending, logged)


#: A periodic count over the whole queue (QueueCap, the queue gauges) waits at least this many
#: times as long as its last run took before the next: with 100,000 envelopes queued, each
#: count takes 0.2–0.4 s of the process's one SQLite connection, which the submissions wait for.
SLOW_COUNT_FACTOR = 20


def paced(service: TimerService, base: float, took: float) -> None:
    """Space ``service``'s next runs by ``base``, or SLOW_COUNT_FACTOR × ``took`` when that is longer."""
    loop = getattr(service, "_loop", None)
    if loop is not None:
        loop.interval = max(base, SLOW_COUNT_FACTOR * took)


class QueueCap(TimerService):
    """
    Refuses a submission that would take a client past ``limit`` pending recipients or
    past ``max_bytes`` bytes of messages not yet finished (0: no such cap).

    The counts are read from the store every ``interval`` seconds (queries over the
    unfinished envelopes only) and increased locally in between, so the caps hold to
    within what other frontend processes accepted in the last interval. The byte count
    is the size of each unfinished submission's message, once however many envelopes
    it has; a finished submission's message is erased, so it no longer counts.
    """

    def __init__(self, store: Any, clock: IReactorTime, limit: int, interval: float = 5.0, max_bytes: int = 0) -> None:
        super().__init__(interval, self.refresh)
        self.clock = clock
        self._interval = interval
        self._store = store
        self.limit = limit
        self.max_bytes = max_bytes
        self.counts: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def refresh(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refresh())

    async def _refresh(self) -> None:
        started = self.clock.seconds()
        try:
            if self.limit > 0:
                self.counts = await self._store.queued_by_client()
            if self.max_bytes > 0:
                self.bytes = await self._store.queued_bytes_by_client()
        except Exception:
            _log.failure("reading queued recipients and bytes per client failed")
        paced(self, self._interval, self.clock.seconds() - started)

    def admit(self, client: str, recipients: int, size: int = 0) -> str | None:
        """
        None if ``client`` may queue ``recipients`` more in a message of ``size`` bytes
        (and they are counted); else why not, for the 429's message.
        """
        queued = self.counts.get(client, 0)
        if self.limit > 0 and queued + recipients > self.limit:
            return f"this client has more than {self.limit} recipients queued"
        queued_bytes = self.bytes.get(client, 0)
        if self.max_bytes > 0 and queued_bytes + size > self.max_bytes:
            return f"this client has more than {self.max_bytes} bytes of messages queued"
        if self.limit > 0:
            self.counts[client] = queued + recipients
        if self.max_bytes > 0:
            self.bytes[client] = queued_bytes + size
        return None

    def forget(self, client: str, recipients: int, size: int = 0) -> None:
        """Take back what :meth:`admit` counted for a submission that was not queued after all (a replay, an error)."""
        if self.limit > 0 and client in self.counts:
            self.counts[client] = max(0, self.counts[client] - recipients)
        if self.max_bytes > 0 and client in self.bytes:
            self.bytes[client] = max(0, self.bytes[client] - size)
