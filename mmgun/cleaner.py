"""The cleaner role: forget finished submissions after the retention period."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

_log = Logger()

#: Submissions deleted per transaction: keeps each write lock short.
BATCH = 500


class Cleaner(TimerService):
    """
    A LoopingCall every ``interval`` seconds; a failed pass is logged and the next one runs.
    A finished submission is deleted once ``retention`` has passed and its Idempotency-Key,
    if it has one, has expired (24 h): a shorter retention never lets a retry queue it twice.
    """

    def __init__(self, store: Any, clock: Any, *, interval: float, retention: float, wall: Any = None) -> None:
        super().__init__(interval, self.clean)
        self.clock = clock
        self._store = store
        self._clock = clock
        #: Wall-clock time, for the stored timestamps (the reactor's clock is monotonic: mmgun.clock).
        self._wall = wall if wall is not None else clock.seconds
        self._retention = retention

    def clean(self) -> Deferred[int]:
        return Deferred.fromCoroutine(self._clean())

    async def _clean(self) -> int:
        total = 0
        try:
            now = self._wall()
            before = now - self._retention
            while True:
                # The store keeps a submission whose Idempotency-Key is younger than a day, even past retention.
                deleted = await self._store.clean(before, BATCH, now)
                total += deleted
                if deleted < BATCH:
                    break
            events = 0
            while True:
                # Events are kept --retention after they happen (issue 14).
                deleted = await self._store.clean_events(before, BATCH)
                events += deleted
                if deleted < BATCH:
                    break
            # MTA-STS policies past their max_age (issue 18): one row per domain at most, so one statement.
            await self._store.forget_expired_mta_sts_policies(now)
            if total or events:
                # The backend's bounded housekeeping (SQLite: free pages back to the file system).
                await self._store.upkeep()
                _log.info("cleaner deleted {count} finished submissions and {events} events", count=total, events=events)
        except Exception:
            _log.failure("cleaning pass failed; the next one will try again")
        return total
