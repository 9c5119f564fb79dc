"""Mod-sequences of the fragment store (CONDSTORE/QRESYNC, RFC 7162; docs/mail.md).

Every message row has a ``modseq``; every mailbox row a ``highestmodseq`` (the
highest value given out in it here, expunges included); every expunge leaves a tombstone ``(user, mailbox, uid, modseq)`` in ``expunged``.
The values are given out by SQLite triggers on each bucket connection
(:func:`install_triggers`), so every writer (stores, flag changes, expunges,
replication applying remote updates, numbering of pending mail, renumbering) is
covered in one place, inside the writer's own transaction.

A new value is ``max(mailbox highestmodseq + 1, ModseqClock.next())``: above
everything given out in that mailbox here, and at least the node's clock in
microseconds (a hybrid logical clock).  A read of the tree
(:meth:`ModseqClock.bound`) reports per mailbox ``max(highestmodseq,
bound)`` where every later write on this node gets a value above ``bound``; the
retrieval proxy shows a client the *lowest* of the fragments' values, so any
change made anywhere after a listing has a mod-sequence above the
HIGHESTMODSEQ that listing showed (the argument is in docs/mail.md).

Tombstones are kept up to :data:`MAX_TOMBSTONES` per mailbox, the oldest
dropped first.  QRESYNC uses them only to leave out of ``VANISHED (EARLIER)``
the UIDs known to have gone at or before the client's mod-sequence; a UID with
no tombstone (dropped, or held by a node that left the fragment list) is
reported, which RFC 7162 allows, so a missing tombstone never hides an expunge.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

#: Tombstones kept per mailbox and fragment (the QRESYNC horizon, docs/mail.md).
MAX_TOMBSTONES = 10_000

#: Columns added to databases made before mod-sequences (table, column, definition).
MIGRATIONS = (
    ("messages", "modseq", "INTEGER NOT NULL DEFAULT 1"),
    ("mailboxes", "highestmodseq", "INTEGER NOT NULL DEFAULT 1"),
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS expunged (
    user TEXT NOT NULL, mailbox TEXT NOT NULL, uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL, PRIMARY KEY (user, mailbox, uid));
CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged (user, mailbox, modseq);
"""

_BOX = "user={r}.user AND name={r}.mailbox"
_MSG = "user=NEW.user AND mailbox=NEW.mailbox AND uid=NEW.uid"

# Table names inside trigger bodies cannot be qualified; a temporary trigger's
# unqualified names resolve to the main database (no temporary tables here).
_TRIGGERS = (
    # a new row (store, copy, numbering, promotion, redo from the journal)
    f"""CREATE TEMP TRIGGER IF NOT EXISTS modseq_insert AFTER INSERT ON main.messages BEGIN
        UPDATE mailboxes SET highestmodseq = max(highestmodseq + 1, modseq_next(NEW.user))
            WHERE {_BOX.format(r="NEW")};
        UPDATE messages SET modseq = coalesce(
            (SELECT highestmodseq FROM mailboxes WHERE {_BOX.format(r="NEW")}),
            modseq_next(NEW.user)) WHERE {_MSG};
    END""",
    # a flag change (STORE, a replica applying a logged update); same flags: nothing
    f"""CREATE TEMP TRIGGER IF NOT EXISTS modseq_flags AFTER UPDATE OF flags ON main.messages
    WHEN OLD.flags IS NOT NEW.flags BEGIN
        UPDATE mailboxes SET highestmodseq =
            max(highestmodseq + 1, NEW.modseq + 1, modseq_next(NEW.user))
            WHERE {_BOX.format(r="NEW")};
        UPDATE messages SET modseq = coalesce(
            (SELECT highestmodseq FROM mailboxes WHERE {_BOX.format(r="NEW")}),
            max(NEW.modseq + 1, modseq_next(NEW.user))) WHERE {_MSG};
    END""",
    # an expunge (or a UID taken back by renumbering): a tombstone
    f"""CREATE TEMP TRIGGER IF NOT EXISTS modseq_delete AFTER DELETE ON main.messages BEGIN
        UPDATE mailboxes SET highestmodseq = max(highestmodseq + 1, modseq_next(OLD.user))
            WHERE {_BOX.format(r="OLD")};
        INSERT OR REPLACE INTO expunged(user, mailbox, uid, modseq)
            SELECT OLD.user, OLD.mailbox, OLD.uid, highestmodseq FROM mailboxes
            WHERE {_BOX.format(r="OLD")};
    END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS modseq_box_delete AFTER DELETE ON main.mailboxes BEGIN
        DELETE FROM expunged WHERE user=OLD.user AND mailbox=OLD.name;
    END""",
    """CREATE TEMP TRIGGER IF NOT EXISTS modseq_box_rename AFTER UPDATE OF name ON main.mailboxes
    BEGIN
        UPDATE expunged SET mailbox=NEW.name WHERE user=OLD.user AND mailbox=OLD.name;
    END""",
)


class ModseqClock:
    """The node's source of mod-sequences: strictly increasing, at least ``now()`` in
    microseconds.  ``lock`` is also held while the mail index is invalidated for a
    write (:meth:`next`) and while a reader looks an entry up and takes its bound
    (:meth:`bound_locked`), so a write either dropped the entry before the reader
    looked or gets a value above the reader's bound."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.lock = threading.Lock()
        self.last = 0
        #: Called with the user under :attr:`lock` before a value is given out.
        self.on_write: Callable[[str], None] = lambda user: None

    def _us(self) -> int:
        return int(self.now() * 1_000_000)

    def next(self, user: str) -> int:
        """A value for a write of ``user``'s rows (above every bound given so far)."""
        with self.lock:
            self.on_write(user)
            self.last = max(self.last + 1, self._us())
            return self.last

    def bound_locked(self) -> int:
        """Call with :attr:`lock` held: every later :meth:`next` is above the result."""
        self.last = max(self.last, self._us() - 1)
        return self.last

    def bound(self) -> int:
        """:meth:`bound_locked`, taking the lock."""
        with self.lock:
            return self.bound_locked()


def migrate(db: sqlite3.Connection) -> None:
    """Add the mod-sequence columns and the tombstone table to a database made before
    them (existing messages start at MODSEQ 1; no client was ever shown one)."""
    for table, column, definition in MIGRATIONS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    run_script(db, SCHEMA)


def run_script(db: sqlite3.Connection, script: str) -> None:
    """The statements of ``script`` (no ``;`` inside one), inside the caller's
    transaction if there is one (``executescript`` would commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def install_triggers(db: sqlite3.Connection, clock: ModseqClock) -> None:
    """The per-connection function and temporary triggers that give out mod-sequences."""

    def modseq_next(user: object) -> int:
        return clock.next(user if isinstance(user, str) else "")

    db.create_function("modseq_next", 1, modseq_next, deterministic=False)
    for sql in _TRIGGERS:
        db.execute(sql)


def prune(db: sqlite3.Connection, user: str, mailbox: str, keep: int | None = None) -> int:
    """Inside a write transaction: drop the oldest tombstones of a mailbox beyond
    ``keep`` (default :data:`MAX_TOMBSTONES`); the number dropped."""
    keep = MAX_TOMBSTONES if keep is None else keep
    (count,) = db.execute(
        "SELECT COUNT(*) FROM expunged WHERE user=? AND mailbox=?", (user, mailbox)
    ).fetchone()
    if count <= keep:
        return 0
    (floor,) = db.execute(
        "SELECT modseq FROM expunged WHERE user=? AND mailbox=? ORDER BY modseq LIMIT 1 OFFSET ?",
        (user, mailbox, count - keep - 1),
    ).fetchone()
    cur = db.execute(
        "DELETE FROM expunged WHERE user=? AND mailbox=? AND modseq<=?", (user, mailbox, floor)
    )
    return cur.rowcount


def tombstones(db: sqlite3.Connection, user: str, mailbox: str) -> dict[int, int]:
    """``{uid: modseq of its expunge}`` of the tombstones of a mailbox here."""
    rows = db.execute(
        "SELECT uid, modseq FROM expunged WHERE user=? AND mailbox=?", (user, mailbox)
    ).fetchall()
    return {int(u): int(m) for u, m in rows}
