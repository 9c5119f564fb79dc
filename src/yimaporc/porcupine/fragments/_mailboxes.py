"""Mailboxes and numbered messages of a :class:`~.FragmentStore`: the IMAP
operations on one user's rows (LIST, CREATE, DELETE, RENAME, SUBSCRIBE, listings,
flags, COPY, EXPUNGE), the one-read fill of the in-memory index, and the UIDNEXT
this node showed.  Blocking: call from a worker thread."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .. import _modseq
from .._sqlite import rollback
from ..mailindex import UserIndex
from ..usermap import bucket_of
from ..values import (
    DELIMITER,
    INBOX,
    Digest,
    MailboxExists,
    MailboxHasChildren,
    MailboxInfo,
    NoSuchMailbox,
)
from ._buckets import BucketFiles, _flags, mailbox_name


class MailboxRows(BucketFiles):
    """What a client sees of one user's mailboxes here (thread-safe)."""

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
                rollback(db)
                raise
        return info

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
                raise MailboxHasChildren(
                    f"mailbox {name} has mailboxes below it, delete them first"
                )
            keys = [k for (k,) in db.execute(
                "SELECT key FROM messages WHERE user=? AND mailbox=?", (user, name))]  # fmt: skip
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM messages WHERE user=? AND mailbox=?", (user, name))
                db.execute("DELETE FROM mailboxes WHERE user=? AND name=?", (user, name))
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
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
                rollback(db)
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
                rollback(db)
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
                rollback(db)
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
                rollback(db)
                raise
            self._drop_unreferenced(db, user, keys.values())
        return sorted(keys)

    def tombstones(self, user: str, mailbox: str) -> dict[int, int]:
        """``{uid: modseq}`` of the expunges of ``mailbox`` here still remembered
        (:mod:`.._modseq`)."""
        name = mailbox_name(mailbox)
        with self._lock_for(bucket_of(user)):
            return _modseq.tombstones(self._db(bucket_of(user)), user, name)

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
                rollback(db)
                raise
            if self.index is not None:  # under the bucket lock: no other write in between
                self.index.set_shown(user, {m: (int(v), int(n)) for m, v, n in rows})
        out = {m: n for m, _, n in rows}
        return {name: int(out.get(name, n)) for name, (_, n) in marks.items()}

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
                rollback(db)
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

    def users_with_mail(self) -> list[str]:
        """Users with at least one message in any bucket here."""
        out: list[str] = []
        for bucket in self._existing_buckets():
            out.extend(self.users_in_bucket(bucket))
        return out
