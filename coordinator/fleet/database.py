"""The registry's two databases: a SQLite file (one machine, the default) and a PostgreSQL server (several workers).

Both take the same SQL, written for SQLite (`?` parameters); PostgreSQL's `%s` and its row locks are put in here.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from coordinator.errors import ConfigError
from edge_runtime.errors import OffsiteError

# The row lock a read-then-write takes on PostgreSQL; SQLite has no such clause (BEGIN IMMEDIATE locks the file).
FOR_UPDATE = " FOR UPDATE"
SCHEMA_LOCK = 0x0FF5173  # the advisory lock the registry's schema is created under (any fixed number)


class RegistryUnavailable(OffsiteError):
    """The registry could not be reached or was busy past its timeout; the statement did not happen. Worth trying
    again: the service waits a tick and goes on (a PostgreSQL connection is made again at the next statement)."""


class Run(Protocol):
    """One statement: its rows (as dicts) and how many rows it changed."""

    def __call__(self, sql: str, *args: Any) -> tuple[list[dict[str, Any]], int]: ...


class SqliteDatabase:
    """`state/fleet.sqlite3` in WAL mode: the fleet commands read while the service writes; the workers of one
    machine share it (each write takes SQLite's file lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.where = str(path)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")

    def _run(self, sql: str, *args: Any) -> tuple[list[dict[str, Any]], int]:
        cursor = self.db.execute(sql.replace(FOR_UPDATE, ""), args)
        return [dict(row) for row in cursor.fetchall()], cursor.rowcount

    def run(self, sql: str, *args: Any) -> tuple[list[dict[str, Any]], int]:
        with self.lock, self._unavailable():
            return self._run(sql, *args)

    @contextmanager
    def transaction(self) -> Iterator[Run]:
        """This process's other threads wait on the lock; other processes on SQLite's write lock (BEGIN IMMEDIATE)."""
        with self.lock, self._unavailable():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self._run
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as error:  # locked past the timeout, disk full, unreadable
            raise RegistryUnavailable(f"the registry {self.where} is unavailable: {error}") from None

    def create(self, schema: str, added: tuple[tuple[str, str, str], ...]) -> None:
        """The tables, and the columns (table, column, type) a file written by an earlier version lacks."""
        with self.lock:
            self.db.executescript(schema)
        with self.transaction() as run:
            for table, column, kind in added:
                if column not in {row["name"] for row in run(f"PRAGMA table_info({table})")[0]}:
                    run(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


class PostgresDatabase:
    """A PostgreSQL server (`postgresql://USER@HOST:PORT/DATABASE`; the password from PGPASSWORD or ~/.pgpass rather
    than the URL, which `ps` shows). One connection per process, its statements serialized by a lock."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise ConfigError("--registry postgresql://… needs psycopg: pip install 'psycopg[binary]'") from None
        parsed = urlparse(url)
        self.where = f"postgresql://{parsed.hostname or 'localhost'}:{parsed.port or 5432}{parsed.path}"
        self.psycopg, self.url, self.dict_row = psycopg, url, dict_row
        try:
            self.db = self._connect()
        except RegistryUnavailable as error:
            raise ConfigError(str(error)) from None
        self.lock = threading.Lock()

    def _connect(self) -> Any:
        try:
            return self.psycopg.connect(self.url, autocommit=True, row_factory=self.dict_row, connect_timeout=10)
        except self.psycopg.OperationalError as error:
            raise RegistryUnavailable(f"cannot open the registry at {self.where}: {str(error).strip()}") from None

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """The connection (made again if the last one broke); a lost server raises RegistryUnavailable."""
        if self.db.broken or self.db.closed:
            self.db = self._connect()
        try:
            yield self.db
        except self.psycopg.OperationalError as error:
            raise RegistryUnavailable(f"the registry at {self.where} is unavailable: {str(error).strip()}") from None

    def _run_with(self, db: Any) -> Run:
        def run(sql: str, *args: Any) -> tuple[list[dict[str, Any]], int]:
            cursor = db.execute(sql.replace("?", "%s"), args)
            rows = cursor.fetchall() if cursor.description else []
            return rows, cursor.rowcount

        return run

    def run(self, sql: str, *args: Any) -> tuple[list[dict[str, Any]], int]:
        with self.lock, self._connection() as db:
            return self._run_with(db)(sql, *args)

    @contextmanager
    def transaction(self) -> Iterator[Run]:
        with self.lock, self._connection() as db, db.transaction():
            yield self._run_with(db)

    def create(self, schema: str, added: tuple[tuple[str, str, str], ...]) -> None:
        """The tables, in one transaction; workers starting together wait on an advisory lock (two concurrent
        CREATE TABLE IF NOT EXISTS can collide). `added` is not needed: PostgreSQL registries began with every
        column."""
        with self.transaction() as run:
            run("SELECT pg_advisory_xact_lock(?)", SCHEMA_LOCK)
            for statement in filter(str.strip, schema.split(";")):
                run(statement)


Database = SqliteDatabase | PostgresDatabase


def open_database(state: Path, url: str | None) -> Database:
    """`url` None: the SQLite file in `state`; else a postgresql:// (or postgres://) server."""
    if url is None:
        return SqliteDatabase(state / "fleet.sqlite3")
    if urlparse(url).scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"--registry {url!r} is not postgresql://USER@HOST:PORT/DATABASE (leave it out for SQLite)")
    return PostgresDatabase(url)
