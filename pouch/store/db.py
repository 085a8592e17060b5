"""The daemon's SQLite database: one file, WAL mode, used off the event loop.

Every statement runs in a worker thread (``trio.to_thread``) on one
connection, serialised by a lock: SQLite is fast enough that one writer is
never the bottleneck here, and a single connection keeps transactions simple.
Each ``transaction()`` commits atomically or not at all, so a daemon killed
mid-call leaves the previous state.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

T = TypeVar("T")

Row = tuple[Any, ...]


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)

    def open_sync(self, schema: Sequence[str]) -> None:
        """Open (creating) the file and apply the schema; run at start-up."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across a process crash in WAL mode; only power
        # loss can drop the last transactions, and the stores are rebuilt from
        # disk for that case.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            for statement in schema:
                conn.execute(statement)
            conn.execute("COMMIT")
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* inside one transaction (blocking; for threads and start-up)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("database is not open")
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* inside one transaction in a worker thread.

        Cancellation: the transaction is not abandoned halfway; a cancel is
        seen after it committed or rolled back.
        """
        return await trio.to_thread.run_sync(self.run_sync, fn, limiter=self._limiter)

    async def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        def fetch(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(sql, params).fetchall()

        return await self.transaction(fetch)
