"""
Where SQLite transactions run: on adbapi's one pool thread (:class:`PoolRunner`, the
daemon) or at once on the calling thread (:class:`SyncRunner`, tests and the admin
command); driver errors become :class:`mmgun.store.StorageError`, and every write checks
that the file written is still the database (:class:`DatabaseFile`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import DatabaseFull, DatabaseGone, StorageError
from . import queries as Q
from .lock import WriteLock
from .schema import CONNECT_OPTIONS, _setup, connect

_log = Logger()
T = TypeVar("T")


_LASTING = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOTADB,
    }
)


def _primary_code(error: BaseException | None) -> int:
    return getattr(error, "sqlite_errorcode", 0) & 0xFF


def _storage_error(error: sqlite3.Error) -> StorageError:
    """The StorageError for a driver error (raise it ``from`` that error)."""
    if _primary_code(error) == sqlite3.SQLITE_FULL:
        return DatabaseFull(str(error))
    return StorageError(str(error))


def _lasting(error: BaseException) -> bool:
    """Whether a failed write means writes fail until someone acts (not a busy database, not a bug)."""
    if isinstance(error, (DatabaseGone, DatabaseFull)):
        return True
    return isinstance(error, StorageError) and _primary_code(error.__cause__) in _LASTING


class DatabaseFile:
    """
    The database file a runner's connection opened, known by ``(st_dev, st_ino)``, and
    how writes to it are going.

    SQLite goes on writing to a file that was deleted, or renamed over, while it is open,
    and its commits succeed: a relay that acknowledged them would lose that mail at the next
    restart. So every write checks, inside its transaction and before COMMIT, that the file
    at the path (and its ``-wal``, which holds the newest commits) is still the one the
    connection opened — two stats — and is rolled back with :class:`DatabaseGone`
    otherwise; the periodic watch and /healthz check the same. One critical line is logged
    when the file goes, one when it is back (moved back into place).

    :meth:`check` runs on any thread; the rest on the reactor thread.
    """

    def __init__(self, path: str, stat_path: Callable[[str], os.stat_result] = os.stat) -> None:
        self.path = os.path.abspath(path)
        self._stat = stat_path
        self.identity: tuple[int, int] | None = None
        # The -wal exists while a connection is open in WAL mode, and SQLite deletes it only
        # when the last one closes: recorded at the first check after the connection opened.
        self._wal_identity: tuple[int, int] | None = None
        self._wal = False
        #: Why the last write failed, when it failed for a reason that lasts; None once one succeeds.
        self.write_error: str | None = None
        self._gone: str | None = None

    def opened(self, conn: sqlite3.Connection) -> None:
        """Right after ``conn`` (re)opened the file: remember it, or insist it is the one first opened."""
        self._wal_identity = None
        self._wal = conn.execute(Q.JOURNAL_MODE).fetchone()[0] == "wal"
        if self.identity is None:
            st = self._stat(self.path)
            self.identity = (st.st_dev, st.st_ino)
        else:
            self.check()

    def check(self, writing: bool = False) -> None:
        """
        Raise DatabaseGone unless the files at the path are the ones this connection opened.
        ``writing``: called inside a write transaction, when the connection surely has its -wal open.
        """
        if self.identity is None:
            return
        if self._identity_of(self.path, "database file") != self.identity:
            raise DatabaseGone("the database file was replaced by another file while mmgun had it open")
        if not self._wal:
            return
        wal = self.path + "-wal"
        if self._wal_identity is None:
            if writing:
                self._wal_identity = self._identity_of(wal, "database's -wal file")
        elif self._identity_of(wal, "database's -wal file") != self._wal_identity:
            raise DatabaseGone("the database's -wal file was replaced by another file while mmgun had it open")

    def _identity_of(self, path: str, name: str) -> tuple[int, int]:
        try:
            st = self._stat(path)
        except FileNotFoundError:
            raise DatabaseGone(f"the {name} was deleted while mmgun had it open") from None
        except OSError as e:
            raise DatabaseGone(f"the {name} cannot be found: {e.strerror}") from None
        return (st.st_dev, st.st_ino)

    def problem(self) -> str | None:
        """Why a write would fail now, or None (see :meth:`mmgun.store.Store.write_problem`)."""
        try:
            self.check()
        except DatabaseGone as e:
            self._report_gone(str(e))
            return str(e)
        self._report_back()
        return self.write_error

    def succeeded(self, result: T) -> T:
        """After a write committed (its check passed): writes work."""
        self._report_back()
        if self.write_error is not None:
            _log.info("writes to database {path} succeed again", path=self.path)
            self.write_error = None
        return result

    def failed(self, failure: Failure) -> Failure:
        """After a write failed: remember a reason that lasts, and say it once."""
        error = failure.value
        if isinstance(error, DatabaseGone):
            self._report_gone(str(error))
        elif _lasting(error):
            if self.write_error is None:
                _log.error(
                    "writes to database {path} fail: {error}; submissions are refused (503) until one succeeds",
                    path=self.path,
                    error=str(error),
                )
            self.write_error = str(error)
        return failure

    def _report_gone(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
            _log.critical(
                "database {path}: {reason}; nothing written now would survive a restart, so every write "
                "is refused: put the file back or restart mmgun",
                path=self.path,
                reason=reason,
            )

    def _report_back(self) -> None:
        if self._gone is not None:
            self._gone = None
            _log.warn("database {path} is the file mmgun opened again; writes are accepted", path=self.path)


def _in_transaction(conn: sqlite3.Connection, begin: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        conn.execute(begin)
        result = fn(conn, *args)
        conn.execute(Q.COMMIT)
        return result
    except BaseException as e:
        if conn.in_transaction:
            conn.rollback()
        if isinstance(e, sqlite3.Error):
            raise _storage_error(e) from e
        raise


def _outside_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(conn, *args)
    except sqlite3.Error as e:
        raise _storage_error(e) from e


def _checked(conn: sqlite3.Connection, file: DatabaseFile, fn: Callable[..., T], *args: Any) -> T:
    """``fn``, then the check that the file written is still the database: before COMMIT, so a failed check rolls back."""
    result = fn(conn, *args)
    file.check(writing=True)
    return result


def _write(conn: sqlite3.Connection, lock: WriteLock, file: DatabaseFile, fn: Callable[..., T], *args: Any) -> T:
    with lock:
        return _in_transaction(conn, Q.BEGIN_WRITE, _checked, file, fn, *args)


def _write_outside_transaction(
    conn: sqlite3.Connection, lock: WriteLock, file: DatabaseFile, fn: Callable[..., T], *args: Any
) -> T:
    with lock:
        file.check()
        return _outside_transaction(conn, fn, *args)


class PoolRunner:
    """
    Runs transactions on adbapi's thread pool (one shared pool per process). Writes,
    and ``autocommit`` (whose one use, incremental_vacuum, writes), take the
    :class:`WriteLock` in the pool thread; reads do not.
    """

    def __init__(self, path: str, reactor: Any = None) -> None:
        kwargs: dict[str, Any] = {}
        if reactor is not None:
            kwargs["cp_reactor"] = reactor
        self._lock = WriteLock(path)
        #: The database's real path: two paths to one file share what is named after it.
        self.database = os.path.realpath(path)
        #: The file the pool's connection opened, and how writes to it go.
        self.file = DatabaseFile(path)
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            **CONNECT_OPTIONS,
            # One connection, one thread: SQLite has one writer at a time anyway, and two
            # connections of one process would wait for each other in SQLite's busy
            # handler (sleeps of 1, 2, 5, 10… ms) instead of queueing in order here.
            # The one connection is also what lets one WriteLock serve the pool.
            cp_min=1,
            cp_max=1,
            cp_openfun=self._opened,
            cp_noisy=False,
            **kwargs,
        )

    def _opened(self, conn: sqlite3.Connection) -> None:
        _setup(conn)
        self.file.opened(conn)

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d = self._pool.runWithConnection(_write, self._lock, self.file, fn, *args)
        return d.addCallbacks(self.file.succeeded, self.file.failed)

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._pool.runWithConnection(_in_transaction, Q.BEGIN_READ, fn, *args)

    def autocommit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d = self._pool.runWithConnection(_write_outside_transaction, self._lock, self.file, fn, *args)
        return d.addCallbacks(self.file.succeeded, self.file.failed)

    def problem(self) -> str | None:
        return self.file.problem()

    def close(self) -> None:
        self._pool.close()  # Joins the pool thread: nothing holds the lock after this.
        self._lock.close()


class SyncRunner:
    """
    Runs transactions at once on the calling thread: for tests on a Clock and for the
    admin command. Its writes take the :class:`WriteLock` too, so that an operator's
    ``mmgun queue flush`` queues behind the daemons' writes (blocking, like the command)
    rather than making them sleep in the busy handler while it holds SQLite's lock.
    """

    def __init__(self, path: str) -> None:
        self._conn = connect(path)
        self._lock = WriteLock(path)
        #: The database's real path: two paths to one file share what is named after it.
        self.database = os.path.realpath(path)
        self.file = DatabaseFile(path)
        self.file.opened(self._conn)

    def _run(self, txn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            return succeed(txn(self._conn, *args))
        except Exception as e:
            return fail(e)

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._run(_write, self._lock, self.file, fn, *args).addCallbacks(self.file.succeeded, self.file.failed)

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._run(_in_transaction, Q.BEGIN_READ, fn, *args)

    def autocommit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d = self._run(_write_outside_transaction, self._lock, self.file, fn, *args)
        return d.addCallbacks(self.file.succeeded, self.file.failed)

    def problem(self) -> str | None:
        return self.file.problem()

    def close(self) -> None:
        self._conn.close()
        self._lock.close()

