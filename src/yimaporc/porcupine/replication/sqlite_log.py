"""The update log in SQLite: WAL mode, ``synchronous=FULL``, one row per object.

Plain synchronous code: the Twisted shell runs it in a thread pool, one
connection per node, and performs the core's actions in order on it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from zope.interface import implementer

from ..._files import private_sqlite
from .._sqlite import rollback
from ._values import DropLog, LogEntry, MarkAlive, PersistLog, Timestamp, Update
from .interfaces import ILogStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS update_log (
    object_id   TEXT PRIMARY KEY,
    wallclock   INTEGER NOT NULL,
    ts_node     TEXT NOT NULL,
    body        BLOB,
    coordinator TEXT NOT NULL,
    targets     TEXT NOT NULL,
    remaining   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alive (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    wallclock INTEGER NOT NULL
);
"""


def _nodes(text: str) -> frozenset[str]:
    return frozenset(n for n in text.split("\n") if n)


@implementer(ILogStore)
class SqliteLog:
    """An :class:`ILogStore` in one SQLite file; every write is committed and fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = private_sqlite(path)  # bodies of replicated mail: 0600, -wal too
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def load(self) -> list[LogEntry]:
        """Every entry."""
        rows = self._db.execute(
            "SELECT object_id, wallclock, ts_node, body, coordinator, targets, remaining "
            "FROM update_log"
        ).fetchall()
        return [
            LogEntry(
                Update(oid, Timestamp(wall, node), None if body is None else bytes(body)),
                coordinator,
                _nodes(targets),
                _nodes(remaining),
            )
            for oid, wall, node, body, coordinator, targets, remaining in rows
        ]

    def put(self, entry: LogEntry) -> None:
        """Write ``entry`` (replacing the object's previous one) and commit durably."""
        for node in entry.targets:
            if "\n" in node:
                raise ValueError(f"node id {node!r} contains a newline")
        u = entry.update
        self._db.execute(
            "INSERT OR REPLACE INTO update_log VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                u.object_id,
                u.timestamp.wallclock,
                u.timestamp.node_id,
                u.body,
                entry.coordinator,
                "\n".join(sorted(entry.targets)),
                "\n".join(sorted(entry.remaining)),
            ),
        )

    def drop(self, object_id: str, timestamp: Timestamp) -> None:
        """Remove the object's entry if it carries ``timestamp``."""
        self._db.execute(
            "DELETE FROM update_log WHERE object_id = ? AND wallclock = ? AND ts_node = ?",
            (object_id, timestamp.wallclock, timestamp.node_id),
        )

    def write_many(self, ops: Sequence[PersistLog | DropLog | MarkAlive]) -> None:
        """Perform ``put``/``drop``/``mark_alive`` in order, as one durable transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                if isinstance(op, PersistLog):
                    self.put(op.entry)
                elif isinstance(op, DropLog):
                    self.drop(op.object_id, op.timestamp)
                else:
                    self.mark_alive(op.wallclock)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise

    def last_alive(self) -> int | None:
        """The alive mark."""
        row = self._db.execute("SELECT wallclock FROM alive WHERE id = 1").fetchone()
        return None if row is None else int(row[0])

    def mark_alive(self, wallclock: int) -> None:
        """Record the alive mark durably."""
        self._db.execute("INSERT OR REPLACE INTO alive VALUES (1, ?)", (wallclock,))

    def wipe(self) -> None:
        """Forget every entry and the alive mark."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM update_log")
        self._db.execute("DELETE FROM alive")
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM update_log").fetchone()
        return int(n)
