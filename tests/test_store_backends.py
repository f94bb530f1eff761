"""
issue 15 (the store made ready for a second backend): the backend is chosen from
``--database`` by :func:`mmgun.store.open_store` and :func:`mmgun.store.open_admin_store`,
and a PostgreSQL URL opens the PostgreSQL store (tests/test_store_postgres.py), never a file at that path.
"""

from __future__ import annotations

import io
import os
import sqlite3
import sys
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun.admin import main
from mmgun.cleaner import Cleaner
from mmgun.config import resolve
from mmgun.service import make_service
from mmgun.store import StorageError, UnsupportedDatabase, open_admin_store, open_store
from mmgun.store.sqlite import SQLiteStore, store as sqlite_store

from .helpers import result, sync_store
from .test_attack_store import deliver_all, new_submission

#: PostgreSQL URLs of servers that are not there (a socket folder that does not exist): each
#: must be taken for PostgreSQL (never for a path) and fail in one line, password masked.
URLS = (
    "postgresql://mmgun:pa55word@/mmgun?host=%2Fnonexistent%2Fmmgun",
    "postgres://mmgun@/mmgun?host=/nonexistent/mmgun&sslmode=disable",
    "PostgreSQL://mmgun@/x?host=/nonexistent/mmgun",
)


class OpenStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        # A relative path made of a URL would be made under the working directory: start from a clean one.
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        old = os.getcwd()
        os.chdir(self.folder)
        self.addCleanup(os.chdir, old)

    def test_a_postgresql_url_is_not_taken_for_a_path(self) -> None:
        """issue 15: open_store and open_admin_store take a PostgreSQL URL for PostgreSQL: an absent server is one clear line, nothing is made."""
        for url in URLS:
            for opening, kwargs in (
                (open_store, {"reactor": MemoryReactorClock()}),
                (open_admin_store, {}),
                (open_admin_store, {"create": True}),
            ):
                error = self.assertRaises(StorageError, opening, url, **kwargs)
                self.assertIn("cannot connect to database postgres", str(error).lower())
                self.assertNotIn("\n", str(error))
                self.assertNotIn("pa55word", str(error))
        # SQLite would have made the folders "postgresql:/…" and a database in them.
        self.assertEqual(os.listdir(self.folder), [])

    def test_another_scheme_is_refused(self) -> None:
        """issue 15: a URL of a database mmgun has no backend for is refused in one line, not made a file path."""
        error = self.assertRaises(UnsupportedDatabase, open_store, "mysql://db/x", MemoryReactorClock())
        self.assertIn("mysql:// databases are not supported", str(error))
        self.assertEqual(os.listdir(self.folder), [])

    def test_a_path_opens_sqlite(self) -> None:
        """issue 15 (seam): a file path is an SQLite store, created and migrated by open_store."""
        store = open_store("queue.sqlite3", MemoryReactorClock())
        self.addCleanup(lambda: result(self, store.close()))
        self.assertIsInstance(store, SQLiteStore)
        with open("queue.sqlite3", "rb") as f:
            self.assertEqual(f.read(16), b"SQLite format 3\x00")

    def test_the_admin_store_creates_only_when_asked(self) -> None:
        """issue 15 (seam): open_admin_store never makes a database unless create=True; then it is usable."""
        error = self.assertRaises(StorageError, open_admin_store, "absent.sqlite3")
        self.assertEqual(str(error), "database absent.sqlite3 does not exist")
        self.assertFalse(os.path.exists("absent.sqlite3"))
        made = open_admin_store("absent.sqlite3", create=True)
        result(self, made.add_client("c1", 1.0))
        result(self, made.close())
        existing = open_admin_store("absent.sqlite3")
        self.addCleanup(lambda: result(self, existing.close()))
        self.assertTrue(result(self, existing.client_exists("c1")))

    def test_the_daemon_fails_in_one_line_without_its_postgresql(self) -> None:
        """issue 15: make_service fails with StorageError (tap prints it as one line, exit 1) before any role starts."""
        config = resolve({"database": URLS[0]}, environ={})
        error = self.assertRaises(StorageError, make_service, config, MemoryReactorClock())
        self.assertIn("cannot connect to database postgresql://mmgun:***@/mmgun", str(error))
        self.assertEqual(os.listdir(self.folder), [])

    def test_the_admin_command_fails_in_one_line_without_its_postgresql(self) -> None:
        """issue 15: every mmgun subcommand, reading or writing, says so in one line with exit status 1."""
        for args in (["queue"], ["stats"], ["clients", "add", "c1"]):
            out, err = io.StringIO(), io.StringIO()
            code = main([*args, "--database", URLS[0]], now=lambda: 1.0, environ={}, stdout=out, stderr=err)
            self.assertEqual((code, out.getvalue()), (1, ""), args)
            self.assertIn("cannot connect to database", err.getvalue())
            self.assertNotIn("pa55word", err.getvalue())
            self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
        self.assertEqual(os.listdir(self.folder), [])


DAY = 86400.0


class UpkeepTests(SynchronousTestCase):
    """issue 15 (seam): the cleaner asks for the backend's upkeep; SQLite's is a bounded incremental vacuum."""

    def setUp(self) -> None:
        self.store, path = sync_store(self)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.conn = sqlite3.connect(path)
        self.addCleanup(self.conn.close)

    def pragma(self, name: str) -> int:
        (value,) = self.conn.execute(f"PRAGMA {name}").fetchone()
        return int(value)

    def test_sqlite_upkeep_frees_a_bounded_number_of_pages(self) -> None:
        """issue 15 (seam): one upkeep hands back at most VACUUM_PAGES free pages, its count chosen inside the backend."""
        for _ in range(60):
            result(self, self.store.add_submission(new_submission(self.clock, body=os.urandom(3000).hex().encode())))
        deliver_all(self, self.store, self.clock)  # Erases the bodies: their pages become free.
        free, pages = self.pragma("freelist_count"), self.pragma("page_count")
        self.assertGreater(free, 2 * 20)
        self.patch(sqlite_store, "VACUUM_PAGES", 20)
        result(self, self.store.upkeep())
        self.assertEqual((self.pragma("freelist_count"), self.pragma("page_count")), (free - 20, pages - 20))
        result(self, self.store.upkeep())
        self.assertEqual((self.pragma("freelist_count"), self.pragma("page_count")), (free - 40, pages - 40))

    def test_the_cleaner_asks_for_upkeep_after_a_pass_that_deleted(self) -> None:
        """issue 15 (seam): a pass that deleted nothing leaves the database alone; one that deleted calls upkeep once."""
        calls: list[None] = []
        real = self.store.upkeep

        async def counting() -> None:
            calls.append(None)
            await real()

        self.patch(self.store, "upkeep", counting)
        cleaner = Cleaner(self.store, self.clock, interval=60, retention=7 * DAY)
        result(self, self.store.add_submission(new_submission(self.clock)))
        deliver_all(self, self.store, self.clock)
        self.assertEqual(self.successResultOf(cleaner.clean()), 0)
        self.assertEqual(calls, [])
        self.clock.advance(8 * DAY)
        self.assertEqual(self.successResultOf(cleaner.clean()), 1)
        self.assertEqual(calls, [None])


#: ``mmgun`` with every call on its store finishing on a later reactor turn, as a store on a
#: database server's connection pool would: the command must run the reactor to finish.
LATER_STORE = """
import sys
from twisted.internet import reactor
from twisted.internet.task import deferLater
from mmgun import admin

opened = admin.open_admin_store


class Later:
    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        method = getattr(self._store, name)

        async def later(*args, **kwargs):
            await deferLater(reactor, 0, lambda: None)
            return await method(*args, **kwargs)

        return later


admin.open_admin_store = lambda database, **options: Later(opened(database, **options))
sys.exit(admin.main())
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AsynchronousStoreTests(TestCase):
    """issue 15 (seam, item 4): the mmgun command (a real process) on a store whose calls do not finish at once."""

    async def mmgun(self, *args: str) -> tuple[int, str, str]:
        from twisted.internet import reactor

        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", LATER_STORE, *args, "--database", self.path], env=env, path=ROOT, reactor=reactor
        )
        return code, out.decode(), err.decode()

    async def test_commands_finish_on_an_asynchronous_store(self) -> None:
        """issue 15 (seam): reads, writes and a command's error all complete under the reactor, exit statuses kept."""
        self.path = os.path.abspath(self.mktemp())
        self.assertEqual(await self.mmgun("clients", "add", "c1"), (0, "added client c1; create a key with: mmgun keys create c1\n", ""))
        self.assertEqual(await self.mmgun("queue"), (0, "queue is empty\n", ""))
        code, out, err = await self.mmgun("keys", "list", "nobody")
        self.assertEqual((code, out, err), (1, "", "mmgun: no client nobody\n"))
        store = open_admin_store(self.path)
        self.addCleanup(lambda: result(self, store.close()))
        self.assertTrue(result(self, store.client_exists("c1")))


class GroupCommitTurnTests(SynchronousTestCase):
    def test_items_of_one_reactor_turn_share_one_commit(self) -> None:
        """
        issue 13 (speed): with a clock, an idle group commit waits for the end of the turn,
        so a burst of requests resumed together (replies of the DKIM child) is one commit,
        not one for the first and another for the rest; without one it writes at once.
        """
        from twisted.internet.defer import succeed

        from mmgun.store.group import GroupCommit

        class Runner:
            def __init__(self) -> None:
                self.writes: list[list[int]] = []

            def write(self, fn: Any, items: list[int]) -> Any:
                self.writes.append(list(items))
                return succeed(fn(None, items))

        clock = Clock()
        runner = Runner()
        group: GroupCommit[int, int] = GroupCommit(runner, lambda conn, items: [i * 10 for i in items], clock)
        waiters = [group.submit(i) for i in range(3)]
        self.assertEqual(runner.writes, [])
        clock.advance(0)
        self.assertEqual(runner.writes, [[0, 1, 2]])
        self.assertEqual([self.successResultOf(w) for w in waiters], [0, 10, 20])
        group.submit(7)
        clock.advance(0)
        self.assertEqual(runner.writes[-1], [7])
        at_once = Runner()
        plain: GroupCommit[int, int] = GroupCommit(at_once, lambda conn, items: list(items))
        plain.submit(1)
        self.assertEqual(at_once.writes, [[1]])
