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

The modules, each one job: :mod:`.queries` (every statement, named), :mod:`.schema`
(pragmas, migrations, :func:`prepare`), :mod:`.lock` (:class:`WriteLock`),
:mod:`.runners` (where transactions run, driver errors) and :mod:`.store`
(:class:`SQLiteStore`); the transactions themselves are every backend's
(:mod:`mmgun.store.transactions`).
"""

from __future__ import annotations

from .. import IDEMPOTENCY_WINDOW
from ..transactions import TEST_MODE_REPLY, suppressed_reply
from .lock import BUSY_TIMEOUT, WriteLock
from .runners import DatabaseFile, PoolRunner, SyncRunner
from .schema import VACUUM_MARGIN, check_existing, connect, free_bytes, migrate, prepare
from .store import CLEAR_BATCH, VACUUM_PAGES, SQLiteStore

__all__ = [
    "BUSY_TIMEOUT",
    "CLEAR_BATCH",
    "IDEMPOTENCY_WINDOW",
    "TEST_MODE_REPLY",
    "VACUUM_MARGIN",
    "VACUUM_PAGES",
    "DatabaseFile",
    "PoolRunner",
    "SQLiteStore",
    "SyncRunner",
    "WriteLock",
    "check_existing",
    "connect",
    "free_bytes",
    "migrate",
    "prepare",
    "suppressed_reply",
]
