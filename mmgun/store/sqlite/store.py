"""The :class:`mmgun.store.Store` on one SQLite file: :class:`mmgun.store.sql.SQLStore` and what only SQLite does."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from typing import Any

from twisted.logger import Logger

from ..sql import CLEAR_BATCH, SQLStore
from . import queries as Q
from .runners import PoolRunner, SyncRunner
from .schema import check_existing, prepare

__all__ = ["CLEAR_BATCH", "VACUUM_PAGES", "SQLiteStore"]

_log = Logger()

#: Free pages handed back to the file system by one upkeep (one cleaner pass).
VACUUM_PAGES = 2000


def _vacuum(conn: sqlite3.Connection, pages: int) -> None:
    # executescript steps the pragma to its end; execute() stops after its first step (it returns no
    # columns, so the sqlite3 module resets it at once), which frees one page.
    conn.executescript(Q.INCREMENTAL_VACUUM.format(pages=pages))


class SQLiteStore(SQLStore):
    """The :class:`mmgun.store.Store` on one SQLite file."""

    _runner: PoolRunner | SyncRunner

    def __init__(self, runner: PoolRunner | SyncRunner, clock: Any = None) -> None:
        """``clock``: the daemon's reactor, so that submissions of one reactor turn share a commit (GroupCommit)."""
        super().__init__(runner, Q, clock)
        #: Sender identities locked by this store (lock_identity): name → the lock file's descriptor.
        self._identities: dict[str, int] = {}

    @classmethod
    def open(cls, path: str, reactor: Any = None) -> SQLiteStore:
        prepare(path)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        return cls(PoolRunner(path, reactor), reactor)

    @classmethod
    def open_sync(cls, path: str) -> SQLiteStore:
        prepare(path)
        return cls(SyncRunner(path))

    @classmethod
    def open_existing(cls, path: str) -> SQLiteStore:
        """
        A synchronous store on a database the daemon has already created, for ``mmgun``.

        Never creates the file nor changes its schema (a typo in a path must not leave an
        empty queue behind); raises StorageError with one line for the operator otherwise.
        """
        check_existing(path)
        return cls(SyncRunner(path))

    async def lock_identity(self, identity: str) -> bool:
        """
        Take the exclusive lock of a sender identity for as long as this store is open:
        ``flock(2)`` on ``<database>-sender-<identity>.lock`` beside the database (made on
        first use and never deleted, like WriteLock's: unlinking races with lockers). False
        when another open store (another process, or another store in this one) holds it,
        or when the file cannot be made or locked; the kernel frees it when its holder dies.
        """
        if identity in self._identities:
            return True
        path = f"{self._runner.database}-sender-{identity}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            _log.warn("cannot open the sender identity lock {path}: {error}", path=path, error=str(e))
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if not isinstance(e, BlockingIOError):
                _log.warn("cannot lock the sender identity lock {path}: {error}", path=path, error=str(e))
            return False
        self._identities[identity] = fd
        return True

    async def upkeep(self) -> None:
        """Return up to VACUUM_PAGES free pages to the file system (PRAGMA incremental_vacuum)."""
        await self._runner.autocommit(_vacuum, VACUUM_PAGES)

    async def close(self) -> None:
        self._runner.close()
        for fd in self._identities.values():
            os.close(fd)
        self._identities.clear()
