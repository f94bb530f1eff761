"""The :class:`mmgun.store.Store` on a PostgreSQL database."""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.pq import ConnStatus
from twisted.application.service import IService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..sql import SQLStore
from . import queries as Q
from .runners import PoolRunner, SyncRunner, connect, idle_in_transaction, masked
from .schema import check_existing, prepare

_log = Logger()

#: Connections (and pool threads) per process unless --database-pool-size says otherwise.
DEFAULT_POOL_SIZE = 4


class PostgresStore(SQLStore):
    """The :class:`mmgun.store.Store` on one PostgreSQL database, shared with other hosts."""

    _runner: PoolRunner | SyncRunner

    def __init__(self, runner: PoolRunner | SyncRunner, url: str, reactor: Any = None) -> None:
        """``reactor``: the daemon's, whose clock groups submissions and whose thread pool takes identity locks."""
        super().__init__(runner, Q, reactor)
        self._url = url
        self._reactor = reactor
        #: Sender identities locked by this store, all on :attr:`_locks`.
        self._identities: set[str] = set()
        #: The connection holding the identities' session advisory locks, opened at the first lock_identity.
        self._locks: psycopg.Connection[Any] | None = None
        self._locks_lost = False
        #: A re-take of the identities' locks is running in the thread pool.
        self._retaking = False

    @classmethod
    def open(
        cls, url: str, reactor: Any = None, pool_size: int = DEFAULT_POOL_SIZE, lease_seconds: float | None = None
    ) -> PostgresStore:
        """
        The daemon's store: the schema created or migrated now (blocking, at start-up), then a
        pool of ``pool_size``, whose sessions are ended by the server when left idle inside a
        transaction for longer than :func:`.runners.idle_in_transaction` of ``lease_seconds``.
        """
        prepare(url)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        return cls(PoolRunner(url, reactor, pool_size, idle_in_transaction(lease_seconds)), url, reactor)

    @classmethod
    def open_sync(cls, url: str) -> PostgresStore:
        prepare(url)
        return cls(SyncRunner(url), url)

    @classmethod
    def open_existing(cls, url: str) -> PostgresStore:
        """A synchronous store on a database the daemon has made, for ``mmgun``; never creates nor migrates."""
        check_existing(url)
        return cls(SyncRunner(url), url)

    async def lock_identity(self, identity: str) -> bool:
        """
        Take a session advisory lock on ``identity`` (``pg_try_advisory_lock`` of a hash of
        ``mmgun-sender:<identity>``) on a connection of its own, held while this store is
        open: False when another session, on any host, holds it. PostgreSQL frees it when
        that connection ends, the holder's death included; if this store's connection is
        lost (the database restarted), so are its locks: :meth:`write_problem` (called every
        few seconds) logs it and takes them again on a new connection as soon as the database
        answers, and says so at critical level if another process took one meanwhile.
        """
        if identity in self._identities:
            return True
        if self._reactor is None:
            taken = self._take(identity)
        else:
            taken = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._take, identity)
        if taken:
            self._identities.add(identity)
        return taken

    def _take(self, identity: str) -> bool:
        try:
            if self._locks is None or self._locks.closed or self._locks.broken:
                self._locks = connect(self._url)
                self._locks_lost = False
            (taken,) = self._locks.execute(Q.LOCK_IDENTITY, (identity,)).fetchone()  # type: ignore[misc]
        except Exception as e:
            _log.warn("cannot lock sender identity {identity}: {error}", identity=identity, error=str(e))
            return False
        return bool(taken)

    def write_problem(self) -> str | None:
        self._watch_locks()
        return super().write_problem()

    def _watch_locks(self) -> None:
        """Log (once) that the connection holding the identity locks is gone, and take them again; without blocking."""
        conn = self._locks
        if self._retaking or not self._identities:
            return
        if self._locks_lost:
            self._retake_later()  # the database did not answer the last try
            return
        if conn is None:
            return
        gone = conn.closed or conn.broken
        if not gone:
            try:
                readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
                if readable:
                    # An idle session hears nothing but its own end (or a notice): read it, without waiting.
                    conn.pgconn.consume_input()
                    gone = conn.pgconn.status != ConnStatus.OK
            except (OSError, ValueError, psycopg.Error):
                gone = True
        if gone:
            self._locks_lost = True
            _log.error(
                "the connection to {database} holding the locks of sender identities {identities} was lost, and the "
                "locks with it: they are taken again as soon as the database answers",
                database=masked(self._url),
                identities=sorted(self._identities),
            )
            self._retake_later()

    def _retake_later(self) -> None:
        if self._reactor is None:
            return  # the admin command and tests: nothing runs long enough to need it
        self._retaking = True
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._retake)
        d.addBoth(self._retaken)

    def _retake(self) -> list[str]:
        """On a new connection, lock every identity again; those another session holds now."""
        old, self._locks = self._locks, None
        if old is not None:
            old.close()
        conn = connect(self._url)
        self._locks = conn
        taken = []
        for identity in sorted(self._identities):
            (locked,) = conn.execute(Q.LOCK_IDENTITY, (identity,)).fetchone()  # type: ignore[misc]
            if not locked:
                taken.append(identity)
        return taken

    def _retaken(self, result: list[str] | Failure) -> None:
        self._retaking = False
        if isinstance(result, Failure):
            return  # the database does not answer yet: the next write_problem tries again
        self._locks_lost = False
        if result:
            _log.critical(
                "sender identities {identities} were taken by another process while their locks were lost: both "
                "may now deliver the same envelopes; stop one of them",
                identities=result,
            )
        else:
            _log.info("the locks of sender identities {identities} are held again", identities=sorted(self._identities))

    def listen_for_wakeups(self, wake: Callable[[], None]) -> IService | None:
        """
        A service that, while running, calls ``wake`` when a transaction of any process on any
        host queued mail due now (LISTEN/NOTIFY on a connection of its own: :mod:`.wake`).
        None for a store without a reactor (the admin command and tests).
        """
        if self._reactor is None:
            return None
        from .wake import NotifyListener

        return NotifyListener(self._url, wake, self._reactor)

    async def upkeep(self) -> None:
        """Nothing: PostgreSQL's autovacuum reclaims what the cleaner deletes, and keeps the statistics fresh."""

    async def close(self) -> None:
        self._runner.close()
        if self._locks is not None:
            try:
                if not (self._locks.closed or self._locks.broken):
                    self._locks.execute(Q.UNLOCK_IDENTITIES)
            except psycopg.Error:
                pass  # gone already, and its locks with it
            self._locks.close()
            self._locks = None
        self._identities.clear()
