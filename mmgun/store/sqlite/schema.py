"""
The SQLite file made ready: connection pragmas, the schema and its migrations, the
file's permissions, and the one-time conversion to incremental auto-vacuum.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable

from twisted.logger import Logger

from .. import StorageError
from . import queries as Q
from .lock import BUSY_TIMEOUT, WriteLock

_log = Logger()


def _os_reason(error: OSError) -> str:
    """"permission denied", not "[Errno 13] Permission denied: '/the/path'" (the caller names the path)."""
    return error.strerror.lower() if error.strerror else str(error)


class Connection(sqlite3.Connection):
    """A SQLite connection as :mod:`mmgun.store.transactions` sees it (:class:`mmgun.store.sql.Db`)."""

    q = Q
    IntegrityError = sqlite3.IntegrityError

    def clock_offset(self, now: float) -> float:
        # One machine, one clock: the caller's (a test's Clock too).
        return 0.0


#: How every connection to the database is opened (sqlite3.connect's keywords).
CONNECT_OPTIONS = {"timeout": BUSY_TIMEOUT, "isolation_level": None, "check_same_thread": False, "factory": Connection}


def connect(path: str) -> Connection:
    """A connection set up the way every part of mmgun uses one."""
    conn = sqlite3.connect(path, **CONNECT_OPTIONS)  # type: ignore[call-overload]
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


def check_existing(path: str) -> None:
    """
    Raise StorageError, one line for the operator, unless ``path`` is an mmgun database
    at the newest schema version. Creates nothing and changes nothing (a typo in a path
    must not leave an empty queue behind).
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
