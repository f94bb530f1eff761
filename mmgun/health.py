"""
Whether this process can accept mail now: what GET /healthz reports and what admits a submission.

A health check that only asks the database to ``SELECT 1`` answers yes while every write
fails (a full disk, a read-only file, a database file deleted under the running process).
:class:`Health` asks what a write needs: the file at the path is the one the store
opened and holds, the file and its folder are writable, the last write did not fail for a
reason that lasts, the file system has room, and the database answers. A PostgreSQL
database (``--database`` a URL) has no file here: the store's own word (unreachable, full)
and the answer to ``SELECT 1`` are all there is to ask.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .store import Store, is_postgresql

_log = Logger()

#: How long a statvfs answer is reused: /send asks on every request.
FREE_SPACE_TTL = 1.0
#: How often the database file's identity is checked with no traffic (so the critical line comes promptly).
WATCH_INTERVAL = 5.0


def _megabytes(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"  # The unit of --min-free-space's M suffix.


class FreeSpace:
    """
    Free space on the file system of the database's folder, as an unprivileged process sees
    it (``f_bavail * f_frsize``), read at most once per ``ttl`` seconds of ``clock``.
    """

    def __init__(
        self,
        folder: str,
        minimum: int,
        clock: IReactorTime,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
        ttl: float = FREE_SPACE_TTL,
    ) -> None:
        self.folder = folder
        self.minimum = minimum
        self._clock = clock
        self._statvfs = statvfs
        self._ttl = ttl
        self._checked_at: float | None = None
        self._free: int | None = None
        self._short = False

    def available(self) -> int | None:
        """Bytes free, or None when the file system cannot be asked (then nothing is refused for it)."""
        now = self._clock.seconds()
        if self._checked_at is None or not 0 <= now - self._checked_at < self._ttl:
            self._checked_at = now
            try:
                st = self._statvfs(self.folder)
                self._free = st.f_bavail * st.f_frsize
            except OSError as e:
                _log.warn("cannot read the free space of {folder}: {error}", folder=self.folder, error=str(e))
                self._free = None
        return self._free

    def shortage(self) -> str | None:
        """Why new submissions are refused for lack of space, or None; says so in the log once per episode."""
        free = self.available()
        short = free is not None and free < self.minimum
        if short != self._short:
            self._short = short
            if short:
                _log.error(
                    "free space on the database's file system ({folder}) is {free} bytes, under --min-free-space "
                    "({minimum}): new submissions are refused (503) so that results can still be recorded",
                    folder=self.folder,
                    free=free,
                    minimum=self.minimum,
                )
            else:
                _log.info(
                    "free space on {folder} is back above --min-free-space: submissions accepted", folder=self.folder
                )
        if not short:
            return None
        assert free is not None
        return f"free space on the database's file system is {_megabytes(free)}, under the minimum of {_megabytes(self.minimum)}"


class Health:
    """
    Whether this process can accept mail now. :meth:`admission` is the cheap part asked on
    every /send (free space); :meth:`check` is everything, for /healthz. Both answer with
    a reason (no path, no secret: /healthz is unauthenticated) or None.
    """

    def __init__(
        self,
        store: Store,
        database: str,
        clock: IReactorTime,
        *,
        min_free_space: int,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
        access: Callable[[str, int], bool] = os.access,
    ) -> None:
        self._store = store
        #: A PostgreSQL database (a URL) has no file, folder or file system here to check:
        #: only what the store says (write_problem) and whether it answers.
        self._server = is_postgresql(database)
        self._database = os.path.abspath(database)
        self._folder = os.path.dirname(self._database)
        self._access = access
        self.free_space = FreeSpace(self._folder, min_free_space, clock, statvfs)

    def admission(self) -> str | None:
        """Why a new submission is refused now (503), or None."""
        if self._server:
            return None
        return self.free_space.shortage()

    async def check(self) -> str | None:
        """Why this process cannot accept mail now, or None; the database is asked last."""
        problem = self._store.write_problem()
        if problem is not None:
            return problem
        if self._server:
            return await _ping_problem(self._store)
        # access(2) answers for this process's user; as root it still reports a read-only file system.
        if not self._access(self._database, os.W_OK):
            return "the database file is not writable"
        if not self._access(self._folder, os.W_OK):
            return "the database's folder is not writable"
        problem = self.free_space.shortage()
        if problem is not None:
            return problem
        return await _ping_problem(self._store)


async def database_problem(store: Store) -> str | None:
    """What the store alone can tell: its file is the one at its path, writes work, and it answers ``SELECT 1``."""
    problem = store.write_problem()
    if problem is not None:
        return problem
    return await _ping_problem(store)


async def _ping_problem(store: Store) -> str | None:
    """Whether the database answers ``SELECT 1``."""
    try:
        await store.ping()
    except Exception:
        _log.failure("health check: the database does not answer")
        return "the database does not answer"
    return None


class DatabaseWatch(TimerService):
    """
    Asks the store every ``interval`` seconds whether its database file is still the one at
    its path, so that a deleted or replaced database is reported (one critical line, by the
    store) even while no request comes. Never raises out of its loop.
    """

    def __init__(self, store: Store, clock: IReactorTime, interval: float = WATCH_INTERVAL) -> None:
        super().__init__(interval, self.check)
        self.clock = clock
        self._store = store

    def check(self) -> Deferred[None] | None:
        try:
            self._store.write_problem()
        except Exception:
            _log.failure("checking the database file failed")
        return None
