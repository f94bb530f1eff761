"""Abuse limits: token buckets per client or per source address, and a cap on queued recipients."""

from __future__ import annotations

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


class QueueCap(TimerService):
    """
    Refuses a submission that would take a client past ``limit`` pending recipients.

    The counts are read from the store every ``interval`` seconds (a query over the
    unfinished envelopes only) and increased locally in between, so the cap holds to
    within what other frontend processes accepted in the last interval.
    """

    def __init__(self, store: Any, clock: IReactorTime, limit: int, interval: float = 5.0) -> None:
        super().__init__(interval, self.refresh)
        self.clock = clock
        self._store = store
        self.limit = limit
        self.counts: dict[str, int] = {}

    def refresh(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refresh())

    async def _refresh(self) -> None:
        if self.limit <= 0:
            return
        try:
            self.counts = await self._store.queued_by_client()
        except Exception:
            _log.failure("reading queued recipients per client failed")

    def admit(self, client: str, recipients: int) -> bool:
        """True (and counted) if ``client`` may queue ``recipients`` more."""
        if self.limit <= 0:
            return True
        queued = self.counts.get(client, 0)
        if queued + recipients > self.limit:
            return False
        self.counts[client] = queued + recipients
        return True
