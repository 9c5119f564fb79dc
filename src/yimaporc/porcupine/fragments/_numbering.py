"""UID fencing of a :class:`~.FragmentStore`: how a message gets its UID here.

A cluster-allocated UID is stored numbered only under this node's current fence of
the user's bucket (and its lease, and for a timed fence an allocation young
enough); else the message is stored *pending* (durable, unnumbered, UID 0) until
its manager numbers it (:meth:`Numbering.number_pending`).  A replica's copy
waiting for the UID its numbering copy gets elsewhere is *held*
(:meth:`Numbering.hold`, :meth:`Numbering.promote`).  The managers' UID marks and
holder records live in ``mail/uid-marks.sqlite``.  Blocking: call from a worker
thread."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .._sqlite import rollback
from ..reconstruct import admit_timed, split_fence
from ..usermap import bucket_of
from ..values import (
    INBOX,
    PENDING,
    Digest,
    NewMessage,
    NoSuchMailbox,
)
from ._buckets import _flags, _fsync_dir, mailbox_name
from ._mailboxes import MailboxRows


class Numbering(MailboxRows):
    """Fenced, pending and held messages; UID marks (thread-safe)."""

    def __init__(self, data_dir: Path, node_id: str, now: Callable[[], float]) -> None:
        super().__init__(data_dir, node_id, now)
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

    def set_fences(self, fences: dict[int, str]) -> None:
        """Adopt the fences of a newly installed user map (call before reading hints)."""
        self.fences = dict(fences)

    def close(self) -> None:
        """Close every index database and the marks database."""
        super().close()
        with self._marks_lock:
            if self._marks is not None:
                self._marks.close()
                self._marks = None

    # --- admission: numbered or pending ----------------------------------------

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
        taken = (
            0 < m.uid < row[0]
            and db.execute(
                "SELECT 1 FROM messages WHERE user=? AND mailbox=? AND uid=?", (m.user, name, m.uid)
            ).fetchone()
        )
        if m.fence and taken:
            # Never two messages under one UID: numbered afresh later.
            return self._insert_pending(db, m, name, key)
        uid = max(row[0], m.uid)
        if 0 < m.uid < row[0] and not taken:
            # A cluster-allocated UID arriving late: a fenced store overtaken by a
            # later one (concurrent deliveries; its allocation is young, so the
            # manager's visibility horizon still holds every reader below it), or a
            # replica catching up that applied a later message first. It keeps its
            # UID, so every copy of the message has one UID.
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
                    rollback(db)
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
                rollback(db)
                raise
            self.pending_users.add(user)
        return True

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
                rollback(db)
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
                rollback(db)
                raise
        return True

    # --- the managers' UID marks and holder records ---------------------------------

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
