"""
The PostgreSQL store: one database shared by any number of hosts.

Durability: a submission is acknowledged after its COMMIT returns (PostgreSQL's own
``synchronous_commit``, on by default, decides what that means on disk and on replicas).
Throughput: submissions are group-committed as on SQLite, and each pool thread has its own
connection (``--database-pool-size``). Concurrency: writers run under READ COMMITTED;
claims lock what they take with ``FOR UPDATE SKIP LOCKED``; every transaction that writes
events (and so every one that finishes submissions) takes feed_clock's row first; leases
and due times are judged on the database's clock. Sender identities are session advisory
locks. What each statement does about concurrency is written beside it in :mod:`.queries`.

The modules: :mod:`.queries` (every statement, named as SQLite's), :mod:`.schema`
(migrations, :func:`prepare`, :func:`check_existing`), :mod:`.runners` (connections, where
transactions run, driver errors) and :mod:`.store` (:class:`PostgresStore`).
"""

from __future__ import annotations

from .runners import CannotConnect, PoolRunner, SyncRunner, connect, masked
from .schema import check_existing, migrate, prepare
from .store import DEFAULT_POOL_SIZE, PostgresStore

__all__ = [
    "DEFAULT_POOL_SIZE",
    "CannotConnect",
    "PoolRunner",
    "PostgresStore",
    "SyncRunner",
    "check_existing",
    "connect",
    "masked",
    "migrate",
    "prepare",
]
