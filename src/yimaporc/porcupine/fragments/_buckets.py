"""The ground floor of a :class:`~.FragmentStore`: per user-map bucket one SQLite
index (opened on first use, one lock each, temporary triggers that keep the
in-memory :class:`~..mailindex.MailIndex` exact), the users' body files, and the
mailbox rows every floor above needs (INBOX created on first sight).  Blocking:
call from a worker thread."""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .. import _modseq
from .._sqlite import rollback
from ..mailindex import MailIndex
from ..usermap import N_BUCKETS, bucket_dir, bucket_of
from ..values import (
    DELIMITER,
    INBOX,
    MailboxInfo,
    NoSuchMailbox,
)

#: Body files end with this, so recovery never touches files it did not write.
BODY_SUFFIX = ".m"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailboxes (
    user TEXT NOT NULL, name TEXT NOT NULL, uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL, subscribed INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user, name));
CREATE TABLE IF NOT EXISTS messages (
    user TEXT NOT NULL, mailbox TEXT NOT NULL, uid INTEGER NOT NULL, key TEXT NOT NULL,
    size INTEGER NOT NULL, flags TEXT NOT NULL, internal_date REAL NOT NULL,
    PRIMARY KEY (user, mailbox, uid));
CREATE INDEX IF NOT EXISTS messages_key ON messages (user, key);
CREATE TABLE IF NOT EXISTS users (user TEXT PRIMARY KEY, last_uidvalidity INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    user TEXT NOT NULL, mailbox TEXT NOT NULL, key TEXT NOT NULL, size INTEGER NOT NULL,
    flags TEXT NOT NULL, internal_date REAL NOT NULL, PRIMARY KEY (user, key));
CREATE TABLE IF NOT EXISTS held (
    user TEXT NOT NULL, mailbox TEXT NOT NULL, key TEXT NOT NULL, size INTEGER NOT NULL,
    flags TEXT NOT NULL, internal_date REAL NOT NULL, PRIMARY KEY (user, key));
CREATE TABLE IF NOT EXISTS shown (
    user TEXT NOT NULL, mailbox TEXT NOT NULL, uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL, PRIMARY KEY (user, mailbox));
CREATE TABLE IF NOT EXISTS journal_mark (id INTEGER PRIMARY KEY CHECK (id = 0),
    seq INTEGER NOT NULL);
"""


def mailbox_name(name: str) -> str:
    """``inbox`` in any case is INBOX; other names are case-sensitive; no empty levels."""
    if name.upper() == INBOX:
        return INBOX
    parts = name.split(DELIMITER)
    if not name or any(not p for p in parts) or any(c in name for c in "\r\n\0*%"):
        raise NoSuchMailbox(f"bad mailbox name {name!r}")
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync: bool, exclusive: bool = False) -> None:
    """Write ``data`` to ``path``, created (``exclusive``: never an existing file) or
    truncated, mode 0600, and fsynced if ``sync``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path) -> bytes:
    """The whole file, read into one buffer of its ``fstat`` size (no growing buffer,
    no second copy unless the file grew meanwhile)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        chunks = [os.read(fd, size)] if size else []
        while more := os.read(fd, 1 << 16):
            chunks.append(more)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _weakly(method: Callable[[object], None]) -> Callable[[object], None]:
    """``method`` called through a weak reference to its object (SQLite functions)."""
    ref = weakref.WeakMethod(method)

    def call(arg: object) -> None:
        m = ref()
        if m is not None:
            m(arg)

    return call


def _flags(text: str) -> tuple[str, ...]:
    return tuple(text.split()) if text else ()


class BucketFiles:
    """Bucket databases and locks, body files, mailbox rows (thread-safe)."""

    def __init__(self, data_dir: Path, node_id: str, now: Callable[[], float]) -> None:
        self.root = Path(data_dir) / "mail"
        self.node_id = node_id
        self.now = now
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.root / "buckets").mkdir(exist_ok=True)
        self._dbs: dict[int, sqlite3.Connection] = {}
        self._locks: dict[int, threading.RLock] = {}
        self._open = threading.Lock()
        #: The in-memory index of users' mailboxes here (None: none); kept exact by
        #: triggers on every bucket connection (:meth:`_watch`).
        self.index: MailIndex | None = None
        #: Gives out mod-sequences (:mod:`.._modseq`); a write drops the user's index
        #: entry under its lock, so a reader's bound is never below a write it missed.
        self.modseqs = _modseq.ModseqClock(now)
        self.modseqs.on_write = _weakly(self._touched)

    # --- plumbing ----------------------------------------------------------

    def bucket_path(self, bucket: int) -> Path:
        """``mail/buckets/NNN``."""
        return self.root / "buckets" / bucket_dir(bucket)

    def user_path(self, user: str) -> Path:
        """``mail/buckets/NNN/<user>``."""
        return self.bucket_path(bucket_of(user)) / user

    def _lock_for(self, bucket: int) -> threading.RLock:
        """One lock per bucket: different buckets commit in parallel."""
        with self._open:
            return self._locks.setdefault(bucket, threading.RLock())

    def _db(self, bucket: int) -> sqlite3.Connection:
        with self._open:
            return self._db_locked(bucket)

    def _db_locked(self, bucket: int) -> sqlite3.Connection:
        db = self._dbs.get(bucket)
        if db is None:
            path = self.bucket_path(bucket)
            path.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                path / "index.sqlite", check_same_thread=False, isolation_level=None
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # One transaction (one commit) for the schema, its migration and the
            # triggers: statement by statement, a new bucket's file cost ~5 ms of CPU.
            db.execute("BEGIN IMMEDIATE")
            try:
                _modseq.run_script(db, _SCHEMA)
                _modseq.migrate(db)
                self._watch(db)
                _modseq.install_triggers(db, self.modseqs)
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                db.close()
                raise
            self._dbs[bucket] = db
        return db

    def _watch(self, db: sqlite3.Connection) -> None:
        """Temporary triggers: any change to a user's ``messages`` or ``mailboxes``
        rows, by whichever code writes through this connection, drops that user
        from :attr:`index`; a change to their ``shown`` rows drops those (see
        :mod:`..mailindex`)."""
        # Weak: a bound method here would tie the store and its connections in a
        # cycle through SQLite's C object that the collector cannot break, so a
        # store never closed would never be freed.
        db.create_function("mailindex_touch", 1, _weakly(self._touched), deterministic=False)
        db.create_function("mailindex_shown", 1, _weakly(self._shown_touched), deterministic=False)
        for table, fn in (
            ("messages", "mailindex_touch"),
            ("mailboxes", "mailindex_touch"),
            ("shown", "mailindex_shown"),
        ):
            for event, rows in (
                ("INSERT", ("NEW",)),
                ("DELETE", ("OLD",)),
                ("UPDATE", ("OLD", "NEW")),
            ):
                calls = " ".join(f"SELECT {fn}({r}.user);" for r in rows)
                db.execute(
                    f"CREATE TEMP TRIGGER IF NOT EXISTS mailindex_{table}_{event.lower()} "
                    f"AFTER {event} ON main.{table} BEGIN {calls} END"
                )

    def _touched(self, user: object) -> None:
        if self.index is not None and isinstance(user, str):
            self.index.invalidate(user)

    def _shown_touched(self, user: object) -> None:
        if self.index is not None and isinstance(user, str):
            self.index.drop_shown(user)

    def _existing_buckets(self) -> list[int]:
        out = []
        for p in (self.root / "buckets").iterdir():
            if p.name.isdigit() and int(p.name) < N_BUCKETS and (p / "index.sqlite").exists():
                out.append(int(p.name))
        return sorted(out)

    def close(self) -> None:
        """Close every index database."""
        with self._open:
            for db in self._dbs.values():
                db.close()
            self._dbs.clear()

    # --- mailbox rows --------------------------------------------------------

    def _ensure_inbox(self, db: sqlite3.Connection, user: str) -> None:
        if self._has(db, user, INBOX):
            return
        if db.in_transaction:
            self._insert_mailbox(db, user, INBOX)
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            if not self._has(db, user, INBOX):
                self._insert_mailbox(db, user, INBOX)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise

    def _insert_mailbox(self, db: sqlite3.Connection, user: str, name: str) -> MailboxInfo:
        row = db.execute("SELECT last_uidvalidity FROM users WHERE user=?", (user,)).fetchone()
        uidvalidity = max(int(self.now()), (row[0] + 1) if row else 1)
        db.execute(
            "INSERT INTO users(user, last_uidvalidity) VALUES (?, ?) "
            "ON CONFLICT(user) DO UPDATE SET last_uidvalidity=excluded.last_uidvalidity",
            (user, uidvalidity),
        )
        db.execute(
            "INSERT INTO mailboxes(user, name, uidvalidity, uidnext) VALUES (?, ?, ?, 1)",
            (user, name, uidvalidity),
        )
        return MailboxInfo(name, uidvalidity, 1, 0, 0, True)

    @staticmethod
    def _has(db: sqlite3.Connection, user: str, name: str) -> bool:
        return (
            db.execute("SELECT 1 FROM mailboxes WHERE user=? AND name=?", (user, name)).fetchone()
            is not None
        )

    # --- body files ----------------------------------------------------------

    def write_body(self, body: bytes, sync: bool = True) -> str:
        """Phase 1 of a store: write ``tmp/<key>`` (fsynced unless ``sync`` is
        False: a group commit's barrier makes it durable); returns the key."""
        key = uuid.uuid4().hex + BODY_SUFFIX
        write_file(self.tmp / key, body, sync=sync, exclusive=True)
        return key

    def discard(self, keys: Iterable[str]) -> None:
        """Drop written bodies that will not be committed."""
        for key in keys:
            (self.tmp / key).unlink(missing_ok=True)

    def read_bodies(self, user: str, keys: Mapping[int, str]) -> dict[int, bytes]:
        """Read the bodies of ``keys`` (UID -> body key, e.g. from the index), each
        file in one read into one buffer; a file gone (expunged meanwhile) is left out."""
        udir = self.user_path(user)
        out = {}
        for uid, key in keys.items():
            try:
                out[uid] = _read_file(udir / key)
            except FileNotFoundError:
                continue
        return out

    def _drop_unreferenced(self, db: sqlite3.Connection, user: str, keys: Iterable[str]) -> None:
        udir = self.user_path(user)
        for key in set(keys):
            if (
                db.execute(
                    "SELECT 1 FROM messages WHERE user=? AND key=? "
                    "UNION SELECT 1 FROM pending WHERE user=? AND key=? "
                    "UNION SELECT 1 FROM held WHERE user=? AND key=?",
                    (user, key, user, key, user, key),
                ).fetchone()
                is None
            ):
                (udir / key).unlink(missing_ok=True)
