"""
Where PostgreSQL transactions run: on adbapi's thread pool, one connection per pool
thread (:class:`PoolRunner`, the daemon), or at once on the calling thread on one
connection (:class:`SyncRunner`, the admin command and tests). Driver errors become
:class:`mmgun.store.StorageError`; a connection that cannot be made or was lost becomes
:class:`mmgun.store.DatabaseUnavailable`, and :meth:`problem` says so (one line in the log
when it starts, one when it ends) until a transaction succeeds again.

The connections are in autocommit mode and every transaction says ``BEGIN`` and ``COMMIT``
itself: so each chooses its isolation (writers READ COMMITTED, readers one REPEATABLE READ
snapshot), and no connection is ever left idle inside a transaction that a driver opened
implicitly (the identity-lock connection runs bare statements).

Retries: a transaction is run once more, on a new connection, when its connection broke
before its COMMIT was sent (the server rolls back what it had; after PostgreSQL restarted,
each pool thread's idle connection is dead, and the first transaction on it would otherwise
fail for nothing), and when PostgreSQL aborted it whole (deadlock, serialization failure).
Never when the connection broke while committing: the commit may have happened, and the
caller gets DatabaseUnavailable (a record is guarded by its lease, a submission by its
Idempotency-Key, if the caller tries again).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import DatabaseFull, DatabaseUnavailable, StorageError
from . import queries as Q

_log = Logger()
T = TypeVar("T")

#: libpq settings applied unless the URL gives its own: a host that cannot be reached (a
#: cut network, not a refusal) fails a connection within seconds, and a connection whose
#: peer vanished is found dead within about tcp_user_timeout (10 s) instead of TCP's 15 minutes.
CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "mmgun",
}
#: The server's side of the same, for each session (libpq's ``options``; a URL's own options
#: come after these, so they win): a host cut off in the middle of a transaction leaves it
#: open on the server, holding its row locks (the submissions and envelopes it was finishing,
#: feed_clock's row), and every other host's writes would wait for it until the server's TCP
#: keepalive gave up on the vanished peer — 2 hours by default on Linux. mmgun never idles inside
#: a transaction, so idle_in_transaction_session_timeout (:func:`idle_in_transaction`) ends only
#: such orphans; the keepalives notice the dead peer in ~11 s.
_SERVER_OPTIONS = (
    "-c idle_in_transaction_session_timeout={idle_ms}ms -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2"
    " -c tcp_keepalives_count=3 -c tcp_user_timeout=10000"
)
#: The longest and shortest idle_in_transaction_session_timeout mmgun sets, in seconds.
MAX_IDLE_IN_TRANSACTION = 10.0
MIN_IDLE_IN_TRANSACTION = 1.0


def idle_in_transaction(lease_seconds: float | None = None) -> float:
    """
    The idle_in_transaction_session_timeout for a daemon whose leases last ``lease_seconds``
    (``--lease-time``): a quarter of it, between 1 and 10 s (10 s for the default 60 s lease, and
    without one). While an orphan holds its row locks the other hosts' results and lease
    renewals wait; were it longer than a third of a lease, their leases could run out meanwhile
    and their envelopes be sent again.
    """
    if lease_seconds is None:
        return MAX_IDLE_IN_TRANSACTION
    return max(MIN_IDLE_IN_TRANSACTION, min(MAX_IDLE_IN_TRANSACTION, lease_seconds / 4))


def server_options(idle: float = MAX_IDLE_IN_TRANSACTION) -> str:
    """The server-side settings of every mmgun session, with ``idle`` seconds of idle_in_transaction_session_timeout."""
    return _SERVER_OPTIONS.format(idle_ms=round(idle * 1000))


#: psycopg prepares a statement server-side once a connection has run it this many times
#: (its default): the claims, records and inserts of a busy relay are planned once.
PREPARE_THRESHOLD = 5
#: SQLSTATEs of a transaction PostgreSQL aborted whole, nothing of it kept: run once more.
RETRIED_STATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
#: SQLSTATEs that mean the server is going away or not there yet.
_GONE_STATES = frozenset({"57P01", "57P02", "57P03"})  # admin_shutdown, crash_shutdown, cannot_connect_now


def masked(url: str) -> str:
    """``url`` with its password (in the user part, or a ``password=`` parameter) shown as ``***``: for logs and errors."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(an unreadable database URL)"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.partition(":")[0] + ":***"
        netloc = f"{user}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def one_line(error: BaseException) -> str:
    """A driver's message (libpq's are several lines) as one line."""
    return " ".join(str(error).split())


def libpq_url(url: str) -> str:
    """``url`` with its scheme in lower case: libpq knows ``postgresql://`` and ``postgres://``, not ``PostgreSQL://``."""
    scheme, separator, rest = url.partition("://")
    return scheme.lower() + separator + rest


def connect_options(url: str, idle: float = MAX_IDLE_IN_TRANSACTION) -> dict[str, Any]:
    """
    psycopg.connect's keywords for ``url``: CONNECT_DEFAULTS that the URL leaves unset,
    :func:`server_options` (``idle``: its idle_in_transaction_session_timeout) before the URL's own, autocommit.
    """
    try:
        given = conninfo_to_dict(libpq_url(url))
    except psycopg.Error as e:
        raise StorageError(f"not a usable database URL {masked(url)}: {one_line(e)}") from None
    options: dict[str, Any] = {name: value for name, value in CONNECT_DEFAULTS.items() if name not in given}
    ours = server_options(idle)
    options["options"] = f"{ours} {given['options']}" if given.get("options") else ours
    options["autocommit"] = True
    options["prepare_threshold"] = PREPARE_THRESHOLD
    return options


class CannotConnect(DatabaseUnavailable):
    """No connection to the database could be made (as opposed to one lost on the way)."""


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection as every part of mmgun uses one; CannotConnect (masked URL, one line) when it cannot be made."""
    options = connect_options(url)
    try:
        return psycopg.connect(libpq_url(url), **options)
    except psycopg.Error as e:
        raise CannotConnect(f"cannot connect to database {masked(url)}: {_reason(e)}") from e


def _reason(error: psycopg.Error) -> str:
    """libpq's message without its "connection failed: " prefix, on one line."""
    text = one_line(error)
    for prefix in ("connection failed: ", "connection is bad: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


class Db:
    """
    A connection as :mod:`mmgun.store.transactions` sees it (:class:`mmgun.store.sql.Db`),
    made for one transaction: it reads the database's clock at most once.
    """

    q = Q
    IntegrityError = psycopg.IntegrityError

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._clock: float | None = None

    def execute(self, query: str, parameters: Any = None, /) -> Any:
        return self._conn.execute(query, parameters)

    def executemany(self, query: str, rows: Any, /) -> None:
        rows = list(rows)
        if not rows:
            return  # psycopg would still make a cursor and a round trip
        # psycopg sends the rows in one pipeline: one round trip, not one per row.
        with self._conn.cursor() as cursor:
            cursor.executemany(query, rows)

    def clock_offset(self, now: float) -> float:
        if self._clock is None:
            (self._clock,) = self._conn.execute(Q.CLOCK).fetchone()  # type: ignore[misc]
        return self._clock - now


def lost(error: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    """Whether ``error`` means that the connection is gone (or could not be made)."""
    if isinstance(error, psycopg.InterfaceError):
        return True
    if conn is not None and (conn.broken or conn.closed):
        return True
    state = getattr(error, "sqlstate", None)
    if state is None:
        # libpq's own errors (no server reply): a connection that failed or broke.
        return isinstance(error, psycopg.OperationalError)
    return state.startswith("08") or state in _GONE_STATES


def storage_error(error: psycopg.Error, conn: psycopg.Connection[Any] | None) -> StorageError:
    """The StorageError for a driver error (raise it ``from`` that error)."""
    if lost(error, conn):
        return DatabaseUnavailable(f"the connection to the database was lost: {_reason(error)}")
    if getattr(error, "sqlstate", None) == "53100":  # disk_full
        return DatabaseFull(one_line(error))
    return StorageError(one_line(error))


class _Failed(Exception):
    """A transaction's driver error, and whether its COMMIT had been sent (then its outcome is unknown)."""

    def __init__(self, error: psycopg.Error, committing: bool) -> None:
        super().__init__(error)
        self.error = error
        self.committing = committing


def _roll_back(conn: psycopg.Connection[Any]) -> None:
    if conn.closed or conn.broken or conn.info.transaction_status == TransactionStatus.IDLE:
        return
    try:
        conn.execute(Q.ROLLBACK)
    except psycopg.Error:
        pass  # broken meanwhile: the server rolls back by itself


def _attempt(conn: psycopg.Connection[Any], begin: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    committing = False
    try:
        conn.execute(begin)
        result = fn(Db(conn), *args)
        committing = True
        conn.execute(Q.COMMIT)
        return result
    except psycopg.Error as e:
        _roll_back(conn)
        raise _Failed(e, committing) from e
    except BaseException:
        _roll_back(conn)
        raise


class _Source:
    """Where a transaction's connection comes from: ``get()`` one, ``forget()`` it once broken."""

    def get(self) -> psycopg.Connection[Any]:
        raise NotImplementedError

    def forget(self) -> None:
        raise NotImplementedError


def run(source: _Source, write: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(db, *args)`` in one transaction on ``source``'s connection, run once more when that is safe (module docstring)."""
    begin = Q.BEGIN_WRITE if write else Q.BEGIN_READ
    for again in (True, False):
        try:
            conn = source.get()
        except DatabaseUnavailable:
            raise
        except psycopg.Error as e:
            raise CannotConnect(f"cannot connect to the database: {_reason(e)}") from e
        try:
            return _attempt(conn, begin, fn, args)
        except _Failed as failed:
            error = failed.error
            broken = lost(error, conn)
            if broken:
                source.forget()
            safe = (broken and not (write and failed.committing)) or getattr(error, "sqlstate", None) in RETRIED_STATES
            if not (again and safe):
                raise storage_error(error, conn) from error
    raise AssertionError("unreachable")


class Reachability:
    """
    How transactions go, for :meth:`problem`: says once when the database becomes
    unreachable (or a write fails for a reason that lasts) and once when a transaction
    succeeds again. Its methods run on the reactor thread (as Deferred callbacks).
    """

    def __init__(self, url: str) -> None:
        self.database = masked(url)
        #: Why the database cannot be used now (no host, path or secret: /healthz shows it), or None.
        self.trouble: str | None = None

    def succeeded(self, result: T) -> T:
        if self.trouble is not None:
            _log.info("the database {database} answers again; submissions and claims resume", database=self.database)
            self.trouble = None
        return result

    def failed(self, failure: Failure) -> Failure:
        error = failure.value
        if isinstance(error, DatabaseUnavailable):
            trouble = "the database is unreachable: " + ("cannot connect" if isinstance(error, CannotConnect) else "connection lost")
        elif isinstance(error, DatabaseFull):
            trouble = "the database is full"
        else:
            return failure
        if self.trouble is None:
            _log.error(
                "{trouble} ({database}: {error}); submissions are refused (503) and senders stop claiming until it answers",
                trouble=trouble,
                database=self.database,
                error=str(error),
            )
        self.trouble = trouble
        return failure

    def problem(self) -> str | None:
        return self.trouble


class _PoolSlot(adbapi.Connection):
    """
    adbapi's wrapper of a pool thread's connection, made per call: it connects only when the
    transaction asks (:func:`run` maps that failure), and leaves commit and rollback to the
    transaction (adbapi's own rollback would log a traceback for every broken connection).
    The connection stays the thread's (``pool.connections``) until it breaks.
    """

    def __init__(self, pool: adbapi.ConnectionPool) -> None:
        self._pool = pool
        self._connection = None

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


class _ThreadSource(_Source):
    def __init__(self, slot: _PoolSlot) -> None:
        self._slot = slot

    def get(self) -> psycopg.Connection[Any]:
        slot = self._slot
        if slot._connection is None:
            slot._connection = slot._pool.connect()  # the thread's, or a new one
        conn: psycopg.Connection[Any] = slot._connection
        return conn

    def forget(self) -> None:
        slot = self._slot
        conn, slot._connection = slot._connection, None
        pool = slot._pool
        if conn is not None and pool.connections.get(pool.threadID()) is conn:
            pool.disconnect(conn)  # closes it; the thread's next transaction connects anew


def _in_pool_thread(slot: _PoolSlot, write: bool, fn: Callable[..., T], *args: Any) -> T:
    return run(_ThreadSource(slot), write, fn, *args)


class PoolRunner:
    """
    Runs transactions on adbapi's thread pool, up to ``size`` at once, each thread with its own
    connection (``idle``: their idle_in_transaction_session_timeout, :func:`idle_in_transaction`).
    """

    def __init__(self, url: str, reactor: Any, size: int, idle: float = MAX_IDLE_IN_TRANSACTION) -> None:
        self.reachability = Reachability(url)
        kwargs: dict[str, Any] = {}
        if reactor is not None:
            kwargs["cp_reactor"] = reactor
        self._pool = adbapi.ConnectionPool(
            "psycopg",
            libpq_url(url),
            **connect_options(url, idle),
            cp_min=size,
            cp_max=size,
            # adbapi's reconnection, done by _ThreadSource.forget and the pool's per-thread connect.
            cp_reconnect=True,
            cp_noisy=False,
            **kwargs,
        )
        self._pool.connectionFactory = _PoolSlot

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d = self._pool.runWithConnection(_in_pool_thread, True, fn, *args)
        return d.addCallbacks(self.reachability.succeeded, self.reachability.failed)

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d = self._pool.runWithConnection(_in_pool_thread, False, fn, *args)
        return d.addCallbacks(self.reachability.succeeded, self.reachability.failed)

    def problem(self) -> str | None:
        return self.reachability.problem()

    def close(self) -> None:
        self._pool.close()  # Joins the pool threads and closes their connections.


class _OwnSource(_Source):
    """One connection, made when first needed and again after it broke."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.conn: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self.conn is None:
            self.conn = connect(self._url)
        return self.conn

    def forget(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class SyncRunner:
    """Runs transactions at once on the calling thread, on one connection: for the admin command and tests."""

    def __init__(self, url: str) -> None:
        self.reachability = Reachability(url)
        self._source = _OwnSource(url)
        self._source.get()  # Fails now, in one line, when the database cannot be reached.

    def _run(self, write: bool, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            d = succeed(run(self._source, write, fn, *args))
        except Exception as e:
            d = fail(e)
        return d.addCallbacks(self.reachability.succeeded, self.reachability.failed)

    def write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._run(True, fn, *args)

    def read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._run(False, fn, *args)

    def problem(self) -> str | None:
        return self.reachability.problem()

    def close(self) -> None:
        self._source.forget()
