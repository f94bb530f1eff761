"""
The PostgreSQL schema made ready: created and migrated at start (:func:`prepare`), under a
transaction-scoped advisory lock so that hosts starting at once against a new database do
not race, and checked without changing anything for the admin command (:func:`check_existing`).
PostgreSQL's DDL is transactional: a migration that fails leaves the schema as it was.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from .. import StorageError
from . import queries as Q
from .runners import CannotConnect, connect, masked, one_line


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema to the newest version in one transaction; return that version."""
    conn.execute(Q.BEGIN_WRITE)
    try:
        conn.execute(Q.LOCK_SCHEMA)
        conn.execute(Q.CREATE_SCHEMA_TABLE)
        conn.execute(Q.INSERT_SCHEMA_VERSION)
        (version,) = conn.execute(Q.SCHEMA_VERSION).fetchone()  # type: ignore[misc]
        if version > len(Q.MIGRATIONS):
            raise StorageError(f"database schema version {version} is newer than this mmgun ({len(Q.MIGRATIONS)})")
        for target, statements in enumerate(Q.MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                conn.execute(statement)
            conn.execute(Q.SET_SCHEMA_VERSION, (target,))
        conn.execute(Q.COMMIT)
    except BaseException:
        if not conn.closed and not conn.broken:
            conn.execute(Q.ROLLBACK)
        raise
    return len(Q.MIGRATIONS)


def prepare(url: str) -> None:
    """Create or migrate the schema of the database at ``url``; StorageError, one line with the password masked, when it cannot."""
    conn = connect(url)
    try:
        migrate(conn)
    except psycopg.Error as e:
        raise StorageError(f"cannot prepare database {masked(url)}: {one_line(e)}") from e
    finally:
        conn.close()


_NO_DATABASE = re.compile(r'database "[^"]*" does not exist')


def check_existing(url: str) -> None:
    """
    Raise StorageError, one line for the operator, unless ``url`` is an mmgun database at
    the newest schema version. Creates nothing and changes nothing.
    """
    where = masked(url)
    try:
        conn = connect(url)
    except CannotConnect as e:
        if _NO_DATABASE.search(str(e)):
            raise StorageError(f"database {where} does not exist") from None
        raise
    try:
        (present,) = conn.execute(Q.HAS_SCHEMA).fetchone()  # type: ignore[misc]
        version = conn.execute(Q.SCHEMA_VERSION).fetchone()[0] if present else 0  # type: ignore[index]
    except psycopg.Error as e:
        raise StorageError(f"cannot open database {where}: {one_line(e)}") from e
    finally:
        conn.close()
    if version == 0:
        raise StorageError(f"{where} is not an mmgun database (it has no mmgun schema)")
    if version > len(Q.MIGRATIONS):
        raise StorageError(f"database {where} has schema version {version}, newer than this mmgun ({len(Q.MIGRATIONS)})")
    if version < len(Q.MIGRATIONS):
        raise StorageError(f"database {where} has schema version {version}; start the daemon once to upgrade it")
