"""
The write lock through which processes on one SQLite file take turns (mmgun.store.sqlite.WriteLock).

"Another process" is either a real subprocess or a second open of the lock file: flock(2)
locks belong to the open file, so two opens in one process exclude each other exactly as two
processes do. That a writer is *waiting* is read from the lock's own count of waits, never inferred
from time passing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mmgun.store import StorageError
from mmgun.store.sqlite import PoolRunner, SyncRunner

from .helpers import result, sync_store

#: The most any wait in these tests may take: a deadline for a failure, never a duration.
DEADLINE = 10.0


def lock_path(database: str) -> str:
    return os.path.realpath(database) + "-lock"


def lock_is_free(path: str) -> bool:
    """Whether another opener could take the lock right now (it is left free again)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # Also unlocks, if we took it.
    return True


class HeldLock:
    """The lock taken by "another process": a second open of the file, locked until release()."""

    def __init__(self, case: SynchronousTestCase, path: str) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        # A failing test must not leave a writer blocked behind us.
        case.addCleanup(self.release)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def wait_for_waiter(case: SynchronousTestCase, runner: Any) -> None:
    """Return once ``runner``'s writer has found the lock taken and waits; fail after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while runner._lock.waits == 0:
        if time.monotonic() > deadline:
            case.fail(f"no writer waited on {runner._lock.path} within {DEADLINE} s")
        os.sched_yield()


class InThread:
    """Runs ``call`` on a thread of its own; ``join`` waits for it with a deadline."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self.outcome: list[Any] = []

        def run() -> None:
            try:
                self.outcome.append(call())
            except BaseException as e:
                self.outcome.append(e)
            finally:
                self.done.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, case: SynchronousTestCase) -> Any:
        case.assertTrue(self.done.wait(DEADLINE), f"not finished within {DEADLINE} s")
        self._thread.join()
        return self.outcome[0]


def insert_row(conn: sqlite3.Connection, ran: threading.Event | None = None) -> int:
    if ran is not None:
        ran.set()
    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
    return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


class WriteLockTests(SynchronousTestCase):
    """The synchronous runner (tests, the ``mmgun`` command) on a real file."""

    def setUp(self) -> None:
        self.store, self.path = sync_store(self)
        self.runner = self.store._runner
        self.lock = lock_path(self.path)

    def test_write_holds_the_lock(self) -> None:
        self.assertEqual(result(self, self.runner.write(lambda conn: lock_is_free(self.lock))), False)
        self.assertTrue(lock_is_free(self.lock))

    def test_vacuum_holds_the_lock(self) -> None:
        """incremental_vacuum writes outside BEGIN … COMMIT: it queues on the lock like a write."""
        self.assertEqual(result(self, self.runner.autocommit(lambda conn: lock_is_free(self.lock))), False)
        self.assertTrue(lock_is_free(self.lock))

    def test_read_does_not_take_the_lock(self) -> None:
        self.assertEqual(result(self, self.runner.read(lambda conn: lock_is_free(self.lock))), True)

    def test_read_proceeds_while_another_process_holds_the_lock(self) -> None:
        HeldLock(self, self.lock)
        # On a thread: were the read to take the lock, it would block until the cleanup, not hang the test.
        reading = InThread(lambda: result(self, self.store.ping()))
        self.assertIsNone(reading.join(self))

    def test_write_waits_for_the_lock_and_proceeds_when_released(self) -> None:
        held = HeldLock(self, self.lock)
        other = SyncRunner(self.path)  # A second connection: its own open of the lock file.
        self.addCleanup(other.close)
        ran = threading.Event()
        writing = InThread(lambda: result(self, other.write(insert_row, ran)))
        wait_for_waiter(self, other)
        self.assertFalse(ran.is_set())  # Blocked before BEGIN IMMEDIATE, not inside SQLite's busy handler.
        held.release()
        self.assertEqual(writing.join(self), 1)

    def test_write_waits_for_another_process_and_proceeds_when_it_exits(self) -> None:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('held', flush=True)\n"
                "sys.stdin.readline()\n",
                self.lock,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(holder.wait, DEADLINE)
        self.addCleanup(holder.kill)
        assert holder.stdin is not None and holder.stdout is not None  # both are PIPEs
        self.assertEqual(holder.stdout.readline(), "held\n")  # EOF ("") if the child failed: no hang.
        ran = threading.Event()
        writing = InThread(lambda: result(self, self.runner.write(insert_row, ran)))
        wait_for_waiter(self, self.runner)
        self.assertFalse(ran.is_set())
        holder.stdin.close()  # The child reads EOF and exits; the kernel drops its lock.
        self.assertEqual(writing.join(self), 1)
        self.assertEqual(holder.wait(DEADLINE), 0)
        holder.stdout.close()

    def test_write_gives_up_after_the_timeout(self) -> None:
        """A holder that never lets go fails the write (as SQLite's busy timeout did), it does not hang it."""
        HeldLock(self, self.lock)
        self.runner._lock.timeout = 0.0
        ran = threading.Event()
        failure = self.failureResultOf(self.runner.write(insert_row, ran), StorageError)
        self.assertIn("database is locked", str(failure.value))
        self.assertFalse(ran.is_set())
        self.assertEqual(self.runner._lock.waits, 1)

    def test_lock_released_when_the_transaction_raises(self) -> None:
        def fail(conn: sqlite3.Connection) -> None:
            insert_row(conn)
            raise ValueError("no")

        self.failureResultOf(self.runner.write(fail), ValueError)
        self.assertTrue(lock_is_free(self.lock))
        # Rolled back before the lock was released.
        self.assertEqual(result(self, self.runner.read(lambda c: c.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchall())), [])

    def test_lock_released_after_a_database_error(self) -> None:
        self.failureResultOf(self.runner.write(lambda conn: conn.execute("INSERT INTO nowhere VALUES (1)")), StorageError)
        self.assertTrue(lock_is_free(self.lock))
        self.assertEqual(result(self, self.runner.write(insert_row)), 1)

    def test_lock_file_writable_by_whoever_may_write_the_database(self) -> None:
        os.unlink(self.lock)
        os.chmod(self.path, 0o664)
        result(self, self.runner.write(insert_row))
        self.assertEqual(stat.S_IMODE(os.stat(self.lock).st_mode), 0o660)

    def test_lock_file_not_open_to_readers_who_may_not_write(self) -> None:
        os.unlink(self.lock)
        os.chmod(self.path, 0o644)
        result(self, self.runner.write(insert_row))
        self.assertEqual(stat.S_IMODE(os.stat(self.lock).st_mode), 0o600)

    def test_lock_file_made_by_root_belongs_to_the_database_owner(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("only root can give a file away")
        os.unlink(self.lock)
        os.chown(self.path, 65534, 65534)
        result(self, self.runner.write(insert_row))
        st = os.stat(self.lock)
        self.assertEqual((st.st_uid, st.st_gid), (65534, 65534))

    def test_unusable_lock_file_leaves_writes_to_the_busy_timeout(self) -> None:
        """A lock file that cannot be opened (even by root: here a dangling link) costs one warning, no write."""
        other = SyncRunner(self.path)
        self.addCleanup(other.close)
        os.unlink(self.lock)
        os.symlink(os.path.join(self.mktemp(), "missing", "lock"), self.lock)
        with capturedLogs() as events:
            self.assertEqual(result(self, other.write(insert_row)), 1)
            self.assertEqual(result(self, other.write(insert_row)), 2)
        warnings = [e for e in events if "cannot lock" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["path"], self.lock)

    def test_admin_store_writes_take_the_lock(self) -> None:
        """The operator's ``mmgun`` command (open_existing) queues behind the daemons' writes too."""
        from mmgun.store.sqlite import SQLiteStore

        admin = SQLiteStore.open_existing(self.path)
        self.addCleanup(admin._runner.close)
        held = HeldLock(self, self.lock)
        adding = InThread(lambda: result(self, admin.add_client("acme", 1.0)))
        wait_for_waiter(self, admin._runner)
        held.release()
        self.assertIsNone(adding.join(self))


class PoolRunnerLockTests(TestCase):
    """The daemon's runner: the lock is taken in adbapi's pool thread, so the reactor never blocks on it."""

    timeout = 4 * DEADLINE

    def setUp(self) -> None:
        _, self.path = sync_store(self)
        self.lock = lock_path(self.path)
        self.runner = PoolRunner(self.path)
        self.addCleanup(self.runner.close)

    def test_pool_write_waits_for_the_lock_and_proceeds_when_released(self) -> Deferred[None]:
        async def scenario() -> None:
            from twisted.internet import reactor
            from twisted.internet.task import deferLater

            # adbapi starts its thread once the reactor runs; trial runs the test method before.
            await deferLater(reactor, 0, lambda: None)
            held = HeldLock(self, self.lock)
            ran = threading.Event()
            d = self.runner.write(insert_row, ran)
            wait_for_waiter(self, self.runner)
            self.assertNoResult(d)
            self.assertFalse(ran.is_set())
            held.release()
            self.assertEqual(await d, 1)

        return Deferred.fromCoroutine(scenario())

    def test_pool_read_does_not_take_the_lock(self) -> Deferred[None]:
        HeldLock(self, self.lock)
        return self.runner.read(lambda conn: conn.execute("SELECT 1").fetchone()).addCallback(self.assertEqual, (1,))

    def test_pool_write_holds_the_lock_only_until_commit(self) -> Deferred[None]:
        d = self.runner.write(lambda conn: lock_is_free(self.lock))
        d.addCallback(self.assertEqual, False)
        return d.addCallback(lambda _: self.assertTrue(lock_is_free(self.lock)))
