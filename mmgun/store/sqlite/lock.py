"""The ``flock(2)`` through which the processes writing one SQLite file take turns."""

from __future__ import annotations

import fcntl
import os
import time

from twisted.logger import Logger

from .. import StorageError

_log = Logger()

#: SQLite's busy timeout (seconds), and how long a writer waits for the WriteLock.
BUSY_TIMEOUT = 30.0
#: A writer waiting for another process's WriteLock tries again after these pauses (doubling).
_FIRST_PAUSE = 0.0001
_LAST_PAUSE = 0.001


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
