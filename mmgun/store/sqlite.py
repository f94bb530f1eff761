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
import time
import uuid
from typing import Any, Callable, Generic, Sequence, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed, fail
from twisted.logger import Logger

from . import (
    ClaimedEnvelope,
    Conflict,
    KeyInfo,
    StoredKey,
    EnvelopeOutcome,
    IdempotencyConflict,
    NewSubmission,
    RecipientState,
    StorageError,
    SubmissionState,
)
from . import InDelivery, NotInQueue, QueueDepth, QueueEntry, QueueStats
from . import _sqlite_queries as Q

_log = Logger()
T = TypeVar("T")
I = TypeVar("I")
R = TypeVar("R")

#: How long an Idempotency-Key is remembered.
IDEMPOTENCY_WINDOW = 24 * 3600.0
#: Most submissions committed in one transaction.
MAX_GROUP = 512
BUSY_TIMEOUT = 30.0
#: A writer waiting for another process's WriteLock tries again after these pauses (doubling).
_FIRST_PAUSE = 0.0001
_LAST_PAUSE = 0.001


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
    if conn.execute(Q.USER_VERSION).fetchone()[0] == 0:
        conn.execute(Q.AUTO_VACUUM)
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
            raise StorageError(str(e)) from e
        raise


def _outside_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(conn, *args)
    except sqlite3.Error as e:
        raise StorageError(str(e)) from e


def _write(conn: sqlite3.Connection, lock: WriteLock, fn: Callable[..., T], *args: Any) -> T:
    with lock:
        return _in_transaction(conn, Q.BEGIN_WRITE, fn, *args)


def _write_outside_transaction(conn: sqlite3.Connection, lock: WriteLock, fn: Callable[..., T], *args: Any) -> T:
    with lock:
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
            cp_openfun=_setup,
            cp_noisy=False,
            **kwargs,
        )

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._pool.runWithConnection(_write, self._lock, fn, *args)

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._pool.runWithConnection(_in_transaction, Q.BEGIN_READ, fn, *args)

    def autocommit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._pool.runWithConnection(_write_outside_transaction, self._lock, fn, *args)

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

    def _run(self, txn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            return succeed(txn(self._conn, *args))
        except Exception as e:
            return fail(e)

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._run(_write, self._lock, fn, *args)

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._run(_in_transaction, Q.BEGIN_READ, fn, *args)

    def autocommit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._run(_write_outside_transaction, self._lock, fn, *args)

    def close(self) -> None:
        self._conn.close()
        self._lock.close()


def prepare(path: str) -> None:
    """Create the database file's folder and schema; called once at start-up, before any pool."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        conn = connect(path)
    except (OSError, sqlite3.Error) as e:
        raise StorageError(f"cannot open database {path}: {e}") from e
    lock = WriteLock(path)
    try:
        with lock:
            migrate(conn)
    except sqlite3.Error as e:
        raise StorageError(f"cannot prepare database {path}: {e}") from e
    finally:
        conn.close()
        lock.close()


class _GroupCommit(Generic[I, R]):
    """
    Group commit: the items that arrive while one transaction commits all go into
    the next one, and each caller hears back after the commit that holds its item.
    Under load, one fsync and one thread hand-off serve many requests; alone, an
    item is written at once. ``txn`` returns one result per item, an exception
    instance for an item that failed on its own (the others still commit).
    """

    def __init__(self, runner: PoolRunner | SyncRunner, txn: Callable[[sqlite3.Connection, list[I]], list[R | Exception]]) -> None:
        self._runner = runner
        self._txn = txn
        self._pending: list[tuple[I, Deferred[R]]] = []
        self._busy = False

    def submit(self, item: I) -> Deferred[R]:
        waiter: Deferred[R] = Deferred()
        self._pending.append((item, waiter))
        if not self._busy:
            self._flush()
        return waiter

    def _flush(self) -> None:
        batch, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
        self._busy = True
        d = self._runner.write(self._txn, [item for item, _ in batch])

        def done(results: list[R | Exception]) -> None:
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

    async def submission(self, client: str, submission_id: str) -> SubmissionState | None:
        return await self._runner.read(_submission_txn, client, submission_id)

    # -- delivery ------------------------------------------------------------

    async def claim(self, owner: str, now: float, lease_seconds: float, limit: int) -> list[ClaimedEnvelope]:
        lease = f"{owner}/{uuid.uuid4().hex}"
        return await self._runner.write(_claim_txn, lease, now, now + lease_seconds, limit)

    async def renew(self, envelopes: Sequence[ClaimedEnvelope], until: float) -> None:
        await self._runner.write(_renew_txn, [(until, e.id, e.lease) for e in envelopes])

    async def record(self, outcomes: Sequence[EnvelopeOutcome], now: float) -> None:
        await self._records.submit((outcomes, now))

    async def release(self, envelopes: Sequence[ClaimedEnvelope], now: float) -> None:
        await self.record([EnvelopeOutcome(e, (), now, attempted=False) for e in envelopes], now)

    async def ping(self) -> None:
        await self._runner.read(_ping_txn)

    async def clean(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` submissions finished before ``before``; return how many."""
        return await self._runner.write(_clean_txn, before, limit)

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
        if not os.path.exists(path):
            raise StorageError(f"database {path} does not exist")
        if not os.path.isfile(path):
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
        except (OSError, sqlite3.Error) as e:
            raise StorageError(f"cannot open database {path}: {e}") from e
        if version == 0:
            raise StorageError(f"{path} is not an mmgun database (it has no schema)")
        if version > len(Q.MIGRATIONS):
            raise StorageError(f"database {path} has schema version {version}, newer than this mmgun ({len(Q.MIGRATIONS)})")
        if version < len(Q.MIGRATIONS):
            raise StorageError(f"database {path} has schema version {version}; start the daemon once to upgrade it")
        return cls(SyncRunner(path))

    async def queue_entries(self, now: float, status: str | None = None, domain: str | None = None) -> list[QueueEntry]:
        """Unfinished envelopes, oldest first; ``status`` is None, "queued" or "deferred"."""
        if status not in (None, "queued", "deferred"):
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

    async def add_key(self, client: str, key_id: str, key_hash: bytes, now: float) -> None:
        await self._runner.write(_add_key_txn, client, key_id, key_hash, now)

    async def list_keys(self, client: str) -> list[KeyInfo]:
        return await self._runner.read(_list_keys_txn, client)

    async def revoke_key(self, key_id: str, now: float) -> bool:
        """True if the key was active and is now revoked; Conflict if there is no such key."""
        return await self._runner.write(_revoke_key_txn, key_id, now)

    async def find_key(self, key_id: str) -> StoredKey | None:
        return await self._runner.read(_find_key_txn, key_id)

    async def touch_keys(self, used: Sequence[tuple[str, float]]) -> None:
        """Record when keys were last used (batched by the caller)."""
        await self._runner.write(_touch_keys_txn, used)

    async def queued_by_client(self) -> dict[str, int]:
        """Pending (queued or deferred) recipients per client."""
        return await self._runner.read(_queued_by_client_txn)

    async def close(self) -> None:
        self._runner.close()


# -- transactions: plain functions on a connection, run inside BEGIN … COMMIT --


def _add_submissions_txn(conn: sqlite3.Connection, batch: list[NewSubmission]) -> list[str | Exception]:
    results: list[str | Exception] = []
    for submission in batch:
        conn.execute(Q.SAVEPOINT)
        try:
            results.append(_add_one(conn, submission))
        except IdempotencyConflict as e:
            conn.execute(Q.ROLLBACK_TO)
            results.append(e)
        conn.execute(Q.RELEASE)
    return results


def _add_one(conn: sqlite3.Connection, s: NewSubmission) -> str:
    if s.idempotency_key is not None:
        row = conn.execute(Q.FIND_IDEMPOTENT, (s.client, s.idempotency_key)).fetchone()
        if row is not None:
            existing_id, request_hash, created_at = row
            if created_at + IDEMPOTENCY_WINDOW > s.created_at:
                if request_hash != s.request_hash:
                    raise IdempotencyConflict(s.idempotency_key)
                return str(existing_id)
            conn.execute(Q.FORGET_IDEMPOTENCY_KEY, (existing_id,))
    conn.execute(
        Q.INSERT_SUBMISSION,
        (s.id, s.client, s.sender, s.created_at, s.idempotency_key, s.request_hash, s.message),
    )
    for domain, addresses in s.envelopes().items():
        envelope_id = conn.execute(Q.INSERT_ENVELOPE, (s.id, domain, s.created_at, s.created_at)).lastrowid
        conn.executemany(
            Q.INSERT_RECIPIENT,
            [(envelope_id, i, s.id, a, s.created_at) for i, a in enumerate(addresses)],
        )
    return s.id


def _submission_txn(conn: sqlite3.Connection, client: str, submission_id: str) -> SubmissionState | None:
    if conn.execute(Q.SUBMISSION_OWNER, (submission_id, client)).fetchone() is None:
        return None
    rows = conn.execute(Q.SUBMISSION_RECIPIENTS, (submission_id,)).fetchall()
    return SubmissionState(submission_id, tuple(RecipientState(*row) for row in rows))


def _claim_txn(
    conn: sqlite3.Connection, lease: str, now: float, expires: float, limit: int
) -> list[ClaimedEnvelope]:
    claimed = conn.execute(Q.CLAIM, (lease, expires, now, limit)).fetchall()
    if not claimed:
        return []
    ids = json.dumps([row[0] for row in claimed])
    details = {eid: (sender, message) for eid, sender, message in conn.execute(Q.CLAIMED_DETAILS, (ids,))}
    pending: dict[int, list[str]] = {}
    for eid, address in conn.execute(Q.PENDING_RECIPIENTS, (ids,)):
        pending.setdefault(eid, []).append(address)
    claimed.sort()
    return [
        ClaimedEnvelope(
            id=eid,
            submission_id=sid,
            domain=domain,
            sender=details[eid][0],
            recipients=tuple(pending.get(eid, ())),
            message=details[eid][1] or b"",
            attempts=attempts,
            created_at=created_at,
            lease=lease,
        )
        for eid, sid, domain, attempts, created_at in claimed
    ]


def _renew_txn(conn: sqlite3.Connection, rows: list[tuple[float, int, str]]) -> None:
    conn.executemany(Q.RENEW, rows)


def _record_many_txn(conn: sqlite3.Connection, batches: list[tuple[Sequence[EnvelopeOutcome], float]]) -> list[None]:
    for outcomes, now in batches:
        _record_txn(conn, outcomes, now)
    return [None] * len(batches)


def _record_txn(conn: sqlite3.Connection, outcomes: Sequence[EnvelopeOutcome], now: float) -> None:
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
        next_attempt = outcome.next_attempt if outcome.next_attempt is not None else now
        (done,) = conn.execute(Q.FINISH_ENVELOPE, (attempted, next_attempt, envelope.id, envelope.lease)).fetchone()
        if done:
            conn.execute(Q.FINISH_SUBMISSION, (now, envelope.submission_id, envelope.submission_id))


def _clean_txn(conn: sqlite3.Connection, before: float, limit: int) -> int:
    return conn.execute(Q.DELETE_FINISHED, (before, limit)).rowcount


def _vacuum(conn: sqlite3.Connection, pages: int) -> None:
    conn.execute(Q.INCREMENTAL_VACUUM.format(pages=pages)).fetchall()


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
        )
        for eid, sid, client, domain, attempts, next_attempt, leased, created_at in rows
    ]


def _queue_stats_txn(conn: sqlite3.Connection, now: float, top_domains: int) -> QueueStats:
    recipients = tuple(conn.execute(Q.RECIPIENTS_BY_STATUS).fetchall())
    unfinished, in_delivery, oldest = conn.execute(Q.UNFINISHED_SUMMARY, (now,)).fetchone()
    domains = tuple(conn.execute(Q.BACKLOG_BY_DOMAIN, (top_domains,)).fetchall())
    return QueueStats(recipients, unfinished, in_delivery, oldest, domains)


def _queue_depth_txn(conn: sqlite3.Connection, now: float) -> QueueDepth:
    recipients = tuple(conn.execute(Q.PENDING_BY_STATUS).fetchall())
    unfinished, in_delivery, oldest = conn.execute(Q.UNFINISHED_SUMMARY, (now,)).fetchone()
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
    failed = conn.execute(Q.FAIL_PENDING_RECIPIENTS, (reply, now, selection)).rowcount
    finished = conn.execute(Q.FINISH_FAILED_ENVELOPES, (selection,)).rowcount
    for submission_id in sorted({row[1] for row in rows}):
        conn.execute(Q.FINISH_SUBMISSION, (now, submission_id, submission_id))
    return finished, failed


def _add_client_txn(conn: sqlite3.Connection, client: str, now: float) -> None:
    if conn.execute(Q.CLIENT_EXISTS, (client,)).fetchone() is not None:
        raise Conflict(f"client {client} already exists")
    conn.execute(Q.INSERT_CLIENT, (client, now))


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


def _touch_keys_txn(conn: sqlite3.Connection, used: Sequence[tuple[str, float]]) -> None:
    conn.executemany(Q.TOUCH_KEY, [(when, key_id) for key_id, when in used])


def _queued_by_client_txn(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute(Q.QUEUED_BY_CLIENT).fetchall())
