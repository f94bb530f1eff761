"""
The SQLite store: the embedded default.

Durability: WAL with ``synchronous = FULL``, so a submission is on disk before
its 200 is sent. Throughput: concurrent submissions are group-committed (the
inserts that arrive while one transaction commits go together in the next),
so the fsync and the thread hand-off are paid once per batch, not per request.
Concurrency: writes use ``BEGIN IMMEDIATE`` (a deferred transaction that reads
then writes fails at once with "database is locked" when another process
committed in between, whatever the busy timeout), and the processes on one
file take turns through :class:`WriteLock`; claims are one ``UPDATE …
RETURNING``; every write to a claimed envelope is guarded by its lease token.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import (
    FEED_END,
    FEED_START,
    LAST_ID,
    ClaimedEnvelope,
    Conflict,
    DatabaseFull,
    DatabaseGone,
    DomainKey,
    EnvelopeOutcome,
    Event,
    EventCursor,
    IdempotencyConflict,
    InDelivery,
    KeyInfo,
    NewSubmission,
    NotInQueue,
    QueueDepth,
    QueueEntry,
    QueueStats,
    RecipientOutcome,
    RecipientState,
    SendingDomain,
    StorageError,
    StoredKey,
    SubmissionState,
    Suppression,
    Webhook,
    WebhookRetry,
    _sqlite_queries as Q,
)

_log = Logger()
T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

#: How long an Idempotency-Key is remembered.
IDEMPOTENCY_WINDOW = 24 * 3600.0
#: Most submissions committed in one transaction.
MAX_GROUP = 512
BUSY_TIMEOUT = 30.0
#: Most suppression entries deleted in one transaction by clear_suppressions.
CLEAR_BATCH = 10_000
#: Most submissions one /status by Message-ID reads (a batch has one per recipient).
MAX_BY_MESSAGE_ID = 10_000
#: A writer waiting for another process's WriteLock tries again after these pauses (doubling).
_FIRST_PAUSE = 0.0001
_LAST_PAUSE = 0.001


def _os_reason(error: OSError) -> str:
    """"permission denied", not "[Errno 13] Permission denied: '/the/path'" (the caller names the path)."""
    return error.strerror.lower() if error.strerror else str(error)


def connect(path: str) -> sqlite3.Connection:
    """A connection set up the way every part of mmgun uses one."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    _setup(conn)
    return conn


def _setup(conn: sqlite3.Connection) -> None:
    for pragma in Q.CONNECTION_PRAGMAS:
        conn.execute(pragma)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; return that version."""
    conn.execute(Q.BEGIN_WRITE)
    try:
        (version,) = conn.execute(Q.USER_VERSION).fetchone()
        if version > len(Q.MIGRATIONS):
            raise StorageError(
                f"database schema version {version} is newer than this mmgun ({len(Q.MIGRATIONS)})"
            )
        for target, statements in enumerate(Q.MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute(Q.SET_USER_VERSION.format(version=target))
        conn.execute(Q.COMMIT)
    except BaseException:
        conn.rollback()
        raise
    return len(Q.MIGRATIONS)


class WriteLock:
    """
    Lets the processes writing one database take turns without long sleeps.

    A connection that finds SQLite's write lock taken retries in the busy handler,
    which sleeps 1, 2, 5, 10 … 100 ms rather than waking when the lock is freed; with a
    frontend and a sender as two processes on one file, every collision cost up to a
    whole sleep (POST p99 near 1 s, ~120 ms alone). So writers hold an exclusive
    ``flock(2)`` on ``<database>-lock`` from just before ``BEGIN IMMEDIATE`` to just
    after ``COMMIT`` or ``ROLLBACK``, and a waiting writer tries it again every 0.1 to
    1 ms (a blocking flock would wake at once, but could wait forever). Past ``timeout``
    (SQLite's busy timeout) the write fails with StorageError, as it would in SQLite.
    Readers never take it (WAL readers do not wait for writers).

    A fast path, never the safety: SQLite's lock still decides, and the busy timeout
    still covers writers without this lock (the sqlite3 shell, an older mmgun) and
    writes when the file cannot be opened (a read-only folder; one warning). The kernel
    frees it when its holder dies. The file is made on the first write and never deleted
    (unlinking races with lockers); it is readable and writable by whoever may write
    the database, and owned like it when root makes it: opening it, even read-only, is
    enough to stall the writers. One instance per connection, one thread at a time.
    """

    def __init__(self, database: str, timeout: float = BUSY_TIMEOUT) -> None:
        self.timeout = timeout
        #: How many writes found the lock taken and waited (a diagnostic; tests watch it).
        self.waits = 0
        # realpath: two paths (or symlinks) to one database share one lock, as SQLite's -wal does.
        self._database = os.path.realpath(database)
        self.path = self._database + "-lock"
        self._fd: int | None = None
        self._held = False
        self._warned = False

    def _open(self) -> int | None:
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self._warn(e)
            return None
        try:
            st = os.stat(self._database)
            writers = st.st_mode & 0o222
            os.fchmod(fd, writers | writers << 1)
            # The database's group too (else the file gets this user's primary group and
            # a daemon in the database's group could not open it); its owner only as root.
            os.fchown(fd, st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
        except OSError:
            pass  # Still a lock for this user; others fall back to the busy timeout.
        return fd

    def _warn(self, error: OSError) -> None:
        if not self._warned:
            self._warned = True
            _log.warn(
                "cannot lock {path} ({error}); writes wait in SQLite's busy handler instead",
                path=self.path,
                error=str(error),
            )

    def acquire(self) -> None:
        """Block until this connection may write (at once if the lock file is unusable)."""
        if self._fd is None:
            # Opened again on every write until it works: a folder made writable helps at once.
            self._fd = self._open()
            if self._fd is None:
                return
        pause, deadline = _FIRST_PAUSE, None
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if deadline is None:
                    self.waits += 1
                    deadline = now + self.timeout
                elif now >= deadline:
                    raise StorageError(
                        f"database is locked: another writer has held {self.path} for over {self.timeout:g} s"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, _LAST_PAUSE)
            except OSError as e:  # ENOLCK, on some network file systems
                self._warn(e)
                return
        self._held = True

    def release(self) -> None:
        if self._held and self._fd is not None:
            self._held = False
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                # Never fail a transaction that has committed: closing the file unlocks it too.
                self.close()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._held = False


#: SQLite's primary result codes for write failures that last until someone acts (a full
#: disk, a read-only file, an I/O error): /healthz reports them until a write succeeds.
#: A busy or locked database clears by itself and is not among them.
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
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
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

    def close(self) -> None:
        self._conn.close()
        self._lock.close()


#: Free space beyond twice the database's size that the one-time VACUUM asks for.
VACUUM_MARGIN = 64 << 20


def free_bytes(folder: str) -> int:
    """Free space on the file system of ``folder``, as an unprivileged process sees it."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def prepare(
    path: str, *, free_space: Callable[[str], int] = free_bytes, lock: WriteLock | None = None
) -> None:
    """
    Create the database file's folder and schema, and convert an old database to
    incremental auto-vacuum once; called once at start-up, before any pool. ``free_space``
    (bytes free in a folder) and ``lock`` are for tests.
    """
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _make_private(path)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        if conn.execute(Q.PAGE_COUNT).fetchone()[0] == 0:
            # A new file: auto_vacuum is fixed once journal_mode = WAL has written the header.
            conn.execute(Q.AUTO_VACUUM)
        _setup(conn)
    except (OSError, sqlite3.Error) as e:
        raise StorageError(f"cannot open database {path}: {e}") from e
    lock = lock if lock is not None else WriteLock(path)
    try:
        with lock:
            migrate(conn)
        if conn.execute(Q.AUTO_VACUUM_MODE).fetchone()[0] == 0:
            with lock:
                # Again, holding the lock: another process starting with this one may have
                # converted it while we waited (and two VACUUMs would rewrite it twice).
                if _auto_vacuum_mode(path) == 0:
                    _convert_to_incremental_vacuum(conn, path, free_space)
    except sqlite3.Error as e:
        raise StorageError(f"cannot prepare database {path}: {e}") from e
    finally:
        conn.close()
        lock.close()


def _make_private(path: str) -> None:
    """
    The database holds DKIM private keys (issue 13): a new file is made readable and
    writable by its owner only (SQLite gives its -wal and -shm the database's mode), and an
    existing one, with its -wal and -shm, loses every permission of "others" (its group
    keeps what the operator gave it: processes of one group may share the file).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)  # An empty file: SQLite makes it a new database.
        return
    for name in (path, path + "-wal", path + "-shm"):
        try:
            st = os.stat(name)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o007:
                os.chmod(name, stat.S_IMODE(st.st_mode) & ~0o007)
                _log.warn("{path} was open to every user; now it is not (it holds DKIM private keys)", path=name)
        except FileNotFoundError:
            continue
        except OSError as e:
            _log.warn("{path} is open to every user and cannot be changed ({error})", path=name, error=_os_reason(e))


def _auto_vacuum_mode(path: str) -> int:
    """
    The database's auto_vacuum mode as it is now, on a new connection: a connection that
    has read it answers from its cache until its next read of a table, even after another
    connection's VACUUM changed it.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        return int(conn.execute(Q.AUTO_VACUUM_MODE).fetchone()[0])
    finally:
        conn.close()


def _convert_to_incremental_vacuum(conn: sqlite3.Connection, path: str, free_space: Callable[[str], int]) -> None:
    """
    Once, for a database made before auto_vacuum was set in the right order: without it
    the cleaner's incremental_vacuum frees nothing and the file never shrinks. VACUUM
    rewrites the whole file (outside any transaction, holding the write lock), so other
    writers wait meanwhile. In WAL mode it writes a copy of about the whole database into
    the -wal (and builds it in a temporary file first), so it is skipped, with a warning,
    unless the file system has more than twice the database's size free plus
    VACUUM_MARGIN: a full disk at start-up would leave no room to record results. If it is
    skipped or fails, mmgun runs unconverted and tries again at its next start.
    """
    # The database as it is now: the file, and the pages of it still in the -wal.
    size = sum(os.path.getsize(name) for name in (path, path + "-wal") if os.path.exists(name))
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free: int | None = free_space(folder)
    except OSError as e:
        _log.warn("cannot read the free space of {folder}: {error}", folder=folder, error=str(e))
        free = None
    needed = 2 * size + VACUUM_MARGIN
    if free is None or free <= needed:
        _log.warn(
            "database {path} not converted to incremental auto-vacuum: the conversion needs more than "
            "{needed} bytes free on its file system ({free} free); the file will not shrink after cleaning. "
            "It is tried again at the next start.",
            path=path,
            needed=needed,
            free="unknown" if free is None else free,
        )
        return
    (pages,) = conn.execute(Q.PAGE_COUNT).fetchone()
    _log.info("converting database {path} to incremental auto-vacuum ({pages} pages; once)", path=path, pages=pages)
    try:
        conn.execute(Q.AUTO_VACUUM)
        conn.execute(Q.VACUUM)
    except sqlite3.Error as e:
        _log.warn("database {path} not converted to incremental auto-vacuum: {error}", path=path, error=str(e))
        return
    (pages,) = conn.execute(Q.PAGE_COUNT).fetchone()
    _log.info("database {path} converted to incremental auto-vacuum ({pages} pages)", path=path, pages=pages)


class _GroupCommit(Generic[ItemT, ResultT]):
    """
    Group commit: the items that arrive while one transaction commits all go into
    the next one, and each caller hears back after the commit that holds its item.
    Under load, one fsync and one thread hand-off serve many requests; alone, an
    item is written at once. ``txn`` returns one result per item, an exception
    instance for an item that failed on its own (the others still commit).
    """

    def __init__(
        self,
        runner: PoolRunner | SyncRunner,
        txn: Callable[[sqlite3.Connection, list[ItemT]], Sequence[ResultT | Exception]],
    ) -> None:
        self._runner = runner
        self._txn = txn
        self._pending: list[tuple[ItemT, Deferred[ResultT]]] = []
        self._busy = False

    def submit(self, item: ItemT) -> Deferred[ResultT]:
        waiter: Deferred[ResultT] = Deferred()
        self._pending.append((item, waiter))
        if not self._busy:
            self._flush()
        return waiter

    def _flush(self) -> None:
        batch, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
        self._busy = True
        d = self._runner.write(self._txn, [item for item, _ in batch])

        def done(results: Sequence[ResultT | Exception]) -> None:
            for (_, waiter), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        def failed(failure: Any) -> None:
            for _, waiter in batch:
                waiter.errback(failure)

        def next_batch(_: object) -> None:
            self._busy = False
            if self._pending:
                self._flush()

        d.addCallbacks(done, failed).addBoth(next_batch)


class SQLiteStore:
    """The :class:`mmgun.store.Store` on one SQLite file."""

    def __init__(self, runner: PoolRunner | SyncRunner) -> None:
        self._runner = runner
        #: Sender identities locked by this store (lock_identity): name → the lock file's descriptor.
        self._identities: dict[str, int] = {}
        self._submissions: _GroupCommit[NewSubmission, str] = _GroupCommit(runner, _add_submissions_txn)
        self._records: _GroupCommit[tuple[Sequence[EnvelopeOutcome], float], None] = _GroupCommit(
            runner, _record_many_txn
        )

    @classmethod
    def open(cls, path: str, reactor: Any = None) -> SQLiteStore:
        prepare(path)
        return cls(PoolRunner(path, reactor))

    @classmethod
    def open_sync(cls, path: str) -> SQLiteStore:
        prepare(path)
        return cls(SyncRunner(path))

    # -- submissions ---------------------------------------------------------

    async def add_submission(self, submission: NewSubmission) -> str:
        return await self._submissions.submit(submission)

    async def submission(self, client: str, submission_id: str, now: float | None = None) -> SubmissionState | None:
        return await self._runner.read(_submission_txn, client, submission_id, now)

    async def add_batch(self, submissions: Sequence[NewSubmission]) -> list[str]:
        if any(s.idempotency_key is not None for s in submissions):
            raise ValueError("a batch takes no idempotency keys")
        return await self._runner.write(_add_batch_txn, list(submissions))

    async def submissions_by_message_id(self, client: str, message_id: str, now: float | None = None) -> list[SubmissionState]:
        return await self._runner.read(_submissions_by_message_id_txn, client, message_id, now)

    # -- delivery ------------------------------------------------------------

    async def claim(
        self,
        owner: str,
        now: float,
        lease_seconds: float,
        limit: int,
        *,
        max_bytes: int | None = None,
        held: Sequence[str] = (),
        always_one: bool = True,
    ) -> list[ClaimedEnvelope]:
        lease = f"{owner}/{uuid.uuid4().hex}"
        return await self._runner.write(
            _claim_txn, lease, now, now + lease_seconds, limit, max_bytes, sorted(held), always_one
        )

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

    async def reclaim(self, identity: str, now: float) -> int:
        """
        Make every unfinished envelope leased under ``identity`` (``"<identity>/..."``) due
        at ``now`` and unleased; returns how many. Only for the holder of
        :meth:`lock_identity`: the process that leased them is gone.
        """
        prefix = f"{identity}/"
        return await self._runner.write(_reclaim_txn, now, prefix)

    async def due_unattempted(self, now: float) -> int:
        """Make never-attempted, unleased envelopes due at ``now`` if they were due later; returns how many."""
        return await self._runner.write(_due_unattempted_txn, now)

    async def renew(self, envelopes: Sequence[ClaimedEnvelope], until: float) -> None:
        await self._runner.write(_renew_txn, [(until, e.id, e.lease) for e in envelopes])

    async def record(self, outcomes: Sequence[EnvelopeOutcome], now: float) -> None:
        await self._records.submit((outcomes, now))

    async def release(self, envelopes: Sequence[ClaimedEnvelope], now: float) -> None:
        await self.record([EnvelopeOutcome(e, (), now, attempted=False) for e in envelopes], now)

    async def ping(self) -> None:
        await self._runner.read(_ping_txn)

    def write_problem(self) -> str | None:
        return self._runner.file.problem()

    async def clean(self, before: float, limit: int, now: float) -> int:
        """
        Delete up to ``limit`` submissions finished before ``before``; return how many. One
        whose Idempotency-Key is younger than IDEMPOTENCY_WINDOW at ``now`` stays, whatever
        the retention: a client's retry must still find it.
        """
        return await self._runner.write(_clean_txn, before, limit, now - IDEMPOTENCY_WINDOW)

    async def clean_events(self, before: float, limit: int) -> int:
        parameters = {"before": before, "limit": limit, "window": 10 * limit}
        return await self._runner.write(_rowcount_txn, Q.DELETE_OLD_EVENTS, parameters)

    async def vacuum(self, pages: int) -> None:
        """Return up to ``pages`` free pages to the file system."""
        await self._runner.autocommit(_vacuum, pages)

    # -- the operator's command (mmgun.admin) ----------------------------------

    @classmethod
    def open_existing(cls, path: str) -> SQLiteStore:
        """
        A synchronous store on a database the daemon has already created, for ``mmgun``.

        Never creates the file nor changes its schema (a typo in a path must not leave an
        empty queue behind); raises StorageError with one line for the operator otherwise.
        """
        try:
            # Not os.path.exists: it is False on EACCES too, and "does not exist" would send
            # the operator looking for a file that is there (issue 11 item 17).
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise StorageError(f"database {path} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot open database {path}: {_os_reason(e)}") from e
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"database {path} is not a file")
        try:
            with open(path, "rb") as f:
                header = f.read(16)
            # Before connect(), whose journal_mode pragma would write to an empty file.
            if header != b"SQLite format 3\x00":
                raise StorageError(f"{path} is not an mmgun database (not an SQLite file)")
            conn = connect(path)
            try:
                (version,) = conn.execute(Q.USER_VERSION).fetchone()
            finally:
                conn.close()
        except OSError as e:
            raise StorageError(f"cannot open database {path}: {_os_reason(e)}") from e
        except sqlite3.Error as e:
            raise StorageError(f"cannot open database {path}: {e}") from e
        if version == 0:
            raise StorageError(f"{path} is not an mmgun database (it has no schema)")
        if version > len(Q.MIGRATIONS):
            raise StorageError(f"database {path} has schema version {version}, newer than this mmgun ({len(Q.MIGRATIONS)})")
        if version < len(Q.MIGRATIONS):
            raise StorageError(f"database {path} has schema version {version}; start the daemon once to upgrade it")
        return cls(SyncRunner(path))

    async def queue_entries(self, now: float, status: str | None = None, domain: str | None = None) -> list[QueueEntry]:
        """Unfinished envelopes, oldest first; ``status`` is None, "queued", "scheduled" or "deferred"."""
        if status not in (None, "queued", "scheduled", "deferred"):
            raise ValueError(f"no queue status {status!r}")
        return await self._runner.read(_queue_entries_txn, now, status, domain)

    async def queue_stats(self, now: float, top_domains: int = 20) -> QueueStats:
        return await self._runner.read(_queue_stats_txn, now, top_domains)

    async def queue_depth(self, now: float) -> QueueDepth:
        """Like queue_stats without the finished history: for gauges polled every few seconds."""
        return await self._runner.read(_queue_depth_txn, now)

    async def flush_deferred(self, now: float, ids: Sequence[str] | None = None) -> tuple[int, int]:
        """
        Make deferred envelopes due at ``now``: all of them, or those named by envelope or
        submission id. Leased ones are left to their sender. Returns (flushed, in delivery);
        raises NotInQueue, changing nothing, if an id matches no unfinished envelope.
        """
        return await self._runner.write(_flush_deferred_txn, now, None if ids is None else list(ids))

    async def fail_queued(self, ids: Sequence[str], now: float, reply: str) -> tuple[int, int]:
        """
        Fail every pending recipient of the named envelopes (or submissions) with ``reply``
        and finish them, as a delivery that failed would. Returns (envelopes, recipients).
        All or nothing: raises NotInQueue or InDelivery and changes nothing.
        """
        return await self._runner.write(_fail_queued_txn, list(ids), now, reply)

    # -- clients and API keys ------------------------------------------------

    async def add_client(self, client: str, now: float) -> None:
        await self._runner.write(_add_client_txn, client, now)

    async def client_exists(self, client: str) -> bool:
        return await self._runner.read(_client_exists_txn, client)

    async def add_key(self, client: str, key_id: str, key_hash: bytes, now: float) -> None:
        await self._runner.write(_add_key_txn, client, key_id, key_hash, now)

    async def list_keys(self, client: str) -> list[KeyInfo]:
        return await self._runner.read(_list_keys_txn, client)

    async def revoke_key(self, key_id: str, now: float) -> bool:
        """True if the key was active and is now revoked; Conflict if there is no such key."""
        return await self._runner.write(_revoke_key_txn, key_id, now)

    async def find_key(self, key_id: str) -> StoredKey | None:
        return await self._runner.read(_find_key_txn, key_id)

    async def key_ids(self) -> set[str]:
        """The id of every API key, revoked ones too (one read, for :class:`mmgun.auth.Authenticator`)."""
        return await self._runner.read(_key_ids_txn)

    async def touch_keys(self, used: Sequence[tuple[str, float]]) -> None:
        """Record when keys were last used (batched by the caller)."""
        await self._runner.write(_touch_keys_txn, used)

    # -- sending domains and DKIM keys (issue 13) ------------------------------

    async def add_domain(self, name: str, client: str, now: float) -> None:
        await self._runner.write(_add_domain_txn, name, client, now)

    async def remove_domain(self, name: str) -> None:
        await self._runner.write(_remove_domain_txn, name)

    async def domains(self, client: str | None = None) -> list[SendingDomain]:
        return await self._runner.read(_domains_txn, client)

    async def domain(self, name: str) -> SendingDomain | None:
        return await self._runner.read(_domain_txn, name)

    async def add_domain_key(self, key: DomainKey) -> None:
        await self._runner.write(_add_domain_key_txn, key)

    async def domain_keys(self, name: str, include_retired: bool = False) -> list[DomainKey]:
        return await self._runner.read(_domain_keys_txn, name, include_retired)

    async def retire_domain_key(self, name: str, selector: str, now: float) -> bool:
        return await self._runner.write(_retire_domain_key_txn, name, selector, now)

    async def signing_keys(self, name: str) -> list[DomainKey]:
        return await self._runner.read(_signing_keys_txn, name)

    async def queued_by_client(self) -> dict[str, int]:
        """Pending (queued or deferred) recipients per client."""
        return await self._runner.read(_queued_by_client_txn)

    async def queued_bytes_by_client(self) -> dict[str, int]:
        """Message bytes of the unfinished submissions per client, each submission once."""
        return await self._runner.read(_queued_bytes_by_client_txn)

    # -- events and suppressions ------------------------------------------------------------------

    async def events(
        self,
        client: str,
        *,
        start: EventCursor | None = None,
        descending: bool = False,
        limit: int = 100,
        domain: str | None = None,
        event: str | None = None,
        severity: str | None = None,
        recipient: str | None = None,
        begin: float | None = None,
        end: float | None = None,
    ) -> list[Event]:
        if start is None:
            start = FEED_END if descending else FEED_START
        parameters = {
            "client": client,
            "seq": start.seq,
            "id": start.id,
            "limit": limit,
            "domain": domain,
            "event": event,
            "severity": severity,
            "recipient": recipient,
            "begin": begin,
            "end": end,
        }
        return await self._runner.read(_events_txn, Q.EVENTS_BEFORE if descending else Q.EVENTS_AFTER, parameters)

    async def events_page(
        self,
        client: str,
        *,
        start: EventCursor | None = None,
        descending: bool = False,
        limit: int = 100,
        scan: int = 5000,
        domain: str | None = None,
        event: str | None = None,
        severity: str | None = None,
        recipient: str | None = None,
        begin: float | None = None,
        end: float | None = None,
    ) -> tuple[list[Event], EventCursor]:
        if start is None:
            start = FEED_END if descending else FEED_START
        parameters = {
            "client": client,
            "seq": start.seq,
            "id": start.id,
            "limit": limit,
            "scan": max(scan, limit),
            "domain": domain,
            "event": event,
            "severity": severity,
            "recipient": recipient,
            "begin": begin,
            "end": end,
        }
        return await self._runner.read(_events_page_txn, descending, parameters)

    async def suppressions(
        self, client: str, kind: str, *, after: str | None = None, limit: int = 100, descending: bool = False
    ) -> list[Suppression]:
        if descending:
            query, parameters = Q.SUPPRESSIONS_BEFORE, {"client": client, "kind": kind, "before": after, "limit": limit}
        else:
            query, parameters = Q.SUPPRESSIONS_AFTER, {"client": client, "kind": kind, "after": after or "", "limit": limit}
        return await self._runner.read(_suppressions_txn, query, parameters)

    async def suppression(self, client: str, kind: str, address: str) -> Suppression | None:
        found = await self._runner.read(_suppressions_txn, Q.SUPPRESSION, (client, kind, address.lower()))
        return found[0] if found else None

    async def add_suppressions(self, entries: Sequence[Suppression]) -> None:
        await self._runner.write(_add_suppressions_txn, list(entries))

    async def remove_suppression(self, client: str, kind: str, address: str) -> bool:
        return bool(await self._runner.write(_rowcount_txn, Q.DELETE_SUPPRESSION, (client, kind, address.lower())))

    async def clear_suppressions(self, client: str, kind: str) -> int:
        # In batches, each its own transaction: a list of millions never holds the write lock for long.
        total = 0
        while True:
            deleted = await self._runner.write(_rowcount_txn, Q.CLEAR_SUPPRESSIONS, (client, kind, CLEAR_BATCH))
            total += deleted
            if deleted < CLEAR_BATCH:
                return total

    # -- webhooks ----------------------------------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> Webhook:
        return await self._runner.write(_add_webhook_txn, webhook)

    async def webhooks(self, client: str | None = None) -> list[Webhook]:
        if client is None:
            return await self._runner.read(_webhooks_txn, Q.ALL_WEBHOOKS, ())
        return await self._runner.read(_webhooks_txn, Q.CLIENT_WEBHOOKS, (client,))

    async def webhook(self, webhook_id: str) -> Webhook | None:
        found = await self._runner.read(_webhooks_txn, Q.FIND_WEBHOOK, (webhook_id,))
        return found[0] if found else None

    async def update_webhook(self, webhook_id: str, url: str, events: Sequence[str]) -> bool:
        changed = await self._runner.write(_rowcount_txn, Q.UPDATE_WEBHOOK, (url, json.dumps(list(events)), webhook_id))
        return bool(changed)

    async def remove_webhook(self, webhook_id: str) -> bool:
        return bool(await self._runner.write(_rowcount_txn, Q.DELETE_WEBHOOK, (webhook_id,)))

    async def webhook_key(self, client: str) -> str | None:
        return await self._runner.read(_webhook_key_txn, client)

    async def set_webhook_key(self, client: str, key: str, now: float, *, replace: bool = True) -> str:
        return await self._runner.write(_set_webhook_key_txn, client, key, now, replace)

    async def release_webhooks(self, lease: str, now: float) -> None:
        await self._runner.write(_release_webhooks_txn, lease, now)

    async def lease_webhooks(self, lease: str, now: float, until: float, *, renew: bool = True) -> list[Webhook]:
        query = Q.LEASE_WEBHOOKS if renew else Q.TAKE_WEBHOOKS
        return await self._runner.write(_webhooks_txn, query, {"lease": lease, "now": now, "until": until})

    async def advance_webhook(
        self, webhook_id: str, lease: str, cursor: EventCursor, failed: Sequence[tuple[int, float, float, str]]
    ) -> bool:
        return await self._runner.write(_advance_webhook_txn, webhook_id, lease, cursor, list(failed))

    async def due_webhook_retries(self, lease: str, now: float, until: float, limit: int) -> list[WebhookRetry]:
        return await self._runner.write(_due_webhook_retries_txn, lease, now, until, limit)

    async def finish_webhook_retries(self, results: Sequence[tuple[WebhookRetry, float | None, str | None]], lease: str) -> None:
        await self._runner.write(_finish_webhook_retries_txn, list(results), lease)

    async def flush_webhook_retries(self, now: float, webhook_ids: Sequence[str] | None = None) -> tuple[int, int]:
        return await self._runner.write(_flush_webhook_retries_txn, now, None if webhook_ids is None else list(webhook_ids))

    async def close(self) -> None:
        self._runner.close()
        for fd in self._identities.values():
            os.close(fd)
        self._identities.clear()


# -- transactions: plain functions on a connection, run inside BEGIN … COMMIT --


class _Events:
    """
    The events one transaction writes. The transaction's feed number is taken when this is
    made, before any savepoint, so that no rollback to a savepoint can give it back.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        (self.seq,) = conn.execute(Q.NEXT_FEED_SEQ).fetchone()

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows made by :func:`_event`."""
        if rows:
            seq = self.seq
            self._conn.executemany(Q.INSERT_EVENT, [(seq, *row) for row in rows])


def _event(
    client: str,
    submission_id: str,
    domain: str,
    recipient: str,
    event: str,
    at: float,
    *,
    severity: str | None = None,
    reason: str | None = None,
    attempt: int | None = None,
    reply: str | None = None,
    mx_host: str | None = None,
) -> tuple[Any, ...]:
    """An event row for :meth:`_Events.add`: Q.INSERT_EVENT's parameters after seq."""
    return (client, domain, submission_id, recipient, event, severity, reason, attempt, reply, mx_host, at)


def _sender_domain(sender: str) -> str:
    return sender.rpartition("@")[2].lower()


def _add_submissions_txn(conn: sqlite3.Connection, batch: list[NewSubmission]) -> list[str | Exception]:
    results: list[str | Exception] = []
    events = _Events(conn)
    for submission in batch:
        conn.execute(Q.SAVEPOINT)
        try:
            results.append(_add_one(conn, submission, events))
        except IdempotencyConflict as e:
            conn.execute(Q.ROLLBACK_TO)
            results.append(e)
        conn.execute(Q.RELEASE)
    return results


def _add_batch_txn(conn: sqlite3.Connection, batch: list[NewSubmission]) -> list[str]:
    events = _Events(conn)
    return [_add_one(conn, submission, events) for submission in batch]


#: The last_reply of a test-mode recipient.
TEST_MODE_REPLY = "not delivered: test mode (o:testmode)"


def _suppressed(conn: sqlite3.Connection, s: NewSubmission) -> dict[str, tuple[str, str | None]]:
    """The recipients of ``s`` on one of its client's suppression lists: address → (kind, the entry's error)."""
    # Every spelling of an address is the address: "Bob@x" and "bob@x" are both stopped.
    spellings: dict[str, list[str]] = {}
    for address in s.recipients:
        spellings.setdefault(address.lower(), []).append(address)
    found: dict[str, tuple[str, str | None]] = {}
    rows = conn.execute(Q.SUPPRESSED_AMONG, {"client": s.client, "addresses": json.dumps(sorted(spellings))}).fetchall()
    for address, kind, error, tags in sorted(rows, key=lambda row: SUPPRESSION_ORDER.get(row[1], 99)):
        if kind == "unsubscribe" and tags:
            limited = set(json.loads(tags))
            if "*" not in limited and not limited & set(s.tags):
                continue
        for spelling in spellings[address]:
            found.setdefault(spelling, (kind, error))
    return found


#: Which list a recipient on several is reported as failing on.
SUPPRESSION_ORDER = {"bounce": 0, "complaint": 1, "unsubscribe": 2}


def suppressed_reply(kind: str, error: str | None) -> str:
    """The last_reply of a recipient not sent to because it is on a suppression list."""
    reply = f"suppressed: the address is on this client's {kind} list"
    return f"{reply} ({error})" if error else reply


def _add_one(conn: sqlite3.Connection, s: NewSubmission, events: _Events) -> str:
    if s.idempotency_key is not None:
        row = conn.execute(Q.FIND_IDEMPOTENT, (s.client, s.idempotency_key)).fetchone()
        if row is not None:
            existing_id, request_hash, created_at = row
            if created_at + IDEMPOTENCY_WINDOW > s.created_at:
                if request_hash != s.request_hash:
                    raise IdempotencyConflict(s.idempotency_key)
                return str(existing_id)
            conn.execute(Q.FORGET_IDEMPOTENCY_KEY, (existing_id,))
    start = s.starts_at()
    suppressed = {} if s.test_mode else _suppressed(conn, s)
    # Nothing left to deliver (test mode, or every recipient suppressed): finished when queued.
    finished = s.test_mode or all(a in suppressed for a in s.recipients)
    conn.execute(
        Q.INSERT_SUBMISSION,
        (
            s.id,
            s.client,
            s.sender,
            s.created_at,
            s.idempotency_key,
            s.request_hash,
            None if finished else s.message,
            start if start > s.created_at else None,
            json.dumps(list(s.tags)) if s.tags else None,
            s.metadata,
            s.message_id,
            s.created_at if finished else None,
        ),
    )
    domain = _sender_domain(s.sender)
    rows = [_event(s.client, s.id, domain, address, "accepted", s.created_at) for address in s.recipients]
    if s.test_mode:
        for envelope_domain, addresses in s.envelopes().items():
            envelope_id = conn.execute(Q.INSERT_ENVELOPE_DONE, (s.id, envelope_domain, start, start)).lastrowid
            conn.executemany(
                Q.INSERT_RECIPIENT_TEST_MODE,
                [(envelope_id, i, s.id, a, TEST_MODE_REPLY, s.created_at) for i, a in enumerate(addresses)],
            )
        rows += [
            _event(s.client, s.id, domain, a, "delivered", s.created_at, reason="testmode", attempt=0, reply=TEST_MODE_REPLY)
            for a in s.recipients
        ]
        events.add(rows)
        return s.id
    for envelope_domain, addresses in s.envelopes().items():
        live = [a for a in addresses if a not in suppressed]
        # A scheduled envelope enters the queue at send_at: not claimed before, and its
        # queue lifetime and age count from then. One whose recipients are all suppressed is done.
        insert = Q.INSERT_ENVELOPE if live else Q.INSERT_ENVELOPE_DONE
        envelope_id = conn.execute(insert, (s.id, envelope_domain, start, start)).lastrowid
        conn.executemany(
            Q.INSERT_RECIPIENT,
            [(envelope_id, i, s.id, a, s.created_at) for i, a in enumerate(addresses) if a not in suppressed],
        )
        failed = []
        for i, a in enumerate(addresses):
            if a in suppressed:
                kind, error = suppressed[a]
                reply = suppressed_reply(kind, error)
                failed.append((envelope_id, i, s.id, a, reply, s.created_at))
                rows.append(
                    _event(s.client, s.id, domain, a, "failed", s.created_at, severity="permanent", reason=f"suppress-{kind}", attempt=0, reply=reply)
                )
        conn.executemany(Q.INSERT_RECIPIENT_FAILED, failed)
    events.add(rows)
    return s.id


def _submission_txn(
    conn: sqlite3.Connection, client: str, submission_id: str, now: float | None
) -> SubmissionState | None:
    head = conn.execute(Q.SUBMISSION_OWNER, (submission_id, client)).fetchone()
    if head is None:
        return None
    send_at, tags, metadata = head
    rows = conn.execute(Q.SUBMISSION_RECIPIENTS, (submission_id,)).fetchall()
    recipients = tuple(RecipientState(*row) for row in rows)
    if send_at is not None and now is not None and send_at > now:
        # Nothing is attempted before send_at: a queued recipient is waiting for it.
        recipients = tuple(attrs.evolve(r, status="scheduled") if r.status == "queued" else r for r in recipients)
    return SubmissionState(
        submission_id, recipients, tags=tuple(json.loads(tags)) if tags else (), metadata=metadata, send_at=send_at
    )


def _submissions_by_message_id_txn(
    conn: sqlite3.Connection, client: str, message_id: str, now: float | None
) -> list[SubmissionState]:
    parameters = {"client": client, "message_id": message_id, "limit": MAX_BY_MESSAGE_ID}
    ids = [row[0] for row in conn.execute(Q.SUBMISSIONS_BY_MESSAGE_ID, parameters)]
    return [state for state in (_submission_txn(conn, client, i, now) for i in ids) if state is not None]


def _claim_txn(
    conn: sqlite3.Connection,
    lease: str,
    now: float,
    expires: float,
    limit: int,
    max_bytes: int | None,
    held: list[str],
    always_one: bool,
) -> list[ClaimedEnvelope]:
    candidates = conn.execute(Q.CLAIM_CANDIDATES, (now, limit)).fetchall()
    if not candidates:
        return []
    chosen: list[int] = []
    counted = set(held)
    total = 0
    for eid, sid, size in candidates:
        if sid not in counted:
            # In next_attempt order, up to the first message that does not fit (skipping it
            # for smaller ones would starve it); with always_one, the first envelope goes anyway.
            if max_bytes is not None and total + size > max_bytes and (chosen or not always_one):
                break
            counted.add(sid)
            total += size
        chosen.append(eid)
    claimed = conn.execute(Q.CLAIM, (lease, expires, json.dumps(chosen))).fetchall()
    ids = json.dumps([row[0] for row in claimed])
    submissions = json.dumps(sorted({row[1] for row in claimed}))
    # One bytes object per submission, shared by all its envelopes.
    details = {
        sid: (sender, message or b"", client)
        for sid, sender, client, message in conn.execute(Q.CLAIMED_SUBMISSIONS, {"ids": submissions, "held": json.dumps(held)})
    }
    pending: dict[int, list[str]] = {}
    for eid, address in conn.execute(Q.PENDING_RECIPIENTS, (ids,)):
        pending.setdefault(eid, []).append(address)
    claimed.sort()
    return [
        ClaimedEnvelope(
            id=eid,
            submission_id=sid,
            domain=domain,
            sender=details[sid][0],
            recipients=tuple(pending.get(eid, ())),
            message=details[sid][1],
            attempts=attempts,
            created_at=created_at,
            lease=lease,
            client=details[sid][2],
        )
        for eid, sid, domain, attempts, created_at in claimed
    ]


def _reclaim_txn(conn: sqlite3.Connection, now: float, prefix: str) -> int:
    return conn.execute(Q.RECLAIM_IDENTITY, (now, len(prefix), prefix)).rowcount


def _due_unattempted_txn(conn: sqlite3.Connection, now: float) -> int:
    return conn.execute(Q.DUE_UNATTEMPTED, {"now": now}).rowcount


def _renew_txn(conn: sqlite3.Connection, rows: list[tuple[float, int, str]]) -> None:
    conn.executemany(Q.RENEW, rows)


def _record_many_txn(conn: sqlite3.Connection, batches: list[tuple[Sequence[EnvelopeOutcome], float]]) -> list[None]:
    events = _Events(conn)
    for outcomes, now in batches:
        _record_txn(conn, outcomes, now, events)
    return [None] * len(batches)


def _outcome_event(envelope: ClaimedEnvelope, r: RecipientOutcome, attempt: int, now: float) -> tuple[Any, ...]:
    if r.status == "sent":
        kind, severity, reason = "delivered", None, None
    elif r.status == "deferred":
        kind, severity, reason = "failed", "temporary", None
    else:
        kind, severity = "failed", "permanent"
        reason = r.reason if r.reason is not None else ("bounce" if r.reply[:1] == "5" else "generic")
    return _event(
        envelope.client,
        envelope.submission_id,
        _sender_domain(envelope.sender),
        r.address,
        kind,
        now,
        severity=severity,
        reason=reason,
        attempt=attempt,
        reply=r.reply,
        mx_host=r.mx_host,
    )


def _reply_code(reply: str) -> str | None:
    code = reply[:3]
    return code if len(code) == 3 and code.isdigit() else None


def _record_txn(conn: sqlite3.Connection, outcomes: Sequence[EnvelopeOutcome], now: float, events: _Events) -> None:
    for outcome in outcomes:
        envelope = outcome.envelope
        if conn.execute(Q.LEASE_HELD, (envelope.id, envelope.lease)).fetchone() is None:
            _log.warn("lease on envelope {envelope} was lost; result not recorded", envelope=envelope.id)
            continue
        attempted = 1 if outcome.attempted else 0
        conn.executemany(
            Q.UPDATE_RECIPIENT,
            [(r.status, attempted, r.reply, now, envelope.id, r.address) for r in outcome.recipients],
        )
        # The pending recipients of an envelope have been attempted as often as it has.
        attempt = envelope.attempts + attempted
        events.add(
            [
                _outcome_event(envelope, r, attempt, now)
                for r in outcome.recipients
                if outcome.attempted or r.status != "deferred"
            ]
        )
        bounced = [r for r in outcome.recipients if r.bounce and r.status == "failed"]
        conn.executemany(
            Q.ADD_BOUNCE_FROM_SUBMISSION,
            [
                {"address": r.address.lower(), "code": _reply_code(r.reply), "error": r.reply, "at": now, "submission_id": envelope.submission_id}
                for r in bounced
            ],
        )
        next_attempt = outcome.next_attempt if outcome.next_attempt is not None else now
        (done,) = conn.execute(Q.FINISH_ENVELOPE, (attempted, next_attempt, envelope.id, envelope.lease)).fetchone()
        if done:
            conn.execute(Q.FINISH_SUBMISSION, (now, envelope.submission_id, envelope.submission_id))


def _clean_txn(conn: sqlite3.Connection, before: float, limit: int, keys_before: float) -> int:
    # Two index ranges, neither of which skips rows it may not delete: a submission with a
    # key finished before the window began was created before it too (created <= finished).
    deleted = conn.execute(Q.DELETE_FINISHED, {"before": min(before, keys_before), "limit": limit}).rowcount
    if deleted < limit and before > keys_before:
        deleted += conn.execute(
            Q.DELETE_FINISHED_WITHOUT_KEY, {"before": before, "limit": limit - deleted}
        ).rowcount
    return deleted


def _vacuum(conn: sqlite3.Connection, pages: int) -> None:
    # executescript steps the pragma to its end; execute() stops after its first step (it returns no
    # columns, so the sqlite3 module resets it at once), which frees one page.
    conn.executescript(Q.INCREMENTAL_VACUUM.format(pages=pages))


def _ping_txn(conn: sqlite3.Connection) -> None:
    conn.execute(Q.PING).fetchone()


def _queue_entries_txn(conn: sqlite3.Connection, now: float, status: str | None, domain: str | None) -> list[QueueEntry]:
    rows = conn.execute(Q.QUEUE_ENVELOPES, {"now": now, "status": status, "domain": domain}).fetchall()
    pending: dict[int, list[str]] = {}
    replies: dict[int, tuple[float, str]] = {}
    for eid, address, reply, updated_at in conn.execute(Q.QUEUE_RECIPIENTS, (json.dumps([row[0] for row in rows]),)):
        pending.setdefault(eid, []).append(address)
        if reply is not None and (eid not in replies or updated_at >= replies[eid][0]):
            replies[eid] = (updated_at, reply)
    return [
        QueueEntry(
            envelope_id=eid,
            submission_id=sid,
            client=client,
            domain=domain,
            recipients=tuple(pending.get(eid, ())),
            attempts=attempts,
            next_attempt=next_attempt,
            last_reply=replies[eid][1] if eid in replies else None,
            created_at=created_at,
            leased=bool(leased),
            scheduled=bool(scheduled),
        )
        for eid, sid, client, domain, attempts, next_attempt, leased, created_at, scheduled in rows
    ]


def _queue_stats_txn(conn: sqlite3.Connection, now: float, top_domains: int) -> QueueStats:
    recipients = tuple(conn.execute(Q.RECIPIENTS_BY_STATUS).fetchall())
    unfinished, in_delivery, oldest = conn.execute(Q.UNFINISHED_SUMMARY, {"now": now}).fetchone()
    domains = tuple(conn.execute(Q.BACKLOG_BY_DOMAIN, (top_domains,)).fetchall())
    return QueueStats(recipients, unfinished, in_delivery, oldest, domains)


def _queue_depth_txn(conn: sqlite3.Connection, now: float) -> QueueDepth:
    recipients = tuple(conn.execute(Q.PENDING_BY_STATUS).fetchall())
    unfinished, in_delivery, oldest = conn.execute(Q.UNFINISHED_SUMMARY, {"now": now}).fetchone()
    return QueueDepth(recipients, unfinished, in_delivery, oldest)


def _match_queued(conn: sqlite3.Connection, ids: list[str], now: float) -> list[tuple[int, str, bool, float]]:
    """The unfinished envelopes named by envelope or submission id; NotInQueue if any id matches none."""
    numbers = {i: str(int(i)) for i in ids if i.isascii() and i.isdigit()}
    rows = conn.execute(Q.MATCH_QUEUED, (now, json.dumps([int(n) for n in numbers.values()]), json.dumps(ids))).fetchall()
    found = {str(eid) for eid, *_ in rows} | {sid for _, sid, *_ in rows}
    missing = [i for i in dict.fromkeys(ids) if i not in found and numbers.get(i) not in found]
    if missing:
        raise NotInQueue(missing)
    return [(eid, sid, bool(leased), next_attempt) for eid, sid, leased, next_attempt in rows]


def _flush_deferred_txn(conn: sqlite3.Connection, now: float, ids: list[str] | None) -> tuple[int, int]:
    selection = None if ids is None else json.dumps(sorted({row[0] for row in _match_queued(conn, ids, now)}))
    flushed = conn.execute(Q.FLUSH_DEFERRED, {"now": now, "ids": selection}).rowcount
    (in_delivery,) = conn.execute(Q.COUNT_IN_DELIVERY, {"now": now, "ids": selection}).fetchone()
    return flushed, in_delivery


def _fail_queued_txn(conn: sqlite3.Connection, ids: list[str], now: float, reply: str) -> tuple[int, int]:
    rows = _match_queued(conn, ids, now)
    busy = sorted((eid, until) for eid, _, leased, until in rows if leased)
    if busy:
        raise InDelivery([eid for eid, _ in busy], max(until for _, until in busy))
    selection = json.dumps(sorted({row[0] for row in rows}))
    changed = conn.execute(Q.FAIL_PENDING_RECIPIENTS_RETURNING, {"reply": reply, "now": now, "ids": selection}).fetchall()
    failed = len(changed)
    owners = {sid: conn.execute(Q.SUBMISSION_SENDER, (sid,)).fetchone() for sid in {row[0] for row in changed}}
    _Events(conn).add(
        [
            _event(owners[sid][0], sid, _sender_domain(owners[sid][1]), address, "failed", now, severity="permanent", reason="deleted", attempt=attempts, reply=reply)
            for sid, address, attempts in changed
        ]
    )
    finished = conn.execute(Q.FINISH_FAILED_ENVELOPES, (selection,)).rowcount
    for submission_id in sorted({row[1] for row in rows}):
        conn.execute(Q.FINISH_SUBMISSION, (now, submission_id, submission_id))
    return finished, failed


def _add_client_txn(conn: sqlite3.Connection, client: str, now: float) -> None:
    if conn.execute(Q.CLIENT_EXISTS, (client,)).fetchone() is not None:
        raise Conflict(f"client {client} already exists")
    conn.execute(Q.INSERT_CLIENT, (client, now))


def _client_exists_txn(conn: sqlite3.Connection, client: str) -> bool:
    return conn.execute(Q.CLIENT_EXISTS, (client,)).fetchone() is not None


def _add_key_txn(conn: sqlite3.Connection, client: str, key_id: str, key_hash: bytes, now: float) -> None:
    if conn.execute(Q.CLIENT_EXISTS, (client,)).fetchone() is None:
        raise Conflict(f"no client {client} (add it first: mmgun clients add {client})")
    conn.execute(Q.INSERT_KEY, (key_id, client, key_hash, now))


def _list_keys_txn(conn: sqlite3.Connection, client: str) -> list[KeyInfo]:
    if conn.execute(Q.CLIENT_EXISTS, (client,)).fetchone() is None:
        raise Conflict(f"no client {client}")
    return [KeyInfo(*row) for row in conn.execute(Q.LIST_KEYS, (client,))]


def _revoke_key_txn(conn: sqlite3.Connection, key_id: str, now: float) -> bool:
    if conn.execute(Q.KEY_EXISTS, (key_id,)).fetchone() is None:
        raise Conflict(f"no API key {key_id}")
    return conn.execute(Q.REVOKE_KEY, (now, key_id)).rowcount == 1


def _find_key_txn(conn: sqlite3.Connection, key_id: str) -> StoredKey | None:
    row = conn.execute(Q.FIND_KEY, (key_id,)).fetchone()
    return None if row is None else StoredKey(row[0], bytes(row[1]), bool(row[2]))


def _key_ids_txn(conn: sqlite3.Connection) -> set[str]:
    return {key_id for (key_id,) in conn.execute(Q.ALL_KEY_IDS)}


def _touch_keys_txn(conn: sqlite3.Connection, used: Sequence[tuple[str, float]]) -> None:
    conn.executemany(Q.TOUCH_KEY, [(when, key_id) for key_id, when in used])


def _queued_by_client_txn(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute(Q.QUEUED_BY_CLIENT).fetchall())


def _queued_bytes_by_client_txn(conn: sqlite3.Connection) -> dict[str, int]:
    return {client: size or 0 for client, size in conn.execute(Q.QUEUED_BYTES_BY_CLIENT)}


def _add_domain_txn(conn: sqlite3.Connection, name: str, client: str, now: float) -> None:
    if conn.execute(Q.CLIENT_EXISTS, (client,)).fetchone() is None:
        raise Conflict(f"no client {client} (add it first: mmgun clients add {client})")
    row = conn.execute(Q.FIND_DOMAIN, (name,)).fetchone()
    if row is not None:
        raise Conflict(f"domain {name} is already registered (for client {row[1]})")
    conn.execute(Q.INSERT_DOMAIN, (name, client, now))


def _remove_domain_txn(conn: sqlite3.Connection, name: str) -> None:
    if conn.execute(Q.FIND_DOMAIN, (name,)).fetchone() is None:
        raise Conflict(f"no sending domain {name}")
    conn.execute(Q.DELETE_DOMAIN_KEYS, (name,))
    conn.execute(Q.DELETE_DOMAIN, (name,))


def _domains_txn(conn: sqlite3.Connection, client: str | None) -> list[SendingDomain]:
    rows = conn.execute(Q.ALL_DOMAINS) if client is None else conn.execute(Q.CLIENT_DOMAINS, (client,))
    return [SendingDomain(*row) for row in rows]


def _domain_txn(conn: sqlite3.Connection, name: str) -> SendingDomain | None:
    row = conn.execute(Q.FIND_DOMAIN, (name,)).fetchone()
    return None if row is None else SendingDomain(*row)


def _add_domain_key_txn(conn: sqlite3.Connection, key: DomainKey) -> None:
    if conn.execute(Q.FIND_DOMAIN, (key.domain,)).fetchone() is None:
        raise Conflict(f"no sending domain {key.domain}")
    if conn.execute(Q.DOMAIN_KEY_EXISTS, (key.domain, key.selector)).fetchone() is not None:
        raise Conflict(f"domain {key.domain} already has a key with selector {key.selector}")
    conn.execute(
        Q.INSERT_DOMAIN_KEY,
        (key.domain, key.selector, key.algorithm, key.private_key, key.public_key, key.created_at, key.retired_at),
    )


def _domain_key(row: tuple[Any, ...]) -> DomainKey:
    domain, selector, algorithm, private_key, public_key, created_at, retired_at = row
    return DomainKey(domain, selector, algorithm, bytes(private_key), public_key, created_at, retired_at)


def _domain_keys_txn(conn: sqlite3.Connection, name: str, include_retired: bool) -> list[DomainKey]:
    return [_domain_key(row) for row in conn.execute(Q.DOMAIN_KEYS if include_retired else Q.ACTIVE_DOMAIN_KEYS, (name,))]


def _newest_by_algorithm(keys: list[DomainKey]) -> list[DomainKey]:
    """The first (newest) of each algorithm in newest-first ``keys``, RSA first."""
    newest: dict[str, DomainKey] = {}
    for key in keys:
        newest.setdefault(key.algorithm, key)
    return sorted(newest.values(), key=lambda k: k.algorithm != "rsa-sha256")


def _retire_domain_key_txn(conn: sqlite3.Connection, name: str, selector: str, now: float) -> bool:
    keys = [_domain_key(row) for row in conn.execute(Q.DOMAIN_KEYS, (name,))]
    key = next((k for k in keys if k.selector == selector), None)
    if key is None:
        raise Conflict(f"domain {name} has no key with selector {selector}")
    if key.retired_at is not None:
        return False
    if key in _newest_by_algorithm([k for k in keys if k.retired_at is None]):
        # Retiring it would sign with an older key, or not at all.
        raise Conflict(
            f"{selector} is the key {name} is signed with ({key.algorithm}); "
            f"make a new one first (mmgun domains rotate {name}), then retire this one"
        )
    return conn.execute(Q.RETIRE_DOMAIN_KEY, (now, name, selector)).rowcount == 1


#: Active keys signed with per algorithm: the newest and the one before it, so that after a
#: rotate mail still passes at receivers whose DNS does not have the new record yet.
SIGNING_KEYS_PER_ALGORITHM = 2


def _signing_keys_txn(conn: sqlite3.Connection, name: str) -> list[DomainKey]:
    """The active keys to sign with: the newest two of each algorithm, RSA first, then newest first."""
    chosen: list[DomainKey] = []
    counts: dict[str, int] = {}
    for key in (_domain_key(row) for row in conn.execute(Q.ACTIVE_DOMAIN_KEYS, (name,))):
        if counts.get(key.algorithm, 0) < SIGNING_KEYS_PER_ALGORITHM:
            counts[key.algorithm] = counts.get(key.algorithm, 0) + 1
            chosen.append(key)
    return sorted(chosen, key=lambda k: k.algorithm != "rsa-sha256")


def _events_txn(conn: sqlite3.Connection, query: str, parameters: Any) -> list[Event]:
    return [
        Event(
            EventCursor(seq, ident),
            client,
            domain,
            submission_id,
            recipient,
            event,
            severity,
            reason,
            attempt,
            reply,
            mx_host,
            created_at,
            message_id,
            sender,
            tuple(json.loads(tags)) if tags else (),
            metadata,
        )
        for (
            seq,
            ident,
            client,
            domain,
            submission_id,
            recipient,
            event,
            severity,
            reason,
            attempt,
            reply,
            mx_host,
            created_at,
            message_id,
            sender,
            tags,
            metadata,
        ) in conn.execute(query, parameters)
    ]


def _suppressions_txn(conn: sqlite3.Connection, query: str, parameters: Any) -> list[Suppression]:
    return [
        Suppression(client, kind, address, created_at, code, error, tuple(json.loads(tags)) if tags else ())
        for client, kind, address, created_at, code, error, tags in conn.execute(query, parameters)
    ]


def _add_suppressions_txn(conn: sqlite3.Connection, entries: list[Suppression]) -> None:
    conn.executemany(
        Q.UPSERT_SUPPRESSION,
        [
            (e.client, e.kind, e.address.lower(), e.code, e.error, json.dumps(list(e.tags)) if e.tags else None, e.created_at)
            for e in entries
        ],
    )


def _rowcount_txn(conn: sqlite3.Connection, query: str, parameters: Any) -> int:
    return conn.execute(query, parameters).rowcount


def _webhook(row: tuple[Any, ...]) -> Webhook:
    ident, client, domain, url, events, created_at, cursor_seq, cursor_id = row
    return Webhook(ident, client, domain, url, tuple(json.loads(events)), created_at, EventCursor(cursor_seq, cursor_id))


def _webhooks_txn(conn: sqlite3.Connection, query: str, parameters: Any) -> list[Webhook]:
    return [_webhook(row) for row in conn.execute(query, parameters)]


def _add_webhook_txn(conn: sqlite3.Connection, webhook: Webhook) -> Webhook:
    (seq,) = conn.execute(Q.FEED_END).fetchone()
    # After every event of every commit so far.
    cursor = EventCursor(seq, LAST_ID)
    try:
        conn.execute(
            Q.INSERT_WEBHOOK,
            (webhook.id, webhook.client, webhook.domain, webhook.url, json.dumps(list(webhook.events)), webhook.created_at, cursor.seq, cursor.id),
        )
    except sqlite3.IntegrityError as e:
        raise Conflict(f"a webhook with id {webhook.id} exists") from e
    return attrs.evolve(webhook, cursor=cursor)


def _webhook_key_txn(conn: sqlite3.Connection, client: str) -> str | None:
    row = conn.execute(Q.WEBHOOK_KEY, (client,)).fetchone()
    return None if row is None else str(row[0])


def _set_webhook_key_txn(conn: sqlite3.Connection, client: str, key: str, now: float, replace: bool) -> str:
    conn.execute(Q.SET_WEBHOOK_KEY if replace else Q.ADD_WEBHOOK_KEY, (client, key, now))
    return str(conn.execute(Q.WEBHOOK_KEY, (client,)).fetchone()[0])


def _release_webhooks_txn(conn: sqlite3.Connection, lease: str, now: float) -> None:
    conn.execute(Q.RELEASE_WEBHOOKS, (lease,))
    conn.execute(Q.RELEASE_WEBHOOK_RETRIES, (now, lease))


def _advance_webhook_txn(
    conn: sqlite3.Connection, webhook_id: str, lease: str, cursor: EventCursor, failed: list[tuple[int, float, float, str]]
) -> bool:
    if conn.execute(Q.ADVANCE_WEBHOOK, (cursor.seq, cursor.id, webhook_id, lease)).rowcount == 0:
        return False
    conn.executemany(Q.INSERT_WEBHOOK_RETRY, [(webhook_id, event_id, first, after, error) for event_id, first, after, error in failed])
    return True


def _due_webhook_retries_txn(conn: sqlite3.Connection, lease: str, now: float, until: float, limit: int) -> list[WebhookRetry]:
    rows = conn.execute(Q.LEASE_WEBHOOK_RETRIES, {"lease": lease, "now": now, "until": until, "limit": limit}).fetchall()
    if not rows:
        return []
    hooks = {w.id: w for w in _webhooks_txn(conn, Q.WEBHOOKS_AMONG, (json.dumps(sorted({r[0] for r in rows})),))}
    events = {e.cursor.id: e for e in _events_txn(conn, Q.EVENTS_BY_ID, (json.dumps(sorted({r[1] for r in rows})),))}
    retries = [
        WebhookRetry(hooks[hook_id], events[event_id], attempts, first_attempt, until, last_error)
        for hook_id, event_id, attempts, first_attempt, last_error in rows
        if hook_id in hooks and event_id in events
    ]
    return sorted(retries, key=lambda r: (r.first_attempt, r.event.cursor))


def _flush_webhook_retries_txn(conn: sqlite3.Connection, now: float, webhook_ids: list[str] | None) -> tuple[int, int]:
    selection = {"now": now, "ids": None if webhook_ids is None else json.dumps(sorted(set(webhook_ids)))}
    flushed = conn.execute(Q.FLUSH_WEBHOOK_RETRIES, selection).rowcount
    (in_delivery,) = conn.execute(Q.COUNT_WEBHOOK_RETRIES_IN_DELIVERY, selection).fetchone()
    return flushed, in_delivery


def _finish_webhook_retries_txn(
    conn: sqlite3.Connection, results: list[tuple[WebhookRetry, float | None, str | None]], lease: str
) -> None:
    for retry, next_attempt, error in results:
        key = (retry.webhook.id, retry.event.cursor.id, lease)
        if next_attempt is None:
            conn.execute(Q.DELETE_WEBHOOK_RETRY, key)
        else:
            conn.execute(Q.WEBHOOK_RETRY_AGAIN, (next_attempt, error, *key))


def _events_page_txn(conn: sqlite3.Connection, descending: bool, parameters: dict[str, Any]) -> tuple[list[Event], EventCursor]:
    if descending:
        events = _events_txn(conn, Q.EVENTS_PAGE_BEFORE, parameters)
    else:
        # Read first, in this transaction's snapshot: no commit numbered up to it can appear later.
        (feed_seq,) = conn.execute(Q.FEED_END).fetchone()
        events = _events_txn(conn, Q.EVENTS_PAGE_AFTER, parameters)
    if len(events) == parameters["limit"]:
        return events, events[-1].cursor
    (scanned,) = conn.execute(Q.EVENTS_SCANNED_COUNT_BEFORE if descending else Q.EVENTS_SCANNED_COUNT_AFTER, parameters).fetchone()
    if scanned == parameters["scan"]:
        seq, ident = conn.execute(Q.EVENTS_SCANNED_LAST_BEFORE if descending else Q.EVENTS_SCANNED_LAST_AFTER, parameters).fetchone()
        return events, EventCursor(seq, ident)
    if descending:
        return events, EventCursor(0, 0)
    return events, max(EventCursor(feed_seq, LAST_ID), EventCursor(parameters["seq"], parameters["id"]))
