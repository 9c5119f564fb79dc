"""The ground floor of a :class:`~.ReplicaObjectStore`: each object's version (and
the tombstones) in ``DATA_DIR/mail/replicas.sqlite``, and what the repairer and
the status read of them (blocking)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ...._files import private_sqlite
from ...fragments import FragmentStore
from .._values import Timestamp, Update
from ._ids import (
    _RID,
    MSG,
    PROFILE,
    ObjectRecord,
    _record,
    message_id,
)

if TYPE_CHECKING:
    from ...profiledb import _Profiles

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    object_id TEXT PRIMARY KEY, wallclock INTEGER NOT NULL, ts_node TEXT NOT NULL,
    user TEXT NOT NULL, mailbox TEXT NOT NULL, rid TEXT NOT NULL,
    targets TEXT NOT NULL, deleted INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS objects_key ON objects (user, rid);
"""


class ObjectVersions:
    """The version table of the replicated objects on this node (thread-safe)."""

    log = Logger()

    def __init__(
        self, path: Path, fragments: FragmentStore, profiles: _Profiles | None = None
    ) -> None:
        private_sqlite(path)
        self.fragments = fragments
        #: ``profiledb._Profiles`` (the blocking half; it has ``merge(records)``).
        self.profiles = profiles
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.RLock()
        self.applied = 0
        self.discarded = 0

    def close(self) -> None:
        """Close the version database."""
        with self.lock:
            self.db.close()

    def version(self, object_id: str) -> Timestamp | None:
        """The object's version (tombstones too)."""
        with self.lock:
            row = self.db.execute(
                "SELECT wallclock, ts_node FROM objects WHERE object_id=?", (object_id,)
            ).fetchone()
        return None if row is None else Timestamp(int(row[0]), str(row[1]))

    def record(self, object_id: str) -> ObjectRecord | None:
        """What is known of ``object_id``."""
        with self.lock:
            row = self.db.execute(
                "SELECT object_id, wallclock, ts_node, user, mailbox, rid, targets, deleted "
                "FROM objects WHERE object_id=?",
                (object_id,),
            ).fetchone()
        return None if row is None else _record(row)

    def records_for(self, user: str, mailbox: str, uids: Sequence[int]) -> dict[int, ObjectRecord]:
        """The live replicated objects among ``uids`` of a mailbox, by UID."""
        keys = self.fragments._keys(user, mailbox, uids)
        out: dict[int, ObjectRecord] = {}
        for uid, key in keys.items():
            rid = key[: -len(".m")]
            rec = self.record(message_id(user, rid)) if _RID.match(rid) else None
            if rec is not None and not rec.deleted:
                out[uid] = rec
        return out

    def purge_tombstones(self, before: int) -> int:
        """Forget message tombstones older than ``before`` (µs)."""
        with self.lock:
            cur = self.db.execute(
                "DELETE FROM objects WHERE deleted=1 AND wallclock < ?", (before,)
            )
            return int(cur.rowcount)

    def inventory(self, node: str) -> list[tuple[str, Timestamp]]:
        """``(object id, version)`` of every live object here whose replica set names
        ``node`` (what ``node`` should hold: re-replication compares it with its own)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT object_id, wallclock, ts_node, targets FROM objects WHERE deleted=0"
            ).fetchall()
        return [
            (str(oid), Timestamp(int(w), str(n)))
            for oid, w, n, targets in rows
            if (oid.startswith(MSG) and node in targets.split("\n")) or oid.startswith(PROFILE)
        ]

    def versions(self, object_ids: Sequence[str]) -> dict[str, Timestamp]:
        """This node's version of each of ``object_ids`` it knows (tombstones too)."""
        out: dict[str, Timestamp] = {}
        for oid in object_ids:
            v = self.version(oid)
            if v is not None:
                out[oid] = v
        return out

    def under_replicated(self, live: Sequence[str]) -> int:
        """Live message objects here with a replica outside ``live`` (down, or gone):
        fewer reachable copies than their replica set, until re-replication."""
        up = set(live)
        with self.lock:
            rows = self.db.execute(
                "SELECT targets FROM objects WHERE deleted=0 AND object_id LIKE 'msg/%'"
            ).fetchall()
        return sum(1 for (t,) in rows if any(n not in up for n in t.split("\n") if n))

    def __len__(self) -> int:
        with self.lock:
            (n,) = self.db.execute("SELECT COUNT(*) FROM objects WHERE deleted=0").fetchone()
        return int(n)

    def _put(
        self, update: Update, user: str, mailbox: str, rid: str, targets: Sequence[str]
    ) -> None:
        ts = update.timestamp
        self.db.execute(
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                update.object_id,
                ts.wallclock,
                ts.node_id,
                user,
                mailbox,
                rid,
                "\n".join(targets),
                int(update.body is None),
            ),
        )
