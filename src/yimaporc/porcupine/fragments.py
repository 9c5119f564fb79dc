"""Mailbox fragments on this node's disk: bodies as files, indexes in SQLite.

Layout (seed §3.3: hard state grouped by user-map bucket)::

    DATA_DIR/mail/tmp/<key>                    bodies being written
    DATA_DIR/mail/buckets/NNN/index.sqlite     mailboxes + messages of the bucket's users
    DATA_DIR/mail/buckets/NNN/<user>/<key>     one file per message body

Stores are group commits (:meth:`FragmentStore.commit_group`), one journal
fdatasync per group of any size, users and buckets:

1. the bodies of the group are written to ``tmp`` and renamed into their users'
   directories (no fsync each);
2. the buckets' locks are taken and each bucket's rows committed in one
   transaction (WAL, ``synchronous=NORMAL``: no fsync), which also sets the
   bucket's ``journal_mark`` to the group's sequence number;
3. one record of the group (:mod:`._journal`: the rows as committed and the
   bodies) is appended to ``mail/journal/`` and **fdatasynced**;
4. the locks are released and the callers told (SMTP 250).

Why that is as durable as an fsync per file: after step 3 everything the
callers were promised can be rebuilt from the journal alone.  At start,
:meth:`FragmentStore.recover` redoes, for a bucket whose mark is below a
record's sequence number, that record's rows with their recorded UIDs (WAL
frames survive as a prefix, so a mark at or above it means the group's own
commit survived, and anything committed durably later, an expunge say, is
not undone), then rewrites every body a row names that is missing or not
byte-identical.  A crash during step 3 leaves a torn record that fails its CRC
and ends the journal: none of that group had its 250.  A crash between steps 2
and 3 can leave the rows of unacknowledged messages (a sender's retry may then
be a duplicate, as with any MTA dying between its fsync and its reply); no
reader saw them before (the locks).  A *checkpoint*
(:meth:`FragmentStore.checkpoint`, off the callers' path, every few seconds)
makes the covered files durable in place (:mod:`._durable`: one syncfs, or an
fsync each) and only then drops the journal file.  Bodies no row names are
removed at start (only files named ``*.m``, the ones this module writes).

``journal=False`` keeps the journal-less way (:class:`~._durable.Barrier`):
bodies and directories made durable before the rows are committed, the
commits made durable before the locks are released.

:class:`FragmentStore` blocks; :class:`MailboxManager` runs it on a thread pool
and forms the groups: a store arriving with no group in flight is committed at
once (no fixed wait), stores arriving meanwhile form the next group.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from . import _modseq
from ._durable import Barrier, default_barrier
from ._journal import Entry, Journal, Record, decode_all, read_records
from .bodycache import BodyCache
from .interfaces import ILocalMailboxes
from .mailindex import MailIndex, UserIndex
from .reconstruct import admit_timed, split_fence
from .usermap import N_BUCKETS, bucket_dir, bucket_of
from .values import (
    DELIMITER,
    INBOX,
    PENDING,
    Digest,
    MailboxExists,
    MailboxInfo,
    NewMessage,
    NoSuchMailbox,
)

T = TypeVar("T")
_R = TypeVar("_R")

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


def _flags(text: str) -> tuple[str, ...]:
    return tuple(text.split()) if text else ()


class FragmentStore:
    """The blocking half: call only from a worker thread (it is thread-safe)."""

    def __init__(
        self,
        data_dir: Path,
        node_id: str,
        now: Callable[[], float],
        barrier: Barrier | None = None,
        journal: bool = True,
    ) -> None:
        self.root = Path(data_dir) / "mail"
        self.node_id = node_id
        self.now = now
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.root / "buckets").mkdir(exist_ok=True)
        #: How group commits make bodies and rows durable (:mod:`._durable`):
        #: one syncfs per barrier where the platform has it, else fsyncs.
        self.barrier: Barrier = barrier or default_barrier(
            self.root, self.tmp, self.root / "buckets"
        )
        #: The group-commit journal (:mod:`._journal`): one fdatasync per group;
        #: None: the barrier's way (an fsync per file, or syncfs).
        self.journal: Journal | None = Journal(self.root / "journal") if journal else None
        self._seq: int | None = None
        self._seq_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._last_checkpoint = now()
        #: A checkpoint is due after this many records, bytes or seconds.
        self.checkpoint_records = 1024
        self.checkpoint_bytes = 32 << 20
        self.checkpoint_seconds = 2.0
        #: Group commits made, messages in them, checkpoints (``/metrics``, tests).
        self.groups = 0
        self.grouped_messages = 0
        self.checkpoints = 0
        #: Rows redone from the journal by the last :meth:`recover`.
        self.replayed = 0
        self._dbs: dict[int, sqlite3.Connection] = {}
        self._locks: dict[int, threading.RLock] = {}
        self._open = threading.Lock()
        #: Per bucket, the fence (``"manager@bucket-epoch"``) of this node's current
        #: user map (:meth:`set_fences`); a fenced allocation that does not match is
        #: stored PENDING.  Read inside each commit's transaction, under the bucket
        #: lock, so a commit either lands before a hint read of its bucket (which
        #: takes the lock) or sees the new fence.
        self.fences: dict[int, str] = {}
        #: The node's lease (``MailCluster.lease_ok``): lapsed after a pause, when
        #: fenced stores and numbering are refused (stored PENDING instead).
        self.fence_ok: Callable[[], bool] = lambda: True
        #: This node's cluster time (timesync), None while not synced: a timed fence's
        #: age is checked with it (MailCluster sets it).
        self.cluster_now: Callable[[], float | None] = lambda: None
        #: Timed allocations stored unnumbered because they were too old (or no clock).
        self.late_allocations = 0
        #: Users with unnumbered mail here (filled by :meth:`recover` and by stores;
        #: the cluster reminds their managers of them).
        self.pending_users: set[str] = set()
        self._marks: sqlite3.Connection | None = None
        self._marks_lock = threading.RLock()
        #: The in-memory index of users' mailboxes here (None: none); kept exact by
        #: triggers on every bucket connection (:meth:`_watch`).
        self.index: MailIndex | None = None
        #: Gives out mod-sequences (:mod:`._modseq`); a write drops the user's index
        #: entry under its lock, so a reader's bound is never below a write it missed.
        self.modseqs = _modseq.ModseqClock(now)
        self.modseqs.on_write = self._touched

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
            db.executescript(_SCHEMA)
            _modseq.migrate(db)
            self._watch(db)
            _modseq.install_triggers(db, self.modseqs)
            self._dbs[bucket] = db
        return db

    def _watch(self, db: sqlite3.Connection) -> None:
        """Temporary triggers: any change to a user's ``messages`` or ``mailboxes``
        rows, by whichever code writes through this connection, drops that user
        from :attr:`index`; a change to their ``shown`` rows drops those (see
        :mod:`.mailindex`)."""
        db.create_function("mailindex_touch", 1, self._touched, deterministic=False)
        db.create_function("mailindex_shown", 1, self._shown_touched, deterministic=False)
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

    def set_fences(self, fences: dict[int, str]) -> None:
        """Adopt the fences of a newly installed user map (call before reading hints)."""
        self.fences = dict(fences)

    def close(self) -> None:
        """Close every index database and the journal."""
        if self.journal is not None:
            self.journal.close()
        with self._open:
            for db in self._dbs.values():
                db.close()
            self._dbs.clear()
        with self._marks_lock:
            if self._marks is not None:
                self._marks.close()
                self._marks = None

    # --- start-up ----------------------------------------------------------

    def recover(self) -> int:
        """Redo what the journal has and a crash lost (rows, bodies), then remove
        what a crash left half-stored (tmp files, bodies with no row), then
        checkpoint the journal.  Returns the files removed."""
        removed = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            removed += 1
        self.replayed = self._replay()
        for bucket in self._existing_buckets():
            with self._lock_for(bucket):
                self.pending_users.update(
                    u for (u,) in self._db(bucket).execute("SELECT DISTINCT user FROM pending")
                )
        for bucket in self._existing_buckets():
            with self._lock_for(bucket):
                db = self._db(bucket)
                for udir in self.bucket_path(bucket).iterdir():
                    if not udir.is_dir():
                        continue
                    keys = {
                        k
                        for (k,) in db.execute(
                            "SELECT key FROM messages WHERE user=? "
                            "UNION SELECT key FROM pending WHERE user=? "
                            # a replica's held copy (waiting for its UID) is a body too
                            "UNION SELECT key FROM held WHERE user=?",
                            (udir.name, udir.name, udir.name),
                        )
                    }
                    for body in udir.iterdir():
                        if body.name.endswith(BODY_SUFFIX) and body.name not in keys:
                            body.unlink(missing_ok=True)
                            removed += 1
        self.checkpoint()
        return removed

    # --- mailboxes ---------------------------------------------------------

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
            db.execute("ROLLBACK")
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

    def mailboxes(self, user: str, bounded: bool = False) -> list[MailboxInfo]:
        """Every mailbox of ``user`` here, INBOX created on first sight; ``bounded``:
        with a ``modseq_bound`` taken under the bucket lock, which every later change
        here exceeds."""
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            self._ensure_inbox(db, user)
            rows = db.execute(
                "SELECT b.name, b.uidvalidity, b.uidnext, b.subscribed, "
                "COUNT(m.uid), SUM(CASE WHEN m.uid IS NOT NULL AND "
                "instr(' ' || m.flags || ' ', ' \\Seen ') = 0 THEN 1 ELSE 0 END), "
                "b.highestmodseq "
                "FROM mailboxes b LEFT JOIN messages m "
                "ON m.user=b.user AND m.mailbox=b.name WHERE b.user=? "
                "GROUP BY b.name ORDER BY b.name",
                (user,),
            ).fetchall()
            bound = self.modseqs.bound() if bounded else 0  # no write in flight now
        return [
            MailboxInfo(n, v, u, c, s or 0, bool(sub), h, max(h, bound) if bounded else 0)
            for n, v, u, sub, c, s, h in rows
        ]

    def create_mailbox(self, user: str, name: str) -> MailboxInfo:
        """Create ``name`` (and missing parents)."""
        name = mailbox_name(name.rstrip(DELIMITER))
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            db.execute("BEGIN IMMEDIATE")
            try:
                self._ensure_inbox(db, user)
                if self._has(db, user, name):
                    raise MailboxExists(f"mailbox {name} already exists")
                parts = name.split(DELIMITER)
                for i in range(1, len(parts)):
                    parent = DELIMITER.join(parts[:i])
                    if not self._has(db, user, mailbox_name(parent)):
                        self._insert_mailbox(db, user, mailbox_name(parent))
                info = self._insert_mailbox(db, user, name)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return info

    @staticmethod
    def _has(db: sqlite3.Connection, user: str, name: str) -> bool:
        return (
            db.execute("SELECT 1 FROM mailboxes WHERE user=? AND name=?", (user, name)).fetchone()
            is not None
        )

    def delete_mailbox(self, user: str, name: str) -> None:
        """Delete a mailbox and its messages (INBOX cannot be deleted)."""
        name = mailbox_name(name)
        if name == INBOX:
            raise NoSuchMailbox("INBOX cannot be deleted")
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            if not self._has(db, user, name):
                raise NoSuchMailbox(f"no mailbox {name}")
            if db.execute(
                "SELECT 1 FROM mailboxes WHERE user=? AND substr(name, 1, ?)=?",
                (user, len(name) + 1, name + DELIMITER),
            ).fetchone():
                raise NoSuchMailbox(f"mailbox {name} has mailboxes below it")
            keys = [k for (k,) in db.execute(
                "SELECT key FROM messages WHERE user=? AND mailbox=?", (user, name))]  # fmt: skip
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM messages WHERE user=? AND mailbox=?", (user, name))
                db.execute("DELETE FROM mailboxes WHERE user=? AND name=?", (user, name))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._drop_unreferenced(db, user, keys)

    def rename_mailbox(self, user: str, old: str, new: str) -> None:
        """Rename ``old`` and everything below it; RENAME of INBOX moves its messages."""
        old, new = mailbox_name(old), mailbox_name(new.rstrip(DELIMITER))
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            if not self._has(db, user, old):
                raise NoSuchMailbox(f"no mailbox {old}")
            if self._has(db, user, new) or new == INBOX:
                raise MailboxExists(f"mailbox {new} already exists")
            db.execute("BEGIN IMMEDIATE")
            try:
                names = [old] if old == INBOX else [n for (n,) in db.execute(
                    "SELECT name FROM mailboxes WHERE user=? AND (name=? OR substr(name, 1, ?)=?)",
                    (user, old, len(old) + 1, old + DELIMITER))]  # fmt: skip
                for n in names:
                    target = new + n[len(old) :]
                    db.execute(
                        "UPDATE mailboxes SET name=? WHERE user=? AND name=?", (target, user, n)
                    )
                    db.execute(
                        "UPDATE messages SET mailbox=? WHERE user=? AND mailbox=?",
                        (target, user, n),
                    )
                parts = new.split(DELIMITER)
                for i in range(1, len(parts)):
                    parent = DELIMITER.join(parts[:i])
                    if not self._has(db, user, parent):
                        self._insert_mailbox(db, user, parent)
                if old == INBOX:
                    # The new INBOX goes on from the old one's UIDNEXT (no UID reused).
                    (nxt,) = db.execute(
                        "SELECT uidnext FROM mailboxes WHERE user=? AND name=?", (user, new)
                    ).fetchone()
                    self._insert_mailbox(db, user, INBOX)
                    db.execute(
                        "UPDATE mailboxes SET uidnext=? WHERE user=? AND name=?",
                        (nxt, user, INBOX),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def subscribe(self, user: str, name: str, subscribed: bool) -> None:
        """Set the subscription flag of a mailbox."""
        name = mailbox_name(name)
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            self._ensure_inbox(db, user)
            cur = db.execute(
                "UPDATE mailboxes SET subscribed=? WHERE user=? AND name=?",
                (int(subscribed), user, name),
            )
            if cur.rowcount == 0:
                raise NoSuchMailbox(f"no mailbox {name}")

    # --- messages ----------------------------------------------------------

    def write_body(self, body: bytes, sync: bool = True) -> str:
        """Phase 1 of a store: write ``tmp/<key>`` (fsynced unless ``sync`` is
        False: a group commit's barrier makes it durable); returns the key."""
        key = uuid.uuid4().hex + BODY_SUFFIX
        fd = os.open(self.tmp / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return key

    def discard(self, keys: Iterable[str]) -> None:
        """Drop written bodies that will not be committed."""
        for key in keys:
            (self.tmp / key).unlink(missing_ok=True)

    def commit_bucket(
        self, bucket: int, items: Sequence[tuple[NewMessage, str]]
    ) -> list[Digest | NoSuchMailbox]:
        """:meth:`commit_group` for messages of one bucket; an error other than a
        missing mailbox is raised (nothing of the bucket is then stored)."""
        for m, _ in items:
            if bucket_of(m.user) != bucket:
                self.discard(key for _, key in items)
                raise ValueError(f"{m.user} is not in bucket {bucket}")
        out: list[Digest | NoSuchMailbox] = []
        for got in self.commit_group(items):
            if not isinstance(got, (Digest, NoSuchMailbox)):
                raise got
            out.append(got)
        return out

    def commit_group(self, items: Sequence[tuple[NewMessage, str]]) -> list[Digest | Exception]:
        """Phase 2 of a group commit: make bodies written to ``tmp`` (fsynced or
        not) visible and durable, any number of users and buckets at once.

        1. rename every body into its user's directory (no fsync);
        2. take the buckets' locks (ascending: no deadlock between two groups),
           commit each bucket's rows in one transaction, without SQLite's fsync;
        3. append one record of the group (its rows as committed, its bodies) to
           the :attr:`journal` and fdatasync it: the group is durable;
        4. release the locks, so no reader of this node sees a row before it is
           durable, and return (the callers' 250).

        One fdatasync per group, whatever its size and its number of users and
        buckets.  Without a journal (``journal=False``) the :attr:`barrier` is
        used instead: bodies and directories made durable before the rows are
        committed, then the commits (an fsync per file and SQLite FULL, or two
        syncfs).  The result has, in each message's place, its Digest or its own
        error: a missing mailbox fails that message only, a failed bucket
        transaction that bucket's messages only; bodies of messages not
        committed are removed again.  An error before any commit is raised, with
        every body removed.
        """
        self.groups += 1
        self.grouped_messages += len(items)
        out: list[Digest | Exception | None] = [None] * len(items)
        by_bucket: dict[int, list[int]] = {}
        for i, (m, _) in enumerate(items):
            by_bucket.setdefault(bucket_of(m.user), []).append(i)
        placed: list[Path | None] = [None] * len(items)
        try:
            dirs: dict[Path, None] = {}
            for i, (m, key) in enumerate(items):
                udir = self.user_path(m.user)
                if udir not in dirs:
                    if not udir.is_dir():
                        udir.mkdir(parents=True, exist_ok=True)
                        # new entries in the bucket dir (and buckets/) to make durable
                        dirs[udir.parent] = None
                        dirs[udir.parent.parent] = None
                    dirs[udir] = None
                os.rename(self.tmp / key, udir / key)
                placed[i] = udir / key
            if self.journal is None:
                self.barrier.files([p for p in placed if p is not None], list(dirs))
        except BaseException:
            for path in placed:
                if path is not None:
                    path.unlink(missing_ok=True)
            self.discard(key for _, key in items)
            raise
        committed: list[int] = []
        entries: list[Entry] = []
        relaxed = self.journal is not None or self.barrier.covers_rows
        if self.journal is not None:
            self._ensure_seq()
        with contextlib.ExitStack() as locks:
            for bucket in sorted(by_bucket):
                locks.enter_context(self._lock_for(bucket))
            seq = self._next_seq() if self.journal is not None else 0
            for bucket in sorted(by_bucket):
                idx = by_bucket[bucket]
                got: list[Digest | Exception]
                try:
                    got = self._commit_rows(bucket, [items[i] for i in idx], relaxed, seq, entries)
                except Exception as e:  # this bucket only: the others go on
                    got = [e] * len(idx)
                for i, g in zip(idx, got):
                    out[i] = g
                    if isinstance(g, Digest):
                        committed.append(i)
            if committed:
                try:
                    if self.journal is not None:
                        self.journal.append(Record(seq, tuple(entries)))
                    else:
                        self.barrier.rows()
                except Exception as e:
                    # Committed but not known durable: no 250 for them (451, the
                    # sender retries); the rows stay, and so do their bodies.
                    for i in committed:
                        out[i] = e
        done = set(committed)
        for i, result in enumerate(out):
            path = placed[i]
            if not isinstance(result, Digest) and i not in done and path is not None:
                path.unlink(missing_ok=True)
        return [g if g is not None else RuntimeError("not committed") for g in out]

    def _commit_rows(
        self,
        bucket: int,
        items: Sequence[tuple[NewMessage, str]],
        relaxed: bool,
        seq: int,
        entries: list[Entry],
    ) -> list[Digest | Exception]:
        """One transaction of ``bucket``'s rows (the caller holds its lock); when
        ``relaxed``, without SQLite's own fsync (``synchronous=NORMAL``): the
        journal record or the barrier makes it durable.  With a journal, the
        bucket's journal mark is set to ``seq`` in the same transaction and the
        committed rows are added to ``entries``."""
        db = self._db(bucket)
        if relaxed:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            out: list[Digest | Exception] = []
            mine: list[Entry] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for m, key in items:
                    try:
                        d = self._insert_message(db, m, key)
                    except NoSuchMailbox as e:  # this one only: its neighbours go on
                        out.append(e)
                        continue
                    out.append(d)
                    if self.journal is not None:
                        name = mailbox_name(m.mailbox)
                        (validity,) = db.execute(
                            "SELECT uidvalidity FROM mailboxes WHERE user=? AND name=?",
                            (m.user, name),
                        ).fetchone()
                        mine.append(
                            Entry(bucket, m.user, name, int(validity), key, d.uid,
                                  " ".join(d.flags), d.internal_date, m.body)
                        )  # fmt: skip
                if self.journal is not None:
                    db.execute(
                        "INSERT INTO journal_mark(id, seq) VALUES (0, ?) "
                        "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq",
                        (seq,),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            entries.extend(mine)
            return out
        finally:
            if relaxed:
                db.execute("PRAGMA synchronous=FULL")

    # --- the journal: sequence, checkpoints, recovery -----------------------

    def _mark(self, bucket: int) -> int:
        """The journal sequence number of the last group committed to ``bucket``."""
        row = self._db(bucket).execute("SELECT seq FROM journal_mark WHERE id=0").fetchone()
        return int(row[0]) if row else 0

    def _ensure_seq(self) -> None:
        """Start the group sequence above every mark and every journal record (once;
        call holding no bucket lock: this takes each in turn)."""
        if self._seq is not None:
            return
        top = 0
        for bucket in self._existing_buckets():
            with self._lock_for(bucket):
                top = max(top, self._mark(bucket))
        if self.journal is not None:
            for _, records in read_records(self.journal.dir):
                top = max([top, *(r.seq for r in records)])
        with self._seq_lock:
            if self._seq is None:
                self._seq = top

    def _next_seq(self) -> int:
        """The next group sequence number (after :meth:`_ensure_seq`)."""
        with self._seq_lock:
            assert self._seq is not None
            self._seq += 1
            return self._seq

    def commit_stats(self) -> dict[str, int]:
        """Counters of the group commits (``/api/status`` ``group_commit``, ``/metrics``):
        groups, messages in them, journal syncs (fdatasync + new-file directory fsync),
        checkpoints."""
        j = self.journal
        return {
            "groups": self.groups,
            "messages": self.grouped_messages,
            "journal_syncs": j.syncs if j is not None else 0,
            "checkpoints": self.checkpoints,
        }

    def checkpoint_due(self) -> bool:
        """Has the journal grown enough (or aged) for a :meth:`checkpoint`?"""
        j = self.journal
        if j is None or j.records == 0:
            return False
        return (
            j.records >= self.checkpoint_records
            or j.size >= self.checkpoint_bytes
            or self.now() - self._last_checkpoint >= self.checkpoint_seconds
        )

    def checkpoint(self) -> int:
        """Make what the journal's closed files cover durable in place (bodies,
        directories, databases: one :attr:`barrier`), then delete those files.
        Returns the records covered.  Off any caller's path; one at a time."""
        if self.journal is None:
            return 0
        with self._checkpoint_lock:
            self._last_checkpoint = self.now()
            closed = self.journal.rotate()
            files: dict[Path, None] = {}
            dirs: dict[Path, None] = {}
            n = 0
            for _, records in [(p, list(decode_all(p.read_bytes()))) for p in closed]:
                for record in records:
                    n += 1
                    for e in record.entries:
                        udir = self.user_path(e.user)
                        if (udir / e.key).exists():
                            files[udir / e.key] = None
                        dirs[udir] = None
                        dirs[udir.parent] = None
                        for suffix in ("", "-wal"):
                            db = self.bucket_path(e.bucket) / ("index.sqlite" + suffix)
                            if db.exists():
                                files[db] = None
            dirs[self.root / "buckets"] = None
            existing = [d for d in dirs if d.is_dir()]
            if closed:
                self.barrier.files(list(files), existing)
                for p in closed:
                    p.unlink(missing_ok=True)
                self.checkpoints += 1
            return n

    def _replay(self) -> int:
        """Redo what a crash lost of the journal's groups (recovery): the rows of a
        bucket whose mark is below a record's sequence number, then every body
        a row names that is missing or not whole.  Returns the rows redone."""
        if self.journal is None:
            return 0
        redone = 0
        for _, records in read_records(self.journal.dir):
            for record in records:
                by_bucket: dict[int, list[Entry]] = {}
                for e in record.entries:
                    by_bucket.setdefault(e.bucket, []).append(e)
                for bucket, entries in by_bucket.items():
                    with self._lock_for(bucket):
                        db = self._db(bucket)
                        if self._mark(bucket) >= record.seq:
                            continue
                        db.execute("BEGIN IMMEDIATE")
                        try:
                            for e in entries:
                                redone += self._redo_row(db, e)
                            db.execute(
                                "INSERT INTO journal_mark(id, seq) VALUES (0, ?) "
                                "ON CONFLICT(id) DO UPDATE SET seq=excluded.seq",
                                (record.seq,),
                            )
                            db.execute("COMMIT")
                        except BaseException:
                            db.execute("ROLLBACK")
                            raise
                for e in record.entries:
                    self._redo_body(e)
        return redone

    def _redo_row(self, db: sqlite3.Connection, e: Entry) -> int:
        if self._same_key(db, e.user, e.mailbox, e.key) is not None:
            return 0
        if not self._has(db, e.user, e.mailbox):
            db.execute(
                "INSERT INTO users(user, last_uidvalidity) VALUES (?, ?) ON CONFLICT(user) "
                "DO UPDATE SET last_uidvalidity=MAX(last_uidvalidity, excluded.last_uidvalidity)",
                (e.user, e.uidvalidity),
            )
            db.execute(
                "INSERT INTO mailboxes(user, name, uidvalidity, uidnext) VALUES (?, ?, ?, 1)",
                (e.user, e.mailbox, e.uidvalidity),
            )
        if e.uid == 0:
            db.execute(
                "INSERT INTO pending(user, mailbox, key, size, flags, internal_date) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (e.user, e.mailbox, e.key, len(e.body), e.flags, e.internal_date),
            )
            self.pending_users.add(e.user)
        else:
            db.execute(
                "INSERT INTO messages(user, mailbox, uid, key, size, flags, internal_date) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.user, e.mailbox, e.uid, e.key, len(e.body), e.flags, e.internal_date),
            )
            db.execute(
                "UPDATE mailboxes SET uidnext=MAX(uidnext, ?) WHERE user=? AND name=?",
                (e.uid + 1, e.user, e.mailbox),
            )
        return 1

    def _redo_body(self, e: Entry) -> None:
        """Rewrite ``e``'s body file if a row names it and it is missing or not whole."""
        bucket = e.bucket
        with self._lock_for(bucket):
            named = (
                self._db(bucket)
                .execute(
                    "SELECT 1 FROM messages WHERE user=? AND key=? "
                    "UNION SELECT 1 FROM pending WHERE user=? AND key=? "
                    "UNION SELECT 1 FROM held WHERE user=? AND key=?",
                    (e.user, e.key, e.user, e.key, e.user, e.key),
                )
                .fetchone()
            )
            path = self.user_path(e.user) / e.key
            if named is None:
                return
            try:
                if path.read_bytes() == e.body:
                    return
            except FileNotFoundError:
                pass
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.tmp / e.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(e.body)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(self.tmp / e.key, path)

    def store_group(self, messages: Sequence[NewMessage]) -> list[Digest | Exception]:
        """Write every body (no fsync each) and :meth:`commit_group` them: the
        whole store of a group in one worker-thread call.  Each message gets its
        Digest or its own error in its place."""
        out: list[Digest | Exception | None] = [None] * len(messages)
        written: list[tuple[int, str]] = []
        try:
            for i, m in enumerate(messages):
                try:
                    written.append((i, self.write_body(m.body, sync=False)))
                except OSError as e:  # e.g. disk full: this message fails, not its group
                    out[i] = e
            results = self.commit_group([(messages[i], key) for i, key in written])
        except BaseException:
            self.discard(key for _, key in written)
            raise
        for (i, _), got in zip(written, results):
            out[i] = got
        return [g if g is not None else RuntimeError("not stored") for g in out]

    def store(self, messages: Sequence[NewMessage]) -> list[Digest]:
        """:meth:`store_group` in this thread; the first error is raised."""
        out: list[Digest] = []
        for got in self.store_group(messages):
            if not isinstance(got, Digest):
                raise got
            out.append(got)
        return out

    def _insert_message(self, db: sqlite3.Connection, m: NewMessage, key: str) -> Digest:
        name = mailbox_name(m.mailbox)
        same = self._same_key(db, m.user, name, key)
        if same is not None:
            # The message is here already (a replicated store applied twice, e.g.
            # by a second coordinator): the same message, never a second index row
            # nor an IntegrityError, whose rollback would unlink the body file the
            # first row names (issue 14).
            return same
        if name == INBOX:
            self._ensure_inbox(db, m.user)
        row = db.execute(
            "SELECT uidnext FROM mailboxes WHERE user=? AND name=?", (m.user, name)
        ).fetchone()
        if row is None:
            raise NoSuchMailbox(f"no mailbox {name}")
        if m.uid == PENDING or (m.fence and not self._fence_admits(m.user, m.fence)):
            return self._insert_pending(db, m, name, key)
        if m.fence and m.uid < row[0]:
            # A fenced allocation below what this mailbox already numbered (a store
            # overtaken by a later one): never a second message under one UID, never
            # a UID below one a client may have seen here: numbered afresh later.
            return self._insert_pending(db, m, name, key)
        uid = max(row[0], m.uid)
        if (
            0 < m.uid < row[0]
            and not db.execute(
                "SELECT 1 FROM messages WHERE user=? AND mailbox=? AND uid=?", (m.user, name, m.uid)
            ).fetchone()
        ):
            # A cluster-allocated UID arriving late (a replica catching up applies a
            # later message first): keep it, so every copy of the message has one UID.
            uid = m.uid
        else:
            db.execute(
                "UPDATE mailboxes SET uidnext=? WHERE user=? AND name=?", (uid + 1, m.user, name)
            )
        flags = " ".join(dict.fromkeys(m.flags))
        date = m.internal_date or self.now()
        db.execute(
            "INSERT INTO messages(user, mailbox, uid, key, size, flags, internal_date) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (m.user, name, uid, key, len(m.body), flags, date),
        )
        return Digest(uid, key, len(m.body), _flags(flags), date, self.node_id)

    def _fence_admits(self, user: str, fence: str) -> bool:
        """A fenced UID may be stored numbered: our map's fence of the user's bucket,
        our lease, and for a timed fence (``owner@epoch/at``) an allocation young
        enough by our synced cluster clock (reconstruct.admit_timed)."""
        base, at = split_fence(fence)
        if self.fences.get(bucket_of(user)) != base or not self.fence_ok():
            return False
        if not admit_timed(at, self.cluster_now() if at is not None else None):
            self.late_allocations += 1
            return False
        return True

    def _same_key(self, db: sqlite3.Connection, user: str, name: str, key: str) -> Digest | None:
        """The digest of ``user``'s message ``key`` in mailbox ``name`` if it is
        stored already (numbered, or unnumbered with UID 0)."""
        row = db.execute(
            "SELECT uid, size, flags, internal_date FROM messages "
            "WHERE user=? AND mailbox=? AND key=? "
            "UNION ALL SELECT 0, size, flags, internal_date FROM pending "
            "WHERE user=? AND key=? LIMIT 1",
            (user, name, key, user, key),
        ).fetchone()
        if row is None:
            return None
        uid, size, flags, date = row
        return Digest(int(uid), key, int(size), _flags(flags), float(date), self.node_id)

    def _insert_pending(self, db: sqlite3.Connection, m: NewMessage, name: str, key: str) -> Digest:
        """Durable but unnumbered (not listed until :meth:`number_pending`); UID 0."""
        flags = " ".join(dict.fromkeys(m.flags))
        date = m.internal_date or self.now()
        db.execute(
            "INSERT INTO pending(user, mailbox, key, size, flags, internal_date) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (m.user, name, key, len(m.body), flags, date),
        )
        self.pending_users.add(m.user)
        return Digest(0, key, len(m.body), _flags(flags), date, self.node_id)

    def pending(self, user: str) -> int:
        """How many of ``user``'s messages here wait for a UID."""
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            (n,) = (
                self._db(bucket)
                .execute("SELECT COUNT(*) FROM pending WHERE user=?", (user,))
                .fetchone()
            )
        return int(n)

    def number_pending(
        self, user: str, fence: str, first: int, count: int
    ) -> tuple[int, list[str], int, int]:
        """Give up to ``count`` of ``user``'s unnumbered messages here the UIDs
        ``first``, ``first + 1``... (oldest first), if ``fence`` is this node's current
        fence of the user's bucket (else nothing: a stale manager).  A UID below a
        mailbox's UIDNEXT here is never used (the caller's counter is behind; the
        last value tells it where to go on).  Returns (messages numbered, mailboxes
        that got some, messages still pending, highest UIDNEXT here)."""
        bucket = bucket_of(user)
        done = 0
        changed: list[str] = []
        with self._lock_for(bucket):
            db = self._db(bucket)
            if fence and self.fences.get(bucket) == fence and count > 0 and self.fence_ok():
                rows = db.execute(
                    "SELECT mailbox, key, size, flags, internal_date FROM pending "
                    "WHERE user=? ORDER BY internal_date, key LIMIT ?",
                    (user, count),
                ).fetchall()
                uid = first
                db.execute("BEGIN IMMEDIATE")
                try:
                    for mailbox, key, size, flags, date in rows:
                        if not self._has(db, user, mailbox):
                            mailbox = INBOX  # its mailbox was deleted meanwhile
                            self._ensure_inbox(db, user)
                        (nxt,) = db.execute(
                            "SELECT uidnext FROM mailboxes WHERE user=? AND name=?",
                            (user, mailbox),
                        ).fetchone()
                        if uid < nxt:
                            break
                        db.execute(
                            "INSERT INTO messages(user, mailbox, uid, key, size, flags, "
                            "internal_date) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (user, mailbox, uid, key, size, flags, date),
                        )
                        db.execute("DELETE FROM pending WHERE user=? AND key=?", (user, key))
                        db.execute(
                            "UPDATE mailboxes SET uidnext=? WHERE user=? AND name=?",
                            (uid + 1, user, mailbox),
                        )
                        uid += 1
                        done += 1
                        if mailbox not in changed:
                            changed.append(mailbox)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            (left,) = db.execute("SELECT COUNT(*) FROM pending WHERE user=?", (user,)).fetchone()
            if not left:
                self.pending_users.discard(user)
            top = max(
                [1]
                + [
                    int(n)
                    for (n,) in db.execute(
                        "SELECT uidnext FROM mailboxes WHERE user=? "
                        "UNION ALL SELECT uidnext FROM shown WHERE user=?",
                        (user, user),
                    )
                ]
            )
        return done, changed, int(left), top

    # --- replica copies waiting for their UID (replication, issue 14) --------------

    def hold(self, m: NewMessage, key: str) -> None:
        """Keep ``tmp/<key>`` (written and fsynced) as a replica's copy of a message
        that waits for the UID its numbering copy gets on another node: durable, never
        listed, never numbered here (two nodes numbering one message would give it two
        UIDs).  A newer hold of the same key replaces its flags."""
        udir = self.user_path(m.user)
        udir.mkdir(parents=True, exist_ok=True)
        os.rename(self.tmp / key, udir / key)
        _fsync_dir(udir)
        bucket = bucket_of(m.user)
        with self._lock_for(bucket):
            self._db(bucket).execute(
                "INSERT OR REPLACE INTO held(user, mailbox, key, size, flags, internal_date) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (m.user, mailbox_name(m.mailbox), key, len(m.body),
                 " ".join(dict.fromkeys(m.flags)), m.internal_date or self.now()),
            )  # fmt: skip

    def is_held(self, user: str, key: str) -> bool:
        """A held copy of ``key`` is here."""
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            row = (
                self._db(bucket)
                .execute("SELECT 1 FROM held WHERE user=? AND key=?", (user, key))
                .fetchone()
            )
        return row is not None

    def unhold(self, user: str, key: str) -> None:
        """Forget the held row of ``key`` (its file stays if a numbered row uses it)."""
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            db = self._db(bucket)
            db.execute("DELETE FROM held WHERE user=? AND key=?", (user, key))
            self._drop_unreferenced(db, user, [key])

    def pending_to_held(self, user: str, key: str) -> bool:
        """This node's unnumbered copy of ``key`` is not the one to number (another
        replica numbers it): move it from ``pending`` to ``held``."""
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            db = self._db(bucket)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO held SELECT user, mailbox, key, size, flags, "
                    "internal_date FROM pending WHERE user=? AND key=?",
                    (user, key),
                )
                cur = db.execute("DELETE FROM pending WHERE user=? AND key=?", (user, key))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return cur.rowcount > 0

    def promote(self, user: str, key: str, uid: int) -> bool:
        """Number this node's unnumbered (pending or held) copy of ``key`` with ``uid``,
        the UID its numbering copy got elsewhere, if that UID is free in its mailbox
        here (False: left as it is)."""
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            db = self._db(bucket)
            row = None
            for table in ("pending", "held"):
                row = db.execute(
                    f"SELECT mailbox, size, flags, internal_date FROM {table} "
                    "WHERE user=? AND key=?",
                    (user, key),
                ).fetchone()
                if row is not None:
                    break
            if row is None or uid <= 0:
                return False
            mailbox, size, flags, date = row
            if not self._has(db, user, mailbox):
                mailbox = INBOX
                self._ensure_inbox(db, user)
            if db.execute(
                "SELECT 1 FROM messages WHERE user=? AND mailbox=? AND uid=?", (user, mailbox, uid)
            ).fetchone():
                return False
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO messages(user, mailbox, uid, key, size, flags, internal_date) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (user, mailbox, uid, key, size, flags, date),
                )
                db.execute("DELETE FROM pending WHERE user=? AND key=?", (user, key))
                db.execute("DELETE FROM held WHERE user=? AND key=?", (user, key))
                db.execute(
                    "UPDATE mailboxes SET uidnext=MAX(uidnext, ?) WHERE user=? AND name=?",
                    (uid + 1, user, mailbox),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return True

    def raise_mark(self, bucket: int, fence: str, mark: int) -> bool:
        """Record (durably) that ``bucket``'s manager with ``fence`` may hand out UIDs
        below ``mark``; False (nothing written) if ``fence`` is not our current fence
        of the bucket or our lease lapsed.  Under the bucket lock, like the hint read:
        a mark either is in our next hint or is refused."""
        with self._lock_for(bucket):
            if self.fences.get(bucket) != fence or not self.fence_ok():
                return False
            with self._marks_lock:
                self.marks_db().execute(
                    "INSERT INTO marks(bucket, mark) VALUES (?, ?) "
                    "ON CONFLICT(bucket) DO UPDATE SET mark=MAX(mark, excluded.mark)",
                    (bucket, int(mark)),
                )
        return True

    def marks_db(self) -> sqlite3.Connection:
        """``mail/uid-marks.sqlite``: one row per bucket (WAL, synchronous=FULL)."""
        with self._marks_lock:
            if self._marks is None:
                db = sqlite3.connect(
                    self.root / "uid-marks.sqlite", check_same_thread=False, isolation_level=None
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS marks "
                    "(bucket INTEGER PRIMARY KEY, mark INTEGER NOT NULL)"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS holders (bucket INTEGER NOT NULL, "
                    "user TEXT NOT NULL, node TEXT NOT NULL, PRIMARY KEY (user, node))"
                )
                self._marks = db
            return self._marks

    def record_holders(self, bucket: int, fence: str, pairs: Sequence[tuple[str, str]]) -> bool:
        """Record (durably) that these (user, node) pairs of ``bucket`` held mail, for
        the manager with ``fence`` (refused like :meth:`raise_mark`)."""
        with self._lock_for(bucket):
            if self.fences.get(bucket) != fence or not self.fence_ok():
                return False
            with self._marks_lock:
                self.marks_db().executemany(
                    "INSERT OR IGNORE INTO holders(bucket, user, node) VALUES (?, ?, ?)",
                    [(bucket, str(u), str(n)) for u, n in pairs if bucket_of(str(u)) == bucket],
                )
        return True

    def bucket_holders(self, bucket: int) -> list[list[str]]:
        """Every (user, node) recorded here as having held mail of ``bucket``."""
        with self._lock_for(bucket), self._marks_lock:
            rows = (
                self.marks_db()
                .execute(
                    "SELECT user, node FROM holders WHERE bucket=? ORDER BY user, node", (bucket,)
                )
                .fetchall()
            )
        return [[u, n] for u, n in rows]

    def bucket_mark(self, bucket: int) -> int:
        """The highest UID mark recorded here for ``bucket`` (1: none)."""
        with self._lock_for(bucket), self._marks_lock:
            row = (
                self.marks_db()
                .execute("SELECT mark FROM marks WHERE bucket=?", (bucket,))
                .fetchone()
            )
        return int(row[0]) if row else 1

    def demote(self, user: str, mailbox: str, uid: int, key: str) -> bool:
        """Take message ``key`` (listed under ``uid``) back to unnumbered: another
        message holds the same UID elsewhere (numbered on two sides of a partition
        before either side noticed); its manager numbers it afresh.  False if it is
        not (or no longer) there under that UID."""
        name = mailbox_name(mailbox)
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            db = self._db(bucket)
            row = db.execute(
                "SELECT size, flags, internal_date FROM messages "
                "WHERE user=? AND mailbox=? AND uid=? AND key=?",
                (user, name, uid, key),
            ).fetchone()
            if row is None:
                return False
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "DELETE FROM messages WHERE user=? AND mailbox=? AND uid=?", (user, name, uid)
                )
                db.execute(
                    "INSERT OR IGNORE INTO pending(user, mailbox, key, size, flags, "
                    "internal_date) VALUES (?, ?, ?, ?, ?, ?)",
                    (user, name, key, *row),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.pending_users.add(user)
        return True

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> dict[str, int]:
        """Record the (UIDVALIDITY, UIDNEXT) this node is about to show per mailbox of
        ``user`` and return, per mailbox, the highest UIDNEXT ever recorded here for
        that UIDVALIDITY (UIDNEXT never goes back, even while a fragment holder is
        out of reach; a re-created mailbox starts again)."""
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            db = self._db(bucket)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO shown(user, mailbox, uidvalidity, uidnext) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(user, mailbox) DO UPDATE SET "
                    "uidnext=CASE WHEN uidvalidity=excluded.uidvalidity "
                    "THEN MAX(uidnext, excluded.uidnext) ELSE excluded.uidnext END, "
                    "uidvalidity=excluded.uidvalidity",
                    [(user, name, v, n) for name, (v, n) in marks.items()],
                )
                rows = db.execute(
                    "SELECT mailbox, uidvalidity, uidnext FROM shown WHERE user=?", (user,)
                ).fetchall()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if self.index is not None:  # under the bucket lock: no other write in between
                self.index.set_shown(user, {m: (int(v), int(n)) for m, v, n in rows})
        out = {m: n for m, _, n in rows}
        return {name: int(out.get(name, n)) for name, (_, n) in marks.items()}

    def digests(self, user: str, mailbox: str) -> list[Digest]:
        """The mailbox's messages by UID."""
        name = mailbox_name(mailbox)
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            if name == INBOX:
                self._ensure_inbox(db, user)
            if not self._has(db, user, name):
                raise NoSuchMailbox(f"no mailbox {name}")
            rows = db.execute(
                "SELECT uid, key, size, flags, internal_date, modseq FROM messages "
                "WHERE user=? AND mailbox=? ORDER BY uid",
                (user, name),
            ).fetchall()
        return [Digest(u, k, s, _flags(f), d, self.node_id, m) for u, k, s, f, d, m in rows]

    def load_user(self, user: str) -> tuple[UserIndex, int]:
        """Everything :meth:`mailboxes` and :meth:`digests` say of ``user`` here, read
        in one go under the bucket lock (INBOX created on first sight), and kept in
        :attr:`index` unless a write to the user's rows raced the read; with a
        mod-sequence bound taken under the same lock (every change not in the entry
        gets a MODSEQ above it)."""
        bucket = bucket_of(user)
        with self._lock_for(bucket):
            db = self._db(bucket)
            self._ensure_inbox(db, user)
            token = self.index.begin_fill(user) if self.index is not None else 0
            try:
                boxes = db.execute(
                    "SELECT name, uidvalidity, uidnext, subscribed, highestmodseq "
                    "FROM mailboxes WHERE user=?",
                    (user,),
                ).fetchall()
                rows = db.execute(
                    "SELECT mailbox, uid, key, size, flags, internal_date, modseq FROM messages "
                    "WHERE user=?",
                    (user,),
                ).fetchall()
                me = self.node_id
                entry = UserIndex.build(
                    boxes,
                    ((b, Digest(u, k, s, _flags(f), d, me, m)) for b, u, k, s, f, d, m in rows),
                )
            except BaseException:
                if self.index is not None:
                    self.index.abandon(user, token)
                raise
            if self.index is not None:
                self.index.install(user, token, entry)
            bound = self.modseqs.bound()
        return entry, bound

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

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> dict[int, bytes]:
        """Read bodies (outside the lock: a body file never changes once committed)."""
        return self.read_bodies(user, self._keys(user, mailbox, uids))

    def _keys(self, user: str, mailbox: str, uids: Iterable[int]) -> dict[int, str]:
        name = mailbox_name(mailbox)
        wanted = sorted(set(uids))
        out: dict[int, str] = {}
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                q = ",".join("?" * len(chunk))
                out.update(
                    db.execute(
                        f"SELECT uid, key FROM messages WHERE user=? AND mailbox=? AND uid IN ({q})",
                        (user, name, *chunk),
                    ).fetchall()
                )
        return out

    def set_flags(
        self,
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> dict[int, tuple[str, ...]]:
        """Replace/add/remove flags, one transaction; the new flags by UID.  A message
        whose flags stay the same keeps its MODSEQ; with ``unchanged_since``
        (CONDSTORE), one whose MODSEQ is above it is left alone and out of the
        answer (as an expunged one is)."""
        name = mailbox_name(mailbox)
        out: dict[int, tuple[str, ...]] = {}
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            db.execute("BEGIN IMMEDIATE")
            try:
                for uid in sorted(set(uids)):
                    row = db.execute(
                        "SELECT flags, modseq FROM messages WHERE user=? AND mailbox=? AND uid=?",
                        (user, name, uid),
                    ).fetchone()
                    if row is None:
                        continue
                    if unchanged_since is not None and row[1] > unchanged_since:
                        continue
                    old = list(_flags(row[0]))
                    if mode == 0:
                        new = list(dict.fromkeys(flags))
                    elif mode > 0:
                        new = list(dict.fromkeys([*old, *flags]))
                    else:
                        gone = {f.lower() for f in flags}
                        new = [f for f in old if f.lower() not in gone]
                    if set(new) != set(old):
                        db.execute(
                            "UPDATE messages SET flags=? WHERE user=? AND mailbox=? AND uid=?",
                            (" ".join(new), user, name, uid),
                        )
                    out[uid] = tuple(new)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return out

    def copy(self, user: str, mailbox: str, uids: Sequence[int], dest: str) -> list[Digest]:
        """Copy rows into ``dest`` (bodies are shared by key, never rewritten)."""
        name, dest = mailbox_name(mailbox), mailbox_name(dest)
        out = []
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            if not self._has(db, user, dest):
                raise NoSuchMailbox(f"no mailbox {dest}")
            db.execute("BEGIN IMMEDIATE")
            try:
                for uid in sorted(set(uids)):
                    row = db.execute(
                        "SELECT key, size, flags, internal_date FROM messages "
                        "WHERE user=? AND mailbox=? AND uid=?",
                        (user, name, uid),
                    ).fetchone()
                    if row is None:
                        continue
                    key, size, flags, date = row
                    (nuid,) = db.execute(
                        "SELECT uidnext FROM mailboxes WHERE user=? AND name=?", (user, dest)
                    ).fetchone()
                    db.execute(
                        "UPDATE mailboxes SET uidnext=? WHERE user=? AND name=?",
                        (nuid + 1, user, dest),
                    )
                    db.execute(
                        "INSERT INTO messages(user, mailbox, uid, key, size, flags, "
                        "internal_date) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (user, dest, nuid, key, size, flags, date),
                    )
                    out.append(Digest(nuid, key, size, _flags(flags), date, self.node_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return out

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> list[int]:
        """Remove rows, then the bodies no row refers to any more."""
        name = mailbox_name(mailbox)
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            keys = self._keys(user, name, uids)
            if not keys:
                return []
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "DELETE FROM messages WHERE user=? AND mailbox=? AND uid=?",
                    [(user, name, uid) for uid in keys],
                )
                _modseq.prune(db, user, name)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._drop_unreferenced(db, user, keys.values())
        return sorted(keys)

    def tombstones(self, user: str, mailbox: str) -> dict[int, int]:
        """``{uid: modseq}`` of the expunges of ``mailbox`` here still remembered
        (:mod:`._modseq`)."""
        name = mailbox_name(mailbox)
        with self._lock_for(bucket_of(user)):
            return _modseq.tombstones(self._db(bucket_of(user)), user, name)

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

    def remove_user(self, user: str) -> None:
        """Forget every mailbox and message of ``user`` here."""
        with self._lock_for(bucket_of(user)):
            db = self._db(bucket_of(user))
            db.execute("BEGIN IMMEDIATE")
            try:
                for table in ("messages", "mailboxes", "users", "pending", "held", "shown"):
                    db.execute(f"DELETE FROM {table} WHERE user=?", (user,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            # under the bucket lock: two removals at once (the admin's and a replicated
            # profile tombstone's) must not trip over each other's files
            udir = self.user_path(user)
            if udir.is_dir():
                for p in udir.iterdir():
                    p.unlink(missing_ok=True)
                try:
                    udir.rmdir()
                except FileNotFoundError:
                    pass

    def users_in_bucket(self, bucket: int) -> list[str]:
        """Users with at least one message here, in one bucket."""
        if not (self.bucket_path(bucket) / "index.sqlite").exists():
            return []
        with self._lock_for(bucket):
            db = self._db(bucket)
            return [
                u
                for (u,) in db.execute(
                    "SELECT user FROM messages UNION SELECT user FROM pending ORDER BY user"
                )
            ]

    def uid_marks(self, bucket: int) -> dict[str, tuple[bool, int, int]]:
        """Per user of ``bucket`` here: (holds messages, numbered or not; the highest
        UIDNEXT of its mailboxes or ever shown by this node; unnumbered messages)."""
        if not (self.bucket_path(bucket) / "index.sqlite").exists():
            return {}
        with self._lock_for(bucket):
            db = self._db(bucket)
            marks: dict[str, int] = {}
            for sql in (
                "SELECT user, MAX(uidnext) FROM mailboxes GROUP BY user",
                "SELECT user, MAX(uidnext) FROM shown GROUP BY user",
            ):
                for u, n in db.execute(sql):
                    marks[u] = max(marks.get(u, 1), int(n))
            with_mail = {u for (u,) in db.execute("SELECT DISTINCT user FROM messages")}
            pending = dict(db.execute("SELECT user, COUNT(*) FROM pending GROUP BY user"))
        return {
            u: (u in with_mail or u in pending, n, int(pending.get(u, 0))) for u, n in marks.items()
        }

    def users_with_mail(self) -> list[str]:
        """Users with at least one message in any bucket here."""
        out: list[str] = []
        for bucket in self._existing_buckets():
            out.extend(self.users_in_bucket(bucket))
        return out


@implementer(ILocalMailboxes)
class MailboxManager:
    """:class:`FragmentStore` off the reactor thread, with group commit for stores.

    Group commit "leader/followers" (PostgreSQL with ``commit_delay=0``): a
    ``store()`` with no group in flight starts one at once (a lone message never
    waits for company); calls arriving while a group is being written queue and
    go out together as the next group, so the group size follows the load.  A
    group is one worker-thread call, :meth:`FragmentStore.store_group`: bodies
    written, two durability barriers (two ``syncfs``, whatever the group's size
    and its number of users and buckets) around one transaction per bucket.
    Each caller's Deferred fires only after the second barrier (its messages are
    durable), or with the first failure among its messages.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        threadpool: ThreadPool,
        store: FragmentStore,
        max_batch: int = 256,
        index: MailIndex | None = None,
        bodies: BodyCache | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = threadpool
        self.fragments = store
        #: The in-memory mailbox index (:mod:`.mailindex`); None or a bound of 0: off.
        self.index = index if index is not None and index.enabled else None
        store.index = self.index
        #: Recently read or stored bodies (:mod:`.bodycache`); None or a bound of 0: off.
        #: Used with the index only (the keys of a fetch come from it).
        on = bodies is not None and bodies.enabled and self.index is not None
        self.bodies = bodies if on else None
        self.node_id = store.node_id
        self.max_batch = max_batch
        self._pending: list[tuple[list[NewMessage], Deferred[list[Digest]]]] = []
        self._writing = False
        self._checkpointing = False
        self._listeners: list[Callable[[str, str], None]] = []

    def _run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def on_change(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(user, mailbox)`` after messages arrive in a mailbox."""
        self._listeners.append(listener)

    def _changed(self, user: str, mailbox: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(user, mailbox)
            except Exception:
                self.log.failure("mailbox change listener failed")

    # --- group commit ------------------------------------------------------

    def store(self, messages: Sequence[NewMessage]) -> Deferred[list[Digest]]:
        """Queue for the next batch; fires once the batch is durable."""
        d: Deferred[list[Digest]] = Deferred()
        self._pending.append((list(messages), d))
        if not self._writing:
            self._write_batch()
        return d

    def _write_batch(self) -> None:
        """Start the next group: everything queued (up to ``max_batch`` messages),
        one worker-thread call (:meth:`FragmentStore.store_group`)."""
        batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]] = []
        n = 0
        while self._pending and (not batch or n + len(self._pending[0][0]) <= self.max_batch):
            item = self._pending.pop(0)
            batch.append(item)
            n += len(item[0])
        self._writing = True
        flat = [(c, m) for c, (msgs, _) in enumerate(batch) for m in msgs]
        d = self._run(self.fragments.store_group, [m for _, m in flat])
        d.addCallback(self._stored, batch, flat)
        d.addErrback(self._broken, batch)

    def _broken(
        self, f: Failure, batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]]
    ) -> None:
        """The group failed as a whole (a rename or the bodies' barrier, or a bug):
        fail its callers (451) rather than hang them all; the next group goes on."""
        self.log.failure("group commit failed", f)
        for _, d in batch:
            if not d.called:
                d.errback(f)
        self._writing = False
        if self._pending:
            self._write_batch()

    def _stored(
        self,
        results: list[Digest | Exception],
        batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]],
        flat: list[tuple[int, NewMessage]],
    ) -> None:
        digests: dict[int, Digest] = {}
        failed: dict[int, Failure | Exception] = {}
        for pos, got in enumerate(results):
            if isinstance(got, Digest):
                digests[pos] = got
            else:
                failed.setdefault(flat[pos][0], got)
        self._finish(batch, flat, digests, failed)

    def _finish(
        self,
        batch: list[tuple[list[NewMessage], Deferred[list[Digest]]]],
        flat: list[tuple[int, NewMessage]],
        digests: dict[int, Digest],
        failed: dict[int, Failure | Exception],
    ) -> None:
        # ``_writing`` stays set while the callers hear: a store they make meanwhile
        # (the next message of a session) joins the next group instead of starting
        # a group of its own beside it; exactly one group is in flight at a time.
        mine: dict[int, list[Digest]] = {}
        for pos, (c, _) in enumerate(flat):
            if pos in digests:
                mine.setdefault(c, []).append(digests[pos])
        changed = dict.fromkeys(
            (flat[pos][1].user, mailbox_name(flat[pos][1].mailbox)) for pos in digests
        )
        if self.bodies is not None:
            # what was just written is what the next read of these keys returns
            for pos, dig in digests.items():
                m = flat[pos][1]
                if dig.node == self.node_id:
                    self.bodies.put(m.user, dig.key, m.body)
        for c, (_, d) in enumerate(batch):
            if c in failed:
                d.errback(Failure(failed[c]) if isinstance(failed[c], Exception) else failed[c])
            else:
                d.callback(mine.get(c, []))
        for user, box in changed:
            self._changed(user, box)
        self._writing = False
        if self._pending:
            self._write_batch()
        self.maybe_checkpoint()

    def maybe_checkpoint(self) -> Deferred[int] | None:
        """Start a journal checkpoint on the pool if one is due and none runs (after
        each group, and periodically from the service for replica-only writes)."""
        if self._checkpointing or not self.fragments.checkpoint_due():
            return None
        self._checkpointing = True

        def done(result: int | Failure) -> int | Failure:
            self._checkpointing = False
            if isinstance(result, Failure):
                self.log.failure("journal checkpoint failed (retried later)", result)
                return 0
            return result

        return self._run(self.fragments.checkpoint).addBoth(done)

    # --- the rest, straight through the pool --------------------------------

    def _user(self, user: str) -> Deferred[UserIndex] | UserIndex:
        """``user``'s index entry: at once when warm, else filled on the pool."""
        assert self.index is not None
        entry = self.index.lookup(user)
        if entry is not None:
            return entry
        return self._run(self.fragments.load_user, user).addCallback(lambda got: got[0])

    def _bounded(self, user: str) -> Deferred[tuple[UserIndex, int]]:
        """``user``'s index entry with a mod-sequence bound taken with it (under the
        clock's lock, which a write holds while it drops the entry): every change not
        in the entry gets a MODSEQ above the bound.  A cold entry is filled first,
        then looked up again the same way (filled anew if a write spoiled it)."""
        assert self.index is not None
        clock = self.fragments.modseqs
        with clock.lock:
            entry = self.index.lookup(user)
            if entry is not None:
                return succeed((entry, clock.bound_locked()))
        return self._run(self.fragments.load_user, user)

    def _tree(self, entry: UserIndex, bound: int) -> list[MailboxInfo]:
        return [attrs.evolve(i, modseq_bound=max(i.highestmodseq, bound)) for i in entry.tree]

    def mailboxes(self, user: str) -> Deferred[list[MailboxInfo]]:
        """See :class:`IMailboxManager` (from the index when it is on)."""
        if self.index is None:
            return self._run(self.fragments.mailboxes, user, True)
        return self._bounded(user).addCallback(lambda got: self._tree(*got))

    def create_mailbox(self, user: str, name: str) -> Deferred[MailboxInfo]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.create_mailbox, user, name)

    def delete_mailbox(self, user: str, name: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.delete_mailbox, user, name)

    def rename_mailbox(self, user: str, old: str, new: str) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.rename_mailbox, user, old, new)

    def subscribe(self, user: str, name: str, subscribed: bool) -> Deferred[None]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.subscribe, user, name, subscribed)

    def digests(self, user: str, mailbox: str) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager` (from the index when it is on)."""
        if self.index is None:
            return self._run(self.fragments.digests, user, mailbox)
        try:
            name = mailbox_name(mailbox)
        except NoSuchMailbox:
            return fail()
        got = self._user(user)
        if isinstance(got, UserIndex):
            return maybeDeferred(_digests_of, got, name)
        return got.addCallback(_digests_of, name)

    def view(
        self, user: str, mailbox: str
    ) -> Deferred[tuple[list[MailboxInfo], list[Digest] | None]]:
        """The user's mailbox tree here and ``mailbox``'s messages (None: no such mailbox
        here) in one call: what a SELECT, STATUS or POP3 login asks each fragment node
        (one RPC per remote node instead of two).  From memory when the index is warm."""
        try:
            name = mailbox_name(mailbox)
        except NoSuchMailbox:
            return fail()
        if self.index is None:
            return self._run(self._view_blocking, user, name)

        def view(got: tuple[UserIndex, int]) -> tuple[list[MailboxInfo], list[Digest] | None]:
            entry, bound = got
            return self._tree(entry, bound), _view_of(entry, name)[1]

        return self._bounded(user).addCallback(view)

    def _view_blocking(self, user: str, name: str) -> tuple[list[MailboxInfo], list[Digest] | None]:
        # the tree (and its bound) before the digests: a change between the two reads
        # is listed with a MODSEQ above the bound, never hidden below it
        tree = self.fragments.mailboxes(user, True)
        try:
            return tree, self.fragments.digests(user, name)
        except NoSuchMailbox:
            return tree, None

    def fetch(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[dict[int, bytes]]:
        """See :class:`IMailboxManager`.  With the user's index warm, the body keys
        come from memory, bodies in the body cache (:mod:`.bodycache`) are answered
        at once, and the pool reads the other files, all in one job (then cached)."""
        entry = self.index.lookup(user) if self.index is not None else None
        if entry is None:
            return self._run(self.fragments.fetch, user, mailbox, list(uids))
        try:
            name = mailbox_name(mailbox)
        except NoSuchMailbox:
            return fail()
        box = entry.boxes.get(name, ())
        wanted = set(uids)
        keys = {d.uid: d.key for d in box if d.uid in wanted}
        if not keys:
            return succeed({})
        cache = self.bodies
        if cache is None:
            return self._run(self.fragments.read_bodies, user, keys)
        found: dict[int, bytes] = {}
        missing: dict[int, str] = {}
        for uid, key in keys.items():
            body = cache.get(user, key)
            if body is None:
                missing[uid] = key
            else:
                found[uid] = body
        if not missing:
            return succeed(found)
        generation = cache.generation(user)

        def keep(read: dict[int, bytes]) -> dict[int, bytes]:
            for uid, body in read.items():
                cache.put(user, missing[uid], body, generation)
            found.update(read)
            return found

        return self._run(self.fragments.read_bodies, user, missing).addCallback(keep)

    def set_flags(
        self,
        user: str,
        mailbox: str,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: int,
        unchanged_since: int | None = None,
    ) -> Deferred[dict[int, tuple[str, ...]]]:
        """See :class:`IMailboxManager`."""
        return self._run(
            self.fragments.set_flags, user, mailbox, list(uids), list(flags), mode, unchanged_since
        )

    def tombstones(self, user: str, mailbox: str) -> Deferred[dict[int, int]]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.tombstones, user, mailbox)

    def copy(
        self, user: str, mailbox: str, uids: Sequence[int], dest: str
    ) -> Deferred[list[Digest]]:
        """See :class:`IMailboxManager`."""
        d = self._run(self.fragments.copy, user, mailbox, list(uids), dest)

        def notify(digests: list[Digest]) -> list[Digest]:
            if digests:
                self._changed(user, mailbox_name(dest))
            return digests

        return d.addCallback(notify)

    def delete(self, user: str, mailbox: str, uids: Sequence[int]) -> Deferred[list[int]]:
        """See :class:`IMailboxManager` (the user's cached bodies are dropped)."""
        self._forget_bodies(user)
        d = self._run(self.fragments.delete, user, mailbox, list(uids))
        return d.addBoth(self._forget_bodies_then, user)

    def remove_user(self, user: str) -> Deferred[None]:
        """See :class:`IMailboxManager` (the user's cached bodies are dropped)."""
        self._forget_bodies(user)
        d = self._run(self.fragments.remove_user, user)
        return d.addBoth(self._forget_bodies_then, user)

    def _forget_bodies(self, user: str) -> None:
        if self.bodies is not None:
            self.bodies.forget_user(user)

    def _forget_bodies_then(self, result: _R, user: str) -> _R:
        """Drop them again once the files are gone: a read that began in between
        is not kept (:meth:`BodyCache.put`'s generation)."""
        self._forget_bodies(user)
        return result

    def users_in_bucket(self, bucket: int) -> Deferred[list[str]]:
        """See :class:`IMailboxManager`."""
        return self._run(self.fragments.users_in_bucket, bucket)

    def number_pending(
        self, user: str, fence: str, first: int, count: int
    ) -> Deferred[tuple[int, int, int]]:
        """:meth:`FragmentStore.number_pending` off the reactor; IMAP sessions are told.
        Fires with (messages numbered, still pending, highest UIDNEXT here)."""
        d = self._run(self.fragments.number_pending, user, fence, first, count)

        def notify(r: tuple[int, list[str], int, int]) -> tuple[int, int, int]:
            done, changed, left, top = r
            for box in changed:
                self._changed(user, box)
            return done, left, top

        return d.addCallback(notify)

    def demote(self, user: str, mailbox: str, uid: int, key: str) -> Deferred[bool]:
        """See :meth:`FragmentStore.demote`."""
        return self._run(self.fragments.demote, user, mailbox, uid, key)

    def shown(self, user: str, marks: dict[str, tuple[int, int]]) -> Deferred[dict[str, int]]:
        """See :meth:`FragmentStore.shown`.  When every mark is already durable here (same
        UIDVALIDITY, UIDNEXT recorded at least as high), the answer comes from memory:
        no pool trip, no write, no fsync."""
        if self.index is not None:
            known = self.index.shown_of(user)
            if known is not None:
                out = {}
                for name, (validity, uidnext) in marks.items():
                    have = known.get(name)
                    if have is None or have[0] != validity or have[1] < uidnext:
                        break
                    out[name] = have[1]
                else:
                    self.index.shown_skipped += 1
                    return succeed(out)
        return self._run(self.fragments.shown, user, dict(marks))


def _digests_of(entry: UserIndex, name: str) -> list[Digest]:
    """``name``'s messages from ``entry`` (``NoSuchMailbox`` if it has no such mailbox)."""
    box = entry.boxes.get(name)
    if box is None:
        raise NoSuchMailbox(f"no mailbox {name}")
    return list(box)


def _view_of(entry: UserIndex, name: str) -> tuple[list[MailboxInfo], list[Digest] | None]:
    box = entry.boxes.get(name)
    return list(entry.tree), None if box is None else list(box)
