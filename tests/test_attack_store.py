"""
Attacks on the store and its health, on real SQLite files (issue 11 items 1, 2, 4, 10, 15):
the database deleted or replaced under the running process, a full disk, a read-only
database, a retention shorter than the idempotency window, a database that never shrank.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Callable
from typing import Any, cast

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mmgun.cleaner import Cleaner
from mmgun.clients import Clients
from mmgun.health import DatabaseWatch, Health
from mmgun.store import (
    DatabaseFull,
    DatabaseGone,
    EnvelopeOutcome,
    NewSubmission,
    RecipientOutcome,
    StorageError,
)
from mmgun.store.sqlite import (
    IDEMPOTENCY_WINDOW,
    VACUUM_MARGIN,
    SQLiteStore,
    SyncRunner,
    WriteLock,
    migrate,
    prepare,
    queries as Q,
)
from mmgun.web.app import Frontend

from .helpers import CLIENT, CLIENT_LABEL, result, sync_store

MB = 1 << 20  # What --min-free-space's M means.
DAY = 86400.0


def unlink_database(path: str) -> None:
    """What the operator did: the database and its -wal and -shm removed while mmgun runs."""
    for suffix in ("", "-wal", "-shm"):
        os.unlink(path + suffix)


def store_connection(store: SQLiteStore) -> sqlite3.Connection:
    """The one connection of a synchronous store: what its writes go through."""
    return cast(SyncRunner, store._runner)._conn


def new_submission(clock: Clock, *, body: bytes = b"hello", key: str | None = None) -> NewSubmission:
    return NewSubmission(
        uuid.uuid4().hex,
        CLIENT_LABEL,
        "me@example.com",
        ("a@x.example",),
        b"Subject: s\r\n\r\n" + body,
        clock.seconds(),
        key,
        key and "digest",
    )


def deliver_all(case: SynchronousTestCase, store: SQLiteStore, clock: Clock) -> int:
    claimed = result(case, store.claim("attack", clock.seconds(), 60, 100_000))
    outcomes = [EnvelopeOutcome(e, tuple(RecipientOutcome(a, "sent", "250 ok") for a in e.recipients)) for e in claimed]
    result(case, store.record(outcomes, clock.seconds()))
    return len(claimed)


class LogCapture:
    """The log events of one level, from the global publisher, for the test's duration."""

    def __init__(self, case: SynchronousTestCase, level: LogLevel) -> None:
        self.events: list[dict[str, Any]] = []

        def observer(event: dict[str, Any]) -> None:
            if event.get("log_level") == level:
                self.events.append(event)

        typed = cast(ILogObserver, observer)
        globalLogPublisher.addObserver(typed)
        case.addCleanup(globalLogPublisher.removeObserver, typed)


class FakeStatvfs:
    """os.statvfs for the database's folder, with a free space the test sets; counts its calls."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: str) -> os.statvfs_result:
        self.calls += 1
        # (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)
        return os.statvfs_result((4096, 1024, 10**9, self.free // 1024, self.free // 1024, 0, 0, 0, 0, 255))


class API:
    """The real frontend (Klein app and /send fast path) over StubTreq, with response headers."""

    def __init__(self, case: SynchronousTestCase, frontend: Frontend) -> None:
        self.case = case
        self.treq = StubTreq(frontend.resource())

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        data = json.dumps(body).encode() if body is not None else None
        d = self.treq.request(  # type: ignore[attr-defined]  # StubTreq makes its methods at run time.
            method, "http://mmgun.test" + path, data=data, headers=headers or {}
        )
        self.treq.flush()
        response = self.case.successResultOf(d)
        content = self.case.successResultOf(response.content())
        return response.code, json.loads(content), response.headers

    def send(self, key: str | None = None, body: str = "hello!") -> tuple[int, Any, Any]:
        document = {
            "client_id": CLIENT,
            "sender": "me@example.com",
            "recipients": ["alice@another.com"],
            "subject": "s",
            "body": body,
        }
        return self.request("POST", "/send", document, {"Idempotency-Key": key} if key else None)

    def healthz(self) -> tuple[int, Any]:
        code, document, _ = self.request("GET", "/healthz")
        return code, document


class Relay:
    """A frontend with its Health on a real SQLite file, on a Clock; statvfs is faked (plenty of room)."""

    def __init__(self, case: SynchronousTestCase, *, access: Callable[[str, int], bool] = os.access) -> None:
        self.store, self.path = sync_store(case)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.statvfs = FakeStatvfs(10_000 * MB)
        self.health = Health(
            self.store, self.path, self.clock, min_free_space=100 * MB, statvfs=self.statvfs, access=access
        )
        clients = Clients.from_ids([CLIENT])
        self.frontend = Frontend(self.store, lambda: clients, self.clock, hostname="mmgun.test", health=self.health)
        self.api = API(case, self.frontend)

    def submissions(self) -> int:
        conn = sqlite3.connect(self.path)
        try:
            return int(conn.execute("SELECT count(*) FROM submissions").fetchone()[0])
        finally:
            conn.close()


class DeletedDatabaseTests(SynchronousTestCase):
    """issue 11 item 1: the database file deleted or replaced under the running process."""

    def setUp(self) -> None:
        self.relay = Relay(self)
        self.critical = LogCapture(self, LogLevel.critical)

    def test_write_after_unlink_fails_and_commits_nothing(self) -> None:
        """issue 11 item 1: after the file, -wal and -shm are unlinked, add_submission fails with DatabaseGone, rolled back."""
        store, clock = self.relay.store, self.relay.clock
        result(self, store.add_submission(new_submission(clock)))
        unlink_database(self.relay.path)
        lost = new_submission(clock)
        failure = self.failureResultOf(Deferred.fromCoroutine(store.add_submission(lost)), DatabaseGone)
        self.assertIn("deleted", str(failure.value))
        # Not even in the orphaned file the connection still holds: the check ran before COMMIT.
        self.assertIsNone(result(self, store.submission(CLIENT_LABEL, lost.id)))

    def test_send_answers_503_and_healthz_503_after_unlink(self) -> None:
        """issue 11 item 1: /send 503 with Retry-After and /healthz 503 once the database is deleted; one critical line."""
        self.assertEqual(self.relay.api.send()[0], 200)
        self.assertEqual(self.relay.api.healthz(), (200, {"status": "ok"}))
        unlink_database(self.relay.path)
        for _ in range(3):
            code, document, headers = self.relay.api.send()
            self.assertEqual(code, 503)
            self.assertEqual(document["result"], "error")
            self.assertIn("database is unavailable", document["message"])
            self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        code, document = self.relay.api.healthz()
        self.assertEqual(code, 503)
        self.assertEqual(document["status"], "unavailable")
        self.assertIn("database file was deleted", document["message"])
        self.assertEqual(len(self.critical.events), 1)
        self.assertEqual(self.critical.events[0]["path"], os.path.abspath(self.relay.path))
        self.assertNotIn(self.relay.path, document["message"])  # /healthz is unauthenticated: no paths.

    def test_replaced_database_refuses_writes(self) -> None:
        """issue 11 item 1: another database renamed over the path: writes refused (503), /healthz 503 'replaced'."""
        other, other_path = sync_store(self, "other.sqlite3")
        result(self, other.close())
        os.replace(other_path, self.relay.path)
        code, _, headers = self.relay.api.send()
        self.assertEqual(code, 503)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        self.assertIn("replaced", self.relay.api.healthz()[1]["message"])
        self.assertEqual(self.relay.submissions(), 0)  # The file now at the path got nothing either.
        self.failureResultOf(
            Deferred.fromCoroutine(self.relay.store.add_submission(new_submission(self.relay.clock))), DatabaseGone
        )
        self.assertEqual(len(self.critical.events), 1)

    def test_deleted_wal_refuses_writes(self) -> None:
        """issue 11 item 1: only the -wal (the newest commits) deleted: writes refused too."""
        self.assertEqual(self.relay.api.send()[0], 200)
        os.unlink(self.relay.path + "-wal")
        self.assertEqual(self.relay.api.send()[0], 503)
        self.assertIn("-wal file was deleted", self.relay.api.healthz()[1]["message"])

    def test_file_put_back_accepts_writes_again(self) -> None:
        """issue 11 item 1: the same file moved away and back: refused meanwhile, accepted again after."""
        aside = self.relay.path + ".aside"
        os.rename(self.relay.path, aside)
        self.assertEqual(self.relay.api.send()[0], 503)
        os.rename(aside, self.relay.path)
        self.assertEqual(self.relay.api.send()[0], 200)
        self.assertEqual(self.relay.api.healthz(), (200, {"status": "ok"}))
        self.assertEqual(self.relay.submissions(), 1)

    def test_watch_logs_one_critical_line_without_traffic(self) -> None:
        """issue 11 item 1: with no request at all, the periodic watch notices the deletion and says so once."""
        watch = DatabaseWatch(self.relay.store, self.relay.clock)
        watch.startService()
        self.addCleanup(watch.stopService)
        unlink_database(self.relay.path)
        self.assertEqual(self.critical.events, [])
        self.relay.clock.advance(5)
        self.assertEqual(len(self.critical.events), 1)
        self.relay.clock.advance(60)
        self.assertEqual(len(self.critical.events), 1)


class DeletedDatabasePoolTests(TestCase):
    """issue 11 item 1, with the daemon's runner: the check runs in adbapi's pool thread."""

    def test_pool_write_after_unlink_fails(self) -> Deferred[None]:
        """issue 11 item 1: SQLiteStore.open (thread pool): after unlinking, add_submission raises DatabaseGone."""

        async def scenario() -> None:
            from twisted.internet import reactor

            path = self.mktemp() + ".sqlite3"
            store = SQLiteStore.open(path, reactor)
            self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
            clock = Clock()
            clock.advance(1_800_000_000)
            await store.add_submission(new_submission(clock))
            unlink_database(path)
            lost = new_submission(clock)
            with self.assertRaises(DatabaseGone):
                await store.add_submission(lost)
            self.assertIsNone(await store.submission(CLIENT_LABEL, lost.id))
            self.assertIn("deleted", store.write_problem() or "")

        return Deferred.fromCoroutine(scenario())


class FullDiskTests(SynchronousTestCase):
    """issue 11 item 2 (store and frontend): SQLITE_FULL and low free space answer 503, never 500."""

    def setUp(self) -> None:
        self.relay = Relay(self)
        self.conn = store_connection(self.relay.store)

    def fill(self) -> None:
        """A real SQLITE_FULL: the database may not grow by one more page."""
        (pages,) = self.conn.execute("PRAGMA page_count").fetchone()
        self.conn.execute(f"PRAGMA max_page_count = {pages}")

    def unfill(self) -> None:
        self.conn.execute("PRAGMA max_page_count = 1073741823")

    def test_sqlite_full_answers_503_with_retry_after(self) -> None:
        """issue 11 item 2: 'database or disk is full' on /send: 503 + Retry-After, nothing queued, then 200 once there is room."""
        self.fill()
        code, document, headers = self.relay.api.send(body="x" * 20000)
        self.assertEqual(code, 503)
        self.assertEqual(
            document, {"result": "error", "message": "cannot store messages now: the disk is full; try again later"}
        )
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        self.assertEqual(self.relay.submissions(), 0)
        self.unfill()
        self.assertEqual(self.relay.api.send(body="x" * 20000)[0], 200)

    def test_record_raises_storage_error_on_full_and_keeps_the_lease(self) -> None:
        """issue 11 item 2: record() on a full database raises DatabaseFull (a StorageError), changes nothing; the retry commits."""
        store, clock = self.relay.store, self.relay.clock
        result(self, store.add_submission(new_submission(clock)))
        (envelope,) = result(self, store.claim("attack", clock.seconds(), 60, 10))
        self.fill()
        outcome = EnvelopeOutcome(envelope, (RecipientOutcome("a@x.example", "sent", "250 " + "y" * 50_000),))
        failure = self.failureResultOf(Deferred.fromCoroutine(store.record([outcome], clock.seconds())), StorageError)
        self.assertIsInstance(failure.value, DatabaseFull)
        state = result(self, store.submission(CLIENT_LABEL, envelope.submission_id))
        self.assertEqual(state.recipients[0].status, "queued")
        self.unfill()
        result(self, store.record([outcome], clock.seconds()))  # The lease survived the failed commit.
        self.assertEqual(
            result(self, store.submission(CLIENT_LABEL, envelope.submission_id)).recipients[0].status, "sent"
        )

    def test_low_free_space_refuses_submissions(self) -> None:
        """issue 11 item 2: under --min-free-space on the database's file system: /send 503 + Retry-After, nothing queued."""
        self.relay.statvfs.free = 99 * MB
        code, document, headers = self.relay.api.send()
        self.assertEqual(code, 503)
        self.assertIn("free space", document["message"])
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"30"])
        self.assertEqual(self.relay.submissions(), 0)
        self.relay.statvfs.free = 101 * MB
        self.relay.clock.advance(1)
        self.assertEqual(self.relay.api.send()[0], 200)

    def test_free_space_read_at_most_once_a_second(self) -> None:
        """issue 11 item 2: statvfs is cached for 1 s on the clock, not called per request."""
        for _ in range(5):
            self.relay.api.send()
        self.assertEqual(self.relay.statvfs.calls, 1)
        self.relay.clock.advance(1)
        self.relay.api.send()
        self.assertEqual(self.relay.statvfs.calls, 2)

    def test_real_statvfs_default(self) -> None:
        """issue 11 item 2: by default the real file system is asked (this one has more than 100 MB free)."""
        health = Health(self.relay.store, self.relay.path, self.relay.clock, min_free_space=100 * MB)
        self.assertIsNone(health.admission())
        huge = Health(self.relay.store, self.relay.path, self.relay.clock, min_free_space=10**18)
        self.assertIn("under the minimum", huge.admission() or "")


class HealthTests(SynchronousTestCase):
    """issue 11 item 10: /healthz answers whether this process can accept mail now."""

    def test_healthz_503_while_writes_fail_read_only(self) -> None:
        """issue 11 item 10: a real SQLITE_READONLY on the store's connection (query_only): /send 503, /healthz 503 until a write succeeds."""
        relay = Relay(self)
        conn = store_connection(relay.store)
        # SQLite's own read-only refusal (SQLITE_READONLY), as for a read-only file; root cannot bypass it.
        conn.execute("PRAGMA query_only = 1")
        self.assertEqual(relay.api.send()[0], 503)
        self.assertEqual(
            relay.api.healthz(), (503, {"status": "unavailable", "message": "attempt to write a readonly database"})
        )
        conn.execute("PRAGMA query_only = 0")
        self.assertEqual(relay.api.healthz()[0], 503)  # Still failing as far as anyone knows: no write has succeeded.
        self.assertEqual(relay.api.send()[0], 200)
        self.assertEqual(relay.api.healthz(), (200, {"status": "ok"}))

    def test_healthz_503_when_the_file_is_immutable(self) -> None:
        """issue 11 item 10: chattr +i on the database file (root cannot write it either): /healthz 503 'not writable'."""
        relay = Relay(self)
        self.immutable(relay.path)
        self.assertEqual(
            relay.api.healthz(), (503, {"status": "unavailable", "message": "the database file is not writable"})
        )

    def test_healthz_503_when_the_folder_is_immutable(self) -> None:
        """issue 11 item 10: chattr +i on the database's folder (no -wal, -shm or -lock can be made): /healthz 503."""
        relay = Relay(self)
        self.immutable(os.path.dirname(os.path.abspath(relay.path)))
        self.assertEqual(
            relay.api.healthz(), (503, {"status": "unavailable", "message": "the database's folder is not writable"})
        )

    def immutable(self, path: str) -> None:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", path], capture_output=True).returncode != 0:
            raise self.skipTest("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and ext4/xfs/btrfs)")
        self.addCleanup(subprocess.run, [chattr, "-i", path], check=True)

    def test_healthz_503_when_not_writable_for_this_user(self) -> None:
        """issue 11 item 10: access(2) says the file is not writable (as it would for a non-root user after chmod): 503."""
        relay = Relay(self, access=lambda path, mode: not path.endswith(".sqlite3"))
        self.assertEqual(relay.api.healthz()[1]["message"], "the database file is not writable")

    def test_healthz_503_under_free_space_threshold(self) -> None:
        """issue 11 item 10: free space under --min-free-space: /healthz 503 with the reason."""
        relay = Relay(self)
        relay.statvfs.free = 5 * MB
        code, document = relay.api.healthz()
        self.assertEqual(code, 503)
        self.assertEqual(
            document["message"], "free space on the database's file system is 5 MiB, under the minimum of 100 MiB"
        )

    def test_healthz_503_after_delete(self) -> None:
        """issue 11 item 10: the database deleted: /healthz 503 (a SELECT 1 on the open file would still answer)."""
        relay = Relay(self)
        unlink_database(relay.path)
        self.assertEqual(relay.api.healthz()[0], 503)
        result(self, relay.store.ping())  # What the old /healthz asked: still fine.

    def test_healthz_ok(self) -> None:
        """issue 11 item 10: all well: 200."""
        self.assertEqual(Relay(self).api.healthz(), (200, {"status": "ok"}))

    def test_check_asks_the_file_once(self) -> None:
        """issue 11 item 10: one health check stats the database file once (write_problem), then pings."""
        store, path = sync_store(self)
        calls: list[str] = []

        class Counting:
            def write_problem(self) -> str | None:
                calls.append("write_problem")
                return store.write_problem()

            async def ping(self) -> None:
                calls.append("ping")
                await store.ping()

        clock = Clock()
        health = Health(cast(Any, Counting()), path, clock, min_free_space=MB, statvfs=FakeStatvfs(1000 * MB))
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(health.check())))
        self.assertEqual(calls, ["write_problem", "ping"])


class IdempotencyOutlivesRetentionTests(SynchronousTestCase):
    """issue 11 item 4: an Idempotency-Key is honoured for 24 h whatever --retention is."""

    def test_replay_after_cleaning_returns_the_same_id(self) -> None:
        """issue 11 item 4: retention 1 s; keyed submission delivered and cleaned; replay within 24 h: same id, nothing queued."""
        relay = Relay(self)
        store, clock = relay.store, relay.clock
        cleaner = Cleaner(store, clock, interval=60, retention=1)
        code, first, _ = relay.api.send(key="retry-me")
        self.assertEqual(code, 200)
        result(self, store.add_submission(new_submission(clock)))  # Without a key: cleaned as before.
        self.assertEqual(deliver_all(self, store, clock), 2)
        clock.advance(2)
        self.assertEqual(self.successResultOf(cleaner.clean()), 1)
        clock.advance(IDEMPOTENCY_WINDOW - 60)
        self.assertEqual(self.successResultOf(cleaner.clean()), 0)
        code, again, _ = relay.api.send(key="retry-me")
        self.assertEqual((code, again), (200, first))
        self.assertEqual(result(self, store.queue_entries(clock.seconds())), [])
        self.assertEqual(relay.submissions(), 1)
        clock.advance(120)  # The key's 24 h are over: now it goes.
        self.assertEqual(self.successResultOf(cleaner.clean()), 1)
        self.assertEqual(relay.submissions(), 0)

    def test_long_retention_unchanged(self) -> None:
        """issue 11 item 4: with a retention longer than a day, keyed submissions go at retention like the others."""
        store, _ = sync_store(self)
        clock = Clock()
        clock.advance(1_800_000_000)
        cleaner = Cleaner(store, clock, interval=60, retention=7 * DAY)
        result(self, store.add_submission(new_submission(clock, key="k")))
        deliver_all(self, store, clock)
        clock.advance(7 * DAY - 1)
        self.assertEqual(self.successResultOf(cleaner.clean()), 0)
        clock.advance(2)
        self.assertEqual(self.successResultOf(cleaner.clean()), 1)


class AutoVacuumTests(SynchronousTestCase):
    """issue 11 item 15: auto_vacuum set in the right order, old databases converted once."""

    def auto_vacuum(self, path: str) -> int:
        conn = sqlite3.connect(path)
        try:
            return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
        finally:
            conn.close()

    def test_new_database_is_incremental(self) -> None:
        """issue 11 item 15: a database mmgun creates has auto_vacuum = 2 (INCREMENTAL) and is in WAL mode."""
        _, path = sync_store(self)
        self.assertEqual(self.auto_vacuum(path), 2)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone(), ("wal",))

    def test_old_database_converted_once_at_start(self) -> None:
        """issue 11 item 15: a database made the old way (WAL first, auto_vacuum 0) is converted at prepare(), data kept, once."""
        path = self.mktemp() + ".sqlite3"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # What the old migrate() did: too late, a no-op.
        migrate(conn)
        conn.execute("INSERT INTO submissions (id, client, sender, created_at) VALUES ('s1', 'c', 'a@b.example', 1.0)")
        conn.close()
        self.assertEqual(self.auto_vacuum(path), 0)
        info = LogCapture(self, LogLevel.info)
        store = SQLiteStore.open_sync(path)
        self.addCleanup(lambda: result(self, store.close()))
        self.assertEqual(self.auto_vacuum(path), 2)
        conversions = [e for e in info.events if "converted" in e["log_format"]]
        self.assertEqual(len(conversions), 1)
        check = sqlite3.connect(path)
        self.addCleanup(check.close)
        self.assertEqual(check.execute("SELECT id FROM submissions").fetchall(), [("s1",)])
        self.assertEqual(check.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        again = SQLiteStore.open_sync(path)
        result(self, again.close())
        self.assertEqual(len([e for e in info.events if "converted" in e["log_format"]]), 1)

    def old_database(self) -> str:
        """A database made the old way (WAL first: auto_vacuum stays 0), with 2 MB in it."""
        path = self.mktemp() + ".sqlite3"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn)
        body = b"x" * 20_000
        for i in range(100):
            conn.execute(
                "INSERT INTO submissions (id, client, sender, created_at, message) VALUES (?, 'c', 'a@b.example', 1.0, ?)",
                (f"s{i}", body),
            )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        self.assertEqual(self.auto_vacuum(path), 0)
        return path

    def test_conversion_skipped_without_room_for_the_copy(self) -> None:
        """
        issue 11 item 15: VACUUM in WAL mode writes about the whole database into the -wal:
        with no more than twice the database's size (plus a margin) free, the conversion is
        skipped with a warning rather than filling the disk; with room, it is done.
        """
        path = self.old_database()
        size = os.path.getsize(path)
        asked: list[str] = []

        def tight(folder: str) -> int:
            asked.append(folder)
            return 2 * size + VACUUM_MARGIN

        warnings = LogCapture(self, LogLevel.warn)
        prepare(path, free_space=tight)
        self.assertEqual(asked, [os.path.dirname(os.path.abspath(path))])
        self.assertEqual(self.auto_vacuum(path), 0)
        (warning,) = [e for e in warnings.events if "not converted" in e["log_format"]]
        self.assertEqual(warning["needed"], 2 * size + VACUUM_MARGIN)
        self.assertFalse(os.path.exists(path + "-wal") and os.path.getsize(path + "-wal") > size // 2)
        prepare(path, free_space=lambda folder: 2 * size + VACUUM_MARGIN + 1)
        self.assertEqual(self.auto_vacuum(path), 2)

    def test_conversion_rechecked_under_the_lock(self) -> None:
        """
        issue 11 item 15: two processes start together on an old database; the other one
        converts it while this one waits for the write lock. This one checks again under
        the lock and does not VACUUM a second time.
        """
        path = self.old_database()
        other_process = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other_process.close)

        class RacedLock(WriteLock):
            """The second wait for the lock (the conversion's) is the one the other process wins."""

            acquired = 0

            def acquire(self) -> None:
                self.acquired += 1
                if self.acquired == 2:
                    other_process.execute("PRAGMA auto_vacuum = INCREMENTAL")
                    other_process.execute("VACUUM")
                super().acquire()

        info = LogCapture(self, LogLevel.info)
        asked: list[str] = []

        def plenty(folder: str) -> int:
            asked.append(folder)
            return 10**12

        lock = RacedLock(path)
        prepare(path, free_space=plenty, lock=lock)
        self.assertEqual(lock.acquired, 2)
        self.assertEqual(self.auto_vacuum(path), 2)
        self.assertEqual(asked, [], "looked at the free space: it was about to convert again")
        self.assertEqual([e for e in info.events if "convert" in e["log_format"]], [])

    def test_cleaner_vacuum_frees_pages(self) -> None:
        """issue 11 item 15: after the cleaner deletes rows, its incremental vacuum hands the pages back."""
        store, path = sync_store(self)
        clock = Clock()
        clock.advance(1_800_000_000)
        body = os.urandom(3000).hex().encode()
        for _ in range(200):
            result(self, store.add_submission(new_submission(clock, body=body)))
        deliver_all(self, store, clock)  # Erases the bodies: their pages become free.
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        (full,) = conn.execute("PRAGMA page_count").fetchone()
        # 200 bodies of 6 KB freed: most pages free (the delivery events reuse a few).
        self.assertGreaterEqual(conn.execute("PRAGMA freelist_count").fetchone()[0], 150)
        clock.advance(8 * DAY)
        self.assertEqual(self.successResultOf(Cleaner(store, clock, interval=60, retention=7 * DAY).clean()), 200)
        (freelist,) = conn.execute("PRAGMA freelist_count").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        self.assertLess(freelist, 10)
        self.assertLess(pages, full // 10, (pages, full))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.assertLess(os.path.getsize(path), full * 4096 // 10)


class QueriesTests(SynchronousTestCase):
    """issue 11 item 4: the cleaner's statements stay on their indexes."""

    def test_cleaning_statements_use_indexes(self) -> None:
        """issue 11 item 4: both DELETEs search submissions by an index range on finished_at, never scan the table."""
        _, path = sync_store(self)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        for statement, index in (
            (Q.DELETE_FINISHED, "submissions_finished "),
            (Q.DELETE_FINISHED_WITHOUT_KEY, "submissions_finished_without_key "),
        ):
            plan = " | ".join(
                row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, {"before": 1.0, "limit": 10})
            )
            self.assertIn(f"USING INDEX {index}(finished_at>? AND finished_at<?)", plan)
            self.assertNotIn("SCAN submissions", plan)
